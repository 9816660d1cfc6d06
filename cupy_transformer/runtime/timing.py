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


def fastest(runs: Sequence[Callable[[], object]], rounds: int | None = None) -> int:
    """The index of the fastest of ``runs`` (each launches its work on the current stream), every run timed
    behind an L2 flush, ``rounds`` turns each (default ``ROUNDS``), by median. Each is run once untimed first (its
    first launch may load a module)."""
    cupy = import_cupy()
    rounds = rounds or ROUNDS
    flush = cupy.empty(2 * cupy.cuda.Device().attributes["L2CacheSize"], cupy.uint8)
    for run in runs:
        run()
    events = []
    for _ in range(rounds):
        for run in runs:
            flush.view(cupy.uint64).max()
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record()
            run()
            end.record()
            events.append((start, end))
    events[-1][1].synchronize()
    ms = [cupy.cuda.get_elapsed_time(a, b) for a, b in events]
    medians = [sorted(ms[i :: len(runs)])[rounds // 2] for i in range(len(runs))]
    return medians.index(min(medians))
