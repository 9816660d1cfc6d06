"""``act(x @ W + bias)`` for the projection ops and the LM head: cuBLASLt with a fused epilogue, or for decode
shapes ``ops.gemv`` (``kernels_cu/gemv.cu``) where it is the faster of the two.

Weights are ``[in, out]`` (DeepSpeed's default, GPT-2's Conv1D) or, with ``transposed_mode``, ``[out, in]``
(``nn.Linear``). Products go to cuBLASLt (``runtime.cublaslt``: fp32 accumulation), whose epilogue adds the
bias and applies ReLU or GELU (tanh form) before the one rounding to the dtype; other activations
(GELU_EXACT) take ``bias_act``'s extra pass. Where cuBLASLt finds no algorithm, ``cupy.matmul`` plus that
pass does it. Up to 8 rows the GEMV kernel may run instead; it applies bias and activation in its epilogue
(fp32, one rounding). Which is faster depends on the shape and the card (on an H200 the GEMV ran at 0.88-1.19x
cuBLAS's speed), so the first eager call of each decode shape times both (``runtime.timing``), eagerly and as
CUDA graphs, and keeps the faster of each: a decode step being captured runs the one faster in a graph
(cuBLASLt, called through ctypes, can be captured). NumPy arrays take ``matmul_reference``.
"""

from __future__ import annotations

import contextlib

import numpy

from ..runtime import cublaslt, timing
from ..runtime.arrays import as_array, common_kind, import_cupy, module_of, to_caller
from .bias_act import apply_bias_act
from .config import ActivationType
from .gemv import GEMV_MAX_ROWS, gemv, gemv_fits, gemv_workspace

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


def matmul(x, w, transposed: bool, bias=None, act=None):
    """``act(x[..., in] @ W + bias)`` → ``[..., out]`` on arrays already checked. A gated ``act`` takes ``W``'s
    ``[up | gate]`` columns: the product, then ``bias_act`` pairs the halves (no epilogue pairs two columns), and
    the result is half as wide."""
    global last_path
    if act is not None and ActivationType(act).gated:
        return apply_bias_act(matmul(x, w, transposed), bias, act)
    if module_of(x) is numpy:
        return matmul_reference(x, w, transposed, bias, act)
    out_features = w.shape[0] if transposed else w.shape[1]
    shape = tuple(x.shape[:-1]) + (out_features,)
    x2 = x.reshape(-1, x.shape[-1])
    if use_gemv(x2, w, transposed, bias, act):
        last_path, y = "gemv", gemv(x2, w, transposed, bias, act)
    else:
        last_path, y = "cublas", _cublas(x2, w, transposed, bias, act)
    return y.reshape(shape)


def matmul_reference(x: numpy.ndarray, w: numpy.ndarray, transposed: bool, bias=None, act=None) -> numpy.ndarray:
    """NumPy reference: the product in float64 rounded to ``x.dtype``, then (with a bias or an activation)
    ``bias_act``'s reference, rounded again."""
    out_features = w.shape[0] if transposed else w.shape[1]
    wf = w.astype(numpy.float64)
    y = (x.reshape(-1, x.shape[-1]).astype(numpy.float64) @ (wf.T if transposed else wf)).astype(x.dtype)
    if bias is not None or act is not None:
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


# Per (device, dtype, x shape, W shape, transposed, bias, act): whether the GEMV timed faster than cuBLAS
# eagerly, and in a CUDA graph.
_GEMV_FASTER: dict[tuple, tuple[bool, bool]] = {}
# (that key, stream): where the eager choice differs from the graph's, the graph's per-stream workspace is made.
_CAPTURE_READY: set[tuple] = set()
_GRAPH_CHOICES = False


@contextlib.contextmanager
def graph_choices():
    """Within it, eager decode products make the choice a captured one makes (the GEMV or cuBLASLt, as timed in a
    graph), so that a step run eagerly computes what its CUDA graph computes, to the bit: the decode loop's first
    step (which prepares the capture) and its eager mode (``--no-cuda-graph``) run under it."""
    global _GRAPH_CHOICES
    before, _GRAPH_CHOICES = _GRAPH_CHOICES, True
    try:
        yield
    finally:
        _GRAPH_CHOICES = before


def use_gemv(x, w, transposed, bias, act) -> bool:
    """Whether this product runs the GEMV kernel: a decode shape it supports, where it timed faster than
    cuBLAS on this shape's first eager call. That call times both eagerly and as CUDA graphs, and a call
    being captured takes the graph ranking: the two differ (H200, [in, out], one row, 6400x1600: the eager
    timing chose cuBLAS, and in a graph the GEMV was 11% faster). A shape first seen while capturing runs the
    GEMV (nothing can be timed there), as does a graph where cuBLASLt finds no algorithm (its fallback,
    ``cupy.matmul``, is not timed in graphs). ``CT_TUNE=0``: cuBLAS eagerly, the GEMV in a graph."""
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
            graph = (
                timing.fastest([run_gemv, lambda: _cublas(x, w, transposed, bias, act, fallback=False)], graph=True)
                == 0
            )
        except cublaslt.CublasLtError:
            graph = True
        faster = _GEMV_FASTER[key] = (eager, graph)
    if not capturing and faster[0] != faster[1]:
        # A capture on this stream (which cannot make the GEMV's split workspace) runs the other one: its
        # per-stream workspace is made now, by the call a capture needs first ("run the step once").
        ready = (key, stream.ptr)
        if ready not in _CAPTURE_READY:
            if faster[1]:
                gemv_workspace(x, w, transposed)
            else:
                cublaslt.stream_workspace()
            _CAPTURE_READY.add(ready)
    return faster[capturing or _GRAPH_CHOICES]


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
    """(eager, in a graph): whether this decode product runs the GEMV, as its first eager call timed it; None
    before that call (and always with ``CT_TUNE=0``)."""
    return _GEMV_FASTER.get(_choice_key(x, w, transposed, bias, act))


def forget_choices() -> None:
    """Drop every timed choice (and which streams are ready for a capture): the next eager call of each decode
    shape times the GEMV against cuBLAS again."""
    _GEMV_FASTER.clear()
    _CAPTURE_READY.clear()
