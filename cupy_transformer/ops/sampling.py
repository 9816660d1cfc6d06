"""Next-token sampling on the GPU (``kernels_cu/sampling.cu``) from a counter-based generator, and its NumPy twin.

For row ``b`` of logits ``l`` (as float64: every dtype's values exactly), with ``T`` the temperature and ``top_p`` as
float32 (the values the kernel is given):

- ``T == 0`` (greedy): the first index of ``max(l)``.
- Otherwise the allowed set ``A``: every index; with ``top_k > 0``, those with ``l_i >=`` the k-th largest value
  (ties at the boundary all kept; ``top_k >= V`` keeps all); with ``top_p < 1``, further those with
  ``l_i >= lambda``, the largest logit value such that ``sum_{j in A, l_j >= lambda} p_j >= top_p * sum_{j in A} p_j``
  with ``p_j = exp((l_j - max l) / T)`` (ties kept; never empty).
- The token is the first index of the largest ``l_i / T + g_i`` over ``A``, ``g_i = -log(-log(u_i))`` (the
  Gumbel-max trick draws from softmax(l / T) restricted to ``A`` and renormalised). ``u_i = ((r_i >> 12) + 0.5) *
  2^-52``, exact in double and inside (0, 1) (from 53 bits, the half would round the largest to 1), where ``r_i`` is
  output ``i`` of Philox4x64-10 keyed by ``(seed, 0)`` from counter ``(0, step, b, 0)``:
  ``numpy.random.Philox(key=(seed, 0), counter=(0, step, b, 0)).random_raw(V)``. NumPy increments the counter's
  first word before each block of four outputs, so ``r_{4j+w}`` is word ``w`` of the block at counter
  ``(j + 1, step, b, 0)``, which the kernel computes itself. A draw thus depends on (seed, step, row) alone.

Gumbel-max rather than a search of the cumulative distribution: each index's draw uses its own ``u_i`` and no prefix
sum over the vocabulary, so the kernel and NumPy agree draw for draw wherever two scores are not within an ulp; the
scores are double on both sides. The top-p masses are summed in a different order on each side, which can move a
boundary only where a level's mass is within an ulp of the target.

Logits must not be NaN, and a row's maximum must be finite (``-inf`` entries are fine: they are never drawn unless
everything allowed is ``-inf``, which then gives the first allowed index; greedy gives a row of ``-inf`` its first
index).

On the GPU the seed and the step are read from ``seed_step`` (device uint64 [2]) when the kernels run, so one
captured CUDA graph serves every step and seed; temperature, top_k and top_p are launch arguments (fixed in a
graph). Every kernel splits each row over several blocks of 256 threads (``sample_splits``: a row of 50k-128k values
on one multiprocessor would leave the others idle), the last block of a row to finish merging the blocks' results in
block order, through the stream's ``split_workspace``. Greedy is one launch of ``greedy_tokens``. Otherwise top_k and
top_p thresholds are found by radix selection over the logits' order-preserving integer keys, 8 bits a launch of
``sample_select`` (each block a histogram of its slice: counts for top_k, double masses for top_p; the merging block
adds them and chooses the digit), two launches each for fp16 / bf16 keys and four for fp32; then one launch of
``sample_draw`` (Gumbel-max, Philox only for blocks of four indices where one is allowed). top_p's first launch
weighs each slice against the slice's own largest value before the row's is known, and the merge rescales: its
masses differ from NumPy's by rounding alone.
"""

from __future__ import annotations

import numbers

import numpy

from ..runtime.arrays import (
    FLOAT_NAMES,
    as_array,
    common_kind,
    from_dlpack,
    import_cupy,
    is_float_dtype,
    kind_of,
    module_of,
    to_caller,
)
from ..runtime.kernels import CTYPES, KernelFamily, ctype_of, split_workspace, wave_blocks

SAMPLE_THREADS = 256  # kernels_cu/sampling.cu's SAMPLE_THREADS
GREEDY_THREADS = 256  # its GREEDY_THREADS
MAX_SPLITS = 256  # its MAX_SPLITS
# The workspace's floats for a row (sampling.cu's SampleRow, 32 bytes) and for each block of it (SamplePart).
_ROW_FLOATS, _PART_FLOATS = 32 // 4, 3088 // 4
_FLOAT32_MAX = float(numpy.finfo(numpy.float32).max)


def _select_name(dtype, mass: bool) -> str:
    return f"ct::sample_select<{ctype_of(dtype)}, {'true' if mass else 'false'}>"


def _draw_name(dtype) -> str:
    return f"ct::sample_draw<{ctype_of(dtype)}>"


def _greedy_name(dtype) -> str:
    return f"ct::greedy_tokens<{ctype_of(dtype)}>"


_KERNELS = KernelFamily(
    "sampling.cu",
    [_select_name(d, m) for d in CTYPES for m in (False, True)]
    + [_draw_name(d) for d in CTYPES]
    + [_greedy_name(d) for d in CTYPES],
    programmatic=True,
)


