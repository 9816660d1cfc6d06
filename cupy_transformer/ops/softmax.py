"""SoftmaxOp: DeepSpeed-Inference's scaled, masked softmax over precomputed attention scores (its BLOOM attention
path), and the mask and alibi semantics the attention kernels share.

For scores ``s`` ``[B, h, Q, K]`` (``h`` = this rank's heads, ``config.heads / mp_size``), each row
``(b, head, i)`` over keys ``j``::

    z_j = s_j * layer_scale + alibi[b, head_offset + head, j] + mask[b, (head), i, j]
    p_j = exp(z_j - max z) / sum(exp(z - max z))     (fp32 on the GPU, float64 for NumPy; stored in T)

Query ``i`` sits at absolute position ``K - Q + i`` (the last ``Q`` of ``K`` positions, i.e. after a
past), which the causal and window rules use.

Where DeepSpeed's kernel is suspect we differ, each a fix:

- ``triangular`` (causal) keeps keys ``j <= K - Q + i``: right with a past (Q < K), where DeepSpeed compares
  with ``i`` and so is right only for Q == K.
- ``local_attention`` keeps the ``window_size`` keys ``K - Q + i - window_size < j <= K - Q + i``, HF GPT-Neo's
  window, in prompts and in decode steps alike (DeepSpeed keeps one key fewer when decoding).
- Excluded keys (causal, window, a False in a boolean mask) get a true ``-inf``, not ``-10000``, and no
  ``1e-6`` is added to the sum; a row with every key excluded is all zeros rather than NaN. A NaN or +inf
  score (not excluded) makes its row NaN, as in ``torch.softmax``.
- The mask: 2-D ``[B, K]`` (one row per sequence, BERT's padding mask) or 4-D ``[B, 1 or h, Q or 1, K]``;
  a 3-D mask, which DeepSpeed silently misreads, is an error, and per-head masks work. It is additive (in
  the scores' dtype: 0 keeps, a large negative drops) or boolean (True keeps).
- The alibi: ``[B * H, 1, K]`` (HF BLOOM's layout) or ``[B, H, 1, K]`` with ``H = h * mp_size`` heads in all;
  this rank uses heads ``head_offset .. head_offset + h``.
- Any ``K`` (DeepSpeed: at most 32768, and wrong past 8192). ``recompute`` and ``async_op`` are not offered;
  the result is a new array (DeepSpeed overwrites the scores), or ``out``.

On the GPU ``kernels_cu/softmax.cu`` computes it: 8 lanes or 1 to 8 warps hold a row in registers (one read,
one exp a key, one write), reading the mask and alibi as given (broadcast dimensions are never expanded) and
skipping the keys the causal or window rule drops. Rows longer than a block holds, or few long rows, are cut
into chunks over blocks (a second launch merges the chunks' sums, reads its chunk again and writes).
"""

from __future__ import annotations

import enum
import math
from typing import NamedTuple

import numpy

from ..runtime.arrays import (
    array_module,
    as_array,
    backend_of,
    check_no_overlap,
    common_kind,
    deliver,
    import_cupy,
    module_of,
    reference_compute,
    to_caller,
)
from ..runtime.kernels import CTYPES, KernelFamily, access_width, ctype_of, sm_count, vector_width, wave_blocks
from .base import TransformerOp

# (lanes a row, vectors a lane, phase): 8, 16 or 32 lanes, or 2 to 8 warps a row (phase 0), or a block a chunk
# of a row (phases 1, 2)
_VARIANTS = (
    (8, 2, 0),
    (32, 2, 0),
    (16, 8, 0),
    (32, 8, 0),
    (64, 8, 0),
    (128, 8, 0),
    (256, 8, 0),
    (256, 8, 1),
    (256, 8, 2),
)


def _name(dtype, vec, row_threads, nv, phase):
    return f"ct::masked_softmax<{ctype_of(dtype)}, {vec}, {row_threads}, {nv}, {phase}>"


_KERNELS = KernelFamily(
    "softmax.cu", [_name(d, v, *variant) for d in CTYPES for v in (vector_width(d), 1) for variant in _VARIANTS]
)


