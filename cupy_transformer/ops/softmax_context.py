"""SoftmaxContextOp: the attention core of DeepSpeed-Inference's GPT-style layers, from the fused QKV projection
to the context (split the heads, rotary, append K and V to the cache, masked softmax, context, merge the heads).

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

Where DeepSpeed is suspect or implicit, we decide: it keeps a process-global token counter (a prompt restarts
it, each decode step reads it) and writes the cache without a bounds check; here the cache and the positions
are the caller's, and capacity is checked before writing (``KVCache.reserve``). ``scale`` defaults to
``1 / sqrt(d)``, and DeepSpeed's ``norm_factor`` is accepted with its meaning (scores times
``norm_factor ** 2``); the score is computed in fp32 from the start, so DeepSpeed's ``layer_scale`` split for
fp16 range is not needed; DeepSpeed applies both rotary pairings when both flags are set, here that is a
config error; head sizes are multiples of 8 up to 256 (what the kernels will take). Returns
``(context, keys, values)``: the keys and values attended, ``[B, kv, T, d]`` (cache views with a cache), not
expanded to the query heads (DeepSpeed stores them expanded).

On the GPU, each step is a kernel family's launcher (``attention_path`` chooses): a decode step (one token per
sequence, with a cache, up to 8 query heads per key/value head, 16 on tensor cores, a per-key mask or none) is one
launch, ``decode_attention_qkv`` (ops/decode_attention.py), which turns the token's Q and K, writes its K and V
into the cache and attends. Otherwise ``rotary_append`` (ops/rotary_append.py) turns Q and K and writes K and V
into the cache in one pass over the projection (where there is a cache or rotary). Other fp16/bf16 calls with head
sizes 32, 64, 80, 96 or 128 and a per-key mask (or none) run ``prefill_attention`` (ops/prefill_attention.py,
FlashAttention-2 style, compute capability 8.0 and later), or on compute capability 9.0 (H100, H200) at head
sizes 64 to 128 ``prefill_attention_sm90`` (ops/prefill_attention_sm90.py, the same math on Hopper's
warpgroup instructions). The rest (fp32, other head sizes, masks per query or head) computes
``attention_reference`` with CuPy array operations in fp32.

``start`` may also be an int32 array on the GPU (``KVCache.device_lengths``: a decode step that advances it on
the device). Nothing is then read on the host: the kernels read the slots there, the key ranges are sized for
the cache's capacity (the keys and values returned span it), and the caller has checked the room
(``KVCache.reserve``). That is how a decode step is captured into a CUDA graph and replayed every token; a
host ``start`` on a stream being captured raises ``RuntimeError`` (a replay would repeat the captured slots).
"""

from __future__ import annotations

import math

import numpy

from ..kv_cache import KVCache
from ..runtime.arrays import array_module, as_array, backend_of, common_kind, module_of, reference_compute, to_caller
from ..runtime.kernels import compute_capability
from ..runtime.lru import device_int32
from .base import TransformerOp
from .decode_attention import decode_attention, decode_attention_qkv, decode_max_group
from .matmul import fusing
from .prefill_attention import PREFILL_GEOMETRY, prefill_attention
from .prefill_attention_sm90 import prefill_attention_sm90, prefill_sm90_runs
from .rotary import apply_rotary
from .rotary_append import rotary_append
from .softmax import alibi_rows, key_mask, softmax_reference

MAX_HEAD_SIZE = 256
_GRID_Y = 65535  # a launch's grid y and z; past it a call takes the array-operation path


