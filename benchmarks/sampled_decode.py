"""Decode ms/token with the token sampled as users ask for it, against greedy, in one process: the captured step
with its sampler inside (``bench.time_generation``, 128-token random prompts, 64 new tokens, best of 3). Llama 3
checkpoints' generation_config.json asks for temperature 0.6 and top-p 0.9 without top-k, and ``generate`` follows a
checkpoint's settings by default.

    python3 benchmarks/sampled_decode.py [--shapes gpt2-small,llama-1b] [--batches 1,16] [--tree DIR]

``--tree``: the source tree whose cupy_transformer to time (default: this one), to compare two trees' samplers in two
processes on one machine. Prints a markdown table.
"""

from __future__ import annotations

import argparse
import os
import sys

MODES = [
    ("greedy", 0.0, 0, 1.0),
    ("T 1", 1.0, 0, 1.0),
    ("T 0.8, top-k 50, top-p 0.9", 0.8, 50, 0.9),
    ("T 0.6, top-p 0.9 (Llama 3's default)", 0.6, 0, 0.9),
]


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="gpt2-small,llama-1b")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--tree", default=os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
    args = parser.parse_args(argv)
    sys.path.insert(0, os.path.abspath(args.tree))
    from cupy_transformer import bench
    from cupy_transformer.generation import Sampling

    print(f"tree {args.tree}\n\n| shape | batch | mode | decode ms/token | vs greedy |\n|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        model = bench.random_model(shape)
        for batch in (int(b) for b in args.batches.split(",")):
            greedy = None
            for name, temperature, top_k, top_p in MODES:
                sampling = Sampling(temperature, top_k, top_p)
                ms = bench.time_generation(model, batch, 128, 64, sampling=sampling)["decode_ms"]
                greedy = greedy or ms
                print(f"| {shape} | {batch} | {name} | {ms:.3f} | {ms / greedy:.2f}x |", flush=True)
        model = None


if __name__ == "__main__":
    main()
