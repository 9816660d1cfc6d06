"""PreLNLayer in its parallel arrangement (GPT-J / GPT-NeoX: ``mlp_after_attn=False``) against the formula in
float64: y = x + Attn(LN1(x)) W_o + b_o + GELU(LN2(x) W1 + b1) W2 + b2, causal attention with NeoX's partial
rotate-half rotary; and the sequential arrangement's two forms (the ops' composition, ``__call__``, and a model
stack's, ``stack``) against each other. (Post-LN and LLaMA layers are checked through the models.)"""

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


SHAPES = dict(
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
GPU = [pytest.param(False, id="numpy"), pytest.param(True, id="gpu", marks=pytest.mark.gpu)]


def random_weights(rng, dtype):
    return {k: random(rng, v, dtype, scale=0.2, offset=1.0 if "gamma" in k else 0.0) for k, v in SHAPES.items()}


@pytest.mark.parametrize("gpu", GPU)
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
    host = random_weights(rng, dtype)
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


@pytest.mark.parametrize("gpu", GPU)
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float16], ids=str)
def test_a_stack_layer_is_the_ops_layer_with_the_next_norm(rng, gpu, dtype):
    """``stack`` (residual adds in the norms' pre-add) gives ``__call__``'s output up to its roundings of the
    residual stream (one more: after the attention block), and that output's next norm, over a prompt and two
    decode steps with a cache."""
    cfg = ops.InferenceConfig(hidden_size=H, heads=HEADS, intermediate_size=INNER, epsilon=1e-5, dtype=dtype)
    host = random_weights(rng, dtype)
    x = random(rng, (2, 7, H), dtype)
    xp = numpy
    if gpu:
        import cupy as xp
    layer = PreLNLayer(cfg)
    w = PreLNWeights(**{k: xp.asarray(v) for k, v in host.items()})
    g, b = (xp.asarray(random(rng, (H,), dtype, scale=0.2, offset=o)) for o in (1.0, 0.0))
    kind = "cupy" if gpu else "numpy"
    caches = [KVCache(layers=1, batch=2, kv_heads=HEADS, max_tokens=16, head_dim=D, dtype=dtype, backend=kind)]
    caches.append(KVCache(layers=1, batch=2, kv_heads=HEADS, max_tokens=16, head_dim=D, dtype=dtype, backend=kind))
    for first, last in ((0, 5), (5, 6), (6, 7)):
        piece, tokens = xp.asarray(x[:, first:last].copy()), last - first
        want = layer(piece, w, cache=caches[0], layer_id=0, start=caches[0].reserve(tokens))
        xn = ops.layer_norm(piece, w.ln1_gamma, w.ln1_beta)
        y, y_next = layer.stack(piece, xn, w, (g, b), cache=caches[1], layer_id=0, start=caches[1].reserve(tokens))
        tol = 1e-5 if dtype == numpy.float32 else 5e-3
        assert rel_error(y, want) < tol
        assert rel_error(y_next, ops.layer_norm(y, g, b)) < tol


def test_stack_refuses_the_parallel_arrangement(rng):
    cfg = ops.InferenceConfig(hidden_size=H, heads=HEADS, intermediate_size=INNER, mlp_after_attn=False)
    w = PreLNWeights(**random_weights(rng, numpy.float32))
    x = random(rng, (1, 3, H), numpy.float32)
    with pytest.raises(ValueError, match="stack runs the sequential arrangement"):
        PreLNLayer(cfg).stack(x, x, w, (w.ln1_gamma, w.ln1_beta))
