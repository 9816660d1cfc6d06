"""Choosing between ways to compute the same thing by timing them once, as a model would run them.

Which cuBLASLt algorithm, or the GEMV kernel versus cuBLAS, is fastest depends on the shape and the card; the
runtime times the candidates on the first call of a shape and keeps the winner (``cublaslt``, ``ops.matmul``).
The timing must look like a model's: there each layer's weights arrive cold, and timed back to back with
warm L2 the ranking changed (a 1600x1600 product picked a cuBLASLt algorithm 15% slower cold). So every timed
run comes behind a write over twice the L2, the candidates take turns (clock and thermal drift hit all
alike), and each is judged by its median. The first call of a shape waits for the GPU once.

``CT_TUNE=0`` in the environment turns this off: cuBLASLt's first pick, and cuBLAS for every eager product.
"""

from __future__ import annotations

import os
from typing import Callable, Sequence

from .arrays import import_cupy

TUNE = os.environ.get("CT_TUNE", "1") != "0"
ROUNDS = 5


def fastest(runs: Sequence[Callable[[], None]], rounds: int = ROUNDS) -> int:
    """The index of the fastest of ``runs`` (each launches its work on the current stream), every run timed
    behind an L2 flush, ``rounds`` turns each, by median. Each is run once untimed first (its first launch
    may load a module)."""
    cupy = import_cupy()
    stream = cupy.cuda.get_current_stream()
    flush = cupy.empty(2 * cupy.cuda.Device().attributes["L2CacheSize"], cupy.uint8)
    for run in runs:
        run()
    events = []
    for _ in range(rounds):
        for run in runs:
            cupy.cuda.runtime.memsetAsync(flush.data.ptr, 0, flush.nbytes, stream.ptr)
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            run()
            end.record()
            events.append((start, end))
    events[-1][1].synchronize()
    ms = [cupy.cuda.get_elapsed_time(a, b) for a, b in events]
    medians = [sorted(ms[i :: len(runs)])[rounds // 2] for i in range(len(runs))]
    return medians.index(min(medians))
