"""Kernels to look at under Nsight Compute: the GEMV and cuBLAS on the same decode products.

ncu --clock-control none --profile-from-start off --section SpeedOfLight --section Occupancy \
    --section WarpStateStats --section LaunchStats python3 benchmarks/profile_gemv.py
"""

import os
import sys

import cupy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from cupy_transformer.ops.gemv import gemv  # noqa: E402

CASES = [
    (1600, 6400, False, 1),
    (1600, 6400, False, 8),
    (1600, 6400, True, 1),
    (1600, 6400, True, 8),
    (8192, 8192, False, 8),
    (8192, 8192, True, 8),
]


def main():
    runs = []
    for k, n, transposed, rows in CASES:
        w = cupy.random.standard_normal((n, k) if transposed else (k, n), dtype=cupy.float32).astype(cupy.float16)
        x = cupy.random.standard_normal((rows, k), dtype=cupy.float32).astype(cupy.float16)
        for _ in range(3):  # compile, plan and warm outside the profiled range
            gemv(x, w, transposed)
            cupy.matmul(x, w.T if transposed else w)
        runs.append((x, w, transposed))
    cupy.cuda.Device().synchronize()
    cupy.cuda.profiler.start()
    for x, w, transposed in runs:
        gemv(x, w, transposed)
        cupy.matmul(x, w.T if transposed else w)
    cupy.cuda.Device().synchronize()
    cupy.cuda.profiler.stop()


if __name__ == "__main__":
    main()
