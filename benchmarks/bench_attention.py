"""Decode attention (one query token per sequence over a KV cache) against torch's scaled_dot_product_attention
in one process: our kernel (kernels_cu/decode_attention.cu, through SoftmaxContextOp's launcher) and SDPA with
its default backend choice and with the flash backend forced, on the issue's sizes (context 4096, 32 heads
of 128, batch 1 and 16; and grouped-query 32/8). GB/s of K + V read against the measured copy bandwidth.
Writes the table under benchmarks/results/ (or $OUT)."""

from __future__ import annotations

import os
import sys

import cupy
import numpy
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import copy_bandwidth_gbs, header, spin_up, time_us, write_table  # noqa: E402
from cupy_transformer.kv_cache import KVCache  # noqa: E402
from cupy_transformer.ops.softmax_context import _decode  # noqa: E402

CASES = [(1, 32, 32, 4096), (16, 32, 32, 4096), (1, 32, 8, 4096), (16, 32, 8, 4096), (1, 32, 32, 16384)]
D = 128


def main():
    spin_up()
    copy = copy_bandwidth_gbs()
    lines = [
        header("Decode attention vs torch SDPA (fp16)"),
        f"Copy {copy:.0f} GB/s (1 GiB memcpy, read + written). One query token per sequence, keys and values in a "
        "KV cache (ours: [B, kv, T, d] with room for more tokens; SDPA: contiguous [B, kv, T, d] tensors, "
        "expanded to the query heads for grouped-query cases, as SDPA's math needs, or enable_gqa). GB/s of K + V "
        "bytes (kv heads) over the time; timed as bench_ops does (1 GiB read between calls).\n",
        "| B | heads | kv heads | context | K+V MB | ours µs | GB/s | of copy | SDPA µs | flash µs | vs SDPA | vs flash |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    for b, h, kv, t in CASES:
        cache = KVCache(1, b, kv, t, D, numpy.float16, backend="cupy")
        cache.keys[...] = cupy.random.standard_normal(cache.keys.shape, dtype=cupy.float32).astype(cupy.float16)
        cache.values[...] = cupy.random.standard_normal(cache.values.shape, dtype=cupy.float32).astype(cupy.float16)
        q = cupy.random.standard_normal((b, h, 1, D), dtype=cupy.float32).astype(cupy.float16)
        lo, hi = numpy.zeros(b, numpy.int64), numpy.full(b, t, numpy.int64)
        ours = time_us(lambda: _decode(q, cache, 0, lo, hi, None, None, D**-0.5, h, kv, D), [()])
        tq = torch.from_dlpack(q)
        tk, tv = torch.from_dlpack(cache.keys[0]), torch.from_dlpack(cache.values[0])
        gqa = kv != h

        def sdpa():
            return F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=gqa)

        theirs = time_us(sdpa, [()])
        try:
            with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
                sdpa()
                flash = time_us(sdpa, [()])
        except RuntimeError:
            flash = float("nan")
        nbytes = 2 * b * kv * t * D * 2
        gbs = nbytes / ours / 1e3
        line = (f"| {b} | {h} | {kv} | {t} | {nbytes / 1e6:.1f} | {ours:.1f} | {gbs:.0f} | {100 * gbs / copy:.0f}% "
                f"| {theirs:.1f} | {flash:.1f} | {theirs / ours:.2f} | {flash / ours:.2f} |")
        print(line)
        lines.append(line)
        cache = tq = tk = tv = None  # free before the next size
        cupy.get_default_memory_pool().free_all_blocks()
    write_table("attention", lines)


if __name__ == "__main__":
    main()
