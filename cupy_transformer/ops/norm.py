"""Layer norm and RMS norm over the last dimension (``kernels_cu/norm.cu``).

DeepSpeed runs these norms inside QKVGemmOp (the input norm) and MLPGemmOp (the post-attention norm); the math
is theirs, per row ``x`` of width ``H``, statistics in fp32 (float64 in the reference):

- LayerNorm: ``y = (x - mean(x)) / sqrt(var(x) + eps) * gamma + beta``, ``var`` the biased (1/H)
  variance from a second pass (no E[x²] - E[x]² cancellation); ``beta`` may be omitted; one rounding to
  the input dtype at the end.
- RMSNorm: ``y = round(round(x / sqrt(mean(x²) + eps)) * gamma)``: the normalised row is rounded to the
  input dtype before the ``gamma`` multiply, as Hugging Face's LLaMA RMSNorm does. (DeepSpeed also
  rounds ``1/sqrt(...)`` to the dtype first; we follow HF, whose checkpoints these models come from.)

DeepSpeed's norm kernels take rows of at most 16384 elements and launch nothing for longer ones; these take
any width.

NumPy inputs run the reference; GPU inputs run one kernel, one block per row (one warp per row for
rows of at most 128 16-byte slots, e.g. 1024 fp16, where there are more than 64 rows; one slot a thread
where there are fewer). Each row moves in aligned 16-byte accesses. When
every row, gamma and beta are 16-byte aligned (widths that are multiples of 8 fp16/bf16 or 4 fp32
values, as every model's hidden size is), rows of up to 8 * 1024 slots stay in registers (one read of
the input) and longer rows take a three-pass path. Other widths and offset views take the three-pass
path with element-wise accesses only for the partial slots at each row's ends; x and ``out`` aligned
differently modulo 16 bytes go element by element.

``normalize`` (for the ops) can add a residual and a bias first, in the same kernel: the row normalised
is ``z = round(x + residual + bias)``, which it can also write out (MLPGemmOp's pre-norm sum).
"""

from __future__ import annotations

import math
import numbers

import numpy

from ..runtime.arrays import as_array, check_no_overlap, common_kind, empty_like_kind, module_of, to_caller
from ..runtime.kernels import CTYPES, KernelFamily, ctype_of, vector_width

_MAX_THREADS = 1024
_TARGET_THREADS = 128  # threads per row: fewer, fuller threads keep more rows in flight per SM
_WARP_ROWS_PER_BLOCK = 4
# Up to this many rows (a decode step's), a row's time is its latency: one block a row and one slot a thread (the
# shortest chain of loads; one row of 4096 fp16 in a captured step 3.8 µs against 6.8 at 4 slots x 128 threads).
_FEW_ROWS = 64
# (vectors held in registers per thread, one warp per row) for aligned rows: 0 vectors = the multi-pass
# path for very long rows; warp-per-row for rows of at most 32 x 4 slots.
_ALIGNED_VARIANTS = [(vpt, False) for vpt in (1, 2, 4, 8, 0)] + [(vpt, True) for vpt in (1, 2, 4)]

_MODE = {"layer_norm": 0, "layer_norm_no_beta": 1, "rms_norm": 2}


def kernel_name(dtype: numpy.dtype, vec: int, vpt: int, warp_per_row: bool, aligned: bool) -> str:
    """The ``norm_rows`` instantiation for ``dtype``: ``vec`` elements an access, ``vpt`` slots a thread held in
    registers (0: the multi-pass path), a warp a row (else a block), every slot whole at compile time (``aligned``)."""
    flags = ", ".join("true" if f else "false" for f in (warp_per_row, aligned))
    return f"ct::norm_rows<{ctype_of(dtype)}, {vec}, {vpt}, {flags}>"


