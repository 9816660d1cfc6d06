import sys, cupy
sys.path.insert(0, '.')
from benchmarks.common import time_us, spin_up
import cupy_transformer.ops.matmul as mm
spin_up(0.5)
label = sys.argv[1]
out = []
for k, n in [(1600, 6400), (6400, 1600), (8192, 8192)]:
    for tr in (False, True):
        w = cupy.random.standard_normal((n, k) if tr else (k, n), dtype=cupy.float32).astype(cupy.float16)
        for rows in (1, 8):
            x = cupy.random.standard_normal((rows, k), dtype=cupy.float32).astype(cupy.float16)
            cells = []
            for bps in (2, 1, 3):
                mm.GEMV_BLOCKS_PER_SM[2, tr] = bps
                us = time_us(lambda: mm.gemv(x, w, tr), [()], reps=30)
                cells.append(f"{w.nbytes / us / 1e3:.0f}")
            out.append(f"| {label} | {k}x{n} | {'nk' if tr else 'kn'} | {rows} | " + " | ".join(cells) + " |")
            print(out[-1], flush=True)
