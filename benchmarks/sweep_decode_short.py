"""Decode attention at short contexts: µs a launch in a CUDA graph, as a captured decode step runs it (the grid
sized for the cache's capacity, each sequence's chunks from its own length), for the most keys one block takes
whole (``one_block``; 0: always chunks). Each launch follows a 64 MiB copy (the weights a step streams between
two attention layers evict the cache from L2); the copies alone are timed too and taken off.

    python3 benchmarks/sweep_decode_short.py
"""

from __future__ import annotations

import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy  # noqa: E402

from benchmarks.common import card_name, graph_node_us, l2_flush_in_graphs  # noqa: E402
from cupy_transformer.kv_cache import KVCache  # noqa: E402
from cupy_transformer.ops.decode_attention import decode_attention, one_block_keys  # noqa: E402

SHAPES = {  # name: (heads, kv heads, head size, batch)
    "gpt2-small": (12, 12, 64, 1),
    "gpt2-xl": (25, 25, 64, 1),
    "llama-1b": (32, 8, 64, 1),
    "llama-7b": (32, 32, 128, 1),
    "gpt2-small B16": (12, 12, 64, 16),
}
LENGTHS = (64, 150, 256, 400, 600, 1000, 2000)
ONE_BLOCK = (0, 256, 512, 768)
CAPACITY = 2048
REPEATS = 30


def graph_us(body) -> float:
    return graph_node_us(lambda i: body(), REPEATS)


def main() -> None:
    print(card_name())
    flush, flush_us = l2_flush_in_graphs()
    print(f"64 MiB copy: {flush_us:.1f} µs\n")
    rng = cupy.random.default_rng(0)
    for shape, (h, kv, d, b) in SHAPES.items():
        cache = KVCache(1, b, kv, CAPACITY, d, cupy.float16, backend="cupy")
        cache.keys[...] = rng.standard_normal(cache.keys.shape, dtype=cupy.float32).astype(cupy.float16)
        cache.values[...] = rng.standard_normal(cache.values.shape, dtype=cupy.float32).astype(cupy.float16)
        q = rng.standard_normal((b, h, 1, d), dtype=cupy.float32).astype(cupy.float16)
        print(f"{shape} (heads {h}, kv {kv}, d {d}, batch {b}): µs a launch (default: one_block_keys(d, warps))")
        print("| keys | " + " | ".join(f"one block <= {m}" for m in ONE_BLOCK) + " |")
        print("|---" * (len(ONE_BLOCK) + 1) + "|")
        for length in LENGTHS:
            start = cupy.full(b, length - 1, cupy.int32)
            times = []
            for m in ONE_BLOCK:

                def body(m=m, start=start):
                    flush()
                    decode_attention(q, cache, 0, start, 0, None, None, d**-0.5, one_block=m)

                times.append(graph_us(body) - flush_us)
            print(f"| {length} | " + " | ".join(f"{t:.2f}" for t in times) + " |")
        print()
    print("one_block_keys(64, 8), one_block_keys(128, 8):", one_block_keys(64, 8), one_block_keys(128, 8))


if __name__ == "__main__":
    main()
