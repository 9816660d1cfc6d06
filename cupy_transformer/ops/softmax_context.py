"""SoftmaxContextOp (``ops-spec.md`` §5): the attention core, from the fused QKV projection to the context.

For ``query_key_value`` ``[B, S, (h + 2 kv) d]`` (per token ``[Q | K | V]``, heads contiguous in each block;
``h = heads / mp_size`` query heads and ``kv = num_kv / mp_size`` key/value heads on this rank, ``d`` the
head size):

1. split heads; rotary (config ``rotary_dim``, ``rotate_half`` / ``rotate_every_two``, ``rope_theta``) turns
   Q and K at ``position_ids`` [B, S] (default: each sequence's next positions);
2. with a ``cache`` (``KVCache``), K and V are written at ``start[b] ..`` of sequence ``b`` (``start`` from
   ``cache.reserve(S)``, once per step for all layers) and the keys are the sequence's first
   ``start[b] + S`` tokens; without one, the keys are this call's tokens;
3. query head ``i`` attends with key/value head ``i // (h / kv)`` (grouped-query attention, K/V not
   expanded): ``softmax(Q K^T * scale + alibi + mask)`` with the causal rule (``triangular_masking``; off
   for bidirectional encoders), GPT-Neo's local window (``local_attention``, ``window_size``) and the
   caller's mask, as ``SoftmaxOp`` computes it; then ``P V`` merged to ``[B, S, h d]``.

Keys are counted in cache slots, which are in time order per sequence: query ``s`` of sequence ``b`` sits
in slot ``start[b] + s`` and may see slots up to it (causal) and, with a window, the last ``window_size``.
Padding is the caller's ``attn_mask`` over key slots ([B, T] boolean or additive, or [B, 1|h, S|1, T],
``T`` = the longest sequence's keys or more: a buffer over the whole cache keeps one shape every step), with
``position_ids`` that skip the pads, so padded sequences get what they would alone.

Decisions where DeepSpeed is suspect or implicit: no process-global token counter (the cache and the
positions are the caller's); capacity is checked before writing (``KVCache.reserve``); ``scale`` defaults to
``1 / sqrt(d)``, and DeepSpeed's ``norm_factor`` is accepted with its meaning (scores times
``norm_factor ** 2``); the score is computed in fp32 from the start, so DeepSpeed's ``layer_scale`` split
for fp16 range is not needed; rotary pairings are exclusive (both flags is a config error); head sizes are
multiples of 8 up to 256 (what the kernels will take). Returns ``(context, keys, values)``: the keys and
values attended, ``[B, kv, T, d]`` (cache views with a cache), not expanded to the query heads.

On the GPU, ``kernels_cu/rotary_append.cu`` turns Q and K and writes K and V into the cache in one pass over
the projection (where there is a cache or rotary). A decode step (one token per sequence, with a cache, up to
8 query heads per key/value head, 16 on tensor cores, a per-key mask or none) runs
``kernels_cu/decode_attention.cu``: the keys split in chunks across blocks, K and V read once for the heads
that share them, chunks merged in a fixed order by the block that finishes last (one launch; a batch that
fills the GPU takes one chunk a block, which writes its context straight); fp16/bf16 with
head sizes 32, 64, 96 or 128 on tensor cores (the heads sharing a key/value head are the rows of the
products), the rest on CUDA cores. Other fp16/bf16 calls with head sizes 32, 64, 80, 96 or 128 and a per-key
mask (or none) run ``kernels_cu/prefill_attention.cu`` (FlashAttention-2 style: tiles of queries against
streamed tiles of keys, online softmax, tensor cores, no score matrix in memory; needs compute capability 8.0);
on compute capability 9.0 (H100, H200) head sizes 64 to 128 run ``kernels_cu/prefill_attention_sm90.cu``
instead, the same math on Hopper's warpgroup instructions (wgmma), its key and value tiles fetched by the
tensor memory accelerator (``runtime/tensor_map.py``), as persistent blocks for prompts of up to 1024 tokens
(one wave of blocks takes the row blocks in turn from a counter). The rest (fp32, other head sizes, masks per query or
head) computes the same formula with CuPy array operations in fp32. A call on a stream being captured into a
CUDA graph raises ``RuntimeError``: positions and key ranges are read on the host, so a replay would repeat
the captured step's.
"""

