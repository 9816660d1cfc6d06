"""The launcher of ``kernels_cu/prefill_attention_sm90.cu``: prefill attention on Hopper's warpgroup instructions
(wgmma, built for sm_90a alone), its key and value tiles fetched by the tensor memory accelerator
(``runtime/tensor_map.py``); head sizes 64 to 128. Same arguments and result as ``prefill_attention``; short
prompts run as persistent blocks (one wave of blocks takes the work items in turn from a counter)."""

from __future__ import annotations

import math

from ..runtime.kernels import HALF_CTYPES, KernelFamily, ctype_of, dynamic_shared, split_workspace, wave_blocks
from ..runtime.lru import DeviceLRU
from ..runtime.tensor_map import layer_maps, tile_map
from .prefill_attention import block_rules, prefill_inputs, prefill_span, token_strides
from .softmax import MaskKind

# Head size -> keys per tile (128 query rows a block): the faster of 64 and 128 per head size; 80 and 96 run
# padded to 128 dimensions.
PREFILL_SM90_TILE = {64: 128, 80: 64, 96: 64, 128: 64}
# With a boolean mask (and no alibi) 64 keys a tile at every head size: only there does the kernel take the
# mask as bits (attention_tile.cuh's apply), 1.4-1.8x faster with padding masks at head size 64.
PREFILL_SM90_MASK_TILE = 64
# Head size 64 up to this many query tokens, causal or with a boolean mask: blocks of one warpgroup (64 rows,
# 64 keys a tile, up to four blocks an SM), 1.07-1.12x at 256-384 tokens; from 512 tokens on, and for
# persistent blocks with neither, two warpgroups were faster.
PREFILL_SM90_SHORT = 384
# Up to this many query tokens: persistent blocks (one wave of them claims the work items one by one and loads
# each item's first tiles and Q rows while it finishes the one before; prefill_attention_sm90.cu), 1.02-1.19x
# at 128-1024 tokens; not past that (register spills in the loop at head size 64 ate the gain), nor at head
# size 64 with a boolean mask (slower there).
PREFILL_SM90_PERSIST = 1024


def prefill_sm90_geometry(
    d: int,
    s: int,
    mask_bits: bool,
    causal: bool,
    *,
    short: int = PREFILL_SM90_SHORT,
    persist_up_to: int = PREFILL_SM90_PERSIST,
) -> tuple[int, int, bool]:
    """(keys a tile, warpgroups a block, persistent) for head size ``d`` and ``s`` query tokens; ``mask_bits``: a
    boolean mask without alibi. ``short``, ``persist_up_to``: the token counts up to which one-warpgroup blocks
    and persistent blocks are taken (a test's way to the other geometries)."""
    persist = s <= persist_up_to and not (mask_bits and d == 64)
    if d == 64 and s <= short and (causal or mask_bits):
        return 64, 1, persist
    return (PREFILL_SM90_MASK_TILE if mask_bits else PREFILL_SM90_TILE[d]), 2, persist


def _name(ctype: str, d: int, geometry: tuple[int, int, bool]) -> str:
    bn, wg, persist = geometry
    return f"ct::attention_prefill_sm90<{ctype}, {d}, {bn}, {wg}, {str(persist).lower()}>"


_KERNELS = KernelFamily(  # every tile and block size prefill_sm90_geometry picks, persistent or not
    "prefill_attention_sm90.cu",
    [
        _name(c, d, (bn, wg, persist))
        for c in HALF_CTYPES
        for d, bn, wg in sorted(
            {
                (d, *prefill_sm90_geometry(d, s, bits, causal)[:2])
                for d in PREFILL_SM90_TILE
                for s in (1, PREFILL_SM90_SHORT + 1)
                for bits in (False, True)
                for causal in (False, True)
            }
        )
        for persist in (False, True)
    ],
    arch="90a",
)


def prefill_sm90_runs(d: int) -> bool:
    """Whether this kernel takes head size ``d`` on the current GPU (compute capability 9.0)."""
    return d in PREFILL_SM90_TILE and _KERNELS.builds_here()


# A launch's shape-derived parts per (device, call shape): every layer of a prompt pass repeats them.
_PLANS = DeviceLRU(256)


