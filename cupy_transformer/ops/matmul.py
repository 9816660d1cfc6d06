"""``act(x @ W + bias)`` for the projection ops: cuBLASLt with a fused epilogue, or for decode shapes
``kernels_cu/gemv.cu`` where it is the faster of the two.

Weights are ``[in, out]`` (DeepSpeed's default, GPT-2's Conv1D) or, with ``transposed_mode``, ``[out, in]``
(``nn.Linear``). Products go to cuBLASLt (``runtime.cublaslt``: fp32 accumulation), whose epilogue adds the
bias and applies ReLU or GELU (tanh form) before the one rounding to the dtype; other activations
(GELU_EXACT) take ``bias_act``'s extra pass. Where cuBLASLt finds no algorithm, ``cupy.matmul`` plus that
pass does it. Up to 8 rows the GEMV kernel may run instead; it applies bias and activation in its epilogue
(fp32, one rounding). Which is faster depends on the shape and the card (on an H200 the GEMV ran at 0.88-1.19x
cuBLAS's speed over two runs: ``benchmarks/results/gpu-runs.md``), so the first eager call of each decode shape times
both (``runtime.timing``), eagerly and as CUDA graphs, and keeps the faster of each: a decode step being
captured runs the one faster in a graph (cuBLASLt, called through ctypes, can be captured). NumPy arrays take
the reference: float64, rounded after the product and again after bias and activation.
"""

from __future__ import annotations

import math

import numpy

from ..runtime import cublaslt, timing
from ..runtime.arrays import as_array, import_cupy
from ..runtime.kernels import (CTYPES, KernelFamily, compute_capability, i32, sm_count, split_workspace,
                               vector_width)
from .bias_act import apply_bias_act

GEMV_MAX_ROWS = 8
_FMA_ROWS = (1, 2, 4, 8)  # the fp32 kernels' row counts (rows round up)
_GEMV_ACTS = (0, 1, 2, 5)  # identity and the ActivationType values a per-column epilogue can apply
# The tensor-core kernels' (16- or 32-column pieces a tile, chunks a batch, blocks resident a SM: the launch
# bounds, and how many the K split fills). [in, out]: one piece, and 4 chunks (two 16-byte x loads a lane)
# unless 2 share a split's chunks out over the 8 warps more evenly (`_kn_chunks_a_batch`); on an H100 in a CUDA
# graph 1-9% faster than the coarse (2, 1) / fine (1, 2) pair it replaced (benchmarks/NOTES.md). [out, in] by
# how many tiles coarse (two-piece) tiles make (`_nk_geometry`).
GEMV_TC_KN = ((1, 2, 2), (1, 4, 2))
GEMV_TC_NK = {"fine": (1, 1, 2), "fine, short rows": (1, 4, 1), "coarse": (2, 1, 2), "coarse, 3 a SM": (2, 1, 3)}


def _nk_geometry(n: int, k: int):
    """Fine (one piece: twice the tiles, half the K splits) where coarse tiles alone would not give every SM a
    block (4-9% faster at N = 4096 on an H200; 15% slower at N = 6400), and there, for rows of K <= 3072, one
    block a SM with 4 chunks a batch: half the K splits again (none where the tiles fill the SMs), as a split's
    partials and last-block pass cost more than they save on short rows (H200, CUDA graph, N 256-2048: 1-55%
    faster at 25 of 26 shapes, 3072x1024 1-3% slower; up to 11% slower at K = 4096). Coarse at 3 blocks a SM
    where 2 would leave a second, partial wave (N = 11008: 344 tiles on 132 SMs; 4-5% faster on an H200, in a
    CUDA graph); else coarse at 2 (3 a SM was slower at N = 6400)."""
    tiles, sms = math.ceil(n / 32), sm_count()
    if tiles <= sms:
        return GEMV_TC_NK["fine, short rows" if k <= 3072 else "fine"]
    return GEMV_TC_NK["coarse, 3 a SM" if 2 * sms < tiles <= 3 * sms else "coarse"]


def _kn_chunks_a_batch(k_per_split: int) -> int:
    """A warp takes every 8th batch of its split's 16-k chunks, so the busiest one spends U ceil(chunks / 8U)
    chunk-times: 4 chunks a batch unless 2 make that less (100 chunks: 14 chunk-times against 16)."""
    chunks = math.ceil(k_per_split / 16)
    return min((4, 2), key=lambda u: u * math.ceil(chunks / (8 * u)))


def _tc_name(ctype: str, transposed: bool, geometry) -> str:
    return f"ct::gemv_tc_{'nk' if transposed else 'kn'}<{ctype}, {', '.join(map(str, geometry))}>"


_KERNELS = KernelFamily(
    "gemv.cu",
    [_tc_name(c, tr, geo) for d, c in CTYPES.items() if d.itemsize == 2
     for tr, geo in [(False, g) for g in GEMV_TC_KN] + [(True, g) for g in GEMV_TC_NK.values()]]
    + [f"ct::gemv_{layout}<float, {r}>" for layout in ("kn", "nk") for r in _FMA_ROWS],
)


