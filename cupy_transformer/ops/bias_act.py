"""Bias + activation after a GEMM (``kernels_cu/bias_act.cu``): the step DeepSpeed's MLPGemmOp runs on its first
product, GELU (tanh) or ReLU with the intermediate bias in its LayerNorm variant, a gated GELU or SiLU without a
bias in its RMSNorm variant (and no bias and no activation for any other pairing). Here every activation takes a
bias or none.

``y = act(h + bias)``, fp32 math, one rounding to the input dtype. Activations: GELU (tanh form, GPT-2's
``gelu_new`` and DeepSpeed's GELU), GELU_EXACT (erf form, BERT's ``gelu``), ReLU, and the gated forms,
where ``h`` holds ``[up | gate]`` (``2 * width`` columns) and ``y = up * act(gate)``: GATED_GELU uses the
erf form (as DeepSpeed), GATED_SILU is LLaMA's. For gated forms ``act(gate)`` is rounded to the dtype
before the product, as Hugging Face's ``act_fn(gate_proj(x)) * up_proj(x)`` is. ``activation=None`` adds
the bias only.
"""

from __future__ import annotations

import math

import numpy

from ..runtime.arrays import (
    as_array,
    check_no_overlap,
    common_kind,
    deliver,
    empty_like_kind,
    module_of,
    reference_compute,
    to_caller,
)
from ..runtime.kernels import (
    CTYPES,
    KernelFamily,
    access_width,
    ctype_of,
    elementwise_grid,
    run_variants,
    vector_count,
    whole_rows,
)
from .config import ActivationType, parse_enum

_ACTS = (0,) + tuple(int(a) for a in ActivationType)


def _name(dtype: numpy.dtype, act: int, vec: int, whole: str) -> str:
    return f"ct::bias_act<{ctype_of(dtype)}, {act}, {vec}, {whole}>"


_KERNELS = KernelFamily("bias_act.cu", [_name(d, a, v, w) for d in CTYPES for a in _ACTS for v, w in run_variants(d)])


def _erf(x: numpy.ndarray) -> numpy.ndarray:
    # NumPy has no erf; math.erf per element is exact to double precision (reference-path sizes are small).
    return numpy.vectorize(math.erf, otypes=[numpy.float64])(x)


# erf(z) = z P(z^2) / Q(z^2) in float32 on [-4, 4], within 5e-7 (Eigen's rational approximation; erf is +-1 in
# float32 beyond), for the CPU's float32 passes (BERT's fast path, generation inside ``cpu_float32``): NumPy has no
# erf, and math.erf per element is the float64 reference's slowest step.
_ERF_P = (-2.72614225801306e-10, 2.77068142495902e-08, -2.10102402082508e-06, -5.69250639462346e-05,
          -7.34990630326855e-04, -2.95459980854025e-03, -1.60960333262415e-02)  # fmt: skip
_ERF_Q = (-1.45660718464996e-05, -2.13374055278905e-04, -1.68282697438203e-03, -7.37332916720468e-03,
          -1.42647390514189e-02)  # fmt: skip


def _horner(z2: numpy.ndarray, coefficients, scale: float = 1.0) -> numpy.ndarray:
    """scale * sum_i c_i z2^(n - i) by Horner's rule, in place after the first product: each step is a pass over
    the array, and these passes are much of a CPU GELU's time."""
    c = [numpy.float32(scale * a) for a in coefficients]
    p = z2 * c[0]
    p += c[1]
    for a in c[2:]:
        p *= z2
        p += a
    return p


def erf_float32(x: numpy.ndarray, scale: float = 1.0, overwrite: bool = False) -> numpy.ndarray:
    """scale * erf(x) in float32 (``_ERF_P`` / ``_ERF_Q``; ``scale`` taken into the numerator's coefficients);
    ``overwrite``: x may be clipped in place (a new array a call cost GELU a fifth of its time)."""
    z = numpy.clip(x, -4.0, 4.0, out=x if overwrite else None)
    z2 = z * z
    p = _horner(z2, _ERF_P, scale)
    p *= z
    p /= _horner(z2, _ERF_Q)
    return p


def gelu_exact_float32(x: numpy.ndarray) -> numpy.ndarray:
    """x (1 + erf(x / sqrt 2)) / 2 as x (1/2 + erf(x / sqrt 2) / 2): the 1/2 in erf's numerator saves passes."""
    p = erf_float32(x * numpy.float32(0.5**0.5), 0.5, overwrite=True)
    p += numpy.float32(0.5)
    p *= x
    return p