def _plan(q, group, m, scale, causal, window, geometry=None, blocks=None, span=None) -> tuple:
    """(name, grid, block, shared memory, keys a tile, persistent, block_rules + items) of a launch on ``q``
    [B, h, S, d] with ``group`` query heads a kv head and mask arguments ``m``; ``prefill_attention_sm90``'s
    keyword arguments, None: the launcher's choice."""
    b, h, s, d = q.shape
    if geometry is None:
        geometry = prefill_sm90_geometry(d, s, m.mask_kind == MaskKind.BOOLEAN and m.alibi_len == 0, causal)
    bn, wg, persist = geometry
    name = _name(ctype_of(q.dtype), d, geometry)
    kernel = _KERNELS.kernel(name)
    smem = dynamic_shared(kernel, (64 * wg + 4 * bn) * (64 * math.ceil(d / 64)) * q.dtype.itemsize + 1024)
    rows, block = math.ceil(s / (64 * wg)), 128 * wg
    items = rows * h * b
    wave = wave_blocks(kernel, block, smem) if blocks is None else blocks
    span = prefill_span(wave, rows, group) if span is None else span
    rules = dict(block_rules(s, h, group, causal, window, m, scale, span), items=items)
    return name, (min(items, wave) if persist else items,), (block,), smem, bn, persist, rules


def prefill_attention_sm90(
    q, k, v, start, mask, alibi, scale: float, causal: bool, window: int, *, geometry=None, blocks=None, span=None,
    layers=None,
):  # fmt: skip
    """``prefill_attention``'s call on the Hopper kernel (k and v: 16-bit, 16-byte aligned strides).
    ``geometry``: (keys a tile, warpgroups a block, persistent), an instantiation of the family; ``blocks``: the
    blocks of one wave (a persistent launch's grid, and what ``prefill_span`` counts); ``span``: the grid's group
    size. None: the launcher's choice (``prefill_sm90_geometry``, ``wave_blocks``, ``prefill_span``).
    ``layers``: (keys, values, layer) where k and v are layer ``layer`` of a cache's [layers, B, kv, T, D] arrays:
    their maps come from one upload for every layer (``layer_maps``) instead of one each."""
    b, h, s, d = q.shape
    q, k, v, out, m = prefill_inputs(q, k, v, mask, alibi)
    group = h // k.shape[1]
    if geometry is None and blocks is None and span is None:  # the launcher's choice: one per call shape
        key = (q.dtype, q.shape, group, m.mask_kind, m.mask_len, m.alibi_len, causal, window, scale)
        plan = _PLANS.get(key, lambda: _plan(q, group, m, scale, causal, window))
    else:
        plan = _plan(q, group, m, scale, causal, window, geometry, blocks, span)
    name, grid, block, smem, bn, persist, rules = plan
    if layers is not None and all(_is_layer(a, whole, layers[2]) for a, whole in zip((k, v), layers)):
        kmap, vmap = (layer_maps(whole, bn)[layers[2]] for whole in layers[:2])
    else:
        kmap, vmap = tile_map(k, bn), tile_map(v, bn)
    # Persistent: one wave of blocks claims the items (a counter of split_workspace's); a block an item reads no
    # counter, and gets ``start`` in its place.
    _KERNELS.launch(
        name,
        grid,
        block,
        shared_mem=smem,
        q=q,
        kmap=kmap,
        vmap=vmap,
        out=out,
        mask=m.mask,
        alibi=m.alibi,
        start=start,
        **token_strides("q", q),
        **rules,
        counter=split_workspace(0, 2)[1] if persist else start,
    )
    return out


def _is_layer(a, whole, layer: int) -> bool:
    """Whether ``a`` is ``whole[layer]`` (a view the kernel may read through ``whole``'s layer maps) and ``whole``
    has layers to share them: one layer gains nothing, and a one-layer view made by indexing (an injected model's
    view of a Hugging Face cache layer) may have a layer stride of 0, which no map takes."""
    return (
        whole.shape[0] > 1
        and a.data.ptr == whole.data.ptr + layer * whole.strides[0]
        and a.shape == whole.shape[1:]
        and a.strides == whole.strides[1:]
        and a.dtype == whole.dtype
    )
