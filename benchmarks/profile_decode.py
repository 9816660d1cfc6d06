"""Where a captured decode step's time goes: the step as it runs, with plain launches instead of programmatic ones and
with the unfused kernels (alternating, in one process), then the kernels of ``generation.Decoder``'s CUDA graph,
from CUPTI (through torch.profiler), grouped by kernel, with their count and GPU time per step, against the step's
time.

    python3 benchmarks/profile_decode.py [shape] [batch]     # default gpt2-small 1
"""

from __future__ import annotations

import collections
import os
import re
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
    decoder = Decoder(model, batch, 128 + 8 + steps)
    decoder.prefill([list(range(1, 129))] * batch)
    for step in range(1, 4):  # eager, captured, replayed
        decoder.step()
        decoder.read(step)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CUDA]) as prof:
        for step in range(4, 4 + steps):
            decoder.step()
            decoder.read(step)
    kernels = collections.defaultdict(lambda: [0, 0.0])
    for event in prof.events():
        if event.device_type == torch.autograd.DeviceType.CUDA:
            name = re.sub(r"<.*", "", event.name).replace("ct::", "")
            kernels[name][0] += 1
            kernels[name][1] += getattr(event, "device_time_total", None) or event.cuda_time
    total = sum(t for _, t in kernels.values()) / steps
    count = sum(c for c, _ in kernels.values()) / steps
    print(f"programmatic step's kernels: {count:.0f} a step, their GPU time {total:.1f} µs a step (overlapping)")
    print("| kernel | a step | µs a step | µs each |\n|---|---|---|---|")
    for name, (count, t) in sorted(kernels.items(), key=lambda kv: -kv[1][1]):
        print(f"| {name[:60]} | {count / steps:.0f} | {t / steps:.1f} | {t / count:.2f} |")


if __name__ == "__main__":
    main(*(sys.argv[1:2] or ["gpt2-small"]), *[int(a) for a in sys.argv[2:3]])
