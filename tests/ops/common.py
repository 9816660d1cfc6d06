"""Shared pieces of the op tests: float64 math written independently of the ops (for NumPy or CuPy),
inputs, running an op on either backend (tolerances: ``tests.helpers``)."""

import math
from typing import NamedTuple

import numpy

from cupy_transformer.ops import ActivationType

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


# Attention (test_softmax_context.py and the tests of its launchers: test_decode_attention.py,
# test_prefill_attention.py, test_prefill_attention_sm90.py, test_rotary_append.py).


def attention_config(dtype, heads=4, kv=2, d=32, **kw):
    from cupy_transformer.ops import InferenceConfig

    return InferenceConfig(hidden_size=heads * d, heads=heads, num_kv=kv, dtype=dtype, **kw)


def history(qkv, c, positions, keep=None, alibi=None, scale=None):
    """float64 attention of every token of one sequence over its history: ``qkv`` [T, (h + 2kv) d],
    ``positions`` [T], ``keep`` [T] keys that may be seen, ``alibi`` [h, T]. Returns [T, h d]."""
    from tests.ops.test_rotary import turned

    h, kv, d = c.heads, c.num_kv, c.head_size
    t = qkv.shape[0]
    x = qkv.astype(numpy.float64)
    q = x[:, : h * d].reshape(t, h, d).transpose(1, 0, 2)[None]
    k = x[:, h * d : (h + kv) * d].reshape(t, kv, d).transpose(1, 0, 2)[None]
    v = x[:, (h + kv) * d :].reshape(t, kv, d).transpose(1, 0, 2)
    if c.rotary_style:
        q = turned(q, positions[None], c.rotary_dim, c.rope_theta, c.rotary_style)
        k = turned(k, positions[None], c.rotary_dim, c.rope_theta, c.rotary_style)
    q, k = q[0], k[0]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = numpy.zeros((t, h, d))
    for i in range(h):
        g = i // (h // kv)
        for s in range(t):
            keys = [
                j
                for j in range(t)
                if (keep is None or keep[j])
                and (not c.triangular_masking or j <= s)
                and (not c.local_attention or j > s - c.window_size)
            ]
            z = numpy.array([q[i, s] @ k[g, j] * scale + (alibi[i, j] if alibi is not None else 0.0) for j in keys])
            if keys:
                p = numpy.exp(z - z.max())
                out[s, i] = (p / p.sum()) @ v[g, keys]
    return out.reshape(t, h * d)


def nan_past(cache, lengths):
    """NaN in every cache slot past each sequence's length (slots that may hold anything, and must never be
    read: 0 x NaN is NaN)."""
    for b, n in enumerate(lengths):
        cache.keys[:, b, :, n:], cache.values[:, b, :, n:] = numpy.nan, numpy.nan


class LaunchInputs(NamedTuple):
    """What SoftmaxContextOp hands its attention launchers on the GPU (see launch_inputs)."""

    q: object
    k: object
    v: object
    first: object  # start on the GPU
    start: numpy.ndarray  # the same on the host: each sequence's first slot
    mask: object
    alibi: object
    scale: float
    causal: bool
    window: int

    @property
    def prefill_args(self) -> tuple:
        """The arguments of prefill_attention and prefill_attention_sm90."""
        return self.q, self.k, self.v, self.first, self.mask, self.alibi, self.scale, self.causal, self.window


def launch_inputs(c, qkv, attn_mask=None, cache=None, start=None, alibi=None, layer=0) -> LaunchInputs:
    """SoftmaxContextOp's steps on the GPU before its attention launch, for CuPy inputs (no position_ids), so
    that a test can call a launcher with a geometry the op does not pick: the mask and alibi as the op reads
    them, the rotary + append kernel (writing ``cache``'s ``layer`` at ``start``, which the caller reserved),
    then q and the keys and values (the cache layer, or this call's)."""
    from cupy_transformer.ops.rotary_append import rotary_append
    from cupy_transformer.ops.softmax import alibi_rows, key_mask
    from cupy_transformer.runtime.lru import device_int32

    h, kv, d = c.heads // c.mp_size, c.num_kv // c.mp_size, c.head_size
    b, s, _ = qkv.shape
    start = numpy.zeros(b, numpy.int64) if cache is None else numpy.asarray(start, numpy.int64)
    t = int(start.max()) + s
    mask = key_mask(attn_mask, "cupy", c.dtype, b, h, s, t, wider=True)
    rows = alibi_rows(alibi, "cupy", c.dtype, b, h, h, 0, t)
    q = qkv[..., : h * d].reshape(b, s, h, d).transpose(0, 2, 1, 3)
    k = qkv[..., h * d : (h + kv) * d].reshape(b, s, kv, d).transpose(0, 2, 1, 3)
    v = qkv[..., (h + kv) * d :].reshape(b, s, kv, d).transpose(0, 2, 1, 3)
    first = device_int32(start)
    if cache is not None or c.rotary_style is not None:
        q, k = rotary_append(qkv, None, c, h, kv, d, cache, layer, first)
    if cache is not None:
        k, v = cache.keys[layer], cache.values[layer]
    return LaunchInputs(
        q,
        k,
        v,
        first,
        start,
        mask,
        rows,
        1 / math.sqrt(d),
        c.triangular_masking,
        c.window_size if c.local_attention else 0,
    )
