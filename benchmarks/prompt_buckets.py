"""What widths rounded up to buckets (``generation.prompt_width``) give prompt passes of varied lengths: one decoder
(as ``generate`` keeps it) through prompts of 16 lengths from 97 to 127 tokens in a shuffled order, three
rounds, the host's wall time from ``prefill`` to the first token read; rounded widths (these lengths fall in two
buckets, 112 and 128: replayed graphs after their first two passes) against each length at its own width (16
widths: each pass eager but for a length met again while its graph is kept). Medians of the last two rounds.

    python3 benchmarks/prompt_buckets.py [--shapes gpt2-small,gpt2-xl]
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy  # noqa: E402

from cupy_transformer import bench, generation  # noqa: E402


def passes_ms(model, lengths: list[int], rounds: int = 3) -> list[float]:
    """ms of each pass of the last ``rounds - 1`` rounds (one decoder through ``lengths`` each round)."""
    decoder = generation.Decoder(model, 1, 256)
    times = []
    for r in range(rounds):
        for n in lengths:
            prompt = [(7 * i + n) % 1000 + 1 for i in range(n)]
            cupy.cuda.Device().synchronize()
            begin = time.perf_counter()
            decoder.prefill([prompt])
            decoder.read(0)
            if r:
                times.append((time.perf_counter() - begin) * 1e3)
    return times


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="gpt2-small,gpt2-xl")
    args = parser.parse_args()
    lengths = list(range(97, 129, 2))
    random.Random(0).shuffle(lengths)
    own_width = generation.prompt_width
    for shape in args.shapes.split(","):
        model = bench.random_model(shape)
        passes_ms(model, lengths[:2], 1)  # compiles the kernels, times the products
        rounded = passes_ms(model, lengths)
        generation.prompt_width = lambda batch, tokens, capacity, hidden: tokens
        try:
            exact = passes_ms(model, lengths)
        finally:
            generation.prompt_width = own_width
        print(
            f"{shape}, prompts of 97-127 tokens, batch 1: a pass {statistics.median(rounded):.2f} ms with rounded "
            f"widths, {statistics.median(exact):.2f} ms at their own widths (medians of {len(rounded)} passes)"
        )


if __name__ == "__main__":
    main()
