"""Shared pieces of the op tests: float64 math written independently of the ops (for NumPy or CuPy),
inputs, running an op on either backend, tolerances."""

import math

import numpy

from cupy_transformer.ops import ActivationType
from cupy_transformer.runtime.arrays import FLOAT_DTYPES

# ||out - exact|| / ||exact|| allowed for an op result against float64 math with no intermediate
# rounding: a few roundings to the dtype (GEMM outputs, activations) add up to a few units of 2^-11
# (fp16) or 2^-8 (bf16); fp32 sees accumulation-order noise only.
TOL = {numpy.dtype(numpy.float16): 3e-3, numpy.dtype(numpy.float32): 5e-5}
if len(FLOAT_DTYPES) == 3:
    TOL[FLOAT_DTYPES[2]] = 2.5e-2

# The sizes for the GPU: hidden widths that are and are not multiples of the 16-byte vector and of
# tiles, and 1, 7 and 512 rows.
GPU_WIDTHS = [768, 1000, 1600, 4096 + 8]
GPU_ROWS = [1, 7, 512]


def xp_of(a):
    import sys

    return sys.modules["cupy"] if type(a).__module__.startswith("cupy") else numpy


def f64(a):
    """A float64 copy on the array's own backend (None stays None)."""
    return None if a is None else a.astype(numpy.float64)


def erf(x):
    xp = xp_of(x)
    if xp is numpy:
        return numpy.vectorize(math.erf, otypes=[numpy.float64])(x)
    from cupyx.scipy.special import erf as cupy_erf

    return cupy_erf(x)


def act(x, a):
    xp = xp_of(x)
    if a == ActivationType.GELU:
        return 0.5 * x * (1 + xp.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))
    if a == ActivationType.ReLU:
        return xp.maximum(x, 0)
    if a in (ActivationType.GELU_EXACT, ActivationType.GATED_GELU):
        return 0.5 * x * (1 + erf(x / math.sqrt(2)))
    if a == ActivationType.GATED_SILU:
        return x / (1 + xp.exp(-x))
    raise AssertionError(a)


def mlp_act(h, a):
    """The activation applied to the first GEMM's output (gated: [up | gate] halves)."""
    if ActivationType(a).gated:
        width = h.shape[-1] // 2
        return h[..., :width] * act(h[..., width:], a)
    return act(h, a)


def layer_norm(x, gamma, beta, eps):
    mean = x.mean(-1, keepdims=True)
    y = (x - mean) / (((x - mean) ** 2).mean(-1, keepdims=True) + eps) ** 0.5 * gamma
    return y if beta is None else y + beta


def rms_norm(x, gamma, eps):
    return x / ((x * x).mean(-1, keepdims=True) + eps) ** 0.5 * gamma


def weight(rng, in_features, out_features, dtype, transposed):
    """A weight scaled so that outputs stay O(1) (no fp16 overflow at wide widths)."""
    w = (rng.standard_normal((in_features, out_features), dtype=numpy.float32) / math.sqrt(in_features)).astype(dtype)
    return numpy.ascontiguousarray(w.T) if transposed else w


def dense(w, transposed):
    """The [in, out] matrix of a weight in either layout."""
    return w.T if transposed else w


def on_backend(arrays: dict, gpu: bool) -> dict:
    if not gpu:
        return dict(arrays)
    import cupy

    return {k: None if v is None else cupy.asarray(v) for k, v in arrays.items()}
