"""GEMV launch-shape sweep: blocks per SM (through the K split) x layout x rows, against cupy.matmul."""

import os
import sys

import cupy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import copy_bandwidth_gbs, spin_up, time_us  # noqa: E402
import cupy_transformer.ops.matmul as mm  # noqa: E402


def main():
    spin_up()
    copy = copy_bandwidth_gbs()
    print(f"copy {copy:.0f} GB/s; GB/s of weights (cuBLAS in the last column)")
    print("| K x N | layout | rows | " + " | ".join(f"{b}/SM" for b in (1, 2, 4, 8, 16)) + " | cuBLAS |")
    for k, n in [(1600, 6400), (4096, 4096), (4096, 11008), (8192, 8192)]:
        for transposed in (False, True):
            w = cupy.random.standard_normal((n, k) if transposed else (k, n), dtype=cupy.float32).astype(cupy.float16)
            for rows in (1, 8):
                x = cupy.random.standard_normal((rows, k), dtype=cupy.float32).astype(cupy.float16)
                cells = []
                for b in (1, 2, 4, 8, 16):
                    mm.GEMV_BLOCKS_PER_SM = {False: b, True: b}
                    us = time_us(lambda: mm.gemv(x, w, transposed), [()])
                    cells.append(f"{w.nbytes / us / 1e3:.0f}")
                us = time_us(lambda: cupy.matmul(x, w.T if transposed else w), [()])
                cells.append(f"{w.nbytes / us / 1e3:.0f}")
                print(f"| {k}x{n} | {'[out,in]' if transposed else '[in,out]'} | {rows} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
