"""``kernels_cu/gemv.cu``'s launcher: ``act(x[rows <= 16, K] @ W + bias)`` (fp32: 8 rows) for decode shapes, with W
``[in, out]`` or (``transposed``) ``[out, in]``, and the bias and activation in the kernel's epilogue (fp32, one
rounding).

fp16 and bf16 may fuse a decode layer's neighbours into the product (``gemv_fused_fits``): ``norm=`` computes
``act(NORM(x) @ W + bias)``, NORM normalising each row of x in the kernel's prologue with ``ops.norm``'s kernel's
code for the values, its statistics in one pass (within a rounding of that kernel's output), and ``residual=`` computes
``round(residual + (x @ W + bias))`` (fp32 sum, one rounding, where the unfused path rounds the product first:
``round(residual + round(x @ W) + bias)``).

fp16 and bf16 run the tensor-core kernels at a geometry (pieces a tile, chunks a batch, blocks resident a SM)
chosen per shape, and 9-16 rows as two mma B operands an A fragment (``X8`` 2: the weights are read once for
16 rows as for 8); fp32 runs the FMA kernels with the rows rounded up to 1, 2, 4 or 8. A launch is a grid of
(column tiles, K splits), as many splits as fill the SMs, with the current stream's split workspace
(``runtime.kernels.split_workspace``). ``ops.matmul`` decides where this kernel runs instead of cuBLASLt; ``gemv``
runs it on checked CuPy arrays, and takes ``geometry`` and ``family`` for the geometries a sweep compares
(``benchmarks/sweep_gemv.py``).

A gated activation (LLaMA's SiLU, GATED_GELU) on fp16 / bf16 ``[out, in]`` weights of ``[up | gate]`` rows is the
epilogue too: ``y[rows, N / 2] = up * act(gate)``, to the bit what the product followed by ``bias_act`` gives (each
tile takes 8 outputs' up rows and then their gate rows, so both sums meet in one block), where N / 2 is a multiple of
8. It saves a decode layer's ``bias_act`` launch and the [rows, N] round trip through memory.

Greedy decoding's argmax is an epilogue of fp16 / bf16 ``[out, in]`` products of up to 8 rows and one K split (an LM
head; ``gemv_argmax_fits``): ``argmax=best`` (uint64 [rows], zeros) writes no product; each block offers each row's
largest packed (value, first index) key of its outputs by ``atomicMax`` (a max is order-free: deterministic), so
``best[r]`` ends as the key of the row's first maximum of the products rounded to the dtype, what the sampler's
greedy kernel finds in the written product; ``ops.decode_state.end_step`` takes the tokens from it. A decode step then
runs no sampler kernel and writes no [rows, vocab] logits.
"""

from __future__ import annotations

import math
from typing import NamedTuple

from ..runtime.arrays import import_cupy
from ..runtime.kernels import (
    HALF_CTYPES,
    KernelFamily,
    compute_capability,
    ctype_of,
    dynamic_shared,
    sm_count,
    split_workspace,
    vector_width,
)

GEMV_MAX_ROWS = 16  # fp16 / bf16 (the tensor-core kernels); fp32: _FMA_ROWS
_THREADS = 256  # gemv.cu's GEMV_THREADS
_FMA_ROWS = (1, 2, 4, 8)  # the fp32 kernels' row counts (rows round up)
_GEMV_ACTS = (0, 1, 2, 5)  # identity and the ActivationType values a per-column epilogue can apply
_GATED_ACTS = (3, 4)  # GATED_GELU, GATED_SILU: the [out, in] tensor-core kernels pair W's [up | gate] rows
# The tensor-core kernels' (16- or 32-column pieces a tile, chunks a batch, blocks resident a SM: the launch
# bounds, and how many the K split fills). [in, out]: one piece, and 4 chunks (two 16-byte x loads a lane)
# unless 2 share a split's chunks out over the 8 warps more evenly (`kn_chunks_a_batch`); on an H100 in a CUDA
# graph 1-9% faster than two-piece tiles of 1 chunk a batch or one-piece ones of 2 (benchmarks/notes/gemv.md).
# [out, in] by how many tiles coarse (two-piece) tiles make (`nk_geometry`).
GEMV_TC_KN = ((1, 2, 2), (1, 4, 2))
GEMV_TC_NK = {"fine": (1, 1, 2), "fine, short rows": (1, 4, 1), "coarse": (2, 1, 2), "coarse, 3 a SM": (2, 1, 3)}