def softmax_reference(scores, mask=None, alibi=None, triangular=False, window_size=None, layer_scale=1.0):
    """The formula on checked arrays of one backend: ``scores`` [B, h, Q, K]; ``mask`` broadcastable to it
    (additive or boolean); ``alibi`` [B, h, 1, K] (this rank's heads) or None; ``window_size`` None for no
    window. Computes in ``reference_compute``'s type (NumPy: float64; CuPy: float32) and returns the scores' dtype."""
    xp = module_of(scores)
    compute = reference_compute(xp, scores.dtype)
    z = scores.astype(compute) * compute(layer_scale)
    if alibi is not None:
        z = z + alibi.astype(compute)
    keep = None
    if mask is not None:
        if mask.dtype == numpy.bool_:
            keep = mask
        else:
            z = z + mask.astype(compute)
    q, k = scores.shape[-2:]
    if triangular or window_size is not None:
        position = xp.arange(q)[:, None] + (k - q)  # each query's absolute position
        key = xp.arange(k)[None, :]
        allowed = key <= position if triangular else xp.ones((q, k), bool)
        if window_size is not None:
            allowed = allowed & (key > position - window_size)
        keep = allowed if keep is None else keep & allowed
    if keep is not None:
        z = xp.where(keep, z, -xp.inf)
    top = z.max(axis=-1, keepdims=True)  # NaN in a row with a NaN score, +inf with a +inf one
    empty = top == -xp.inf  # every key excluded: a row of zeros (the documented choice)
    with numpy.errstate(invalid="ignore"):  # a NaN or +inf score makes its whole row NaN, as in torch.softmax
        e = xp.exp(z - xp.where(empty, 0, top))  # excluded keys: exp(-inf) = 0
        return xp.where(empty, 0, e / e.sum(axis=-1, keepdims=True)).astype(scores.dtype)


def key_mask(attn_mask, kind, dtype, b, h, q, k, wider=False):
    """The attention mask as an array broadcastable to scores [B, h, Q, K], or None: 2-D [B, K] (one row per
    sequence) or 4-D [B, 1|h, Q|1, K], additive in ``dtype`` or boolean. ``wider``: the key dimension may pass
    K (a buffer over a whole cache); the caller uses the first K columns."""
    if attn_mask is None:
        return None
    m = as_array("attn_mask", attn_mask, kind, ndim=(2, 4), dtypes=(numpy.dtype(dtype), numpy.dtype(numpy.bool_)))
    keys, fits = (f"{k} or more", m.shape[-1] >= k) if wider else (f"{k}", m.shape[-1] == k)
    if m.ndim == 2:
        if m.shape[0] != b or not fits:
            raise ValueError(
                f"attn_mask: expected a [batch, keys] = [{b}, {keys}] mask over key slots; got shape {tuple(m.shape)}"
            )
        return m[:, None, None, :]
    if m.shape[0] != b or m.shape[1] not in (1, h) or m.shape[2] not in (1, q) or not fits:
        raise ValueError(f"attn_mask: expected a [{b}, 1 or {h}, 1 or {q}, {keys}] mask; got shape {tuple(m.shape)}")
    return m


def alibi_rows(alibi, kind, dtype, b, total, h, head_offset, k):
    """Heads ``head_offset .. + h`` of an alibi for ``total`` heads, [B * total, 1, K] (HF BLOOM's layout) or
    [B, total, 1, K], as [B, h, 1, K]; or None."""
    if alibi is None:
        return None
    a = as_array("alibi", alibi, kind, ndim=(3, 4), dtypes=dtype)
    if a.ndim == 3 and tuple(a.shape) == (b * total, 1, k):
        a = a.reshape(b, total, 1, k)
    elif tuple(a.shape) != (b, total, 1, k):
        raise ValueError(
            f"alibi: expected [{b * total}, 1, {k}] or [{b}, {total}, 1, {k}] (batch x {total} heads, "
            f"keys); got shape {tuple(a.shape)}"
        )
    return a[:, head_offset : head_offset + h]


class MaskKind(enum.IntEnum):
    """The kernels' ``mask_kind`` argument (kernels_cu/mask.cuh)."""

    NONE = 0
    ADDITIVE = 1  # added to the scores (0 keeps a key, a large negative drops it)
    BOOLEAN = 2  # True keeps a key


def mask_kind(mask) -> MaskKind:
    """The kind of ``mask`` (an array or None)."""
    if mask is None:
        return MaskKind.NONE
    return MaskKind.BOOLEAN if mask.dtype == numpy.bool_ else MaskKind.ADDITIVE


class MaskArguments(NamedTuple):
    """The attention kernels' mask and alibi arguments, named as their parameters: ``mask`` [B, mask_len]
    (one row per sequence), ``alibi`` [B, h, alibi_len] (0: none), or a placeholder that is never read."""

    mask_kind: MaskKind
    mask: object
    mask_len: int
    alibi: object
    alibi_len: int


