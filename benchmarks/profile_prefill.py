"""Where a prompt pass's host time goes: cProfile of ``Decoder.prefill`` eagerly on a random model, after a
warm-up, sorted by own time; and the pass's host time against its time on the stream, eager and replayed.

    python3 benchmarks/profile_prefill.py [shape] [batch] [prompt]     # default gpt2-small 1 128
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


def times(decoder, prompts, runs: int = 10) -> tuple[float, float]:
    """Medians of the host's time to issue a prompt pass and of its time on the stream, in ms."""
    hosts, gpus = [], []
    for _ in range(runs):
        decoder.stream.synchronize()
        begin = time.perf_counter()
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record(decoder.stream)
        decoder.prefill(prompts)
        end.record(decoder.stream)
        hosts.append(time.perf_counter() - begin)
        end.synchronize()
        gpus.append(cupy.cuda.get_elapsed_time(start, end))
    return statistics.median(hosts) * 1e3, statistics.median(gpus)


def main(shape: str = "gpt2-small", batch: int = 1, prompt: int = 128) -> None:
    model = bench.random_model(shape)
    prompts = [list(range(1, prompt + 1))] * batch
    # The eager pass (every pass of a decoder without graphs; a new decoder's first), then the replayed graph.
    eager, graph = Decoder(model, batch, prompt + 8, cuda_graph=False), Decoder(model, batch, prompt + 8)
    for decoder in (eager, graph):
        for _ in range(3):
            decoder.prefill(prompts)
    for name, decoder in (("eager", eager), ("replayed graph", graph)):
        host, gpu = times(decoder, prompts)
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
    main(*(sys.argv[1:2] or ["gpt2-small"]), *[int(a) for a in sys.argv[2:4]])