# A block whose K range is at most this loads its first batch of weights before it waits for the kernel before
# (and before the norm prologue): a short range's stream is mostly those round trips (GPT-2 small's decode step,
# every product under it, 11% faster on an H100). Since the norm prologue's one pass, ranges up to 4096 gain too
# (every decode product of GPT-2 XL and LLaMA-1B; XL's captured step 3.7% faster than with 1024 here); longer ones
# are not measured. benchmarks/notes/gemv.md.
EARLY_WEIGHTS_K = 4096


def nk_geometry(n: int, k: int, sms: int, rows: int = 1):
    """The [out, in] geometry for N x K on ``sms`` SMs. Where coarse (two-piece) tiles would not give every SM a block
    and rows are short (K <= 3072): fine tiles (one piece: twice the tiles) at one block a SM with 4 chunks a batch,
    which halves the K splits twice over (none where the tiles fill the SMs), as a split's partials and last-block pass
    cost more than they save on short rows. Fine so too at any width for rows of 2048-3072 and up to 8 ``rows``:
    0.92-0.99x the coarse tiles' time at N 16384 and 128256 (LLaMA-1B's up|gate product and LM head; H100, in a graph as
    the step runs them), where rows of 768-1600 take 1.03-1.12x. Longer rows: coarse, their K splits filling the SMs
    (LLaMA-1B's down product, N 2048 x K 8192: the captured step 2.4% faster than with fine tiles on an H100; neutral at
    the LLaMA-7B shape). Coarse at 3 blocks a SM where 2 would leave a second, partial wave (N = 11008: 344 tiles on 132
    SMs; 4-5% faster on an H200, in a CUDA graph), and where rows of K <= 1024 fill more than a wave (GPT-2's LM head,
    768 x 50257: 11% faster, more of the short rows in flight a SM), but for 9-16 ``rows`` (their kernel would spill
    registers within the 80 that 3 a SM leave); else coarse at 2."""
    tiles = math.ceil(n / 32)
    if k <= 3072 and (tiles <= sms or (k >= 2048 and rows <= 8)):
        return GEMV_TC_NK["fine, short rows"]
    three = 2 * sms < tiles <= 3 * sms or (k <= 1024 and tiles > 3 * sms)
    return GEMV_TC_NK["coarse, 3 a SM" if three and rows <= 8 else "coarse"]


def kn_chunks_a_batch(k_per_split: int) -> int:
    """A warp takes every 8th batch of its split's 16-k chunks, so the busiest one spends U ceil(chunks / 8U)
    chunk-times: 4 chunks a batch unless 2 make that less (100 chunks: 14 chunk-times against 16)."""
    chunks = math.ceil(k_per_split / 16)
    return min((4, 2), key=lambda u: u * math.ceil(chunks / (8 * u)))


def x8_of(rows: int) -> int:
    """gemv.cu's X8 for ``rows`` rows of x: the groups of 8 a lane's B operands cover."""
    return 1 if rows <= 8 else 2


def tc_kernel_name(ctype: str, transposed: bool, geometry, x8: int = 1) -> str:
    """The name expression of a tensor-core kernel at ``geometry`` (pieces, chunks, blocks a SM) for up to 8 ``x8``
    rows."""
    return f"ct::gemv_tc_{'nk' if transposed else 'kn'}<{ctype}, {', '.join(map(str, geometry))}, {x8}>"


# gemv.cu's GemvFuse flags: the norm prologue, the residual epilogue, the gated activation's epilogue ([out, in];
# alone or with the norm), greedy's argmax ([out, in], up to 8 rows; alone or with the norm).
FUSE_NORM, FUSE_RESIDUAL, FUSE_GATED, FUSE_ARGMAX = 1, 2, 4, 8


def fused_kernel_name(ctype: str, transposed: bool, geometry, fuse: int, x8: int = 1) -> str:
    """The name expression of a fused tensor-core kernel (``fuse``: ``FUSE_NORM``, ``FUSE_RESIDUAL``, ``FUSE_GATED``,
    ``FUSE_ARGMAX``, or either of the last two ``| FUSE_NORM``) at ``geometry``."""
    layout = "nk" if transposed else "kn"
    return f"ct::gemv_tc_{layout}_fused<{ctype}, {', '.join(map(str, geometry))}, {fuse}, {x8}>"


