"""What launching a captured decode step costs the host: ``Graph.launch`` with the step before still running
(as ``generate`` runs it, a step ahead of the host), with the GPU idle, alternating two executable graphs of the
same capture (whether the driver waits for the running instance of the one it is asked to launch again), and the whole
``Decoder.step`` (the capacity count, the launch, the event its tokens' read waits for) in turn with the same and a
copy call of the tokens added (what a step cost the host before it wrote them itself).

    python3 benchmarks/graph_launch.py [--shapes gpt2-small,llama-7b] [--batch 1] [--steps 160]

Each figure: the median and the 90th percentile of the host's µs in the launch call, over ``--steps`` steps.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy  # noqa: E402
import numpy  # noqa: E402

from benchmarks.common import card_name, free_gpu_memory  # noqa: E402
from cupy_transformer import bench  # noqa: E402
from cupy_transformer.generation import Decoder  # noqa: E402

PROMPT = 128


def spread(times: list[float]) -> str:
    us = sorted(t * 1e6 for t in times)
    return f"{statistics.median(us):.1f} / {us[int(0.9 * (len(us) - 1))]:.1f}"


def measure(model, shape: str, batch: int, steps: int) -> str:
    decoder = Decoder(model, batch, PROMPT + 5 * steps + 16)
    rng = numpy.random.default_rng(0)
    decoder.prefill([rng.integers(0, model.vocab, PROMPT).tolist() for _ in range(batch)])
    for _ in range(3):  # eager, captured, replayed
        decoder.step()
    cupy.cuda.Device().synchronize()
    graph = next(g for key, g in decoder._graphs.items() if key[0] == "step")
    stream = decoder.stream
    second = cupy.cuda.runtime.graphInstantiate(graph.graph)
    execs = (graph.graphExec, second)

    def run(launch, idle: bool) -> list[float]:
        times = []
        for i in range(steps):
            decoder.cache.advance(1)  # the host's count of the capacity the replays use
            if idle:
                stream.synchronize()
            begin = time.perf_counter()
            launch(i)
            times.append(time.perf_counter() - begin)
            if not idle and i:
                done.synchronize()  # the step before this one, as generate waits for it
            done.record(stream)
        stream.synchronize()
        return times

    done = cupy.cuda.Event(disable_timing=True)
    same = run(lambda i: graph.launch(stream), idle=False)
    idle = run(lambda i: graph.launch(stream), idle=True)
    alternating = run(lambda i: cupy.cuda.runtime.graphLaunch(execs[i % 2], stream.ptr), idle=False)
    # Decoder.step as generate calls it, and in turn with a copy call of the tokens added (as a step was before
    # it wrote them itself): the two in one loop, so that the host's drift is the same for both.
    whole, with_copy = [], []
    runtime = cupy.cuda.runtime
    for i in range(2 * steps):
        begin = time.perf_counter()
        decoder.step()
        if i % 2:
            host = decoder._host[decoder.steps % 2]
            ids, d2h = decoder.ids.data.ptr, runtime.memcpyDeviceToHost
            runtime.memcpyAsync(host.ctypes.data, ids, host.nbytes, d2h, stream.ptr)
        (with_copy if i % 2 else whole).append(time.perf_counter() - begin)
        decoder.wait(decoder.steps - 1)
    stream.synchronize()
    cupy.cuda.runtime.graphExecDestroy(second)
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    start.record(stream)
    for _ in range(8):
        decoder.cache.advance(1)
        graph.launch(stream)  # the capacity (16 slots) left for these
    end.record(stream)
    end.synchronize()
    step_us = cupy.cuda.get_elapsed_time(start, end) / 8 * 1e3
    columns = [f"{step_us:.0f}", *map(spread, (same, idle, alternating, whole, with_copy))]
    return f"| {shape} | {batch} | {' | '.join(columns)} |"


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--shapes", default="gpt2-small,gpt2-xl,llama-1b,llama-7b")
    parser.add_argument("--batch", default="1,16")
    parser.add_argument("--steps", type=int, default=160)  # GPT-2: 1024 positions
    args = parser.parse_args()
    print(f"{card_name()}: host µs in the step's launch call, median / 90th percentile\n")
    print(
        "| shape | batch | step µs (GPU) | step before running | GPU idle | two graphs alternating "
        "| Decoder.step | Decoder.step and a copy call |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        model = bench.random_model(shape)
        for batch in map(int, args.batch.split(",")):
            print(measure(model, shape, batch, args.steps), flush=True)
        del model
        free_gpu_memory()


if __name__ == "__main__":
    main()
