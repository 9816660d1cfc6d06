"""The launcher of ``kernels_cu/decode_attention.cu``: attention of one query token per sequence over a KV cache
(SoftmaxContextOp's decode steps), split along the keys in chunks across blocks, the chunks merged by the block
of a (sequence, kv head) that finishes last (one launch). fp16/bf16 at head sizes 32, 64, 96 and 128 run on
tensor cores (``attention_partial_tc``, the query heads sharing a kv head as the rows of the products), the rest
on CUDA cores (``attention_partial``). A decode step of SoftmaxContextOp launches from the fused QKV projection
(``decode_attention_qkv``): the kernel turns the token's query and key (rotary) and appends its key and value to
the cache itself, so the step runs no rotary_append kernel."""

from __future__ import annotations

import math

import numpy

from ..runtime.arrays import import_cupy
from ..runtime.kernels import (
    CTYPES,
    HALF_CTYPES,
    KernelFamily,
    compute_capability,
    ctype_of,
    split_workspace,
    wave_blocks,
)
from ..runtime.lru import device_int32
from .rotary_append import rotary_arguments
from .softmax import mask_arguments

GROUPS = (1, 2, 4, 8)  # query heads per key/value head that attention_partial takes (rounded up)
TENSOR_CORE_HEAD_SIZES = (32, 64, 96, 128)  # attention_partial_tc's (fp16/bf16, sm_80+)
_KERNELS = KernelFamily(
    "decode_attention.cu",
    [f"ct::attention_partial<{c}, {g}>" for c in CTYPES.values() for g in GROUPS]
    + [f"ct::attention_partial_tc<{c}, {d}, {w}>" for c in HALF_CTYPES for d in TENSOR_CORE_HEAD_SIZES for w in (4, 8)],
    programmatic=True,
)


def decode_on_tensor_cores(dtype, d, capability=None) -> bool:
    """Whether decode runs attention_partial_tc (up to 16 query heads a kv head) or attention_partial (8), on a
    GPU of compute ``capability`` (None: the current one's)."""
    if numpy.dtype(dtype).itemsize != 2 or d not in TENSOR_CORE_HEAD_SIZES:
        return False
    return (compute_capability() if capability is None else capability) >= 80


def decode_max_group(dtype, d, capability=None) -> int:
    """The most query heads per key/value head a decode launch takes: 16 on tensor cores (the rows of an
    m16n8k16 product), else 8."""
    return 16 if decode_on_tensor_cores(dtype, d, capability) else GROUPS[-1]


def _names(dtype, d: int, group: int) -> dict[int, str]:
    """Warps a block -> the kernel for head size ``d`` and ``group`` query heads a kv head (4; 8 too on tensor
    cores)."""
    element = ctype_of(dtype)
    if decode_on_tensor_cores(dtype, d):
        return {w: f"ct::attention_partial_tc<{element}, {d}, {w}>" for w in (4, 8)}
    return {4: f"ct::attention_partial<{element}, {next(g for g in GROUPS if group <= g)}>"}