_TC_GEOMETRIES = [(False, g) for g in GEMV_TC_KN] + [(True, g) for g in GEMV_TC_NK.values()]


def _tc_kernels(x8: int) -> list[str]:
    """The tensor-core kernels the launcher runs for up to 8 ``x8`` rows, plain and fused (9-16 rows: never at 3
    blocks a SM, and the residual epilogue only)."""
    geometries = [(tr, g) for tr, g in _TC_GEOMETRIES if x8 == 1 or g[2] < 3]
    return [tc_kernel_name(c, tr, geo, x8) for c in HALF_CTYPES for tr, geo in geometries] + [
        fused_kernel_name(c, tr, geo, fuse, x8) for c in HALF_CTYPES for tr, geo in geometries
        for fuse in ((FUSE_NORM, FUSE_RESIDUAL) if x8 == 1 else (FUSE_RESIDUAL,))  # the norm: up to NORM_MAX_ROWS
    ]  # fmt: skip


def _gated_kernels(x8: int) -> list[str]:
    """The [out, in] kernels with the gated epilogue (up to 8 rows: alone and with the norm prologue)."""
    geometries = [g for g in GEMV_TC_NK.values() if x8 == 1 or g[2] < 3]
    fuses = (FUSE_GATED, FUSE_GATED | FUSE_NORM) if x8 == 1 else (FUSE_GATED,)
    return [fused_kernel_name(c, True, g, fuse, x8) for c in HALF_CTYPES for g in geometries for fuse in fuses]


def _argmax_kernels() -> list[str]:
    """The [out, in] kernels with greedy's argmax as the epilogue (up to 8 rows: alone and with the norm prologue)."""
    fuses = (FUSE_ARGMAX, FUSE_ARGMAX | FUSE_NORM)
    return [fused_kernel_name(c, True, g, fuse) for c in HALF_CTYPES for g in GEMV_TC_NK.values() for fuse in fuses]


GEMV_KERNELS = KernelFamily(
    "gemv.cu",
    _tc_kernels(1) + [f"ct::gemv_{layout}<float, {r}>" for layout in ("kn", "nk") for r in _FMA_ROWS],
    programmatic=True,
)
# Compiled on their first use, apart, which the other calls need not wait for: the 9-16-row kernels (a batch of 9-16
# sequences; the family's compile time doubles with them) and the gated ones (LLaMA-style MLPs), by rows.
GEMV16_KERNELS = KernelFamily("gemv.cu", _tc_kernels(2), programmatic=True, part="9-16 rows")
GATED_KERNELS = {
    x8: KernelFamily("gemv.cu", _gated_kernels(x8), programmatic=True, part=part)
    for x8, part in ((1, "gated"), (2, "gated, 9-16 rows"))
}
# Greedy decoding's LM head (compiled on first use too: a model that samples never needs it).
ARGMAX_KERNELS = KernelFamily("gemv.cu", _argmax_kernels(), programmatic=True, part="greedy")


class GemvNorm(NamedTuple):
    """The norm a fused product applies to x first: ``mode`` as ``ops.norm.normalize`` takes it ("layer_norm",
    "layer_norm_no_beta" or "rms_norm"), ``gamma`` and ``beta`` ([K]; beta None but for "layer_norm"), ``eps``."""

    mode: str
    gamma: object
    beta: object
    eps: float


_NORM_MODES = {"layer_norm": 0, "layer_norm_no_beta": 1, "rms_norm": 2}  # norm_row.cuh's NormMode
# The norm prologue sums a row's statistics a 16-byte slot a lane, then over the row's warps in one warp: rows of
# at most 32 x 32 slots.
NORM_MAX_SLOTS = 1024
# ... and takes up to 8 rows. At 16, every block's statistics over 16 whole rows cost more than a norm kernel before
# the product saves: GPT-2 small's batch-16 step took 1.16x as long with the prologue in its QKV and up products as
# with norm kernels before them (H100).
NORM_MAX_ROWS = 8
# Dynamic shared memory for the normalised rows of a block's K range: with the kernels' ~12 KiB of static shared
# memory under the 48 KiB a launch gets without opting in (16-row kernels, ~22 KiB, opt in), and 3 blocks a SM
# within an A100's 164 KiB. 8 rows of K 2048 (LLaMA-1B) fit; where they do not, the caller normalises first
# (``gemv_fused_fits``).
PROLOGUE_SHARED_BYTES = 36 * 1024