# Rows off 16-byte alignment (odd widths, offset views) and x and out aligned differently (element-wise
# access, vec 1) are rare: one multi-pass variant each.
NORM_KERNELS = KernelFamily(
    "norm.cu",
    [
        kernel_name(dtype, vector_width(dtype), vpt, warp, aligned=True)
        for dtype in CTYPES
        for vpt, warp in _ALIGNED_VARIANTS
    ]
    + [
        kernel_name(dtype, vec, 0, warp_per_row=False, aligned=vec == 1)
        for dtype in CTYPES
        for vec in (vector_width(dtype), 1)
    ],
    programmatic=True,
)


def layer_norm(x, gamma, beta=None, eps: float = 1e-5, *, out=None):
    """LayerNorm over the last dimension of ``x`` (any rank ≥ 1); ``beta`` optional.

    ``out`` (optional) receives the result: same shape and dtype as ``x``, contiguous, not
    overlapping the inputs. Returns the result in the caller's kind (NumPy, CuPy, torch).
    """
    return _norm("layer_norm" if beta is not None else "layer_norm_no_beta", x, gamma, beta, eps, out)


def rms_norm(x, gamma, eps: float = 1e-6, *, out=None):
    """RMSNorm over the last dimension of ``x`` (any rank ≥ 1), as Hugging Face's LLaMA RMSNorm."""
    return _norm("rms_norm", x, gamma, None, eps, out)


def norm_reference(mode: str, x: numpy.ndarray, gamma: numpy.ndarray, beta, eps: float) -> numpy.ndarray:
    """The NumPy reference: float64 statistics, rounded to ``x.dtype`` as the kernel rounds."""
    xf = x.astype(numpy.float64)
    g = gamma.astype(numpy.float64)
    if mode == "rms_norm":
        normed = xf / numpy.sqrt(numpy.mean(xf * xf, axis=-1, keepdims=True) + eps)
        return (normed.astype(x.dtype).astype(numpy.float64) * g).astype(x.dtype)
    mean = xf.mean(axis=-1, keepdims=True)
    var = ((xf - mean) ** 2).mean(axis=-1, keepdims=True)
    y = (xf - mean) / numpy.sqrt(var + eps) * g
    if beta is not None:
        y = y + beta.astype(numpy.float64)
    return y.astype(x.dtype)


def pre_add_reference(x: numpy.ndarray, residual: numpy.ndarray, add_bias) -> numpy.ndarray:
    """``round(x + residual [+ add_bias])``: the sum the pre-add normalises, in float64 then rounded."""
    z = x.astype(numpy.float64) + residual.astype(numpy.float64)
    if add_bias is not None:
        z = z + add_bias.astype(numpy.float64)
    return z.astype(x.dtype)


def launch_config(rows: int, width: int, dtype: numpy.dtype, rows_at: dict[str, int], params_at: dict[str, int]):
    """(kernel name expression, grid, block, per-column vectors aligned) for ``rows`` rows of ``width``
    elements; ``rows_at`` holds the device addresses of the row-shaped tensors (x first), ``params_at``
    those of the per-column vectors (gamma, beta, bias)."""
    x_ptr = rows_at["x"]
    params_aligned = all(p % 16 == 0 for p in params_at.values())
    if any((p - x_ptr) % 16 for p in rows_at.values()):  # aligned differently: no slot is aligned in all
        threads = min(_MAX_THREADS, 32 * math.ceil(width / 32))
        return kernel_name(dtype, 1, 0, warp_per_row=False, aligned=True), (rows,), (threads,), params_aligned
    vec = vector_width(dtype)
    if width % vec or x_ptr % 16 or not params_aligned:
        slots = (width + 2 * (vec - 1)) // vec  # slots of the worst-placed row
        threads = min(_MAX_THREADS, 32 * math.ceil(slots / 32))
        return kernel_name(dtype, vec, 0, warp_per_row=False, aligned=False), (rows,), (threads,), params_aligned
    slots = width // vec
    if rows <= _FEW_ROWS and slots <= _MAX_THREADS:
        threads = 32 * math.ceil(slots / 32)
        return kernel_name(dtype, vec, 1, warp_per_row=False, aligned=True), (rows,), (threads,), True
    if slots <= 32 * 4:
        vpt = next(v for v in (1, 2, 4) if slots <= 32 * v)
        grid = (rows + _WARP_ROWS_PER_BLOCK - 1) // _WARP_ROWS_PER_BLOCK
        return kernel_name(dtype, vec, vpt, warp_per_row=True, aligned=True), (grid,), (32, _WARP_ROWS_PER_BLOCK), True
    if slots > 8 * _MAX_THREADS:
        return kernel_name(dtype, vec, 0, warp_per_row=False, aligned=True), (rows,), (_MAX_THREADS,), True
    vpt = next((v for v in (1, 2, 4, 8) if slots <= _TARGET_THREADS * v), 8)
    threads = 32 * math.ceil(math.ceil(slots / vpt) / 32)
    return kernel_name(dtype, vec, vpt, warp_per_row=False, aligned=True), (rows,), (threads,), True


