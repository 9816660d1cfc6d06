"""Where a captured decode step's time goes: the step with programmatic launches and without (alternating, in one
process), then the kernels of ``generation.Decoder``'s CUDA graph, from CUPTI (through torch.profiler), grouped by
kernel, with their count and GPU time per step, against the step's time.

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
    # Programmatic launches (runtime/programmatic.py) against plain ones, alternating, best of each.
    runs = {True: [], False: []}
    for _ in range(3):
        for programmatic in runs:
            runs[programmatic].append(
                bench.time_generation(model, batch, 128, 64, repeats=1, programmatic=programmatic)
            )
    timing, plain = (min(runs[p], key=lambda r: r["decode_ms"]) for p in (True, False))
    same = all((r["tokens"] == timing["tokens"]).all() for rs in runs.values() for r in rs)
    print(
        f"{shape}, batch {batch}: step {timing['decode_ms'] * 1e3:.1f} µs programmatic, "
        f"{plain['decode_ms'] * 1e3:.1f} µs plain ({plain['decode_ms'] / timing['decode_ms']:.3f}x); "
        f"same tokens: {same}"
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