from __future__ import annotations

import collections
import math

import numpy

from ..kv_cache import KVCache
from ..runtime.arrays import as_array, common_kind, import_cupy, to_caller
from ..runtime.tensor_map import tile_map
from ..runtime.kernels import (CTYPES, KernelFamily, compute_capability, dynamic_shared, elementwise_grid, f32, i32,
                               split_workspace, vector_count, wave_blocks)
from .base import TransformerOp
from .rotary import apply_rotary, inverse_frequencies
from .softmax import alibi_rows, key_mask, softmax_reference

MAX_HEAD_SIZE = 256
_GRID_Y = 65535  # a launch's grid y and z; past it a call takes the array-operation path
# Head size -> (row tiles per warp, keys per tile) of the prefill kernel, from benchmarks/sweep_prefill.py.
PREFILL_GEOMETRY = {32: (2, 64), 64: (2, 64), 80: (2, 32), 96: (2, 32), 128: (2, 32)}


def prefill_kernel_name(ctype: str, d: int, geometry) -> str:
    return f"ct::attention_prefill<{ctype}, {d}, {geometry[0]}, {geometry[1]}>"


_PREFILL = KernelFamily(
    "prefill_attention.cu",
    [prefill_kernel_name(c, d, g) for t, c in CTYPES.items() if t.itemsize == 2 for d, g in PREFILL_GEOMETRY.items()],
)
# Head size -> keys per tile of the Hopper prefill kernel (128 query rows a block): the faster of 64 and 128
# with TMA copies in the A/B of benchmarks/results/gpu-runs.md (ninth session); 80 and 96 run padded to 128.
# With a boolean mask (and no alibi) 64 at every head size: only at 64 does the kernel take the mask as bits
# (attention_tile.cuh's apply), 1.4-1.8x faster with padding masks at head size 64 (benchmarks/NOTES.md).
PREFILL_SM90_TILE = {64: 128, 80: 64, 96: 64, 128: 64}
PREFILL_SM90_MASK_TILE = 64
# Head size 64 up to this many query tokens, causal or with a boolean mask: blocks of one warpgroup (64 rows,
# 64 keys a tile, up to four blocks an SM), 1.07-1.12x at S 256-384 on an H200 (persistent and causal,
# 1.03-1.06x); at S 512 and above, and persistent without either (0.90-0.96x), two warpgroups were faster.
PREFILL_SM90_SHORT = 384
# Up to this many query tokens: persistent blocks (one wave of them claims the work items one by one and loads
# each item's first tiles and Q rows while it finishes the one before; prefill_attention_sm90.cu). H200:
# 1.02-1.19x at 128-1024 tokens, 0.97-1.05x at 2048 (register spills in the loop at head size 64), and at head
# size 64 with a boolean mask 0.96-0.99x, so not there (benchmarks/NOTES.md).
PREFILL_SM90_PERSIST = 1024
SM90_PREFILL = True  # take it where it builds (tests turn it off to cover the other kernel there)


def _sm90_geometry(d: int, s: int, mask_bits: bool, causal: bool) -> tuple[int, int, bool]:
    """(keys a tile, warpgroups a block, persistent) of the Hopper prefill kernel for head size ``d`` and
    ``s`` query tokens; ``mask_bits``: a boolean mask without alibi."""
    persist = s <= PREFILL_SM90_PERSIST and not (mask_bits and d == 64)
    if d == 64 and s <= PREFILL_SM90_SHORT and (causal or mask_bits):
        return 64, 1, persist
    return (PREFILL_SM90_MASK_TILE if mask_bits else PREFILL_SM90_TILE[d]), 2, persist


def _sm90_name(ctype: str, d: int, geometry: tuple[int, int, bool]) -> str:
    bn, wg, persist = geometry
    return f"ct::attention_prefill_sm90<{ctype}, {d}, {bn}, {wg}, {str(persist).lower()}>"