def mask_arguments(mask, alibi, b: int, h: int, placeholder) -> MaskArguments:
    """``mask`` [B, 1, 1, T'] (a key mask) or None and ``alibi`` [B, h, 1, T] or None as the decode and prefill
    kernels take them; ``placeholder`` stands for an absent array."""
    cupy = import_cupy()
    kind, mask_arg, mask_len = MaskKind.NONE, placeholder, 0
    if mask is not None:
        kind = mask_kind(mask)
        mask_arg, mask_len = cupy.ascontiguousarray(mask.reshape(b, -1)), mask.shape[-1]
    alibi_arg, alibi_len = placeholder, 0
    if alibi is not None:  # a slice of this rank's heads is not contiguous: the kernels index [B, h, T] densely
        alibi_arg, alibi_len = cupy.ascontiguousarray(alibi.reshape(b, h, -1)), alibi.shape[-1]
    return MaskArguments(kind, mask_arg, mask_len, alibi_arg, alibi_len)


class SoftmaxOp(TransformerOp):
    def forward(
        self,
        attn_scores,
        attn_mask=None,
        alibi=None,
        triangular=False,
        local_attention=False,
        window_size=None,
        layer_scale=1.0,
        head_offset=0,
        *,
        out=None,
    ):
        """``attn_scores`` [B, h, Q, K]; ``attn_mask`` [B, K] or [B, 1|h, Q|1, K], additive or boolean;
        ``alibi`` [B*H, 1, K] or [B, H, 1, K]; ``triangular``: causal; ``local_attention`` with
        ``window_size`` keys; ``layer_scale`` multiplies the scores; ``head_offset``: this rank's first head
        in the alibi. Returns the probabilities [B, h, Q, K] in the scores' dtype."""
        cfg = self.config
        kind = common_kind(attn_scores=attn_scores, attn_mask=attn_mask, alibi=alibi, out=out)
        s = as_array("attn_scores", attn_scores, kind, ndim=4, dtypes=cfg.dtype)
        b, h, q, k = s.shape
        local_heads = cfg.heads // cfg.mp_size
        if h != local_heads:
            raise ValueError(
                f"attn_scores: expected {local_heads} heads (config heads / mp_size) in dimension 1; "
                f"got shape {tuple(s.shape)}"
            )
        if s.size == 0:
            raise ValueError(f"attn_scores: expected at least one query and one key; got shape {tuple(s.shape)}")
        mask = key_mask(attn_mask, kind, cfg.dtype, b, h, q, k)
        rows = self._alibi(alibi, kind, s.shape, head_offset)
        if (
            not isinstance(layer_scale, (int, float))
            or isinstance(layer_scale, bool)
            or not numpy.isfinite(layer_scale)
        ):
            raise ValueError(f"layer_scale: expected a finite number; got {layer_scale!r}")
        window = None
        if local_attention:
            if isinstance(window_size, bool) or not isinstance(window_size, int) or window_size < 1:
                raise ValueError(f"window_size: expected a positive integer with local_attention; got {window_size!r}")
            window = window_size
        if out is not None:  # may be attn_scores itself (DeepSpeed's in-place update), but no other input
            out = as_array("out", out, kind, dtypes=cfg.dtype, shape=tuple(s.shape))
            in_place = array_module(backend_of(kind)) is not numpy and out.data.ptr == s.data.ptr
            check_no_overlap("out", out, **({} if in_place else {"attn_scores": s}), attn_mask=mask, alibi=rows)
        if array_module(backend_of(kind)) is numpy:
            p = deliver(softmax_reference(s, mask, rows, bool(triangular), window, float(layer_scale)), out)
        else:
            p = _masked_softmax(s, mask, rows, bool(triangular), window, float(layer_scale), out)
        return to_caller(p, kind)

    def _alibi(self, alibi, kind, shape, head_offset):
        """This rank's alibi rows as [B, h, 1, K], or None."""
        b, h, _, k = shape
        total = h * self.config.mp_size
        if isinstance(head_offset, bool) or not isinstance(head_offset, int) or not 0 <= head_offset <= total - h:
            raise ValueError(
                f"head_offset: expected an integer in [0, {total - h}] (this rank's first of {total} "
                f"heads); got {head_offset!r}"
            )
        return alibi_rows(alibi, kind, self.config.dtype, b, total, h, head_offset, k)


