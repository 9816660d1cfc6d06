"""The end of a decode step on the device (``kernels_cu/decode_state.cu``), and its NumPy twin.

A captured decode step draws each sequence's next token into ``ids`` [B] and then, in one kernel, hands the tokens
to the host and advances the state the next step reads: ``ring[seed_step[1] % 2] = ids`` (the host's [2, B] buffer,
page-locked: the kernel writes host memory itself, so a step needs no copy call, and the host reads step n's row
while step n + 1 runs), ``positions += 1`` and ``lengths += 1`` (each sequence's next position and cache length)
where ``advance``, then ``seed_step[1] += 1`` (the sampler's step). A prompt pass ends with the same kernel without
``advance`` (it sets positions and lengths itself): its tokens go to row 0, and the first step draws at step 1.
With ``best`` (uint64 [B]: the keys a greedy LM head leaves, ``ops.gemv``'s ``argmax``), the tokens are first taken
from it into ``ids`` (``ids = ~best`` in the low 32 bits: the first index of each row's maximum) and ``best`` is
zeroed for the next step's head: a greedy step then needs no sampler kernel.

One block of up to 1024 threads (a thread a sequence, striding past 1024); every thread reads the step before the
block's barrier, one thread writes it after. The arrays are the decoder's own (int32, uint64); the checks are once
a call, before the launch, for a decoder's first (eager) step; the captured step replays the launch.
"""

from __future__ import annotations

import numpy

from ..runtime.arrays import as_array, common_kind, module_of
from ..runtime.kernels import KernelFamily

_KERNELS = KernelFamily("decode_state.cu", ["ct::end_step"], programmatic=True)
_INT32, _UINT64 = numpy.dtype(numpy.int32), numpy.dtype(numpy.uint64)


def argmax_index(best):
    """The index each of ``best``'s argmax keys packs (int32): the bitwise not of its low 32 bits."""
    return (~best & numpy.uint64(0xFFFFFFFF)).astype(numpy.uint32).view(numpy.int32)


def end_step_reference(ids, positions, lengths, seed_step, ring, advance: bool = True, best=None) -> None:
    """In place on NumPy arrays: with ``best``, ``ids = argmax_index(best)`` and ``best`` zeroed; then ``ring[step %
    2] = ids``, with ``advance`` positions and lengths plus one, then ``seed_step[1] += 1``."""
    if best is not None:
        ids[...] = argmax_index(best)
        best[...] = 0
    ring[int(seed_step[1]) % 2] = ids
    if advance:
        positions += 1
        lengths += 1
    seed_step[1] += 1


def _per_sequence(name: str, value, kind: str, batch: int):
    """An int32 [B] or [B, 1] array as [B] (a view: the kernel writes where the caller's array is)."""
    array = as_array(name, value, kind, dtypes=_INT32, ndim=(1, 2))
    if array.shape[1:] not in ((), (1,)) or batch not in (-1, array.shape[0]):
        want = "B" if batch == -1 else str(batch)
        raise ValueError(f"{name}: expected shape ({want},) or ({want}, 1); got {tuple(array.shape)}")
    return array.reshape(array.shape[0])


def end_step(ids, positions, lengths, seed_step, ring, advance: bool = True, best=None) -> None:
    """End a step as the module docstring says: ``ids``, ``positions``, ``lengths`` int32 [B] or [B, 1]
    (C-contiguous), ``seed_step`` uint64 [2], ``ring`` int32 [2, B], ``best`` None or uint64 [B]. All CuPy (the
    kernel, on the current stream; ``ring`` may be a CuPy array over page-locked host memory) or all NumPy
    (``end_step_reference``)."""
    kind = common_kind(ids=ids, positions=positions, lengths=lengths, seed_step=seed_step, ring=ring, best=best)
    ids = _per_sequence("ids", ids, kind, -1)
    batch = ids.shape[0]
    positions, lengths = (_per_sequence(n, a, kind, batch) for n, a in (("positions", positions), ("lengths", lengths)))
    state = as_array("seed_step", seed_step, kind, dtypes=_UINT64, shape=(2,))
    ring = as_array("ring", ring, kind, dtypes=_INT32, shape=(2, batch))
    if best is not None:
        best = as_array("best", best, kind, dtypes=_UINT64, shape=(batch,))
    if module_of(ids) is numpy:
        end_step_reference(ids, positions, lengths, state, ring, advance, best)
        return
    _KERNELS.launch(
        "ct::end_step",
        (1,),
        (min(1024, max(32, -(-batch // 32) * 32)),),  # a thread a sequence, in whole warps
        ids=ids,
        best=ids if best is None else best,  # ids: unread without from_best
        positions=positions,
        lengths=lengths,
        seed_step=state,
        ring=ring,
        batch=batch,
        from_best=int(best is not None),
        advance=int(bool(advance)),
    )
