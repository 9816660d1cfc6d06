"""Geometry sweep of the prefill attention kernel (kernels_cu/prefill_attention.cu): row tiles per warp x
keys per tile, per head size, on the issue's sizes (causal and not), against torch's flash backend in the
same process. Prints TFLOP/s per geometry and the relative difference from SDPA (each variant's check);
the launcher's choice is prefill_attention.PREFILL_GEOMETRY."""

from __future__ import annotations

import os
import sys

import cupy
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import card_name, spin_up, time_us  # noqa: E402
from cupy_transformer.ops.prefill_attention import KERNELS, prefill_attention, prefill_kernel_name  # noqa: E402

SIZES = {64: (8, 16, 2048), 128: (4, 32, 4096)}  # head size: B, H, S
GEOMETRIES = {64: [(1, 64), (1, 128), (2, 32), (2, 64)], 128: [(1, 32), (1, 64), (2, 32)]}


def main():
    spin_up()
    family = KERNELS.extended([prefill_kernel_name("__half", d, g) for d in GEOMETRIES for g in GEOMETRIES[d]])
    print(card_name())
    for d, (b, h, s) in SIZES.items():
        q, k, v = (cupy.random.standard_normal((b, h, s, d), dtype=cupy.float32).astype(cupy.float16) for _ in "qkv")
        tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
        start = cupy.zeros(b, cupy.int32)
        for causal in (True, False):
            flops = 4 * b * h * s * s * d / (2 if causal else 1)
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                ref = F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal)
                flash = time_us(lambda: F.scaled_dot_product_attention(tq, tk, tv, is_causal=causal), [()], reps=20)
            ref = cupy.asarray(ref.transpose(1, 2)).astype(cupy.float32)
            row = [f"D{d} B{b} H{h} S{s} causal={causal}: flash {flops / flash / 1e6:.0f}"]
            for g in GEOMETRIES[d]:

                def run():
                    return prefill_attention(q, k, v, start, None, None, d**-0.5, causal, 0, geometry=g, family=family)

                got = run().reshape(b, s, h, d).astype(cupy.float32)
                err = float(cupy.linalg.norm(got - ref) / cupy.linalg.norm(ref))
                us = time_us(run, [()], reps=20)
                row.append(f"{g}: {flops / us / 1e6:.0f} ({err:.0e})")
            print(" | ".join(row), flush=True)


if __name__ == "__main__":
    main()
