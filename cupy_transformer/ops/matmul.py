"""``act(x @ W + bias)`` for the projection ops and the LM head: cuBLASLt with a fused epilogue, or for decode
shapes ``ops.gemv`` (``kernels_cu/gemv.cu``) where it is the faster of the two.

Weights are ``[in, out]`` (DeepSpeed's default, GPT-2's Conv1D) or, with ``transposed_mode``, ``[out, in]``
(``nn.Linear``). Products go to cuBLASLt (``runtime.cublaslt``: fp32 accumulation), whose epilogue adds the
bias and applies ReLU or GELU (tanh form) before the one rounding to the dtype; other activations
(GELU_EXACT) take ``bias_act``'s extra pass. Where cuBLASLt finds no algorithm, ``cupy.matmul`` plus that
pass does it. Up to 16 rows (fp32: 8) the GEMV kernel may run instead; it applies bias and activation in its epilogue
(fp32, one rounding). Which is faster depends on the shape and the card (on an H200 the GEMV ran at 0.88-1.19x
cuBLAS's speed), so the first eager call of each decode shape times both (``runtime.timing``), eagerly and as
CUDA graphs, and keeps the faster of each: a decode step being captured runs the one faster in a graph
(cuBLASLt, called through ctypes, can be captured). NumPy arrays take ``matmul_reference``, or inside
``runtime.arrays.cpu_float32`` (a model's generation on the CPU) float32 products from BLAS.
"""

from __future__ import annotations

import numpy

from ..runtime import cublaslt, timing
from ..runtime.arrays import ThreadSwitch, as_array, common_kind, import_cupy, module_of, reference_compute, to_caller
from .bias_act import apply_bias_act
from .config import ActivationType
from .gemv import GEMV_MAX_ROWS, GemvNorm, gemv, gemv_argmax_fits, gemv_fits, gemv_fused_fits, gemv_workspace
from .norm import norm_reference

#: Which product the latest ``matmul`` on GPU arrays ran: "gemv" or "cublas" (None before the first).
last_path: str | None = None


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


def lm_logits(x, weight):
    """The LM head: logits ``x[..., hidden] @ weight.T`` → ``[..., vocab]`` for a ``[vocab, hidden]`` weight
    (a tied embedding, or ``nn.Linear``'s layout), in the caller's kind; NumPy arrays take the reference."""
    kind = common_kind(x=x, weight=weight)
    x = as_array("x", x, kind, min_ndim=1)
    w, _ = weight_array("weight", weight, kind, x.dtype, x.shape[-1], transposed=True)
    return to_caller(matmul(x, w, transposed=True), kind)


def matmul(x, w, transposed: bool, bias=None, act=None, *, norm: GemvNorm | None = None, residual=None):
    """``act(x[..., in] @ W + bias)`` → ``[..., out]`` on arrays already checked. A gated ``act`` takes ``W``'s
    ``[up | gate]`` columns and the result is half as wide: in a decode graph's products the GEMV's epilogue pairs
    them where it can (``gated_fits``), else the product runs and then ``bias_act``.

    Fused decode products (one GEMV kernel; on GPU arrays only where ``fused_fits`` holds, else ValueError):
    ``norm``: ``act(NORM(x) @ W + bias)``; ``residual`` (x's shape but ``out``): ``round(residual + (x @ W + bias))``
    in fp32, a new array, where the unfused path gives ``round(residual + round(x @ W) + bias)``."""
    global last_path
    if act is not None and ActivationType(act).gated:
        if residual is not None:
            raise ValueError("matmul: a residual epilogue takes no activation")
        x2 = x.reshape(-1, x.shape[-1])
        if not gated_fits(x2, w, transposed, bias, act, norm):
            return apply_bias_act(matmul(x, w, transposed, norm=norm), bias, act)
        last_path, y = "gemv", gemv(x2, w, transposed, bias, act, norm=norm)
        return y.reshape(tuple(x.shape[:-1]) + (y.shape[-1],))
    if module_of(x) is numpy:
        if reference_compute(numpy, x.dtype) is numpy.float32 and w.dtype == x.dtype:  # inside cpu_float32
            return _blas_product(x, w, transposed, bias, act, norm, residual)
        return matmul_reference(x, w, transposed, bias, act, norm=norm, residual=residual)
    out_features = w.shape[0] if transposed else w.shape[1]
    shape = tuple(x.shape[:-1]) + (out_features,)
    x2 = x.reshape(-1, x.shape[-1])
    if norm is not None or residual is not None:
        r2 = None if residual is None else residual.reshape(-1, out_features)
        if not fused_fits(x2, w, transposed, bias, act, norm, r2):
            raise ValueError("matmul: this product cannot take the norm or the residual in the GEMV (fused_fits)")
        last_path, y = "gemv", gemv(x2, w, transposed, bias, act, norm=norm, residual=r2)
    elif use_gemv(x2, w, transposed, bias, act):
        last_path, y = "gemv", gemv(x2, w, transposed, bias, act)
    else:
        last_path, y = "cublas", _cublas(x2, w, transposed, bias, act)
    return y.reshape(shape)


