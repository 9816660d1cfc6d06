"""``act(x @ W + bias)`` for the projection ops: cuBLASLt with a fused epilogue, or ``kernels_cu/gemv.cu``
while a CUDA graph is being captured.

Weights are ``[in, out]`` (DeepSpeed's default, GPT-2's Conv1D) or, with ``transposed_mode``, ``[out, in]``
(``nn.Linear``). Products go to cuBLASLt (``runtime.cublaslt``: fp32 accumulation), whose epilogue adds the
bias and applies ReLU or GELU (tanh form) before the one rounding to the dtype; other activations
(GELU_EXACT) take ``bias_act``'s extra pass. Where cuBLASLt finds no algorithm, ``cupy.matmul`` plus that
pass does it. CuPy cannot call cuBLAS during stream capture, so a captured decode step (up to 8 rows) runs
the GEMV kernel instead, which applies bias and activation in its epilogue (fp32, one rounding). The GEMV is not yet faster than cuBLAS outside
capture (``benchmarks/results/``: 45-85% of copy bandwidth at one row, cuBLAS 55-92%), so eager calls
keep cuBLAS. NumPy arrays take the reference: float64, rounded after the product and again after bias and
activation.
"""

from __future__ import annotations

import math

import numpy

from ..runtime import cublaslt
from ..runtime.arrays import as_array, import_cupy
from ..runtime.kernels import CTYPES, KernelFamily, i32, sm_count, vector_width
from .bias_act import apply_bias_act

GEMV_MAX_ROWS = 8
_GEMV_ROWS = (1, 2, 4, 8)
_GEMV_ACTS = (0, 1, 2, 5)  # identity and the ActivationType values a per-column epilogue can apply
_THREADS = 256
_KERNELS = KernelFamily(
    "gemv.cu", [f"ct::gemv_{layout}<{c}, {r}>" for c in CTYPES.values() for layout in ("kn", "nk") for r in _GEMV_ROWS]
)


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
    if isinstance(x, numpy.ndarray):
        wf = w.astype(numpy.float64)
        y = (x2.astype(numpy.float64) @ (wf.T if transposed else wf)).astype(x.dtype)
    elif use_gemv(x2, w, transposed, bias, act):
        return gemv(x2, w, transposed, bias, act).reshape(shape)
    else:
        fused = (None if act is None else act.name, bias is not None)
        try:
            if fused in cublaslt.EPILOGUES:
                return cublaslt.matmul(x2, w, transposed, bias, fused[0]).reshape(shape)
            y = cublaslt.matmul(x2, w, transposed)
        except cublaslt.CublasLtError:
            y = import_cupy().matmul(x2, w.T if transposed else w)
    if bias is not None or act is not None:
        y = apply_bias_act(y, bias, act, out=y)
    return y.reshape(shape)


def use_gemv(x, w, transposed, bias, act) -> bool:
    """Whether this product runs the GEMV kernel: a decode shape it supports, under stream capture."""
    cupy = import_cupy()
    return x.shape[0] <= GEMV_MAX_ROWS and cupy.cuda.get_current_stream().is_capturing() and gemv_fits(
        x, w, transposed, bias, act
    )


def gemv_fits(x, w, transposed, bias, act) -> bool:
    """The GEMV kernel's requirements: 16-byte aligned operands, whole vectors along the weight's rows,
    and an activation it can apply per column."""
    vec = vector_width(x.dtype)
    k, n = x.shape[1], (w.shape[0] if transposed else w.shape[1])
    aligned = all(a.data.ptr % 16 == 0 for a in (x, w) + ((bias,) if bias is not None else ()))
    whole_vectors = k % vec == 0 and (transposed or n % vec == 0)
    return aligned and whole_vectors and (act is None or int(act) in _GEMV_ACTS)


_WORKSPACES: dict[tuple[int, int], tuple] = {}


def _workspace(partial_floats: int, tiles: int):
    """fp32 partials and zeroed tile counters for split-K launches, one set per (device, stream): launches
    on one stream run in order, so they may share it (the kernel leaves the counters at zero)."""
    cupy = import_cupy()
    key = (cupy.cuda.runtime.getDevice(), cupy.cuda.get_current_stream().ptr)
    partials, counters = _WORKSPACES.get(key, (None, None))
    if partials is None or partials.size < partial_floats:
        partials = cupy.empty(max(partial_floats, 1 << 16), cupy.float32)
    if counters is None or counters.size < tiles:
        counters = cupy.zeros(max(tiles, 1024), cupy.int32)
    _WORKSPACES[key] = (partials, counters)
    return partials, counters


# Blocks per SM the K split aims for, per layout ([in, out], [out, in]); from benchmarks/sweep_gemv.py.
GEMV_BLOCKS_PER_SM = {False: 4, True: 2}


def gemv_k_per_split(k: int, n_tiles: int, k_step: int, blocks_per_sm: int) -> int:
    """The K range of one split, a multiple of ``k_step``, so that column tiles x splits gives each SM
    about ``blocks_per_sm`` blocks."""
    want = max(1, math.ceil(blocks_per_sm * sm_count() / n_tiles))
    return max(k_step, math.ceil(math.ceil(k / want) / k_step) * k_step)


def gemv(x, w, transposed, bias=None, act=None):
    """The GEMV kernel on checked CuPy arrays (``gemv_fits`` must hold): ``act(x[rows<=8, K] @ W + bias)``."""
    cupy = import_cupy()
    rows, k = x.shape
    n = w.shape[0] if transposed else w.shape[1]
    vec = vector_width(x.dtype)
    r = next(r for r in _GEMV_ROWS if rows <= r)
    tile = 32 if transposed else 8 * vec  # columns per block, as in gemv.cu
    n_tiles = math.ceil(n / tile)
    # nk: a split holds whole strides of the 32 lanes x 16 bytes; kn: whole chunks of vec k, and not tiny.
    per_split = gemv_k_per_split(k, n_tiles, 32 * vec if transposed else 8 * vec, GEMV_BLOCKS_PER_SM[transposed])
    splits = math.ceil(k / per_split)
    y = cupy.empty((rows, n), x.dtype)
    partials, counters = _workspace(splits * rows * n if splits > 1 else 0, n_tiles)
    kernel = _KERNELS.kernel(f"ct::gemv_{'nk' if transposed else 'kn'}<{CTYPES[x.dtype]}, {r}>")
    kernel(
        (n_tiles, splits),
        (_THREADS,),
        (x, w, y, bias if bias is not None else x, partials, counters, i32(rows), i32(k), i32(n), i32(per_split),
         i32(0 if act is None else int(act)), i32(bias is not None)),
    )
    return y
