"""GEMV launch-shape sweep (fp16, tensor-core kernels): the launcher's own choice and fixed (pieces a warp,
chunks a batch, blocks resident a SM: the launch bounds and what the K split fills) x layout x rows, in GB/s
of weights, against cupy.matmul (cuBLAS) and a plain read of the same bytes (the floor at that size) in the
same process. Every variant's result is checked against cuBLAS's first."""

import os
import sys

import cupy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import card_name, copy_bandwidth_gbs, read_floor_us, spin_up, time_us  # noqa: E402
from cupy_transformer.ops.gemv import GEMV_KERNELS, GEMV_TC_KN, GEMV_TC_NK, gemv, tc_kernel_name  # noqa: E402

SHAPES = [(1600, 6400), (6400, 1600), (1600, 1600), (4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]
# (pieces, chunks, blocks a SM: the launch bounds and what the K split fills); "launcher": its own choices.
VARIANTS = {
    False: ["launcher", (1, 2, 2), (1, 6, 2), (2, 2, 2), (2, 4, 2), (1, 4, 1)],  # [in, out]: chunk pairs
    True: ["launcher", (2, 1, 2), (2, 1, 3), (1, 2, 2), (1, 1, 2), (1, 4, 2), (1, 2, 1), (1, 4, 1)],
}


def _kernel_names():
    geometries = {(tr, v) for tr in (False, True) for v in VARIANTS[tr] if v != "launcher"}
    geometries |= {(False, g) for g in GEMV_TC_KN} | {(True, g) for g in GEMV_TC_NK.values()}
    return sorted(tc_kernel_name("__half", tr, geo) for tr, geo in geometries)


def main():
    spin_up()
    copy = copy_bandwidth_gbs()
    family = GEMV_KERNELS.extended(_kernel_names())  # the launcher's kernels and every variant's
    print(
        f"{card_name()}: copy {copy:.0f} GB/s; GB/s of weights; columns: launcher, then pieces/chunks/blocks "
        "a SM; read floor and cuBLAS last"
    )
    for tr in (False, True):
        print(
            f"{'[out,in]' if tr else '[in,out]'}: "
            + " | ".join(v if v == "launcher" else "/".join(map(str, v)) for v in VARIANTS[tr])
        )
    worst = 0.0
    for k, n in SHAPES:
        for transposed in (False, True):
            w = cupy.random.standard_normal((n, k) if transposed else (k, n), dtype=cupy.float32).astype(cupy.float16)
            floor = w.nbytes / read_floor_us(w) / 1e3
            for rows in (1, 8):
                x = cupy.random.standard_normal((rows, k), dtype=cupy.float32).astype(cupy.float16)
                ref = cupy.matmul(x.astype(cupy.float32), (w.T if transposed else w).astype(cupy.float32))
                scale = float(cupy.abs(ref).max())
                cells = []
                for variant in VARIANTS[transposed]:
                    geometry = None if variant == "launcher" else variant
                    y = gemv(x, w, transposed, geometry=geometry, family=family)
                    worst = max(worst, float(cupy.abs(y.astype(cupy.float32) - ref).max()) / scale)
                    us = time_us(lambda: gemv(x, w, transposed, geometry=geometry, family=family), [()], reps=30)
                    cells.append(f"{w.nbytes / us / 1e3:.0f}")
                us = time_us(lambda: cupy.matmul(x, w.T if transposed else w), [()], reps=30)
                cells += [f"{floor:.0f}", f"{w.nbytes / us / 1e3:.0f}"]
                print(
                    f"| {k}x{n} | {'[out,in]' if transposed else '[in,out]'} | {rows} | " + " | ".join(cells) + " |",
                    flush=True,
                )
    print(f"largest error vs cuBLAS (fp32 product of the same fp16 operands), relative to max |y|: {worst:.2e}")


if __name__ == "__main__":
    main()