def _norm(mode: str, x, gamma, beta, eps: float, out):
    kind = common_kind(x=x, gamma=gamma, beta=beta, out=out)
    x = as_array("x", x, kind, min_ndim=1)
    width = x.shape[-1]
    if width == 0:
        raise ValueError(f"x: expected a last dimension of at least 1; got shape {tuple(x.shape)}")
    gamma = as_array("gamma", gamma, kind, dtypes=x.dtype, shape=(width,))
    if beta is not None:
        beta = as_array("beta", beta, kind, dtypes=x.dtype, shape=(width,))
    check_eps(eps)
    if out is not None:
        out = as_array("out", out, kind, dtypes=x.dtype, shape=tuple(x.shape))
        check_no_overlap("out", out, x=x, gamma=gamma, beta=beta)
    return to_caller(normalize(mode, x, gamma, beta, eps, out=out), kind)


def check_eps(eps) -> None:
    if isinstance(eps, bool) or not (isinstance(eps, numbers.Real) and math.isfinite(eps) and eps >= 0):
        raise ValueError(f"eps: expected a finite number >= 0; got {eps!r}")


def normalize(mode: str, x, gamma, beta, eps: float, *, out=None, residual=None, add_bias=None, want_sum=False):
    """The norm on arrays already checked (NumPy: the reference; CuPy: the kernel), for the ops.

    With ``residual``, the row normalised is ``z = round(x + residual [+ add_bias])``; ``want_sum`` also
    returns ``z``. Returns ``y`` or ``(y, z)``.
    """
    numpy_path = module_of(x) is numpy
    if out is None:
        out = empty_like_kind("numpy" if numpy_path else "cupy", tuple(x.shape), x.dtype)
    if numpy_path:
        z = x if residual is None else pre_add_reference(x, residual, add_bias)
        out[...] = norm_reference(mode, z, gamma, beta, eps)
        return (out, z) if want_sum else out
    total = empty_like_kind("cupy", tuple(x.shape), x.dtype) if want_sum else None
    width = x.shape[-1]
    rows = x.size // width
    if rows:
        rows_at = {"x": x.data.ptr, "out": out.data.ptr}
        params_at = {"gamma": gamma.data.ptr}
        for name, array, where in (
            ("beta", beta, params_at),
            ("add_bias", add_bias, params_at),
            ("residual", residual, rows_at),
            ("sum", total, rows_at),
        ):
            if array is not None:
                where[name] = array.data.ptr
        name, grid, block, params_aligned = launch_config(rows, width, x.dtype, rows_at, params_at)
        pre_add = (residual is not None) * 1 + (add_bias is not None) * 2 + want_sum * 4

        def given(a):  # x stands in for the pointers that the mode and flags leave unread
            return x if a is None else a

        NORM_KERNELS.launch(
            name,
            grid,
            block,
            x=x,
            residual=given(residual),
            add_bias=given(add_bias),
            gamma=gamma,
            beta=given(beta),
            y=out,
            sum=given(total),
            rows=rows,
            width=width,
            eps=eps,
            mode=_MODE[mode],
            pre_add=pre_add,
            params_aligned=params_aligned,
        )
    return (out, total) if want_sum else out