class SoftmaxContextOp(TransformerOp):
    def forward(
        self,
        query_key_value,
        attn_mask=None,
        cache=None,
        layer_id=0,
        start=None,
        position_ids=None,
        alibi=None,
        norm_factor=None,
        *,
        scale=None,
    ):
        """See the module docstring. ``start``: positions from ``cache.reserve`` (required with a cache; checked
        against its capacity before anything is written or launched), or ``cache.device_lengths`` on the GPU;
        ``position_ids`` [B, S] int32 or int64: NumPy ones must lie in [0, 2^31) (the kernel's int32), GPU ones
        are trusted (reading them on the host would cost a sync every layer); ``alibi`` [B, h, 1, T] or
        [B * h, 1, T] for this rank's heads; ``scale`` or DeepSpeed's ``norm_factor`` (scale = norm_factor ** 2),
        not both."""
        cfg = self.config
        h, kv, d = cfg.heads // cfg.mp_size, cfg.num_kv // cfg.mp_size, cfg.head_size
        if d % 8 or d > MAX_HEAD_SIZE:
            raise ValueError(f"head size {d} (hidden_size / heads): expected a multiple of 8 up to {MAX_HEAD_SIZE}")
        kind = common_kind(query_key_value=query_key_value, attn_mask=attn_mask, alibi=alibi)
        qkv = as_array("query_key_value", query_key_value, kind, ndim=3, dtypes=cfg.dtype)
        b, s, width = qkv.shape
        if width != (h + 2 * kv) * d:
            raise ValueError(
                f"query_key_value: expected a last dimension of (heads {h} + 2 x kv heads {kv}) x head "
                f"size {d} = {(h + 2 * kv) * d}; got shape {tuple(qkv.shape)}"
            )
        if b == 0 or s == 0:
            raise ValueError(f"query_key_value: expected at least one sequence and token; got shape {tuple(qkv.shape)}")
        start = self._start(cache, layer_id, kind, b, s, kv, d, start)
        t = key_count(cache, start, s)
        position_ids = self._position_ids(position_ids, kind, b, s)  # None: start[b] + 0 .. S - 1
        mask = key_mask(attn_mask, kind, cfg.dtype, b, h, s, t, wider=True)
        rows = alibi_rows(alibi, kind, cfg.dtype, b, h, h, 0, t)  # this rank's heads only
        if scale is not None and norm_factor is not None:
            raise ValueError("scale, norm_factor: give one (scale = norm_factor ** 2)")
        factor = (
            1 / math.sqrt(d)
            if scale is None and norm_factor is None
            else (scale if scale is not None else norm_factor**2)
        )
        if isinstance(factor, bool) or not isinstance(factor, (int, float)) or not math.isfinite(factor):
            raise ValueError(f"scale: expected a finite number; got {factor!r}")
        context, k, v = self.attend(qkv, cache, layer_id, start, position_ids, mask, rows, factor)
        if cache is not None:
            k, v = cache.keys[layer_id, :, :, :t], cache.values[layer_id, :, :, :t]
        return to_caller(context, kind), to_caller(k, kind), to_caller(v, kind)

    def attend(self, qkv, cache=None, layer_id=0, start=None, position_ids=None, mask=None, alibi=None, scale=None):
        """The attention on arguments ``forward`` has checked, or a model's layer has from checked inputs (its
        projection [B, S, (h + 2 kv) d]; its cache with ``start`` from ``cache.reserve``, int64 on the host, or the
        cache's device lengths; ``position_ids`` int32 [B, S] or None; ``mask`` as ``key_mask`` returns it (over
        ``key_count`` keys or more), ``alibi`` as ``alibi_rows`` does; ``scale`` default 1 / sqrt(d)): nothing is
        checked again. Returns (context [B, S, h d], k, v): without a cache the keys and values attended, else
        None, None (they are the cache's)."""
        cfg = self.config
        h, kv, d = cfg.heads // cfg.mp_size, cfg.num_kv // cfg.mp_size, cfg.head_size
        b, s, _ = qkv.shape
        xp = module_of(qkv)
        if start is None:  # no cache: the keys are this call's, from slot 0
            start = numpy.zeros(b, numpy.int64)
        on_device = not isinstance(start, numpy.ndarray)
        if xp is not numpy and not on_device and xp.cuda.get_current_stream().is_capturing():
            raise RuntimeError(
                "start: a step captured into a CUDA graph needs its cache slots on the GPU "
                "(cache.device_lengths); host ones would be repeated by every replay"
            )
        factor = 1 / math.sqrt(d) if scale is None else scale
        window = cfg.window_size if cfg.local_attention else None
        per_key_mask = mask is None or (mask.shape[1] == 1 and mask.shape[2] == 1)
        capability = compute_capability() if xp is not numpy else 0
        path = attention_path(xp is not numpy, b, h, kv, s, d, cfg.dtype, cache is not None, per_key_mask, capability)

        def heads(first_head, count):  # qkv's heads first_head .. + count as a [B, count, S, d] view
            part = qkv[..., first_head * d : (first_head + count) * d]
            return part.reshape(b, s, count, d).transpose(0, 2, 1, 3)

        # Views are made only where a branch reads them: a prompt pass on the GPU with a cache reads q from
        # rotary_append and k / v from the cache, and nine array views a layer are host time a prompt pays.
        first = None if xp is numpy else (start if on_device else device_int32(start))
        fused = path == "decode" and fusing()
        q = k = v = None
        if fused:  # the kernel turns q and k and appends k and v itself
            context = decode_attention_qkv(
                qkv, position_ids, cfg, h, cache, layer_id, start, window or 0, mask, alibi, factor
            )
        elif xp is not numpy and (cache is not None or cfg.rotary_style is not None):
            q, k = rotary_append(qkv, position_ids, cfg, h, kv, d, cache, layer_id, first)
        else:
            q, k = heads(0, h), heads(h, kv)
            if cfg.rotary_style is not None:
                positions = position_ids if position_ids is not None else xp.asarray(start[:, None] + numpy.arange(s))
                q = apply_rotary(q, positions, cfg.rotary_dim, cfg.rope_theta, cfg.rotary_style)
                k = apply_rotary(k, positions, cfg.rotary_dim, cfg.rope_theta, cfg.rotary_style)
        if cache is None or xp is numpy:
            v = heads(h + kv, kv)
        if cache is not None and xp is numpy:
            cache.write(layer_id, xp.ascontiguousarray(k), xp.ascontiguousarray(v), start)
        if path == "prefill":
            src_k, src_v = (cache.keys[layer_id], cache.values[layer_id]) if cache is not None else (k, v)
            rules = dict(causal=cfg.triangular_masking, window=window or 0)
            if prefill_sm90_runs(d):  # a cache's layers share one upload of their tensor maps
                layers = None if cache is None else (cache.keys, cache.values, layer_id)
                context = prefill_attention_sm90(q, src_k, src_v, first, mask, alibi, factor, **rules, layers=layers)
            else:
                context = prefill_attention(q, src_k, src_v, first, mask, alibi, factor, **rules)
        elif path == "decode" and not fused:  # unfused (ops.matmul.fused_decode(False)): after rotary_append above
            context = decode_attention(q, cache, layer_id, start, window or 0, mask, alibi, factor)
        elif path == "reference":
            keys, values = (k, v)
            if cache is not None:
                t = key_count(cache, start, s)
                keys, values = cache.keys[layer_id, :, :, :t], cache.values[layer_id, :, :, :t]
            context = attention_reference(
                q, keys, values, start, mask, alibi, factor, causal=cfg.triangular_masking, window=window
            )
        return (context, None, None) if cache is not None else (context, k, v)

    def kernels(self, batch: int, tokens: int) -> bool:
        """Whether a GPU pass of ``tokens`` tokens a sequence with a cache (its padding masked by key, or none)
        runs on this op's kernels rather than ``attention_reference``, whose array operations call CuPy's cuBLAS:
        refused inside a stream capture, so a decoder does not capture such a prompt pass or step."""
        cfg = self.config
        h, kv = cfg.heads // cfg.mp_size, cfg.num_kv // cfg.mp_size
        path = attention_path(True, batch, h, kv, tokens, cfg.head_size, cfg.dtype, True, True, compute_capability())
        return path != "reference"

    def _start(self, cache, layer_id, kind, b, s, kv, d, start):
        """Each sequence's first slot for this call's ``s`` tokens (zeros without a cache), checked against the
        cache (before the mask, whose width follows from it)."""
        if cache is None:
            if start is not None:
                raise ValueError("start: positions in a cache; got start without a cache")
            return numpy.zeros(b, numpy.int64)
        if not isinstance(cache, KVCache):
            raise TypeError(f"cache: expected a KVCache; got {type(cache).__name__}")
        want = (b, kv, d, self.config.dtype, backend_of(kind))
        have = (cache.batch, cache.kv_heads, cache.head_dim, cache.dtype, cache.backend)
        if want != have:
            raise ValueError(
                f"cache: expected batch {b}, {kv} kv heads of size {d}, {want[3]}, {want[4]} arrays; "
                f"got batch {have[0]}, {have[1]} kv heads of size {have[2]}, {have[3]}, {have[4]}"
            )
        if start is None:
            raise ValueError("start: with a cache, pass where this step's tokens go (start = cache.reserve(tokens))")
        if array_module(backend_of(kind)) is not numpy and module_of(start) is not numpy:  # checked by reserve
            cache.check_layer(layer_id)
            return as_array("start", start, kind, dtypes=numpy.dtype(numpy.int32), shape=(b,))
        return cache.check_write(layer_id, s, start).astype(numpy.int64)

    def _position_ids(self, position_ids, kind, b, s):
        if position_ids is None:
            return None
        ids = as_array(
            "position_ids",
            position_ids,
            kind,
            ndim=2,
            dtypes=tuple(numpy.dtype(t) for t in (numpy.int32, numpy.int64)),
            shape=(b, s),
        )
        if module_of(ids) is numpy and (ids.min() < 0 or ids.max() >= 2**31):  # GPU ones: no sync to read them
            raise ValueError(f"position_ids: expected positions in [0, 2^31); got {ids.min()} to {ids.max()}")
        return ids