def prologue_stride(k_per_split: int) -> int:
    """Elements between the normalised rows in shared memory: the K range rounded up to 64 elements (128 bytes),
    plus 32 (64 bytes), so the rows of a quarter-warp's 16-byte loads fall in distinct banks."""
    return math.ceil(k_per_split / 64) * 64 + 32


def prologue_fits(rows: int, k: int, k_per_split: int, itemsize: int) -> bool:
    """Whether the norm prologue takes rows of ``k`` (``k_per_split`` of them a block) of a 16-bit dtype: at most
    ``NORM_MAX_ROWS`` rows of at most ``NORM_MAX_SLOTS`` slots, the normalised rows within ``PROLOGUE_SHARED_BYTES``."""
    return (
        itemsize == 2
        and rows <= NORM_MAX_ROWS
        and k // (16 // itemsize) <= NORM_MAX_SLOTS
        and rows * prologue_stride(k_per_split) * itemsize <= PROLOGUE_SHARED_BYTES
    )


# Per transposed: the fp32 kernels' (output columns a block, k a loop step: a split holds whole steps).
_FMA_TILES = {
    False: (32, 32),  # gemv_kn<float>: 8 lanes x 4 columns, chunks of 4 k
    True: (32, 128),  # gemv_nk<float>: 8 warps x 4 rows, 32 lanes x 4 k
}
# Blocks per SM the fp32 kernels' K split fills up to, per transposed (the tensor-core kernels' is their
# geometry's: they lose to extra splits' partial sums more than they gain from a second wave;
# benchmarks/sweep_gemv.py).
_FMA_BLOCKS_PER_SM = {False: 4, True: 2}


def gemv_fits(x, w, transposed, bias, act) -> bool:
    """The GEMV kernel's requirements: up to ``GEMV_MAX_ROWS`` rows (fp32: 8), 16-byte aligned operands, whole
    vectors along the weight's rows, an activation it can apply per column, and for fp16/bf16 tensor cores with
    mma.sync m16n8k16 (sm_80+); a gated activation on fp16/bf16 ``[out, in]`` weights of N rows, N / 2 a multiple
    of 8."""
    if x.shape[0] > (GEMV_MAX_ROWS if x.dtype.itemsize == 2 else _FMA_ROWS[-1]):
        return False
    vec = vector_width(x.dtype)
    k, n = x.shape[1], (w.shape[0] if transposed else w.shape[1])
    aligned = all(a.data.ptr % 16 == 0 for a in (x, w) + ((bias,) if bias is not None else ()))
    whole_vectors = k % vec == 0 and (transposed or n % vec == 0)
    tensor_cores_if_needed = x.dtype.itemsize == 4 or compute_capability() >= 80
    if act is not None and int(act) in _GATED_ACTS:
        act_fits = transposed and x.dtype.itemsize == 2 and n % 16 == 0
    else:
        act_fits = act is None or int(act) in _GEMV_ACTS
    return aligned and whole_vectors and tensor_cores_if_needed and act_fits


def gemv_fused_fits(x, w, transposed, bias=None, act=None, norm: GemvNorm | None = None, residual=None) -> bool:
    """Whether a fused GEMV takes this product (``gemv_fits`` must hold; ``gemv``'s ``norm`` and ``residual``, one
    of them): fp16/bf16 (the tensor-core kernels; fp32 products normalise and add as before), up to 16 rows; the
    norm with 16-byte aligned gamma and beta and its rows within ``prologue_fits`` (up to 8) at this launch's K
    split; the residual a contiguous [rows, N] array of x's dtype, with no activation."""
    if x.dtype.itemsize != 2 or x.shape[0] > GEMV_MAX_ROWS or (norm is None) == (residual is None):
        return False
    if norm is not None:
        params = [norm.gamma] + ([norm.beta] if norm.mode == "layer_norm" else [])
        if any(p.data.ptr % 16 for p in params):
            return False
        return prologue_fits(
            x.shape[0], x.shape[1], _launch_plan(x, w, transposed, make_workspace=False)[2], x.dtype.itemsize
        )
    n = w.shape[0] if transposed else w.shape[1]
    return (
        act is None and residual.shape == (x.shape[0], n) and residual.dtype == x.dtype and residual.flags.c_contiguous
    )


