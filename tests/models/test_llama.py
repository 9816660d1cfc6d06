"""LLaMA-style models on the ops: logits of a tiny random checkpoint (grouped-query heads, rotary, gated SiLU,
RMSNorm; tied and untied heads) against a float64 LLaMA written out here as Hugging Face defines it, and a
prompt then decode steps through the cache against the full forward."""

import json
import math

import numpy
import pytest
from safetensors.numpy import save_file

from cupy_transformer.models import load_model
from tests.helpers import rel_error
from tests.models.common import check_logits_and_decode

H, HEADS, KV, INNER, LAYERS, VOCAB, THETA = 64, 4, 2, 96, 2, 40, 500.0
D = H // HEADS


def checkpoint(path, rng, tied, *, h=H, heads=HEADS, kv=KV, inner=INNER, layers=LAYERS, vocab=VOCAB, positions=64):
    """Random LlamaForCausalLM-style weights and config (the tiny model unless sizes are given)."""
    H, HEADS, KV, INNER, LAYERS, VOCAB, D = h, heads, kv, inner, layers, vocab, h // heads
    w = {"model.embed_tokens.weight": (VOCAB, H), "model.norm.weight": (H,)}
    if not tied:
        w["lm_head.weight"] = (VOCAB, H)
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        w.update(
            {
                p + "input_layernorm.weight": (H,),
                p + "self_attn.q_proj.weight": (HEADS * D, H),
                p + "self_attn.k_proj.weight": (KV * D, H),
                p + "self_attn.v_proj.weight": (KV * D, H),
                p + "self_attn.o_proj.weight": (H, H),
                p + "post_attention_layernorm.weight": (H,),
                p + "mlp.gate_proj.weight": (INNER, H),
                p + "mlp.up_proj.weight": (INNER, H),
                p + "mlp.down_proj.weight": (H, INNER),
            }
        )
    tensors = {
        n: (rng.standard_normal(s) * (0.25 if len(s) == 2 else 0.1) + (1.0 if len(s) == 1 else 0.0)).astype(
            numpy.float32
        )
        for n, s in w.items()
    }
    save_file(tensors, str(path / "model.safetensors"))
    config = {
        "model_type": "llama",
        "hidden_size": H,
        "num_attention_heads": HEADS,
        "num_key_value_heads": KV,
        "intermediate_size": INNER,
        "num_hidden_layers": LAYERS,
        "vocab_size": VOCAB,
        "rms_norm_eps": 1e-6,
        "rope_theta": THETA,
        "max_position_embeddings": positions,
        "hidden_act": "silu",
        "tie_word_embeddings": tied,
    }
    (path / "config.json").write_text(json.dumps(config))
    return {k: v.astype(numpy.float64) for k, v in tensors.items()}


def reference_logits(w, ids, tied):
    def rms(x, g):
        return x / numpy.sqrt((x**2).mean(-1, keepdims=True) + 1e-6) * g

    def rope(x, s):  # x [heads, s, D]: rotate-half
        inv = THETA ** (-numpy.arange(0, D, 2) / D)
        ang = numpy.arange(s)[:, None] * inv
        cos, sin = numpy.cos(numpy.concatenate([ang, ang], -1)), numpy.sin(numpy.concatenate([ang, ang], -1))
        rotated = numpy.concatenate([-x[..., D // 2 :], x[..., : D // 2]], -1)
        return x * cos + rotated * sin

    s = len(ids)
    x = w["model.embed_tokens.weight"][ids]
    for i in range(LAYERS):
        p = f"model.layers.{i}."
        xn = rms(x, w[p + "input_layernorm.weight"])
        q = rope((xn @ w[p + "self_attn.q_proj.weight"].T).reshape(s, HEADS, D).transpose(1, 0, 2), s)
        k = rope((xn @ w[p + "self_attn.k_proj.weight"].T).reshape(s, KV, D).transpose(1, 0, 2), s)
        v = (xn @ w[p + "self_attn.v_proj.weight"].T).reshape(s, KV, D).transpose(1, 0, 2)
        k, v = numpy.repeat(k, HEADS // KV, 0), numpy.repeat(v, HEADS // KV, 0)
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(D) + numpy.triu(numpy.full((s, s), -numpy.inf), 1)
        att = numpy.exp(scores - scores.max(-1, keepdims=True))
        ctx = (att / att.sum(-1, keepdims=True) @ v).transpose(1, 0, 2).reshape(s, H)
        x = x + ctx @ w[p + "self_attn.o_proj.weight"].T
        xn = rms(x, w[p + "post_attention_layernorm.weight"])
        gate = xn @ w[p + "mlp.gate_proj.weight"].T
        x = x + (gate / (1 + numpy.exp(-gate)) * (xn @ w[p + "mlp.up_proj.weight"].T)) @ w[p + "mlp.down_proj.weight"].T
    head = w["model.embed_tokens.weight"] if tied else w["lm_head.weight"]
    return rms(x, w["model.norm.weight"]) @ head.T


def logits_and_decode(tmp_path, rng, backend, tied):
    w = checkpoint(tmp_path, rng, tied)
    model = load_model(tmp_path, "float32", backend, progress=False)
    check_logits_and_decode(model, rng.integers(0, VOCAB, (2, 10)), lambda ids: reference_logits(w, ids, tied), 6)


@pytest.mark.parametrize("tied", [False, True])
def test_logits_and_cached_decode_match_the_reference(tmp_path, rng, tied):
    logits_and_decode(tmp_path, rng, "numpy", tied)


@pytest.mark.gpu
def test_gpu_logits_and_cached_decode_match_the_reference(tmp_path, rng):
    logits_and_decode(tmp_path, rng, "cupy", False)


def test_unsupported_configs_are_named(tmp_path, rng):
    checkpoint(tmp_path, rng, False)
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, rope_scaling={"type": "linear", "factor": 2.0})))
    with pytest.raises(ValueError, match=r"rope scaling .* is not supported"):
        load_model(tmp_path, backend="numpy")
    (tmp_path / "config.json").write_text(json.dumps(dict(config, hidden_act="gelu")))
    with pytest.raises(ValueError, match=r"hidden_act 'gelu': only 'silu' is supported"):
        load_model(tmp_path, backend="numpy")


def test_rope_theta_from_transformers_5_rope_parameters(tmp_path, rng):
    """transformers 5 writes rope_parameters {rope_theta, rope_type} instead of a top-level rope_theta."""
    w = checkpoint(tmp_path, rng, False)
    config = json.loads((tmp_path / "config.json").read_text())
    del config["rope_theta"]
    config["rope_parameters"] = {"rope_theta": THETA, "rope_type": "default"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    model = load_model(tmp_path, "float32", "numpy", progress=False)
    ids = rng.integers(0, VOCAB, (1, 7))
    assert rel_error(model.forward(ids)[0], reference_logits(w, ids[0], False)) < 1e-5