def key_count(cache, start, s: int) -> int:
    """The most keys any sequence attends for ``s`` tokens from ``start``: the cache's capacity where ``start`` is
    on the device (nothing is read there), else the furthest slot written plus one."""
    return cache.max_tokens if not isinstance(start, numpy.ndarray) else int(start.max()) + s


def attention_path(gpu, b, h, kv, s, d, dtype, cached, per_key_mask, capability) -> str:
    """Which launch computes SoftmaxContextOp's attention: "decode" (``decode_attention_qkv``: one token a
    sequence, a cache, a per-key mask or none, up to 8 query heads a kv head, 16 on tensor cores; it turns and
    appends the token itself), "prefill" (fp16/bf16, a head size of PREFILL_GEOMETRY, a per-key mask or none,
    compute ``capability`` 8.0 and later; after rotary_append) or "reference" (``attention_reference``, with
    array operations: NumPy, and what no kernel takes). ``gpu``: CuPy arrays; ``cached``: a cache is given."""
    kernels = gpu and b <= _GRID_Y and h <= _GRID_Y and b * h * s < 2**31  # the kernels' grids
    if kernels and cached and s == 1 and per_key_mask and h // kv <= decode_max_group(dtype, d, capability):
        return "decode"
    if kernels and numpy.dtype(dtype).itemsize == 2 and d in PREFILL_GEOMETRY and per_key_mask and capability >= 80:
        return "prefill"
    return "reference"