_PREFILL_SM90 = KernelFamily(  # every tile and block size _sm90_geometry picks, persistent or not
    "prefill_attention_sm90.cu",
    [_sm90_name(c, d, (bn, wg, persist)) for t, c in CTYPES.items() if t.itemsize == 2
     for d, bn, wg in sorted({(d, *_sm90_geometry(d, s, bits, causal)[:2]) for d in PREFILL_SM90_TILE
                              for s in (1, PREFILL_SM90_SHORT + 1) for bits in (False, True)
                              for causal in (False, True)})
     for persist in (False, True)],
    arch="90a",
)
_GROUPS = (1, 2, 4, 8)  # query heads per key/value head that the decode kernel takes (rounded up)
_DECODE_TC_HEAD_SIZES = (32, 64, 96, 128)  # the tensor-core decode kernel's (fp16/bf16, sm_80+)
_KERNELS = KernelFamily(
    "decode_attention.cu",
    [f"ct::attention_partial<{c}, {g}>" for c in CTYPES.values() for g in _GROUPS]
    + [f"ct::attention_partial_tc<{c}, {d}, {w}>" for t, c in CTYPES.items() if t.itemsize == 2
       for d in _DECODE_TC_HEAD_SIZES for w in (4, 8)]
)
_ROTARY = KernelFamily("rotary_append.cu", [f"ct::rotary_append<{c}>" for c in CTYPES.values()])