def _fusing_here(x) -> bool:
    """Whether the decode fusions may take a product of x [rows, in]: GPU arrays of up to 16 rows, in a graph's
    products (``graph_products``) with the fusions on (``fusing``)."""
    return module_of(x) is not numpy and x.shape[0] <= GEMV_MAX_ROWS and graph_products() and fusing()


def fused_fits(x, w, transposed, bias=None, act=None, norm: GemvNorm | None = None, residual=None) -> bool:
    """Whether ``matmul`` runs this product (x [rows, in] on the GPU) with ``norm`` or ``residual`` fused into one
    GEMV kernel: up to 16 rows in a graph's products (``graph_products``), where the GEMV takes it (``gemv_fits``,
    ``gemv_fused_fits``: fp16/bf16). A gated ``act`` is no part of the question: ``matmul`` applies it in the
    epilogue or after the product (``gated_fits``)."""
    if not _fusing_here(x):
        return False
    if act is not None and ActivationType(act).gated:
        bias = act = None
    return gemv_fits(x, w, transposed, bias, act) and gemv_fused_fits(x, w, transposed, bias, act, norm, residual)


def greedy_head(x, w, argmax, *, norm: GemvNorm | None = None) -> bool:
    """Greedy decoding's LM head, where a decode graph's GEMV takes it (``_fusing_here``, ``gemv_argmax_fits``): the
    key of each row's first maximum of ``NORM(x) @ w.T`` (x [rows, in], w [vocab, in]; ``norm`` optional) into
    ``argmax`` (uint64 [rows], zeros; ``ops.gemv``'s module docstring), no logits written. Returns whether it ran;
    if not, the caller computes the logits."""
    x2 = x.reshape(-1, x.shape[-1])
    fits = argmax.shape == (x2.shape[0],) and _fusing_here(x2) and gemv_fits(x2, w, True, None, None)
    fits = fits and gemv_argmax_fits(x2, w, True, norm=norm)
    if fits:
        gemv(x2, w, True, norm=norm, argmax=argmax)
    return fits


def gated_fits(x, w, transposed, bias, act, norm: GemvNorm | None = None) -> bool:
    """Whether ``matmul`` applies the gated ``act`` in the GEMV's epilogue (x [rows, in]): a decode graph's product
    (``graph_products``, ``fusing``: a fusion like the others) that the GEMV takes with it (``gemv_fits``), and with
    its ``norm`` where given (``gemv_fused_fits``). Eagerly the product takes the path timed faster, then
    ``bias_act``."""
    if not _fusing_here(x):
        return False
    fits = gemv_fits(x, w, transposed, bias, act)
    return fits and (norm is None or gemv_fused_fits(x, w, transposed, bias, act, norm=norm))


