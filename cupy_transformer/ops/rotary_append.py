"""The launcher of ``kernels_cu/rotary_append.cu``: rotary and the KV-cache append in one pass over the fused QKV
projection, SoftmaxContextOp's first step on the GPU where it is no decode step (a decode step's kernel turns and
appends its token itself: ``ops/decode_attention.py``; the rotation itself: ``ops/rotary.py``)."""

from __future__ import annotations

from ..runtime.arrays import import_cupy
from ..runtime.kernels import CTYPES, KernelFamily, ctype_of, elementwise_grid, vector_count
from .rotary import inverse_frequencies

_KERNELS = KernelFamily("rotary_append.cu", [f"ct::rotary_append<{c}>" for c in CTYPES.values()], programmatic=True)


def rotary_arguments(cfg) -> tuple[int, object, int]:
    """(rot, inv_freq, half_style) of the kernels that turn q and k as kernels_cu/rotary.cuh does (this family's
    and decode_attention.cu's): the dims turned (0: no rotary), the pairs' inverse frequencies as float32 on the
    GPU (None without rotary: the caller passes any array, never read, rather than allocate one each layer and
    step), 1 for rotate-half pairs (else every-two)."""
    rot = cfg.rotary_dim if cfg.rotary_style is not None else 0
    inv_freq = inverse_frequencies(rot, cfg.rope_theta, import_cupy()) if rot else None
    return rot, inv_freq, int(cfg.rotary_style == "half")


def rotary_append(qkv, position_ids, cfg, h, kv, d, cache, layer, start):
    """q [B, h, S, d] of the projection ``qkv`` [B, S, (h + 2 kv) d], turned (where ``cfg`` has rotary), and K
    (turned) and V written to ``cache``'s ``layer`` from slot ``start[b]`` on (int32 on the GPU; checked against
    the cache by the caller; a token whose slot falls outside the cache, as a device start may put it, gets a NaN
    query and writes nothing); without a cache, K [B, kv, S, d] (V then stays a view of the projection).
    ``position_ids`` None: the slots. Returns (q, k): k None with a cache (the keys are read from it)."""
    cupy = import_cupy()
    b, s, _ = qkv.shape
    rot, inv_freq, half_style = rotary_arguments(cfg)
    q = cupy.empty((b, h, s, d), qkv.dtype)
    if cache is not None:
        k_out, v_out = cache.keys[layer], cache.values[layer]
    else:
        k_out = v_out = cupy.empty((b, kv, s, d), qkv.dtype)
    pairs = b * s * (h + kv + (kv if cache is not None else 0)) * d // 2
    kv_seq, kv_head, kv_tok = (x // qkv.dtype.itemsize for x in k_out.strides[:-1])
    _KERNELS.launch(
        f"ct::rotary_append<{ctype_of(qkv.dtype)}>",
        elementwise_grid(pairs),
        (256,),
        qkv=qkv,
        positions=q if position_ids is None else cupy.ascontiguousarray(position_ids, cupy.int32),
        inv_freq=q if inv_freq is None else inv_freq,  # q: a placeholder, never read without rotary
        start=start,
        q_out=q,
        k_out=k_out,
        v_out=v_out,
        kv_seq=kv_seq,
        kv_head=kv_head,
        kv_tok=kv_tok,
        S=s,
        h=h,
        kv=kv,
        d=d,
        rot=rot,
        half_style=half_style,
        copy_v=int(cache is not None),
        has_positions=int(position_ids is not None),
        slots=k_out.shape[2],
        pairs=vector_count(pairs),
    )
    return q, (k_out if cache is None else None)