class SoftmaxContextOp(TransformerOp):
    def forward(self, query_key_value, attn_mask=None, cache=None, layer_id=0, start=None, position_ids=None,
                alibi=None, norm_factor=None, *, scale=None):
        """See the module docstring. ``start``: positions from ``cache.reserve`` (required with a cache; checked
        against its capacity before anything is written or launched); ``position_ids`` [B, S] int32 or int64:
        NumPy ones must lie in [0, 2^31) (the kernel's int32), GPU ones are trusted (reading them on the host
        would cost a sync every layer); ``alibi`` [B, h, 1, T] or [B * h, 1, T] for this rank's heads;
        ``scale`` or DeepSpeed's ``norm_factor`` (scale = norm_factor ** 2), not both."""
        cfg = self.config
        h, kv, d = cfg.heads // cfg.mp_size, cfg.num_kv // cfg.mp_size, cfg.head_size
        if d % 8 or d > MAX_HEAD_SIZE:
            raise ValueError(f"head size {d} (hidden_size / heads): expected a multiple of 8 up to {MAX_HEAD_SIZE}")
        kind = common_kind(query_key_value=query_key_value, attn_mask=attn_mask, alibi=alibi)
        qkv = as_array("query_key_value", query_key_value, kind, ndim=3, dtypes=cfg.dtype)
        b, s, width = qkv.shape
        if width != (h + 2 * kv) * d:
            raise ValueError(f"query_key_value: expected a last dimension of (heads {h} + 2 x kv heads {kv}) x head "
                             f"size {d} = {(h + 2 * kv) * d}; got shape {tuple(qkv.shape)}")
        if b == 0 or s == 0:
            raise ValueError(f"query_key_value: expected at least one sequence and token; got shape {tuple(qkv.shape)}")
        xp = numpy if kind == "numpy" else import_cupy()
        if xp is not numpy and xp.cuda.get_current_stream().is_capturing():
            raise RuntimeError("SoftmaxContextOp: cannot be captured in a CUDA graph yet: the step's cache positions "
                               "and key ranges are host values, and a replay would repeat this step's")
        start = self._start(cache, layer_id, kind, b, s, kv, d, start)
        keys_len = start + s  # keys per sequence
        t = int(keys_len.max())
        position_ids = self._position_ids(position_ids, kind, b, s)  # None: start[b] + 0 .. S - 1
        mask = key_mask(attn_mask, kind, cfg.dtype, b, h, s, t, wider=True)
        rows = alibi_rows(alibi, kind, cfg.dtype, b, h, h, 0, t)  # this rank's heads only
        if scale is not None and norm_factor is not None:
            raise ValueError("scale, norm_factor: give one (scale = norm_factor ** 2)")
        factor = 1 / math.sqrt(d) if scale is None and norm_factor is None else (
            scale if scale is not None else norm_factor**2)
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
            raise ValueError(f"scale: expected a finite number; got {factor!r}")

        q = qkv[..., : h * d].reshape(b, s, h, d).transpose(0, 2, 1, 3)
        k = qkv[..., h * d:(h + kv) * d].reshape(b, s, kv, d).transpose(0, 2, 1, 3)
        v = qkv[..., (h + kv) * d:].reshape(b, s, kv, d).transpose(0, 2, 1, 3)
        first = None if xp is numpy else _on_device(start)
        if xp is not numpy and (cache is not None or cfg.rotary_style is not None):
            q, k = _rotary_append(qkv, position_ids, cfg, h, kv, d, cache, layer_id, start, first)
        elif cfg.rotary_style is not None:
            positions = position_ids if position_ids is not None else xp.asarray(start[:, None] + numpy.arange(s))
            q = apply_rotary(q, positions, cfg.rotary_dim, cfg.rope_theta, cfg.rotary_style)
            k = apply_rotary(k, positions, cfg.rotary_dim, cfg.rope_theta, cfg.rotary_style)
        if cache is not None:
            if xp is numpy:
                cache.write(layer_id, xp.ascontiguousarray(k), xp.ascontiguousarray(v), start)
            keys, values = cache.keys[layer_id, :, :, :t], cache.values[layer_id, :, :, :t]
        else:
            keys, values = k, v
        per_key_mask = mask is None or (mask.shape[1] == 1 and mask.shape[2] == 1)
        kernels = xp is not numpy and b <= _GRID_Y and h <= _GRID_Y and b * h * s < 2**31  # the kernels' grids
        decode = kernels and cache is not None and s == 1 and per_key_mask
        if decode and h // kv <= (16 if _decode_on_tensor_cores(cfg.dtype, d) else _GROUPS[-1]):
            lo = numpy.maximum(start + 1 - cfg.window_size, 0) if cfg.local_attention else numpy.zeros_like(start)
            context = _decode(q, cache, layer_id, lo, keys_len, mask, rows, factor, h, kv, d)
            return to_caller(context, kind), to_caller(keys, kind), to_caller(values, kind)

        if (kernels and cfg.dtype.itemsize == 2 and d in PREFILL_GEOMETRY and per_key_mask
                and compute_capability() >= 80):
            src_k, src_v = (cache.keys[layer_id], cache.values[layer_id]) if cache is not None else (k, v)
            context = _prefill(q, src_k, src_v, first, mask, rows, factor, cfg)
            return to_caller(context, kind), to_caller(keys, kind), to_caller(values, kind)

        # Slot rules per sequence: query s in slot start + s; keys below keys_len; causal; window.
        slot = xp.asarray(start)[:, None, None] + xp.arange(s)[None, :, None]  # [B, S, 1]
        key = xp.arange(t)[None, None, :]
        keep = key < xp.asarray(keys_len)[:, None, None]
        if cfg.triangular_masking:
            keep = keep & (key <= slot)
        if cfg.local_attention:
            keep = keep & (key > slot - cfg.window_size)
        compute = numpy.float64 if xp is numpy else numpy.float32
        bias = xp.where(keep[:, None], 0.0, -numpy.inf).astype(compute)  # [B, 1, S, T]: -inf drops a key
        if mask is not None:
            mask = mask[..., :t]
            bias = bias + (xp.where(mask, 0.0, -numpy.inf) if mask.dtype == numpy.bool_ else mask).astype(compute)
        if rows is not None:
            bias = bias + rows.astype(compute)
        groups = h // kv
        # A cache slot past a shorter sequence's keys may hold anything, NaN too (0 x NaN is NaN): zeros.
        filled = (key[0] < xp.asarray(keys_len)[:, None])[:, None, :, None]  # [B, 1, T, 1]
        k_all, v_all = (xp.where(filled, a.astype(compute), 0) for a in (keys, values))
        qg = q.astype(compute).reshape(b, kv, groups, s, d)
        scores = xp.einsum("bkgsd,bktd->bkgst", qg, k_all).reshape(b, h, s, t)
        p = softmax_reference(scores, bias, layer_scale=factor)
        context = xp.einsum("bkgst,bktd->bkgsd", p.reshape(b, kv, groups, s, t), v_all)
        # CuPy's einsum may pick any output layout, so the reshape below can be a strided view.
        context = context.reshape(b, h, s, d).transpose(0, 2, 1, 3).reshape(b, s, h * d)
        context = xp.ascontiguousarray(context.astype(cfg.dtype, copy=False))
        return to_caller(context, kind), to_caller(keys, kind), to_caller(values, kind)

    def _start(self, cache, layer_id, kind, b, s, kv, d, start):
        """Each sequence's first slot for this call's ``s`` tokens (zeros without a cache), checked against the
        cache (before the mask, whose width follows from it)."""
        if cache is None:
            if start is not None:
                raise ValueError("start: positions in a cache; got start without a cache")
            return numpy.zeros(b, numpy.int64)
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache; got {type(cache).__name__}")
        want = (b, kv, d, self.config.dtype, "numpy" if kind == "numpy" else "cupy")
        have = (cache.batch, cache.kv_heads, cache.head_dim, cache.dtype, cache.kind)
        if want != have:
            raise ValueError(f"cache: expected batch {b}, {kv} kv heads of size {d}, {want[3]}, {want[4]} arrays; "
                             f"got batch {have[0]}, {have[1]} kv heads of size {have[2]}, {have[3]}, {have[4]}")
        if start is None:
            raise ValueError("start: with a cache, pass where this step's tokens go (start = cache.reserve(tokens))")
        return cache.check_write(layer_id, s, start).astype(numpy.int64)

    def _position_ids(self, position_ids, kind, b, s):
        if position_ids is None:
            return None
        ids = as_array("position_ids", position_ids, kind, ndim=2, dtypes=tuple(
            numpy.dtype(t) for t in (numpy.int32, numpy.int64)), shape=(b, s))
        if kind == "numpy" and (ids.min() < 0 or ids.max() >= 2**31):  # GPU ones: no sync to read them
            raise ValueError(f"position_ids: expected positions in [0, 2^31); got {ids.min()} to {ids.max()}")
        return ids