def decode_geometry(kernels, pairs: int) -> tuple[int, int]:
    """(warps a block, key chunks a (sequence, kv head)) of a decode launch over ``pairs`` such pairs;
    ``kernels``: warps -> kernel (4; 8 too for the tensor-core kernel). Chunks: one wave of 4-warp blocks (as
    many as the SMs hold at once: a second, partial wave cost a whole block's time), at most 256 (the merge
    walks them in one loop). The last block of a pair merges its chunks after the streams end, so the
    tensor-core kernel trades chunks for 8-warp blocks where there are many: where the wave gives two chunks a
    pair and one wave of 8-warp blocks holds a block a pair, those take all of a pair's keys (no merge:
    1.05-1.13x at 96-192 pairs, D128); past 16 chunks (up to 16 pairs), 8-warp blocks in at most 16 chunks,
    whose shorter merge paid for the fewer blocks (up to 1.8x at batch 1)."""
    chunks = max(1, min(wave_blocks(kernels[4], 128) // pairs, 256))
    if 8 not in kernels:
        return 4, chunks
    wave = wave_blocks(kernels[8], 256)
    if chunks == 2 and wave >= pairs:
        return 8, 1
    if chunks > 16:
        return 8, max(1, min(wave // pairs, 16))
    return 4, chunks


def one_block_keys(d: int, warps: int) -> int:
    """The most keys a sequence may have for one block to take them all, with no merge: four 16-key tiles a warp
    at head size 64 (as many bytes at others). Past that, chunks of at least 64 keys merged by the last block,
    whose partial rows, ticket and merge cost a short sequence about 2 µs more (notes: decode_attention.md)."""
    return max(64, 4096 * warps // d // 64 * 64)


def decode_attention(
    q, cache, layer: int, start, window: int, mask, alibi, scale: float, *, warps=None, chunks=None, one_block=None
):
    """q [B, h, 1, d] (one token a sequence, in cache slot ``start[b]``, turned, its key and value in the cache
    already: rotary_append's) against the keys of ``cache``'s ``layer`` up to that slot (the last ``window`` of
    them; 0: all). ``start``: host integers, or an int32 array on the GPU, which the kernel reads there (a
    captured step's; a slot outside the cache gives that sequence a NaN context, and nothing is read or written
    for it). ``mask`` [B, 1, 1, T] or None, ``alibi`` [B, h, 1, T] or None. ``warps`` and ``chunks``: the launch's
    geometry (both or neither; None: ``decode_geometry``'s); ``one_block``: the most keys a sequence has for one
    block to take them (None: ``one_block_keys``'; 0: always chunks).
    Returns the context [B, 1, h d]. (SoftmaxContextOp's decode steps run ``decode_attention_qkv``.)"""
    b, h, _, d = q.shape
    q = import_cupy().ascontiguousarray(q)
    return _launch(
        q, h * d, None, None, h, d, cache, layer, start, window, mask, alibi, scale, warps, chunks, one_block
    )


def decode_attention_qkv(
    qkv,
    position_ids,
    cfg,
    h: int,
    cache,
    layer: int,
    start,
    window: int,
    mask,
    alibi,
    scale: float,
    *,
    warps=None,
    chunks=None,
    one_block=None,
):
    """A decode step from the fused projection ``qkv`` [B, 1, (h + 2 kv) d] (C-contiguous; ``kv``, ``d``:
    ``cache``'s) in one launch, in place of rotary_append then ``decode_attention``: the kernel turns the query
    and key where ``cfg`` has rotary (as rotary_append turns them, to the bit: kernels_cu/rotary.cuh) at
    ``position_ids`` [B, 1] (GPU integers; None: the slots ``start``), writes the key and value into slot
    ``start[b]`` of ``cache``'s ``layer`` (the caller reserved it) and attends as ``decode_attention`` does, whose
    other arguments these are. Returns the context [B, 1, h d]."""
    cupy = import_cupy()
    positions = None if position_ids is None else cupy.ascontiguousarray(position_ids, cupy.int32)
    return _launch(
        qkv,
        qkv.shape[-1],
        rotary_arguments(cfg),
        positions,
        h,
        cache.head_dim,
        cache,
        layer,
        start,
        window,
        mask,
        alibi,
        scale,
        warps,
        chunks,
        one_block,
    )


def _launch(
    q, q_seq, rotary, positions, h, d, cache, layer, start, window, mask, alibi, scale, warps, chunks, one_block
):
    """The decode launch: sequence b's token at ``q`` + b ``q_seq`` (query heads first), with ``rotary``
    (rotary_arguments') the kernel turns and appends it; None: q turned and appended already."""
    cupy = import_cupy()
    b = q.shape[0]
    kv = cache.kv_heads
    on_host = isinstance(start, numpy.ndarray)
    t = int(start.max()) + 1 if on_host else cache.max_tokens  # the most keys a sequence has (at most)
    names = _names(q.dtype, d, h // kv)
    if warps is None and chunks is None:
        warps, chunks = decode_geometry({w: _KERNELS.kernel(n) for w, n in names.items()}, b * kv)
    elif warps not in names or chunks is None or chunks < 1:
        raise ValueError(
            f"warps, chunks: expected {' or '.join(map(str, names))} warps and a positive number of "
            f"chunks for {names[4]}; got {warps!r}, {chunks!r}"
        )
    if one_block is None:
        one_block = one_block_keys(d, warps)
    elif isinstance(one_block, bool) or not isinstance(one_block, int) or one_block < 0:
        raise ValueError(f"one_block: expected a number of keys >= 0; got {one_block!r}")
    # As many chunks of a multiple of 64 keys as the longest sequence fills (the kernel sizes each sequence's).
    chunks = 1 if t <= one_block else math.ceil(t / (64 * max(1, math.ceil(t / chunks / 64))))
    partial, counters = split_workspace(b * h * chunks * (d + 4), b * kv)  # the chunks' rows; the last merges
    out = cupy.empty((b, 1, h * d), q.dtype)
    m = mask_arguments(mask, alibi, b, h, q)
    start = device_int32(start) if on_host else start
    rot, inv_freq, half_style = rotary if rotary is not None else (0, out, 0)  # out: a placeholder, never read
    keys, values = cache.keys[layer], cache.values[layer]
    _KERNELS.launch(
        names[warps],
        (chunks, kv, b),
        (32 * warps,),
        q=q,
        positions=start if positions is None else positions,  # start: a placeholder, never read
        inv_freq=out if inv_freq is None else inv_freq,  # out: a placeholder, never read without rotary
        k=keys,
        v=values,
        k_out=keys,
        v_out=values,
        mask=m.mask,
        alibi=m.alibi,
        start=start,
        partial=partial,
        out=out,
        counters=counters,
        q_seq=q_seq,
        h=h,
        kv=kv,
        d=d,
        max_tokens=cache.max_tokens,
        window=window,
        one_block=one_block,
        mask_kind=m.mask_kind,
        mask_len=m.mask_len,
        alibi_len=m.alibi_len,
        rot=rot,
        half_style=half_style,
        has_positions=int(positions is not None),
        append=int(rotary is not None),
        scale=scale,
    )
    return out