def matmul_reference(
    x: numpy.ndarray, w: numpy.ndarray, transposed: bool, bias=None, act=None, *, norm=None, residual=None
) -> numpy.ndarray:
    """NumPy reference: the product in float64 rounded to ``x.dtype``, then (with a bias or an activation)
    ``bias_act``'s reference, rounded again. ``norm`` (a ``GemvNorm``): x normalised first as ``ops.norm``'s
    reference does (rounded to x.dtype); ``residual``: ``round(residual + (x @ W + bias))`` from the float64 product
    and bias, rounded once (the fused GEMV's math; no activation)."""
    out_features = w.shape[0] if transposed else w.shape[1]
    if norm is not None:
        x = norm_reference(norm.mode, x, norm.gamma, norm.beta, norm.eps)
    wf = w.astype(numpy.float64)
    y = x.reshape(-1, x.shape[-1]).astype(numpy.float64) @ (wf.T if transposed else wf)
    if residual is not None:
        if act is not None:
            raise ValueError("matmul: a residual epilogue takes no activation")
        y = y + (0.0 if bias is None else bias.astype(numpy.float64)) + residual.reshape(y.shape).astype(numpy.float64)
        return y.astype(x.dtype).reshape(tuple(x.shape[:-1]) + (out_features,))
    y = y.astype(x.dtype)
    if act is not None and ActivationType(act).gated:  # [up | gate] halves: half as wide
        return apply_bias_act(y, bias, act).reshape(tuple(x.shape[:-1]) + (out_features // 2,))
    if bias is not None or act is not None:
        y = apply_bias_act(y, bias, act, out=y)
    return y.reshape(tuple(x.shape[:-1]) + (out_features,))


#: Up to this many rows a float32 product on the CPU (``_blas_product``) runs as one BLAS product a row: OpenBLAS
#: (NumPy's wheels') multiplies a few rows at once far slower than one row (3-8x one row's time for two rows at
#: GPT-2 small's decode shapes), and past three rows one product was as often faster. A row's product is then the
#: one it gets alone, to the bit, in a product of up to this many rows.
ROW_PRODUCTS = 3


def _blas_product(x, w, transposed, bias, act, norm, residual):
    """``matmul``'s product on float32 NumPy arrays inside ``cpu_float32``: BLAS's float32 product (its own
    accumulation; a product a row up to ``ROW_PRODUCTS`` rows), the bias, activation and residual added in float32
    (the residual form: one float32 sum a term)."""
    if norm is not None:
        x = norm_reference(norm.mode, x, norm.gamma, norm.beta, norm.eps)
    out_features = w.shape[0] if transposed else w.shape[1]
    x2, w2 = x.reshape(-1, x.shape[-1]), w.T if transposed else w
    if len(x2) <= ROW_PRODUCTS:
        y = numpy.empty((len(x2), out_features), x2.dtype)
        for r in range(len(x2)):
            numpy.matmul(x2[r : r + 1], w2, out=y[r : r + 1])
    else:
        y = x2 @ w2
    if residual is not None:
        if act is not None:
            raise ValueError("matmul: a residual epilogue takes no activation")
        if bias is not None:
            y += bias
        y += residual.reshape(y.shape)
    elif bias is not None or act is not None:
        y = apply_bias_act(y, bias, act, out=y)
    return y.reshape(tuple(x.shape[:-1]) + (out_features,))


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


# Per (device, dtype, x shape, W shape, transposed, bias, act): whether the GEMV timed faster than cuBLAS eagerly.
_GEMV_FASTER: dict[tuple, bool] = {}
# (that key, stream): where cuBLAS runs eagerly, the GEMV's per-stream workspace is made for a capture there.
_CAPTURE_READY: set[tuple] = set()
_GRAPH_CHOICES = ThreadSwitch(False)
_FUSED = ThreadSwitch(True)


def graph_choices():
    """Within it, eager decode products make the choice a captured one makes (the GEMV), so that a step run eagerly
    computes what its CUDA graph computes, to the bit: the decode loop's first step (which prepares the capture)
    and its eager mode (``--no-cuda-graph``) run under it. It holds for the thread that enters it."""
    return _GRAPH_CHOICES.set(True)


def fused_decode(enabled: bool = True):
    """Within it with ``enabled`` False, a decode step runs its kernels unfused, as before the fusions: a norm kernel
    before each product (the residual adds as its pre-add) and rotary_append before the decode attention kernel;
    for comparisons and debugging (``generation.Decoder(fused=False)``). It holds for the thread that enters it."""
    return _FUSED.set(enabled)


def fusing() -> bool:
    """Whether decode steps take the fused kernels (``fused_decode``; the default)."""
    return _FUSED.value()


def graph_products() -> bool:
    """Whether products run as in a CUDA graph: a capture on the current stream, or ``graph_choices``."""
    return _GRAPH_CHOICES.value() or import_cupy().cuda.get_current_stream().is_capturing()


def use_gemv(x, w, transposed, bias, act) -> bool:
    """Whether this product runs the GEMV kernel: a decode shape it supports, and then always in a CUDA graph (a
    call being captured, or under ``graph_choices``), eagerly where it timed faster than cuBLAS on this shape's
    first eager call. In a graph the GEMV's kernels and their neighbours start while the kernel before finishes
    (programmatic launches, ``runtime.programmatic``), which cuBLAS's kernels do not; timed alone, the products of
    a GPT-2-small step chose cuBLAS 3 times in 4, and the step ran 1.15x faster on the GEMV alone (H100).
    ``CT_TUNE=0``: cuBLAS eagerly."""
    cupy = import_cupy()
    if x.shape[0] > GEMV_MAX_ROWS or not gemv_fits(x, w, transposed, bias, act):
        return False
    if graph_products():
        return True
    stream = cupy.cuda.get_current_stream()
    key = _choice_key(x, w, transposed, bias, act)
    faster = _GEMV_FASTER.get(key) if timing.TUNE else False
    if faster is None:
        faster = _GEMV_FASTER[key] = (
            timing.fastest([lambda: gemv(x, w, transposed, bias, act), lambda: _cublas(x, w, transposed, bias, act)])
            == 0
        )
    if not faster and (key, stream.ptr) not in _CAPTURE_READY:
        # A capture on this stream runs the GEMV, which cannot make its split workspace there: it is made now, by
        # the call a capture needs first ("run the step once").
        gemv_workspace(x, w, transposed)
        _CAPTURE_READY.add((key, stream.ptr))
    return faster


def _choice_key(x, w, transposed, bias, act) -> tuple:
    return (
        import_cupy().cuda.runtime.getDevice(),
        x.dtype,
        x.shape,
        w.shape,
        transposed,
        bias is not None,
        None if act is None else int(act),
    )


def gemv_choice(x, w, transposed, bias=None, act=None):
    """Whether an eager call of this decode product runs the GEMV, as its first eager call timed it; None before
    that call (and always with ``CT_TUNE=0``). In a graph it always does (``use_gemv``)."""
    return _GEMV_FASTER.get(_choice_key(x, w, transposed, bias, act))


def forget_choices() -> None:
    """Drop every timed choice (and which streams are ready for a capture): the next eager call of each decode
    shape times the GEMV against cuBLAS again."""
    _GEMV_FASTER.clear()
    _CAPTURE_READY.clear()