_ON_DEVICE: collections.OrderedDict[tuple, object] = collections.OrderedDict()


def _on_device(host) -> object:
    """``host`` (per-sequence integers) as an int32 GPU array, uploaded once per distinct content: every layer
    of a step passes the same start and key ranges, so one upload serves them all (the two copies a decode
    call made cost ~7 µs on an H200, against 17-24 µs for the batch-1 kernels). The arrays are never written."""
    cupy = import_cupy()
    values = numpy.ascontiguousarray(host, numpy.int32)
    key = (cupy.cuda.runtime.getDevice(), values.tobytes())
    array = _ON_DEVICE.get(key)
    if array is None:
        array = _ON_DEVICE[key] = cupy.asarray(values)
        while len(_ON_DEVICE) > 16:
            _ON_DEVICE.popitem(last=False)
    else:
        _ON_DEVICE.move_to_end(key)
    return array


def _decode_on_tensor_cores(dtype, d) -> bool:
    """Whether decode runs attention_partial_tc (up to 16 query heads a kv head) or attention_partial (8)."""
    return numpy.dtype(dtype).itemsize == 2 and d in _DECODE_TC_HEAD_SIZES and compute_capability() >= 80


def _decode_geometry(kernels, pairs: int) -> tuple[int, int]:
    """(warps a block, key chunks a (sequence, kv head)) of a decode launch over ``pairs`` such pairs;
    ``kernels``: warps -> kernel (4; 8 too for the tensor-core kernel). Chunks: one wave of 4-warp blocks (as
    many as the SMs hold at once: a second, partial wave cost a whole block's time), at most 256 (the merge
    walks them in one loop). The last block of a pair merges its chunks after the streams end, so the
    tensor-core kernel trades chunks for 8-warp blocks where there are many (H200, D128): where the wave gives
    two chunks a pair and one wave of 8-warp blocks holds a block a pair, those take all of a pair's keys (no
    merge: 1.05-1.13x at 96-192 pairs); past 16 chunks (up to 16 pairs), 8-warp blocks in at most 16 chunks
    (B1 with 2 / 4 / 8 kv heads: 29.1 -> 15.8, 19.8 -> 13.2, 14.3 -> 14.0 µs)."""
    chunks = max(1, min(wave_blocks(kernels[4], 128) // pairs, 256))
    if 8 not in kernels:
        return 4, chunks
    wave = wave_blocks(kernels[8], 256)
    if chunks == 2 and wave >= pairs:
        return 8, 1
    if chunks > 16:
        return 8, max(1, min(wave // pairs, 16))
    return 4, chunks


def _decode(q, cache, layer, lo, hi, mask, alibi, scale, h, kv, d):
    """The decode kernel: q [B, h, 1, d] against keys [lo[b], hi[b]) of ``cache``'s ``layer``; ``mask``
    [B, 1, 1, T] or None, ``alibi`` [B, h, 1, T] or None. Returns the context [B, 1, h d]."""
    cupy = import_cupy()
    b, t = q.shape[0], int(hi.max())
    group = h // kv
    ctype = CTYPES[q.dtype]
    if _decode_on_tensor_cores(q.dtype, d):
        kernels = {w: _KERNELS.kernel(f"ct::attention_partial_tc<{ctype}, {d}, {w}>") for w in (4, 8)}
    else:
        kernels = {4: _KERNELS.kernel(f"ct::attention_partial<{ctype}, {next(g for g in _GROUPS if group <= g)}>")}
    warps, chunks = _decode_geometry(kernels, b * kv)
    kernel = kernels[warps]
    # Chunks of a multiple of 64 keys (a 4-warp step, 16 keys a warp: 125-key chunks took 15.5 µs where 128-key
    # ones took 14.6, batch 1, 8 kv heads, H200).
    chunk = 64 * max(1, math.ceil(t / chunks / 64))
    chunks = math.ceil(t / chunk)
    partial, counters = split_workspace(b * h * chunks * (d + 4), b * kv)  # the chunks' rows; the last merges
    out = cupy.empty((b, 1, h * d), q.dtype)
    mask_kind, mask_arg, mask_len, alibi_arg, alibi_len = _mask_args(mask, alibi, b, h, q)
    kernel(
        (chunks, kv, b), (32 * warps,),
        (cupy.ascontiguousarray(q), cache.keys[layer], cache.values[layer], mask_arg, alibi_arg,
         _on_device(lo), _on_device(hi), partial, out, counters, i32(h), i32(kv), i32(d),
         i32(cache.max_tokens), i32(chunk), i32(mask_kind), i32(mask_len), i32(alibi_len), f32(scale)),
    )
    return out


def _prefill(q, k, v, start, mask, alibi, scale, cfg, kernels=None, geometry=None):
    """The prefill kernel: q [B, h, S, d] (any strides, d contiguous) against the keys [0, start[b] + S) of
    k, v [B, kv, T, d] (a cache layer, or this call's tokens with ``start`` 0); ``start`` int32 on the GPU;
    ``mask`` [B, 1, 1, T'] or None, ``alibi`` [B, h, 1, T] or None. ``kernels`` and ``geometry``: an
    instantiation of prefill_attention.cu (a sweep's); None: the launcher's choice. Returns the context
    [B, S, h d]."""
    cupy = import_cupy()
    b, h, s, d = q.shape
    items = q.dtype.itemsize

    def aligned(a):  # views of the fused projection qualify as they are
        ok = a.strides[-1] == items and all(x % 16 == 0 for x in a.strides[:-1]) and a.data.ptr % 16 == 0
        return a if ok else cupy.ascontiguousarray(a)

    q, k, v = aligned(q), aligned(k), aligned(v)
    out = cupy.empty((b, s, h * d), q.dtype)
    mask_kind, mask_arg, mask_len, alibi_arg, alibi_len = _mask_args(mask, alibi, b, h, q)
    group = h // k.shape[1]
    strides = q.strides[:-1]  # the queries' (sequence, head, token), then K's and V's where the kernel wants them
    if kernels is None and SM90_PREFILL and d in PREFILL_SM90_TILE and _PREFILL_SM90.builds_here():
        bn, wg, persist = sm90 = _sm90_geometry(d, s, mask_kind == 2 and alibi_len == 0, cfg.triangular_masking)
        kernel = _PREFILL_SM90.kernel(_sm90_name(CTYPES[q.dtype], d, sm90))
        smem = dynamic_shared(kernel, (64 * wg + 4 * bn) * (64 * math.ceil(d / 64)) * items + 1024)  # its layout
        rows, block = math.ceil(s / (64 * wg)), 128 * wg
        k, v = tile_map(k, bn), tile_map(v, bn)  # the kernel fetches its tiles by TMA; a map holds the strides
        # Persistent: one wave of blocks claims the rows x h x b work items (a counter of split_workspace's;
        # a block an item reads no counter, and gets ``start`` in its place).
        grid = min(rows * h * b, wave_blocks(kernel, block, smem)) if persist else rows * h * b
        items_args = (i32(rows * h * b), split_workspace(0, 2)[1] if persist else start)
    else:
        mt, bn = geometry or PREFILL_GEOMETRY[d]
        kernel = (kernels or _PREFILL).kernel(prefill_kernel_name(CTYPES[q.dtype], d, (mt, bn)))
        smem = dynamic_shared(kernel, (64 * mt + 4 * bn) * (d + 8) * items)  # the kernel's layout
        rows, block = math.ceil(s / (64 * mt)), 128
        grid, items_args = rows * h * b, ()
        strides += k.strides[:-1] + v.strides[:-1]
    span = prefill_span(kernel, block, smem, rows, group)
    kernel(
        (grid,), (block,),
        (q, k, v, out, mask_arg, alibi_arg, start, *(numpy.int64(x // items) for x in strides), i32(s), i32(h),
         i32(group), i32(cfg.triangular_masking), i32(cfg.window_size if cfg.local_attention else 0),
         i32(mask_kind), i32(mask_len), i32(alibi_len), f32(scale), i32(span), *items_args),
        shared_mem=smem,
    )
    return out


def prefill_span(kernel, threads: int, shared: int, rows: int, group: int) -> int:
    """(sequence, head) pairs a group of the prefill grid takes (attention_tile.cuh's PrefillBlock): the query
    heads of as many key/value heads as one wave of resident blocks covers with all their row blocks, so the
    keys and values being read stay in L2. Counted in key/value heads: with one pair a kv head, grouped-query
    heads (4 a kv head) ran 2-4% slower than all pairs in one group, the order before; per kv head, as fast
    (benchmarks/NOTES.md)."""
    return max(1, wave_blocks(kernel, threads, shared) // rows) * group


def _mask_args(mask, alibi, b, h, placeholder):
    """The kernels' mask and alibi arguments: (mask kind 0 none / 1 additive / 2 boolean, mask [B, T'],
    T', alibi [B, h, T], T (0: none)); ``placeholder`` stands for an absent array (never read)."""
    cupy = import_cupy()
    mask_kind, mask_arg, mask_len = 0, placeholder, 0
    if mask is not None:
        mask_kind = 2 if mask.dtype == numpy.bool_ else 1
        mask_arg, mask_len = cupy.ascontiguousarray(mask.reshape(b, -1)), mask.shape[-1]
    alibi_arg, alibi_len = placeholder, 0
    if alibi is not None:  # a slice of this rank's heads is not contiguous: the kernels index [B, h, T] densely
        alibi_arg, alibi_len = cupy.ascontiguousarray(alibi.reshape(b, h, -1)), alibi.shape[-1]
    return mask_kind, mask_arg, mask_len, alibi_arg, alibi_len


def _rotary_append(qkv, position_ids, cfg, h, kv, d, cache, layer, start, first):
    """The fused rotary + append kernel on the GPU: returns q [B, h, S, d] and k (turned), with K and V
    written to ``cache``'s ``layer`` at ``start`` (``first`` is it on the GPU), or k [B, kv,
    S, d] without a cache (``v`` then stays a view of the projection). ``position_ids`` None: the slots.
    ``start`` must have passed ``cache.check_write`` (the op's ``_start``)."""
    cupy = import_cupy()
    b, s, _ = qkv.shape
    rot = cfg.rotary_dim if cfg.rotary_style is not None else 0
    q = cupy.empty((b, h, s, d), qkv.dtype)
    if cache is not None:
        k_out, v_out = cache.keys[layer], cache.values[layer]
    else:
        k_out = v_out = cupy.empty((b, kv, s, d), qkv.dtype)
    inv_freq = inverse_frequencies(rot, cfg.rope_theta, cupy) if rot else cupy.empty(1, cupy.float32)
    pairs = b * s * (h + kv + (kv if cache is not None else 0)) * d // 2
    strides = (numpy.int64(x // qkv.dtype.itemsize) for x in k_out.strides[:-1])
    _ROTARY.kernel(f"ct::rotary_append<{CTYPES[qkv.dtype]}>")(
        elementwise_grid(pairs), (256,),
        (qkv, q if position_ids is None else cupy.ascontiguousarray(position_ids, cupy.int32), inv_freq, first, q, k_out,
         v_out, *strides, i32(s), i32(h), i32(kv), i32(d), i32(rot), i32(cfg.rotary_style == "half"),
         i32(cache is not None), i32(position_ids is not None), vector_count(pairs)),
    )
    return q, (k_out if cache is None else None)
