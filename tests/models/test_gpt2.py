"""GPT-2 on the ops: logits of a tiny random checkpoint against a float64 GPT-2 written out here (the model
as Hugging Face defines it), a prompt then decode steps through the cache against the full forward, a
left-padded batch against each prompt alone, and the errors."""

import json
import math

import numpy
import pytest
from safetensors.numpy import save_file

from cupy_transformer.models import GPT2, load_model
from tests.helpers import rel_error
from tests.models.common import check_logits_and_decode

H, HEADS, LAYERS, VOCAB, POSITIONS = 32, 4, 2, 50, 24


def checkpoint(path, rng, prefix="transformer.", *, h=H, heads=HEADS, layers=LAYERS, vocab=VOCAB, positions=POSITIONS):
    """Random GPT2LMHeadModel-style weights (Conv1D: [in, out]) and config (the tiny model unless sizes are given)."""
    H, HEADS, LAYERS, VOCAB, POSITIONS = h, heads, layers, vocab, positions
    w = {"wte.weight": (VOCAB, H), "wpe.weight": (POSITIONS, H), "ln_f.weight": (H,), "ln_f.bias": (H,)}
    for i in range(LAYERS):
        w.update(
            {
                f"h.{i}.ln_1.weight": (H,),
                f"h.{i}.ln_1.bias": (H,),
                f"h.{i}.attn.c_attn.weight": (H, 3 * H),
                f"h.{i}.attn.c_attn.bias": (3 * H,),
                f"h.{i}.attn.c_proj.weight": (H, H),
                f"h.{i}.attn.c_proj.bias": (H,),
                f"h.{i}.ln_2.weight": (H,),
                f"h.{i}.ln_2.bias": (H,),
                f"h.{i}.mlp.c_fc.weight": (H, 4 * H),
                f"h.{i}.mlp.c_fc.bias": (4 * H,),
                f"h.{i}.mlp.c_proj.weight": (4 * H, H),
                f"h.{i}.mlp.c_proj.bias": (H,),
            }
        )
    tensors = {}
    for name, shape in w.items():
        scale = 0.3 if len(shape) == 2 else 0.1
        gain = name.endswith(("ln_1.weight", "ln_2.weight", "ln_f.weight"))
        t = rng.standard_normal(shape) * scale + (1.0 if gain else 0.0)
        tensors[prefix + name] = t.astype(numpy.float32)
    save_file(tensors, str(path / "model.safetensors"))
    config = {
        "model_type": "gpt2",
        "n_embd": H,
        "n_head": HEADS,
        "n_layer": LAYERS,
        "vocab_size": VOCAB,
        "n_positions": POSITIONS,
        "layer_norm_epsilon": 1e-5,
        "activation_function": "gelu_new",
    }
    (path / "config.json").write_text(json.dumps(config))
    return {k[len(prefix) :]: v.astype(numpy.float64) for k, v in tensors.items()}


def reference_logits(w, ids):
    """float64 GPT-2 forward of one sequence ``ids`` [S]."""

    def ln(x, g, b):
        mu = x.mean(-1, keepdims=True)
        return (x - mu) / numpy.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-5) * g + b

    def gelu(x):
        return 0.5 * x * (1 + numpy.tanh(math.sqrt(2 / math.pi) * (x + 0.044715 * x**3)))

    s, d = len(ids), H // HEADS
    x = w["wte.weight"][ids] + w["wpe.weight"][numpy.arange(s)]
    for i in range(LAYERS):
        p = f"h.{i}."
        qkv = ln(x, w[p + "ln_1.weight"], w[p + "ln_1.bias"]) @ w[p + "attn.c_attn.weight"] + w[p + "attn.c_attn.bias"]
        q, k, v = (qkv[:, j * H : (j + 1) * H].reshape(s, HEADS, d).transpose(1, 0, 2) for j in range(3))
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d) + numpy.triu(numpy.full((s, s), -numpy.inf), 1)
        p_att = numpy.exp(scores - scores.max(-1, keepdims=True))
        ctx = (p_att / p_att.sum(-1, keepdims=True) @ v).transpose(1, 0, 2).reshape(s, H)
        x = x + ctx @ w[p + "attn.c_proj.weight"] + w[p + "attn.c_proj.bias"]
        xn = ln(x, w[p + "ln_2.weight"], w[p + "ln_2.bias"])
        hidden = gelu(xn @ w[p + "mlp.c_fc.weight"] + w[p + "mlp.c_fc.bias"])
        x = x + hidden @ w[p + "mlp.c_proj.weight"] + w[p + "mlp.c_proj.bias"]
    return ln(x, w["ln_f.weight"], w["ln_f.bias"]) @ w["wte.weight"].T


