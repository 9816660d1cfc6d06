"""Where a captured decode step's time goes: the step as it runs, with plain launches instead of programmatic ones and
with the unfused kernels (alternating, in one process), then the kernels of ``generation.Decoder``'s CUDA graph,
from CUPTI (through torch.profiler), by place in a layer, with plain launches (each kernel's own time) and with
programmatic ones (overlapping).

    python3 benchmarks/profile_decode.py [shape] [batch]     # default gpt2-small 1
"""

from __future__ import annotations

import collections
import os
import re
import statistics
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import torch  # noqa: E402

from cupy_transformer import bench  # noqa: E402
from cupy_transformer.generation import Decoder  # noqa: E402


def main(shape: str = "gpt2-small", batch: int = 1, steps: int = 20) -> None:
    model = bench.random_model(shape)
    # The step as it runs (programmatic launches, fused kernels) against plain launches (runtime/programmatic.py) and
    # against the unfused kernels (ops.fused_decode), alternating, best of each.
    arms = {"now": (True, True), "plain launches": (False, True), "unfused": (True, False)}
    runs = {arm: [] for arm in arms}
    for _ in range(3):
        for arm, (programmatic, fused) in arms.items():
            runs[arm].append(
                bench.time_generation(model, batch, 128, 64, repeats=1, programmatic=programmatic, fused=fused)
            )
    best = {arm: min(rs, key=lambda r: r["decode_ms"]) for arm, rs in runs.items()}
    now = best["now"]
    # Plain launches run the same kernels: the same tokens. Unfused kernels round the residual adds apart: tokens
    # may part where two logits are within a rounding (how many lead alike is shown).
    same = all((r["tokens"] == now["tokens"]).all() for arm in ("now", "plain launches") for r in runs[arm])
    agree = bench.agreement(best["unfused"]["tokens"][:, 0], now["tokens"][:, 0])
    others = "; ".join(
        f"{arm} {best[arm]['decode_ms'] * 1e3:.1f} µs ({best[arm]['decode_ms'] / now['decode_ms']:.3f}x)"
        for arm in ("plain launches", "unfused")
    )
    print(
        f"{shape}, batch {batch}: step {now['decode_ms'] * 1e3:.1f} µs; {others}; same tokens with plain launches: "
        f"{same}; unfused tokens agree {agree}"
    )
    for programmatic in (False, True):
        kernel_table(model, batch, steps, programmatic)


def kernel_table(model, batch: int, steps: int, programmatic: bool) -> None:
    """The captured step's kernels from CUPTI, by place: each place of a layer over the layers, then the step's own
    (embedding, LM head, sampler, advance), median µs a kernel. With plain launches a kernel's time is its own; with
    programmatic ones it includes its wait for the kernel before (they overlap)."""
    decoder = Decoder(model, batch, 128 + 8 + steps, programmatic=programmatic)
    decoder.prefill([list(range(1, 129))] * batch)
    for step in range(1, 4):  # eager, captured, replayed
        decoder.step()
        decoder.read(step)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for step in range(4, 4 + steps):
            decoder.step()
            decoder.read(step)
    events = [
        e for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA and not e.name.startswith("Memcpy")
    ]
    events.sort(key=lambda e: e.time_range.start)
    n = len(events) // steps
    per_layer = (n - 4) // model.layers_count  # the step's own: embedding, LM head, sampler, advance
    places = collections.defaultdict(list)
    spans = []
    for step in range(steps):
        kernels = events[step * n : (step + 1) * n]
        spans.append(kernels[-1].time_range.end - kernels[0].time_range.start)
        for i, e in enumerate(kernels):
            in_layer = 1 <= i < 1 + per_layer * model.layers_count
            place = f"layer, {(i - 1) % per_layer + 1} of {per_layer}" if in_layer else f"step, {i}"
            name = re.sub(r"<.*", "", e.name).replace("void ", "").replace("ct::", "")
            places[place, name].append(e.time_range.end - e.time_range.start)
    how = "programmatic (overlapping)" if programmatic else "plain"
    print(f"\n{how} launches: {n} kernels a step, span {statistics.median(spans):.1f} µs (median)")
    print("| place | kernel | a step | µs each (median) | µs a step |\n|---|---|---|---|---|")
    for (place, name), times in places.items():
        count = len(times) // steps
        print(f"| {place} | {name[:40]} | {count} | {statistics.median(times):.2f} | {sum(times) / steps:.1f} |")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["gpt2-small"]), *[int(a) for a in sys.argv[2:3]])
