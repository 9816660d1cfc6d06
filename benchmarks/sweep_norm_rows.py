"""The norm at decode sizes (a few rows): µs a launch in a CUDA graph for each register-held variant, one warp a
row or one block a row at 1, 2 or 4 vectors a thread. LayerNorm with the pre-add that a decode step runs
(``round(x + residual + bias)`` normalised and written out). Each launch follows a 64 MiB copy (a step's weights
evict the norm's vectors from L2); the copies alone are timed too and taken off.

    python3 benchmarks/sweep_norm_rows.py
"""

from __future__ import annotations

import math
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy  # noqa: E402
import numpy  # noqa: E402

from benchmarks.common import card_name, graph_node_us, l2_flush_in_graphs  # noqa: E402
from cupy_transformer.ops.norm import NORM_KERNELS, kernel_name, launch_config  # noqa: E402


def main() -> None:
    print(card_name())
    flush, flush_us = l2_flush_in_graphs()
    dtype = numpy.dtype(numpy.float16)
    print("| rows x width | launcher's | warp a row | block, 1 a thread | block, 2 | block, 4 |")
    print("|---|---|---|---|---|---|")
    for rows in (1, 16):
        for width in (768, 1600, 2048, 4096):

            def rand(*shape):
                return cupy.random.standard_normal(shape, dtype=cupy.float32).astype(dtype)

            x, r, y, z = (rand(rows, width) for _ in range(4))
            g, b = rand(width), rand(width)
            slots = width // 8
            chosen, _, _, _ = launch_config(rows, width, dtype, {"x": x.data.ptr, "y": y.data.ptr}, {"g": g.data.ptr})
            variants = {"launcher's": None}
            if slots <= 128:
                vpt = next(v for v in (1, 2, 4) if slots <= 32 * v)
                variants["warp"] = (kernel_name(dtype, 8, vpt, True, True), (math.ceil(rows / 4),), (32, 4))
            else:
                variants["warp"] = None
            for vpt in (1, 2, 4):
                threads = 32 * math.ceil(math.ceil(slots / vpt) / 32)
                fits = threads <= 1024 and kernel_name(dtype, 8, vpt, False, True) in NORM_KERNELS.name_expressions
                variants[vpt] = (kernel_name(dtype, 8, vpt, False, True), (rows,), (threads,)) if fits else None
            cells = []
            for key, v in variants.items():
                if key == "launcher's":
                    v = next(w for w in variants.values() if w is not None and w[0] == chosen)
                if v is None:
                    cells.append("–")
                    continue
                kernel, grid, block = v

                def body(kernel=kernel, grid=grid, block=block):
                    flush()
                    NORM_KERNELS.launch(kernel, grid, block, x=x, residual=r, add_bias=b, gamma=g, beta=b, y=y,
                                        sum=z, rows=rows, width=width, eps=1e-5, mode=0, pre_add=7,
                                        params_aligned=1)  # fmt: skip

                cells.append(f"{graph_node_us(lambda i, body=body: body(), 30) - flush_us:.2f}")
            print(f"| {rows} x {width} | " + " | ".join(cells) + " |")


if __name__ == "__main__":
    main()