def gemv_argmax_fits(x, w, transposed, bias=None, act=None, norm: GemvNorm | None = None) -> bool:
    """Whether ``gemv(argmax=)`` takes this product (``gemv_fits`` must hold, and with ``norm`` ``gemv_fused_fits``):
    fp16/bf16 ``[out, in]`` weights, up to 8 rows, no activation, and one K split (an LM head's rows fill the GPU
    many times over; a split's partials would need a last block to finish the argmax)."""
    if not _argmax_product(x, transposed, act):
        return False
    if norm is not None and not gemv_fused_fits(x, w, transposed, bias, norm=norm):
        return False
    return _launch_plan(x, w, transposed, make_workspace=False)[1][1] == 1


def _argmax_product(x, transposed, act, residual=None) -> bool:
    """Whether the argmax epilogue takes a product of this form: 16-bit [out, in], up to 8 rows, neither an activation
    nor a residual (the kernel writes a key a row and applies neither)."""
    return x.dtype.itemsize == 2 and bool(transposed) and x.shape[0] <= 8 and act is None and residual is None


def _check_argmax(argmax, x, transposed, act, residual) -> None:
    """``gemv``'s ``argmax`` before the launch: a uint64 [rows] array, for a product ``_argmax_product`` takes."""
    import numpy

    rows = x.shape[0]
    if argmax.dtype != numpy.uint64 or argmax.shape != (rows,):
        raise ValueError(f"argmax: expected a uint64 array of shape ({rows},); got {argmax.dtype} {argmax.shape}")
    if not _argmax_product(x, transposed, act, residual):
        raise ValueError("argmax: takes a 16-bit [out, in] product of up to 8 rows with no activation or residual")