# Per transposed: the fp32 kernels' (output columns a block, k a loop step: a split holds whole steps).
_FMA_TILES = {
    False: (32, 32),  # gemv_kn<float>: 8 lanes x 4 columns, chunks of 4 k
    True: (32, 128),  # gemv_nk<float>: 8 warps x 4 rows, 32 lanes x 4 k
}


def weight_array(name: str, weight, kind: str, dtype: numpy.dtype, in_features: int, transposed: bool):
    """Check a weight against the input width it multiplies; returns (array, out_features)."""
    w = as_array(name, weight, kind, ndim=2, dtypes=dtype)
    rows, cols = w.shape
    w_in, w_out = (cols, rows) if transposed else (rows, cols)
    if w_in != in_features:
        layout = "[out, in] (transposed_mode)" if transposed else "[in, out]"
        raise ValueError(
            f"{name}: expected a {layout} weight whose in-dimension matches the input width {in_features}; "
            f"got shape {tuple(w.shape)}"
        )
    return w, w_out


def matmul(x, w, transposed: bool, bias=None, act=None):
    """``act(x[..., in] @ W + bias)`` → ``[..., out]`` on arrays already checked (``act`` not gated)."""
    out_features = w.shape[0] if transposed else w.shape[1]
    shape = tuple(x.shape[:-1]) + (out_features,)
    x2 = x.reshape(-1, x.shape[-1])
    if not isinstance(x, numpy.ndarray):
        y = (gemv if use_gemv(x2, w, transposed, bias, act) else _cublas)(x2, w, transposed, bias, act)
        return y.reshape(shape)
    wf = w.astype(numpy.float64)
    y = (x2.astype(numpy.float64) @ (wf.T if transposed else wf)).astype(x.dtype)
    if bias is not None or act is not None:
        y = apply_bias_act(y, bias, act, out=y)
    return y.reshape(shape)


def _cublas(x, w, transposed, bias, act, fallback: bool = True):
    """The product through cuBLASLt (its epilogue where it has one), else (with ``fallback``; without,
    ``CublasLtError`` gets out) ``cupy.matmul``; then our pass."""
    fused = (None if act is None else act.name, bias is not None)
    try:
        if fused in cublaslt.EPILOGUES:
            return cublaslt.matmul(x, w, transposed, bias, fused[0])
        y = cublaslt.matmul(x, w, transposed)
    except cublaslt.CublasLtError:
        if not fallback:
            raise
        y = import_cupy().matmul(x, w.T if transposed else w)
    if bias is not None or act is not None:
        y = apply_bias_act(y, bias, act, out=y)
    return y


# Per (device, dtype, x shape, W shape, transposed, bias, act): whether the GEMV timed faster than cuBLAS
# eagerly, and in a CUDA graph.
_GEMV_FASTER: dict[tuple, tuple[bool, bool]] = {}
# (that key, stream): where the eager choice differs from the graph's, the graph's per-stream workspace is made.
_CAPTURE_READY: set[tuple] = set()


def use_gemv(x, w, transposed, bias, act) -> bool:
    """Whether this product runs the GEMV kernel: a decode shape it supports, where it timed faster than
    cuBLAS on this shape's first eager call. That call times both eagerly and as CUDA graphs, and a call
    being captured takes the graph ranking: the two differ (H200, [in, out], one row: at 6400x1600 the eager
    timing chose cuBLAS and in a graph the GEMV was 11% faster; at 1600x6400 the reverse, cuBLASLt 4% faster
    in a graph). A shape first seen while capturing runs the GEMV (nothing can be timed there), as does a
    graph where cuBLASLt finds no algorithm (its fallback, ``cupy.matmul``, is not timed in graphs).
    ``CT_TUNE=0``: cuBLAS eagerly, the GEMV in a graph."""
    cupy = import_cupy()
    if x.shape[0] > GEMV_MAX_ROWS or not gemv_fits(x, w, transposed, bias, act):
        return False
    stream = cupy.cuda.get_current_stream()
    capturing = stream.is_capturing()
    key = _choice_key(x, w, transposed, bias, act)
    faster = _GEMV_FASTER.get(key) if timing.TUNE else (False, True)
    if faster is None:
        if capturing:
            return True

        def run_gemv():
            return gemv(x, w, transposed, bias, act)

        eager = timing.fastest([run_gemv, lambda: _cublas(x, w, transposed, bias, act)]) == 0
        try:
            graph = timing.fastest([run_gemv, lambda: _cublas(x, w, transposed, bias, act, fallback=False)],
                                   graph=True) == 0
        except cublaslt.CublasLtError:
            graph = True
        faster = _GEMV_FASTER[key] = (eager, graph)
    if not capturing and faster[0] != faster[1]:
        # A capture on this stream (which cannot make the GEMV's split workspace) runs the other one: its
        # per-stream workspace is made now, by the call a capture needs first ("run the step once").
        ready = (key, stream.ptr)
        if ready not in _CAPTURE_READY:
            if faster[1]:
                _gemv_launch(x, w, transposed)
            else:
                cublaslt.stream_workspace()
            _CAPTURE_READY.add(ready)
    return faster[capturing]


