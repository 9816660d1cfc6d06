"""Where a prompt pass's host time goes: cProfile of ``Decoder.prefill`` eagerly on a random model, after a
warm-up, sorted by own time; and the pass's host time against its time on the stream, eager and replayed. With
``--new``: the first pass of new decoders instead (each ``generate`` call's), after one on another decoder.

    python3 benchmarks/profile_prefill.py [shape] [batch] [prompt] [--new]     # default gpt2-small 1 128
"""

from __future__ import annotations

import cProfile
import os
import pstats
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy  # noqa: E402

from cupy_transformer import bench  # noqa: E402
from cupy_transformer.generation import Decoder  # noqa: E402


def timed(decoder, prompts) -> tuple[float, float]:
    """One prompt pass's host ms (issuing it) and stream ms, the device idle before it."""
    cupy.cuda.Device().synchronize()
    begin = time.perf_counter()
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(decoder.stream)
    decoder.prefill(prompts)
    end.record(decoder.stream)
    host = time.perf_counter() - begin
    end.synchronize()
    return host * 1e3, cupy.cuda.get_elapsed_time(start, end)


def medians(runs: list[tuple[float, float]]) -> tuple[float, float]:
    """The median host ms and stream ms of ``timed`` runs."""
    return statistics.median(h for h, _ in runs), statistics.median(g for _, g in runs)


def first_passes(shape: str, model, batch: int, prompt: int, prompts, runs: int = 5) -> None:
    """Each new decoder's first pass (eager, on its own stream and memory pool), timed and then profiled."""
    Decoder(model, batch, prompt + 8).prefill(prompts)  # compiles, chooses the products
    decoders = [Decoder(model, batch, prompt + 8) for _ in range(2 * runs)]
    host, gpu = medians([timed(decoder, prompts) for decoder in decoders[:runs]])
    print(
        f"{shape} batch {batch} prompt {prompt}, a new decoder's first pass: host {host:.2f} ms, stream {gpu:.2f} ms "
        f"(medians of {runs})"
    )
    profile = cProfile.Profile()
    for decoder in decoders[runs:]:
        profile.enable()
        decoder.prefill(prompts)
        profile.disable()
        decoder.stream.synchronize()
    pstats.Stats(profile).sort_stats("tottime").print_stats(30)


def main(shape: str = "gpt2-small", batch: int = 1, prompt: int = 128, new: bool = False) -> None:
    model = bench.random_model(shape)
    prompts = [list(range(1, prompt + 1))] * batch
    if new:
        return first_passes(shape, model, batch, prompt, prompts)
    # The eager pass (every pass of a decoder without graphs; a new decoder's first), then the replayed graph.
    eager, graph = Decoder(model, batch, prompt + 8, cuda_graph=False), Decoder(model, batch, prompt + 8)
    for decoder in (eager, graph):
        for _ in range(3):
            decoder.prefill(prompts)
    for name, decoder in (("eager", eager), ("replayed graph", graph)):
        host, gpu = medians([timed(decoder, prompts) for _ in range(10)])
        print(f"{shape} batch {batch} prompt {prompt}, {name}: host {host:.2f} ms, stream {gpu:.2f} ms (medians of 10)")
    profile = cProfile.Profile()
    profile.enable()
    for _ in range(5):
        eager.prefill(prompts)
    profile.disable()
    eager.stream.synchronize()
    pstats.Stats(profile).sort_stats("tottime").print_stats(30)
    pstats.Stats(profile).sort_stats("cumulative").print_stats(40)


if __name__ == "__main__":
    args = [a for a in sys.argv[1:] if a != "--new"]
    main(*(args[0:1] or ["gpt2-small"]), *[int(a) for a in args[1:3]], new="--new" in sys.argv)