def logits_and_decode(tmp_path, rng, backend, prefix):
    w = checkpoint(tmp_path, rng, prefix)
    model = load_model(tmp_path, "float32", backend, progress=False)
    check_logits_and_decode(model, rng.integers(0, VOCAB, (2, 11)), lambda ids: reference_logits(w, ids), 8)


@pytest.mark.parametrize("prefix", ["transformer.", ""])  # GPT2LMHeadModel's names, and the Hub gpt2 file's
def test_logits_and_cached_decode_match_the_reference(tmp_path, rng, prefix):
    logits_and_decode(tmp_path, rng, "numpy", prefix)


@pytest.mark.gpu
def test_gpu_logits_and_cached_decode_match_the_reference(tmp_path, rng):
    logits_and_decode(tmp_path, rng, "cupy", "transformer.")


def test_left_padded_batch_gives_each_prompt_alone(tmp_path, rng):
    checkpoint(tmp_path, rng)
    model = GPT2(tmp_path, numpy.float32, "numpy", progress=False)
    short, long = rng.integers(0, VOCAB, 5), rng.integers(0, VOCAB, 8)
    ids = numpy.stack([numpy.concatenate([numpy.zeros(3, int), short]), long])
    keep = numpy.ones((2, 8), bool)
    keep[0, :3] = False
    positions = numpy.stack([numpy.concatenate([numpy.zeros(3, int), numpy.arange(5)]), numpy.arange(8)])
    cache = model.new_cache(2, 12)
    padded = model.forward(ids, cache, keep, positions)
    assert rel_error(padded[0, 3:], model.forward(short[None])[0]) < 1e-5
    assert rel_error(padded[1], model.forward(long[None])[0]) < 1e-5
    nxt = numpy.array([[7], [9]])  # one decode step: the short prompt's next position is 5, the long one's 8
    step = model.forward(nxt, cache, numpy.concatenate([keep, numpy.ones((2, 1), bool)], 1), numpy.array([[5], [8]]))
    assert rel_error(step[0, 0], model.forward(numpy.concatenate([short, [7]])[None])[0, -1]) < 1e-5
    assert rel_error(step[1, 0], model.forward(numpy.concatenate([long, [9]])[None])[0, -1]) < 1e-5


def test_errors(tmp_path, rng):
    checkpoint(tmp_path, rng)
    model = GPT2(tmp_path, numpy.float32, "numpy", progress=False)
    with pytest.raises(ValueError, match=r"position_ids: the model has 24 positions; this call needs 30"):
        model.forward(numpy.zeros((1, 30), int))
    cache = model.new_cache(1)
    model.forward(numpy.zeros((1, 20), int), cache)
    with pytest.raises(ValueError, match=r"KV cache full: sequence 0 holds 20 of 24 tokens and cannot take 5 more"):
        model.forward(numpy.zeros((1, 5), int), cache)
    with pytest.raises(ValueError, match=r"input_ids: expected token ids in \[0, 50\)"):
        model.forward(numpy.array([[3, 50]]))
    with pytest.raises(ValueError, match=r"input_ids: expected a non-empty \[batch, tokens\] integer array"):
        model.forward(numpy.zeros((1, 0), int))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="bloom")))
    with pytest.raises(ValueError, match=r"model_type 'bloom' is not supported; supported: bert, gpt2, llama"):
        load_model(tmp_path, backend="numpy")
    (tmp_path / "config.json").write_text(json.dumps(dict(config, n_layer=3)))
    with pytest.raises(ValueError, match=r"tensor 'transformer.h.2.ln_1.weight' not found in the checkpoint"):
        load_model(tmp_path, backend="numpy", progress=False)