def _choice_key(x, w, transposed, bias, act) -> tuple:
    return (import_cupy().cuda.runtime.getDevice(), x.dtype, x.shape, w.shape, transposed, bias is not None,
            None if act is None else int(act))


def gemv_choice(x, w, transposed, bias=None, act=None):
    """(eager, in a graph): whether this decode product runs the GEMV, as its first eager call timed it; None
    before that call."""
    return _GEMV_FASTER.get(_choice_key(x, w, transposed, bias, act))


def gemv_fits(x, w, transposed, bias, act) -> bool:
    """The GEMV kernel's requirements: 16-byte aligned operands, whole vectors along the weight's rows,
    an activation it can apply per column, and for fp16/bf16 tensor cores with mma.sync m16n8k16 (sm_80+)."""
    vec = vector_width(x.dtype)
    k, n = x.shape[1], (w.shape[0] if transposed else w.shape[1])
    aligned = all(a.data.ptr % 16 == 0 for a in (x, w) + ((bias,) if bias is not None else ()))
    whole_vectors = k % vec == 0 and (transposed or n % vec == 0)
    tensor_cores_if_needed = x.dtype.itemsize == 4 or compute_capability() >= 80
    return aligned and whole_vectors and tensor_cores_if_needed and (act is None or int(act) in _GEMV_ACTS)


# Blocks per SM the fp32 kernels' K split fills up to, per transposed (the tensor-core kernels' is their
# geometry's: they lose to extra splits' partial sums more than they gain from a second wave;
# benchmarks/sweep_gemv.py).
_FMA_BLOCKS_PER_SM = {False: 4, True: 2}


def gemv_k_per_split(k: int, n_tiles: int, k_step: int, blocks_per_sm: int) -> int:
    """The K range of one split, a multiple of ``k_step``: K shared evenly by the most splits for which column
    tiles x splits gives each SM at most ``blocks_per_sm`` blocks (at least one split). Every block of a
    launch takes about as long as the longest split, so the splits are as even as ``k_step`` allows."""
    splits = min(max(1, blocks_per_sm * sm_count() // n_tiles), math.ceil(k / k_step))
    return math.ceil(math.ceil(k / splits) / k_step) * k_step


def gemv(x, w, transposed, bias=None, act=None, geometry=None):
    """The GEMV kernel on checked CuPy arrays (``gemv_fits`` must hold): ``act(x[rows<=8, K] @ W + bias)``.
    ``geometry``: (pieces, chunks, blocks a SM) for fp16/bf16 instead of the launcher's choice
    (benchmarks/sweep_gemv.py)."""
    cupy = import_cupy()
    rows, k = x.shape
    name, grid, per_split, (partials, counters) = _gemv_launch(x, w, transposed, geometry)
    n = w.shape[0] if transposed else w.shape[1]
    y = cupy.empty((rows, n), x.dtype)
    epilogue = (i32(0 if act is None else int(act)), i32(bias is not None))
    bias = bias if bias is not None else x  # unread
    _KERNELS.kernel(name)(grid, (256,), (x, w, y, bias, partials, counters, i32(rows), i32(k), i32(n), i32(per_split))
                          + epilogue)
    return y


def _gemv_launch(x, w, transposed, geometry=None):
    """The GEMV's kernel for this product, its grid (column tiles, K splits), the K range of a split, and the
    current stream's split workspace (made here where the stream has none large enough)."""
    rows, k = x.shape
    n = w.shape[0] if transposed else w.shape[1]
    if x.dtype.itemsize == 2:
        if geometry is None and transposed:
            geometry = _nk_geometry(n, k)
        # gemv.cu: pieces of 16 rows / 32 columns a tile; a split holds whole chunks of 32 / 16 k
        pieces, _, blocks_per_sm = geometry or (1, None, 2)  # [in, out]: chunks a batch from the split, below
        tile, k_step = (16 * pieces, 32) if transposed else (32 * pieces, 16)
    else:
        (tile, k_step), blocks_per_sm = _FMA_TILES[transposed], _FMA_BLOCKS_PER_SM[transposed]
    n_tiles = math.ceil(n / tile)
    per_split = gemv_k_per_split(k, n_tiles, k_step, blocks_per_sm)
    splits = math.ceil(k / per_split)
    if x.dtype.itemsize == 2:
        name = _tc_name(CTYPES[x.dtype], transposed, geometry or (1, _kn_chunks_a_batch(per_split), blocks_per_sm))
    else:
        name = f"ct::gemv_{'nk' if transposed else 'kn'}<float, {next(r for r in _FMA_ROWS if rows <= r)}>"
    workspace = split_workspace(splits * rows * n if splits > 1 else 0, n_tiles)
    return name, (n_tiles, splits), per_split, workspace