def sampling_arguments(temperature, top_k, top_p) -> tuple[float, int, float]:
    """The checked arguments: temperature and top_p as the float32 values the kernel takes (as Python floats),
    top_k as an int."""
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, numbers.Real)
        or not (0 <= temperature <= _FLOAT32_MAX)
    ):  # NaN fails too
        raise ValueError(f"temperature: expected a finite number >= 0 (0: greedy); got {temperature!r}")
    if isinstance(top_k, bool) or not isinstance(top_k, numbers.Integral) or top_k < 0:
        raise ValueError(f"top_k: expected an integer >= 0 (0: no top-k cut); got {top_k!r}")
    if isinstance(top_p, bool) or not isinstance(top_p, numbers.Real) or not 0 < top_p <= 1:
        raise ValueError(f"top_p: expected a number in (0, 1] (1: no top-p cut); got {top_p!r}")
    return float(numpy.float32(temperature)), int(top_k), float(numpy.float32(top_p))


def philox_uniforms(seed: int, step: int, row: int, count: int) -> numpy.ndarray:
    """``u_0 .. u_{count-1}`` of row ``row`` at (``seed``, ``step``): float64 in (0, 1), from NumPy's Philox4x64-10."""
    words = numpy.array([seed, 0], numpy.uint64), numpy.array([0, step, row, 0], numpy.uint64)
    bits = numpy.random.Philox(key=words[0], counter=words[1]).random_raw(count)
    return ((bits >> 12).astype(numpy.float64) + 0.5) * 2.0**-52


def allowed_tokens(row: numpy.ndarray, temperature: float, top_k: int, top_p: float) -> numpy.ndarray:
    """The set ``A`` a draw may take from float64 ``row`` (bool [V]); ``temperature`` > 0 and ``top_p`` as float32
    values (``sampling_arguments``)."""
    vocab = row.size
    allowed = numpy.ones(vocab, bool)
    if 0 < top_k < vocab:
        allowed = row >= numpy.partition(row, vocab - top_k)[vocab - top_k]
    if top_p < 1:
        values = numpy.sort(row[allowed])[::-1]
        mass = numpy.cumsum(numpy.exp((values - row.max()) / temperature))
        level_ends = numpy.append(values[1:] != values[:-1], True)  # the last position of each distinct value
        levels, reached = values[level_ends], mass[level_ends]
        allowed &= row >= levels[numpy.argmax(reached >= top_p * mass[-1])]
    return allowed


def sample_reference(logits, seed: int, step: int, temperature=0.0, top_k=0, top_p=1.0) -> numpy.ndarray:
    """The module docstring's draw from NumPy ``logits`` [B, V] or [B, 1, V] at (``seed``, ``step``), row ``b``
    drawing with counter row ``b``: int64 [B]."""
    temperature, top_k, top_p = sampling_arguments(temperature, top_k, top_p)
    rows = numpy.asarray(logits)
    rows = rows.reshape(rows.shape[0], rows.shape[-1]).astype(numpy.float64)
    tokens = numpy.empty(rows.shape[0], numpy.int64)
    for b, row in enumerate(rows):
        if temperature == 0:
            tokens[b] = numpy.argmax(row)
            continue
        allowed = numpy.flatnonzero(allowed_tokens(row, temperature, top_k, top_p))
        gumbel = -numpy.log(-numpy.log(philox_uniforms(seed, step, b, row.size)))
        score = row / temperature + gumbel
        tokens[b] = allowed[numpy.argmax(score[allowed])]
    return tokens


def _logit_rows(logits, kind: str):
    """``logits`` [B, V] or [B, 1, V] as a [B, V] array of the backend, its values consecutive and its rows any
    whole number of elements apart (the last position of [B, S, V] logits, ``logits[:, -1:]``, is such a view)."""
    own = kind_of("logits", logits)
    if own in ("torch", "dlpack"):
        logits = from_dlpack("logits", logits)
    elif own == "cupy":
        current = import_cupy().cuda.runtime.getDevice()
        if logits.data.device_id != current:
            raise ValueError(
                f"logits: expected an array on the current GPU {current}; got one on GPU {logits.data.device_id}"
            )
    if logits.ndim not in (2, 3) or (logits.ndim == 3 and logits.shape[1] != 1):
        raise ValueError(
            f"logits: expected a [batch, vocab] or [batch, 1, vocab] array; got shape {tuple(logits.shape)}"
        )
    if not is_float_dtype(logits.dtype):
        raise TypeError(f"logits: expected dtype {', '.join(FLOAT_NAMES)}; got {logits.dtype}")
    rows = logits[:, 0] if logits.ndim == 3 else logits
    if rows.shape[1] == 0:
        raise ValueError(f"logits: expected at least one value a row; got shape {tuple(logits.shape)}")
    if rows.shape[1] > 1 and rows.strides[1] != rows.itemsize or rows.strides[0] % rows.itemsize:
        raise ValueError(
            f"logits: expected consecutive values in a row and rows a whole number of elements apart; "
            f"got strides {tuple(logits.strides)} (bytes) for dtype {logits.dtype}"
        )
    return rows