def activation_reference(x: numpy.ndarray, act) -> numpy.ndarray:
    """The activation in x's float type (float64 from ``bias_act_reference``)."""
    if act is None:
        return x
    if act == ActivationType.GELU:  # 0.5 x (1 + tanh(c (x + 0.044715 x^3))); x**3 took 70x as long as x * x * x
        inner = x * x
        inner *= 0.7978845608028654 * 0.044715
        inner += 0.7978845608028654
        inner *= x
        y = numpy.tanh(inner, out=inner)
        y += 1
        y *= x
        y *= 0.5
        return y
    if act == ActivationType.ReLU:
        return numpy.maximum(x, 0)
    if act in (ActivationType.GELU_EXACT, ActivationType.GATED_GELU):
        if x.dtype == numpy.float32:  # inside cpu_float32: math.erf per element took 0.3 µs an element
            return gelu_exact_float32(x)
        return 0.5 * x * (1 + _erf(x / math.sqrt(2)))
    if act == ActivationType.GATED_SILU:
        return x / (1 + numpy.exp(-x))
    raise ValueError(f"activation: unknown {act!r}")


def bias_act_reference(h: numpy.ndarray, bias, act) -> numpy.ndarray:
    """NumPy reference: float64 math (float32 for float32 inside ``cpu_float32``: ``reference_compute``), rounded to
    ``h.dtype`` where the kernel rounds."""
    dtype, compute = h.dtype, reference_compute(numpy, h.dtype)
    hf = h.astype(compute)
    if bias is not None:
        hf = hf + bias.astype(compute)
    if act is not None and ActivationType(act).gated:
        width = h.shape[-1] // 2
        up, gate = hf[..., :width], hf[..., width:]
        if bias is not None:
            up = up.astype(dtype).astype(compute)
        g = activation_reference(gate, act).astype(dtype).astype(compute)
        return (up * g).astype(dtype)
    return activation_reference(hf, act).astype(dtype)


def bias_act(h, bias=None, activation=None, *, out=None):
    """``act(h + bias)`` over the last dimension (gated: ``h`` is ``[..., 2 * width]``, result ``[..., width]``).

    ``activation``: an ``ActivationType`` (or its name), or None for the bias alone. ``out`` may be ``h``
    itself for a non-gated activation (updated in place)."""
    act = None if activation is None else parse_enum(ActivationType, "activation", activation)
    kind = common_kind(h=h, bias=bias, out=out)
    h = as_array("h", h, kind, min_ndim=1)
    in_width = h.shape[-1]
    gated = act is not None and act.gated
    if gated and in_width % 2:
        raise ValueError(f"h: a gated activation needs [up | gate] halves, an even last dimension; got {in_width}")
    if bias is not None:
        bias = as_array("bias", bias, kind, dtypes=h.dtype, shape=(in_width,))
    shape = tuple(h.shape[:-1]) + ((in_width // 2,) if gated else (in_width,))
    if out is not None:
        out = as_array("out", out, kind, dtypes=h.dtype, shape=shape)
        # In place (out is h) is fine element by element; a gated result would overwrite unread gates.
        check_no_overlap("out", out, bias=bias, **({} if out is h and not gated else {"h": h}))
    return to_caller(apply_bias_act(h, bias, act, out), kind)


def apply_bias_act(h, bias, act, out=None):
    """``bias_act`` on arrays already checked (NumPy or CuPy; ``out`` may be ``h`` when not gated)."""
    gated = act is not None and act.gated
    width = h.shape[-1] // 2 if gated else h.shape[-1]
    if module_of(h) is numpy:
        return deliver(bias_act_reference(h, bias, act), out)
    if out is None:
        out = empty_like_kind("cupy", tuple(h.shape[:-1]) + (width,), h.dtype)
    rows = h.size // h.shape[-1] if h.shape[-1] else 0
    if rows and width:
        # Gated, a run's up and gate elements are `width` apart: aligned together only for whole-vector rows.
        vec = access_width(h.dtype, width, h, out, bias, any_width=not gated)
        name = _name(h.dtype, 0 if act is None else int(act), vec, whole_rows(width, vec))
        vectors, tail = divmod(rows * width, vec)
        _KERNELS.launch(
            name,
            elementwise_grid(vectors),
            (256,),
            h=h,
            bias=h if bias is None else bias,
            y=out,
            vectors=vector_count(vectors),
            tail=tail,
            width=width,
            has_bias=bias is not None,
        )
    return out
