"""The launcher of ``kernels_cu/prefill_attention.cu``: FlashAttention-2-style attention of a prompt's queries
(fp16/bf16 on tensor cores with mma.sync, compute capability 8.0 and later; head sizes 32, 64, 80, 96 and 128),
and the pieces of a launch that the Hopper kernel's launcher (``ops/prefill_attention_sm90.py``) shares."""

from __future__ import annotations

import math

from ..runtime.arrays import import_cupy
from ..runtime.kernels import HALF_CTYPES, KernelFamily, ctype_of, dynamic_shared, wave_blocks
from .softmax import mask_arguments

# Head size -> (row tiles per warp, keys per tile), from benchmarks/sweep_prefill.py.
PREFILL_GEOMETRY = {32: (2, 64), 64: (2, 64), 80: (2, 32), 96: (2, 32), 128: (2, 32)}


def prefill_kernel_name(ctype: str, d: int, geometry) -> str:
    return f"ct::attention_prefill<{ctype}, {d}, {geometry[0]}, {geometry[1]}>"


KERNELS = KernelFamily(  # a sweep runs more geometries through KERNELS.extended(...) and the launcher's family=
    "prefill_attention.cu", [prefill_kernel_name(c, d, g) for c in HALF_CTYPES for d, g in PREFILL_GEOMETRY.items()]
)


def prefill_span(wave: int, rows: int, group: int) -> int:
    """(sequence, head) pairs a group of the prefill grid takes (attention_tile.cuh's prefill_item), for ``wave``
    resident blocks (one wave of the launch's kernel), ``rows`` row blocks a pair and ``group`` query heads a
    kv head: the query heads of as many key/value heads as one wave covers with all their row blocks, so the
    keys and values being read stay in L2. Counted in key/value heads: counted in query heads, grouped-query
    heads ran 2-4% slower."""
    return max(1, wave // rows) * group


def prefill_inputs(q, k, v, mask, alibi):
    """What both prefill kernels take of a call: q, k and v with 16-byte aligned rows (views of the fused
    projection qualify as they are; others are copied), the context array [B, S, h d] to write, and the mask and
    alibi arguments. Returns (q, k, v, out, MaskArguments)."""
    cupy = import_cupy()
    b, h, s, d = q.shape
    items = q.dtype.itemsize

    def aligned(a):
        ok = a.strides[-1] == items and all(x % 16 == 0 for x in a.strides[:-1]) and a.data.ptr % 16 == 0
        return a if ok else cupy.ascontiguousarray(a)

    q, k, v = aligned(q), aligned(k), aligned(v)
    out = cupy.empty((b, s, h * d), q.dtype)
    return q, k, v, out, mask_arguments(mask, alibi, b, h, q)


def block_rules(s: int, h: int, group: int, causal: bool, window: int, m, scale: float, span: int) -> dict:
    """The arguments both prefill kernels pass to their PrefillBlock (attention_tile.cuh), by name in their
    signatures' order: the queries' count, heads and grouping, the key rules, the mask and alibi (``m``:
    ``mask_arguments``'s), the scale and the grid's group size."""
    return dict(
        S=s,
        h=h,
        group=group,
        causal=int(causal),
        window=window,
        mask_kind=m.mask_kind,
        mask_len=m.mask_len,
        alibi_len=m.alibi_len,
        scale=scale,
        span=span,
    )


def token_strides(name: str, a) -> dict:
    """The (sequence, head, token) strides of a [B, heads, T, d] array in elements, as the kernels' arguments
    ``{name}_seq``, ``{name}_head``, ``{name}_tok``."""
    seq, head, tok = (x // a.dtype.itemsize for x in a.strides[:-1])
    return {f"{name}_seq": seq, f"{name}_head": head, f"{name}_tok": tok}


def prefill_attention(
    q, k, v, start, mask, alibi, scale: float, causal: bool, window: int, *, geometry=None, family=None, span=None
):
    """q [B, h, S, d] (any strides, d contiguous) against the keys [0, start[b] + S) of k, v [B, kv, T, d] (a
    cache layer, or this call's tokens with ``start`` 0); ``start`` int32 on the GPU; ``mask`` [B, 1, 1, T'] or
    None, ``alibi`` [B, h, 1, T] or None; ``causal``, and ``window`` keys (0: none). ``geometry`` (row tiles a
    warp, keys a tile), ``family`` (a KernelFamily of prefill_attention.cu holding that instantiation) and
    ``span`` (prefill_span's): None for the launcher's choice. Returns the context [B, S, h d]."""
    b, h, s, d = q.shape
    q, k, v, out, m = prefill_inputs(q, k, v, mask, alibi)
    mt, bn = geometry or PREFILL_GEOMETRY[d]
    family = family or KERNELS
    name = prefill_kernel_name(ctype_of(q.dtype), d, (mt, bn))
    kernel = family.kernel(name)
    smem = dynamic_shared(kernel, (64 * mt + 4 * bn) * (d + 8) * q.dtype.itemsize)  # the kernel's layout
    rows, group = math.ceil(s / (64 * mt)), h // k.shape[1]
    family.launch(
        name,
        (rows * h * b,),
        (128,),
        shared_mem=smem,
        q=q,
        k=k,
        v=v,
        out=out,
        mask=m.mask,
        alibi=m.alibi,
        start=start,
        **token_strides("q", q),
        **token_strides("k", k),
        **token_strides("v", v),
        **block_rules(
            s,
            h,
            group,
            causal,
            window,
            m,
            scale,
            prefill_span(wave_blocks(kernel, 128, smem), rows, group) if span is None else span,
        ),
    )
    return out
