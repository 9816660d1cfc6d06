"""What a new decoder costs a generation: a 128-token prompt and N new tokens on a random model, host wall time
from the prompt pass to the last token read, on a new ``generation.Decoder`` each time (its KV cache, eager first
pass and step, the step's capture) against one decoder kept from the call before (replayed graphs), as
``generation.generate`` now keeps it. Medians of 3 after a compiling run.

    python3 benchmarks/decoder_reuse.py [--shapes gpt2-small,gpt2-xl] [--new 32,128]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy  # noqa: E402

from cupy_transformer import bench  # noqa: E402
from cupy_transformer.generation import Decoder  # noqa: E402


def generation_ms(model, decoder, prompt: list, new: int) -> tuple[Decoder, float]:
    """(the decoder, ms) of one generation of ``new`` tokens on ``decoder`` (None: a new one)."""
    cupy.cuda.Device().synchronize()
    begin = time.perf_counter()
    decoder = decoder or Decoder(model, 1, len(prompt) + new)
    decoder.prefill([prompt])
    for step in range(1, new):
        decoder.step()
        decoder.read(step - 1)  # the host reads a step behind, as generate does
    decoder.read(new - 1)
    return decoder, (time.perf_counter() - begin) * 1e3


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="gpt2-small,gpt2-xl")
    parser.add_argument("--new", default="32,128")
    args = parser.parse_args()
    for shape in args.shapes.split(","):
        model = bench.random_model(shape)
        prompt = list(range(1, 129))
        for new in map(int, args.new.split(",")):
            generation_ms(model, None, prompt, new)  # compiles
            fresh = statistics.median(generation_ms(model, None, prompt, new)[1] for _ in range(3))
            kept, _ = generation_ms(model, None, prompt, new)
            again = statistics.median(generation_ms(model, kept, prompt, new)[1] for _ in range(3))
            print(f"{shape}, 128-token prompt, {new} new tokens: a new decoder {fresh:.1f} ms, a kept one {again:.1f}")
        del model


if __name__ == "__main__":
    main()