def _element_strides(a, dims):
    """The strides of ``a``'s ``dims`` in elements, 0 where the dimension is broadcast (size 1)."""
    return tuple(numpy.int64(0 if a.shape[d] == 1 else a.strides[d] // a.itemsize) for d in dims)


def softmax_plan(rows, k, vec, slots):
    """How the kernel covers ``rows`` rows of ``k`` keys, ``vec`` keys a vector: ``(lanes a row, vectors a lane,
    chunks a row, keys a chunk)``. Rows of up to 16 vectors take 8 lanes and of up to 64 a warp, at 2 vectors a
    lane; longer rows take the fewest lanes (16, or 1, 2, 4 or 8 warps) that hold them at 8 vectors a lane: the
    fewer lanes a row, the more rows an SM works on at once, each at its own pace, and the fewer shuffles a
    key (8 lanes at 8 vectors were 42% slower than a warp at 2 on 512 keys with a boolean mask and alibi: the
    mask and alibi loads, one vector after another, want more warps). Rows longer than 8 vectors a thread of a
    block are cut into chunks; with fewer rows than ``slots`` (the blocks the GPU runs at once), rows past 4
    warps are cut further, into chunks of at least a vector a thread, to fill it."""
    if k <= 8 * vec * 2:
        return 8, 2, 1, k
    if k <= 32 * vec * 2:
        return 32, 2, 1, k
    for threads in (16, 32, 64, 128):
        if k <= threads * vec * 8:
            return threads, 8, 1, k
    per_pass = 256 * vec
    chunks = math.ceil(k / (8 * per_pass))
    if rows < slots:
        chunks = max(chunks, min(slots // rows, math.ceil(k / per_pass)))
    chunk = math.ceil(math.ceil(k / chunks) / vec) * vec
    chunks = math.ceil(k / chunk)
    return 256, 8, chunks, chunk


def _vector_aligned(a, vec):
    """Whether every row the kernel reads of ``a`` (a mask or alibi, stride-1 keys) starts on a ``vec``-element
    vector: its base and the strides of its other dimensions."""
    strides = _element_strides(a, range(a.ndim - 1))
    return a.data.ptr % (vec * a.itemsize) == 0 and all(st % vec == 0 for st in strides)


def _masked_softmax(s, mask, alibi, triangular, window, layer_scale, out):
    """The kernel on checked CuPy arrays: ``s`` [B, h, Q, K], ``mask`` broadcastable to it or None, ``alibi``
    [B, h, 1, K] or None; the result in ``out`` (which may be ``s``) or a new array."""
    cupy = import_cupy()
    b, h, q, k = s.shape
    p = out if out is not None else cupy.empty_like(s)
    rows = b * h * q
    if rows >= 2**31:
        raise ValueError(f"attn_scores: {rows} rows (B * h * Q) exceed the kernel's 2^31; split the batch")
    vec = access_width(s.dtype, k, s, p)
    if mask is not None and not _vector_aligned(mask, vec):  # keys are stride 1: key_mask's checks
        mask = mask.copy()  # a view off the vectors (a rare case): a fresh array is aligned
    if alibi is not None and not _vector_aligned(alibi, vec):
        alibi = alibi.copy()
    mask_strides = _element_strides(mask, (0, 1, 2)) if mask is not None else (numpy.int64(0),) * 3
    alibi_strides = _element_strides(alibi, (0, 1)) if alibi is not None else (numpy.int64(0),) * 2
    threads, nv, chunks, chunk = softmax_plan(rows, k, vec, 2 * sm_count())
    phases = (0,) if chunks == 1 else (1, 2)
    names = [_name(s.dtype, vec, threads, nv, phase) for phase in phases]
    # One chunk a row: at most one wave of blocks, each looping over rows. Chunks: a block each.
    grid = (
        min(math.ceil(rows / (256 // threads)), wave_blocks(_KERNELS.kernel(names[0]), 256))
        if chunks == 1
        else rows * chunks
    )
    stats = cupy.empty(2 * rows * chunks, cupy.float32) if chunks > 1 else s  # (max, sum) a chunk; else unread
    for name in names:
        _KERNELS.launch(
            name,
            (grid,),
            (256,),
            s=s,
            p=p,
            mask=s if mask is None else mask,
            alibi=s if alibi is None else alibi,
            stats=stats,
            rows=rows,
            chunks=chunks,
            h=h,
            q=q,
            k=k,
            chunk=chunk,
            layer_scale=layer_scale,
            mask_kind=mask_kind(mask),
            mask_b=mask_strides[0],
            mask_h=mask_strides[1],
            mask_q=mask_strides[2],
            has_alibi=int(alibi is not None),
            alibi_b=alibi_strides[0],
            alibi_h=alibi_strides[1],
            causal=int(triangular),
            window=window or 0,
        )
    return p