def gemv_k_per_split(k: int, n_tiles: int, k_step: int, blocks_per_sm: int, sms: int) -> int:
    """The K range of one split, a multiple of ``k_step``: K shared evenly by the most splits for which column
    tiles x splits gives each of the ``sms`` SMs at most ``blocks_per_sm`` blocks (at least one split). Every
    block of a launch takes about as long as the longest split, so the splits are as even as ``k_step`` allows."""
    splits = min(max(1, blocks_per_sm * sms // n_tiles), math.ceil(k / k_step))
    return math.ceil(math.ceil(k / splits) / k_step) * k_step


def gemv(x, w, transposed, bias=None, act=None, geometry=None, family=None, *,
         norm=None, residual=None, early=None, argmax=None):  # fmt: skip
    """The GEMV kernel on checked CuPy arrays (``gemv_fits`` must hold): ``act(x[rows, K] @ W + bias)`` (gated: [rows,
    N / 2], the module docstring's).
    ``geometry``: (pieces, chunks, blocks a SM) for fp16/bf16 instead of the launcher's choice; ``family``: one
    that has that geometry's kernel (``GEMV_KERNELS.extended``) instead of ``GEMV_KERNELS``.
    Fused (``gemv_fused_fits`` must hold too): ``norm`` (a ``GemvNorm``): ``act(NORM(x) @ W + bias)``;
    ``residual`` [rows, N]: ``round(residual + (x @ W + bias))``, a new array (``residual`` is only read).
    ``early``: whether a block loads its first weights before it waits (``EARLY_WEIGHTS_K``) instead of the launcher's
    choice (the same result either way).
    ``argmax`` (``gemv_argmax_fits`` must hold): a uint64 [rows] array of zeros that takes each row's greedy key (the
    module docstring's) instead of the product; returns None."""
    cupy = import_cupy()
    rows, k = x.shape
    gated = act is not None and int(act) in _GATED_ACTS
    fuse = (FUSE_NORM if norm is not None else FUSE_RESIDUAL if residual is not None else 0) | (FUSE_GATED * gated)
    fuse |= FUSE_ARGMAX * (argmax is not None)
    if argmax is not None:
        _check_argmax(argmax, x, transposed, act, residual)
    name, grid, per_split, (partials, counters) = _launch_plan(x, w, transposed, geometry, fuse=fuse)
    if argmax is not None and grid[1] != 1:  # the epilogue would take each split's partial sums for the product's
        raise ValueError(f"argmax: the product takes one K split (gemv_argmax_fits); this launch has {grid[1]}")
    n = w.shape[0] if transposed else w.shape[1]
    y = argmax if argmax is not None else cupy.empty((rows, n // 2 if gated else n), x.dtype)
    if family is None and argmax is not None:
        family = ARGMAX_KERNELS
    elif family is None and gated:
        family = GATED_KERNELS[x8_of(rows)]
    elif family is None:
        family = GEMV16_KERNELS if x8_of(rows) == 2 and x.dtype.itemsize == 2 else GEMV_KERNELS
    arguments = dict(
        x=x,
        w=w,
        y=y,
        bias=x if bias is None else bias,  # x: unread without a bias
        partials=partials,
        counters=counters,
        rows=rows,
        K=k,
        N=n,
        k_per_split=per_split,
        act=0 if act is None else int(act),
        has_bias=int(bias is not None),
        early=int(per_split <= EARLY_WEIGHTS_K if early is None else early),
    )
    shared = 0
    if fuse:
        stride = prologue_stride(per_split)
        if norm is not None:  # the normalised rows of the block's K range
            shared = dynamic_shared(family.kernel(name), rows * stride * x.dtype.itemsize)
        arguments.update(
            residual=x if residual is None else residual,  # x stands in for what the fusion leaves unread
            gamma=x if norm is None else norm.gamma,
            beta=x if norm is None or norm.beta is None else norm.beta,
            eps=0.0 if norm is None else norm.eps,
            norm_mode=0 if norm is None else _NORM_MODES[norm.mode],
            x_stride=stride,
        )
    family.launch(name, grid, (_THREADS,), shared, **arguments)
    return None if argmax is not None else y


def gemv_workspace(x, w, transposed):
    """Make the current stream's split workspace as large as this product's launch needs (a launch being
    captured cannot make it), without launching; returns (partials, counters)."""
    return _launch_plan(x, w, transposed)[3]


def _launch_plan(x, w, transposed, geometry=None, make_workspace=True, fuse=0):
    """The GEMV's kernel for this product (``fuse``: the fused kernel, ``FUSE_NORM`` or ``FUSE_RESIDUAL``), its grid
    (column tiles, K splits), the K range of a split, and the current stream's split workspace (made here where the
    stream has none large enough; None without ``make_workspace``)."""
    rows, k = x.shape
    n = w.shape[0] if transposed else w.shape[1]
    sms = sm_count()
    if x.dtype.itemsize == 2:
        if geometry is None and transposed:
            geometry = nk_geometry(n, k, sms, rows)
        # gemv.cu: pieces of 16 rows / 32 columns a tile; a split holds whole chunks of 32 / 16 k
        pieces, _, blocks_per_sm = geometry or (1, None, 2)  # [in, out]: chunks a batch from the split, below
        tile, k_step = (16 * pieces, 32) if transposed else (32 * pieces, 16)
    else:
        (tile, k_step), blocks_per_sm = _FMA_TILES[transposed], _FMA_BLOCKS_PER_SM[transposed]
    n_tiles = math.ceil(n / tile)
    per_split = gemv_k_per_split(k, n_tiles, k_step, blocks_per_sm, sms)
    splits = math.ceil(k / per_split)
    if x.dtype.itemsize == 2:
        geometry = geometry or (1, kn_chunks_a_batch(per_split), blocks_per_sm)
        ctype = ctype_of(x.dtype)
        x8 = x8_of(rows)
        name = (
            fused_kernel_name(ctype, transposed, geometry, fuse, x8)
            if fuse
            else tc_kernel_name(ctype, transposed, geometry, x8)
        )
    else:
        name = f"ct::gemv_{'nk' if transposed else 'kn'}<float, {next(r for r in _FMA_ROWS if rows <= r)}>"
    workspace = split_workspace(splits * rows * n if splits > 1 else 0, n_tiles) if make_workspace else None
    return name, (n_tiles, splits), per_split, workspace
