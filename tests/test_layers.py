"""PreLNLayer in its parallel arrangement (GPT-J / GPT-NeoX: ``mlp_after_attn=False``) against the formula in
float64: y = x + Attn(LN1(x)) W_o + b_o + GELU(LN2(x) W1 + b1) W2 + b2, causal attention with NeoX's partial
rotate-half rotary. (The sequential pre-LN, post-LN and LLaMA arrangements are checked through the models.)"""

import math

import numpy
import pytest

from cupy_transformer import ops
from cupy_transformer.kv_cache import KVCache
from cupy_transformer.layers import PreLNLayer, PreLNWeights
from tests.helpers import random, rel_error
from tests.ops.test_rotary import turned

H, HEADS, D, INNER, ROT = 64, 4, 16, 256, 8


def layer_norm(x, g, b, eps=1e-5):
    mu = x.mean(-1, keepdims=True)
    return (x - mu) / numpy.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + eps) * g + b


def gelu_tanh(z):
    return 0.5 * z * (1 + numpy.tanh(math.sqrt(2 / math.pi) * (z + 0.044715 * z**3)))


def parallel_layer(x, w):
    """float64 GPT-NeoX layer on one batch [B, S, H]."""
    w = {k: numpy.asarray(v, numpy.float64) for k, v in vars(w).items()}
    b, s, _ = x.shape
    qkv = layer_norm(x, w["ln1_gamma"], w["ln1_beta"]) @ w["w_qkv"] + w["b_qkv"]
    q, k, v = (qkv[..., i * H : (i + 1) * H].reshape(b, s, HEADS, D).transpose(0, 2, 1, 3) for i in range(3))
    positions = numpy.broadcast_to(numpy.arange(s), (b, s))
    q, k = turned(q, positions, ROT, 10000.0, "half"), turned(k, positions, ROT, 10000.0, "half")
    z = q @ k.transpose(0, 1, 3, 2) / math.sqrt(D) + numpy.triu(numpy.full((s, s), -numpy.inf), 1)
    p = numpy.exp(z - z.max(-1, keepdims=True))
    context = ((p / p.sum(-1, keepdims=True)) @ v).transpose(0, 2, 1, 3).reshape(b, s, H)
    attn = context @ w["w_o"] + w["b_o"]
    mlp = gelu_tanh(layer_norm(x, w["ln2_gamma"], w["ln2_beta"]) @ w["w1"] + w["b1"]) @ w["w2"] + w["b2"]
    return x + attn + mlp


@pytest.mark.parametrize("gpu", [pytest.param(False, id="numpy"), pytest.param(True, id="gpu", marks=pytest.mark.gpu)])
def test_parallel_residual_layer_matches_the_formula(rng, gpu):
    dtype = numpy.float32
    cfg = ops.InferenceConfig(
        hidden_size=H,
        heads=HEADS,
        intermediate_size=INNER,
        epsilon=1e-5,
        mlp_after_attn=False,
        dtype=dtype,
        rotary_dim=ROT,
        rotate_half=True,
        rotate_every_two=False,
    )
    shapes = dict(
        ln1_gamma=(H,),
        ln1_beta=(H,),
        w_qkv=(H, 3 * H),
        b_qkv=(3 * H,),
        w_o=(H, H),
        b_o=(H,),
        ln2_gamma=(H,),
        ln2_beta=(H,),
        w1=(H, INNER),
        b1=(INNER,),
        w2=(INNER, H),
        b2=(H,),
    )
    host = {k: random(rng, v, dtype, scale=0.2, offset=1.0 if "gamma" in k else 0.0) for k, v in shapes.items()}
    x = random(rng, (2, 7, H), dtype)
    want = parallel_layer(x.astype(numpy.float64), PreLNWeights(**host))
    xp = numpy
    if gpu:
        import cupy as xp
    layer = PreLNLayer(cfg)
    w = PreLNWeights(**{k: xp.asarray(v) for k, v in host.items()})
    cache = KVCache(
        layers=1, batch=2, kv_heads=HEADS, max_tokens=16, head_dim=D, dtype=dtype, backend="cupy" if gpu else "numpy"
    )
    prompt = layer(xp.asarray(x[:, :5].copy()), w, cache=cache, layer_id=0, start=cache.reserve(5))
    step = [
        layer(xp.asarray(x[:, t : t + 1].copy()), w, cache=cache, layer_id=0, start=cache.reserve(1)) for t in (5, 6)
    ]
    got = numpy.concatenate([a.get() if gpu else a for a in [prompt] + step], axis=1)
    assert rel_error(got, want) < 1e-5