def attention_reference(q, keys, values, start, mask=None, alibi=None, scale=1.0, causal=True, window=None):
    """The formula on one backend's arrays, in ``reference_compute``'s type (NumPy: float64; CuPy: float32),
    returned in q's dtype as the context [B, S, h d]: q [B, h, S, d] against keys, values [B, kv, T, d] (T: the
    longest sequence's keys; query head i with kv head i // (h / kv)); ``start`` [B] integers (host, or q's
    backend): sequence b's queries sit in slots start[b] .. start[b] + S and its keys are the first start[b] + S
    slots (those past it may hold anything); ``mask`` broadcastable to [B, h, S, T' >= T] (additive or boolean)
    or None; ``alibi`` [B, h, 1, T] or None; ``causal``; ``window`` keys (None: none)."""
    xp = module_of(q)
    b, h, s, d = q.shape
    kv, t = keys.shape[1], keys.shape[2]
    keys_len = start + s
    # Slot rules per sequence: query s in slot start + s; keys below keys_len; causal; window.
    slot = xp.asarray(start)[:, None, None] + xp.arange(s)[None, :, None]  # [B, S, 1]
    key = xp.arange(t)[None, None, :]
    keep = key < xp.asarray(keys_len)[:, None, None]
    if causal:
        keep = keep & (key <= slot)
    if window is not None:
        keep = keep & (key > slot - window)
    compute = reference_compute(xp, q.dtype)
    bias = xp.where(keep[:, None], 0.0, -numpy.inf).astype(compute)  # [B, 1, S, T]: -inf drops a key
    if mask is not None:
        mask = mask[..., :t]
        bias = bias + (xp.where(mask, 0.0, -numpy.inf) if mask.dtype == numpy.bool_ else mask).astype(compute)
    if alibi is not None:
        bias = bias + alibi.astype(compute)
    groups = h // kv
    # A cache slot past a shorter sequence's keys may hold anything, NaN too (0 x NaN is NaN): zeros.
    filled = (key[0] < xp.asarray(keys_len)[:, None])[:, None, :, None]  # [B, 1, T, 1]
    if xp is numpy and filled.all():  # every slot a key (a CPU decode step at batch 1): no copy in float32
        k_all, v_all = keys.astype(compute, copy=False), values.astype(compute, copy=False)
    else:
        k_all, v_all = (xp.where(filled, a.astype(compute), 0) for a in (keys, values))
    qg = q.astype(compute).reshape(b, kv, groups, s, d)
    if xp is numpy:  # BLAS a (sequence, kv head, group); NumPy's einsum loops in C without it
        scores = (qg @ k_all[:, :, None].swapaxes(-1, -2)).reshape(b, h, s, t)
    else:
        scores = xp.einsum("bkgsd,bktd->bkgst", qg, k_all).reshape(b, h, s, t)
    p = softmax_reference(scores, bias, layer_scale=scale).reshape(b, kv, groups, s, t)
    context = p @ v_all[:, :, None] if xp is numpy else xp.einsum("bkgst,bktd->bkgsd", p, v_all)
    # CuPy's einsum may pick any output layout, so the reshape below can be a strided view.
    context = context.reshape(b, h, s, d).transpose(0, 2, 1, 3).reshape(b, s, h * d)
    return xp.ascontiguousarray(context.astype(q.dtype, copy=False))