def sample_splits(dtype, batch: int, vocab: int, greedy: bool) -> int:
    """Blocks a row for ``batch`` rows of ``vocab`` logits of ``dtype``, greedy or sampled."""
    name, threads = (_greedy_name(dtype), GREEDY_THREADS) if greedy else (_draw_name(dtype), SAMPLE_THREADS)
    wave = wave_blocks(_KERNELS.kernel(name), threads)
    # A block per 16 elements a thread (4096 a block), all rows' blocks in one wave, at most 256, at least 1.
    return max(1, min(-(-vocab // (threads * 16)), wave // batch, MAX_SPLITS))


def sample_tokens(logits, tokens, seed_step, temperature=0.0, top_k=0, top_p=1.0, *, splits=None):
    """Write the next token of each row of ``logits`` ([B, V], or a [B, 1, V] view) into ``tokens`` (int32 [B]),
    drawn as the module docstring says with the seed and step in ``seed_step`` (uint64 [2]: seed, step), and return
    ``tokens``. All on the GPU (CuPy, or DLPack producers such as torch tensors), where nothing waits for the GPU and
    the launch can be captured in a CUDA graph; or all NumPy, where ``sample_reference`` computes the tokens.

    ``temperature``: 0 for greedy, else > 0; ``top_k``: 0 for no cut; ``top_p`` in (0, 1], 1 for no cut.
    ``splits``: blocks a row (1 to ``MAX_SPLITS``; None: ``sample_splits``'s). The kernels use the current stream's
    ``split_workspace``: run a launch once on a stream before capturing it there."""
    kind = common_kind(logits=logits, tokens=tokens, seed_step=seed_step)
    rows = _logit_rows(logits, kind)
    batch, vocab = rows.shape
    out = as_array("tokens", tokens, kind, dtypes=numpy.dtype(numpy.int32), shape=(batch,))
    state = as_array("seed_step", seed_step, kind, dtypes=numpy.dtype(numpy.uint64), shape=(2,))
    temperature, top_k, top_p = sampling_arguments(temperature, top_k, top_p)
    if splits is not None and (
        isinstance(splits, bool) or not isinstance(splits, numbers.Integral) or not 1 <= splits <= MAX_SPLITS
    ):
        raise ValueError(f"splits: expected an integer in [1, {MAX_SPLITS}] or None; got {splits!r}")
    if module_of(rows) is numpy:
        out[...] = sample_reference(rows, int(state[0]), int(state[1]), temperature, top_k, top_p)
        return out
    if vocab >= 2**31:
        raise ValueError(f"logits: {vocab} values a row exceed the kernel's 2^31; got shape {tuple(logits.shape)}")
    if not batch:
        return to_caller(out, kind)
    row_arguments = dict(logits=rows, row_stride=rows.strides[0] // rows.itemsize, vocab=vocab)
    splits = sample_splits(rows.dtype, batch, vocab, greedy=temperature == 0) if splits is None else int(splits)
    if temperature == 0:
        # Two of the workspace's fp32 words a uint64 partial. One block a row reads neither (placeholders).
        partials, counters = split_workspace(2 * batch * splits, batch) if splits > 1 else (out, out)
        _KERNELS.launch(
            _greedy_name(rows.dtype),
            (batch, splits),
            (GREEDY_THREADS,),
            **row_arguments,
            partials=partials,
            counters=counters,
            tokens=out,
        )
        return to_caller(out, kind)
    workspace, counters = split_workspace(batch * (_ROW_FLOATS + splits * _PART_FLOATS), batch)
    states = dict(rows=workspace, parts=workspace[batch * _ROW_FLOATS :], counters=counters)
    grid, block = (batch, splits), (SAMPLE_THREADS,)
    top_k = top_k if top_k < vocab else 0
    shifts = range(8 * rows.itemsize - 8, -1, -8)  # a launch per 8 bits of the keys, the top ones first
    selections = [False] * (top_k > 0) + [True] * (top_p < 1)  # top_k's (counts), then top_p's (masses)
    for mass in selections:
        for shift in shifts:
            _KERNELS.launch(
                _select_name(rows.dtype, mass),
                grid,
                block,
                **row_arguments,
                shift=shift,
                top_k=top_k,
                top_p=top_p,
                temperature=temperature,
                after_top_k=int(mass and top_k > 0),
                **states,
            )
    _KERNELS.launch(
        _draw_name(rows.dtype),
        grid,
        block,
        **row_arguments,
        seed_step=state,
        temperature=temperature,
        selected=int(bool(selections)),
        **states,
        tokens=out,
    )
    return to_caller(out, kind)
