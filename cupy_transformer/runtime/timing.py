"""Choosing between ways to compute the same thing by timing them once, as a model would run them.

Which cuBLASLt algorithm, or the GEMV kernel versus cuBLAS, is fastest depends on the shape and the card; the
runtime times the candidates on the first call of a shape and keeps the winner (``cublaslt``, ``ops.matmul``).
The timing must look like a model's: there each layer's weights arrive cold, and timed back to back with warm L2
the ranking changed (a 1600x1600 product picked a cuBLASLt algorithm 15% slower cold). So every timed run comes
behind a read of twice the L2, which leaves it as the kernels before a product do (behind a write, whose dirty
lines the product's reads must evict, the GEMV against cuBLASLt at [in, out] 1600x6400 on an H200 was picked the
slower way in 9 of 16 tries, behind a read in 3). The candidates take turns (clock and thermal drift hit all
alike), and each is judged by its median. The first call of a shape waits for the GPU once.

``CT_TUNE=0`` in the environment turns this off: cuBLASLt's first pick, and cuBLAS for every eager product.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from .arrays import import_cupy

TUNE = os.environ.get("CT_TUNE", "1") != "0"
ROUNDS = 5
GRAPH_ROUNDS = 9  # decode GEMV against cuBLASLt on an H200: a pick's mean loss up to 0.52% at 5, 0.17% at 9


def fastest(runs: Sequence[Callable[[], object]], rounds: int | None = None, graph: bool = False) -> int:
    """The index of the fastest of ``runs`` (each launches its work on the current stream), every run timed
    behind an L2 flush, ``rounds`` turns each (default ``ROUNDS``, ``GRAPH_ROUNDS`` for graphs), by median.
    Each is run once untimed first (its first launch may load a module). ``graph``: each run is captured into
    a CUDA graph (on a stream kept for this, so a run must be capturable and ready to run on a new stream
    after its first call) and the graph's launches are timed: a captured step's kernels start faster than
    eager launches, by more for some kernels than for others, and the ranking can change."""
    cupy = import_cupy()
    rounds = rounds or (GRAPH_ROUNDS if graph else ROUNDS)
    stream = cupy.cuda.get_current_stream()
    flush = cupy.empty(2 * cupy.cuda.Device().attributes["L2CacheSize"], cupy.uint8)
    if graph:
        stream = _capture_stream()
        stream.wait_event(cupy.cuda.get_current_stream().record())  # the runs' inputs are ready there
    graphs = []  # alive until the GPU is done with them
    with stream:
        for run in runs:
            run()
        events = []
        for _ in range(rounds):
            if graph:  # new graphs each round: a graph's own launch cost varies by up to ~1 µs (H200)
                graphs.append([_captured(run, stream) for run in runs])
            for launch in graphs[-1] if graph else runs:
                if graph:
                    launch()  # a graph's first launch uploads it
                flush.view(cupy.uint64).max()
                start, end = cupy.cuda.Event(), cupy.cuda.Event()
                start.record()
                launch()
                end.record()
                events.append((start, end))
    events[-1][1].synchronize()
    ms = [cupy.cuda.get_elapsed_time(a, b) for a, b in events]
    medians = [sorted(ms[i :: len(runs)])[rounds // 2] for i in range(len(runs))]
    return medians.index(min(medians))


_CAPTURE_STREAMS: dict[int, object] = {}


def _capture_stream():
    """One stream per device for ``fastest(graph=True)``: per-stream workspaces are made once, not per call
    (they stay with it: the GEMV's split-K workspace and cuBLASLt's 32 MB)."""
    cupy = import_cupy()
    device = cupy.cuda.runtime.getDevice()
    if device not in _CAPTURE_STREAMS:
        _CAPTURE_STREAMS[device] = cupy.cuda.Stream(non_blocking=True)
    return _CAPTURE_STREAMS[device]


def _captured(run: Callable[[], object], stream) -> Callable[[], None]:
    """``run`` captured on ``stream`` (current); a call launches the graph there."""
    stream.begin_capture()
    try:
        outputs = run()
    finally:
        graph = stream.end_capture()

    def launch(outputs=outputs):  # holds what the graph writes, so that the memory pool does not reuse it
        graph.launch(stream)

    return launch
