"""BERT on the ops: hidden states and mean-pooled embeddings of a tiny random checkpoint against a float64
BERT written out here (as Hugging Face defines it), right-padded batches against each sentence alone."""

import json
import math

import numpy
import pytest
from safetensors.numpy import save_file

from cupy_transformer.models import BERT, load_model
from tests.helpers import host, rel_error

H, HEADS, LAYERS, INNER, VOCAB, POSITIONS = 32, 4, 2, 64, 40, 16


def checkpoint(path, rng):
    w = {
        "embeddings.word_embeddings.weight": (VOCAB, H),
        "embeddings.position_embeddings.weight": (POSITIONS, H),
        "embeddings.token_type_embeddings.weight": (2, H),
        "embeddings.LayerNorm.weight": (H,),
        "embeddings.LayerNorm.bias": (H,),
        "pooler.dense.weight": (H, H),
    }
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        for n in ("query", "key", "value"):
            w[p + f"attention.self.{n}.weight"], w[p + f"attention.self.{n}.bias"] = (H, H), (H,)
        w.update(
            {
                p + "attention.output.dense.weight": (H, H),
                p + "attention.output.dense.bias": (H,),
                p + "attention.output.LayerNorm.weight": (H,),
                p + "attention.output.LayerNorm.bias": (H,),
                p + "intermediate.dense.weight": (INNER, H),
                p + "intermediate.dense.bias": (INNER,),
                p + "output.dense.weight": (H, INNER),
                p + "output.dense.bias": (H,),
                p + "output.LayerNorm.weight": (H,),
                p + "output.LayerNorm.bias": (H,),
            }
        )
    tensors = {}
    for name, shape in w.items():
        t = rng.standard_normal(shape) * (0.3 if len(shape) == 2 else 0.1)
        tensors[name] = (t + (1.0 if name.endswith("LayerNorm.weight") else 0.0)).astype(numpy.float32)
    save_file(tensors, str(path / "model.safetensors"))
    config = {
        "model_type": "bert",
        "hidden_size": H,
        "num_attention_heads": HEADS,
        "num_hidden_layers": LAYERS,
        "intermediate_size": INNER,
        "vocab_size": VOCAB,
        "max_position_embeddings": POSITIONS,
        "type_vocab_size": 2,
        "layer_norm_eps": 1e-12,
        "hidden_act": "gelu",
    }
    (path / "config.json").write_text(json.dumps(config))
    return {k: v.astype(numpy.float64) for k, v in tensors.items()}


def reference_hidden(w, ids):
    """float64 BertModel last hidden states of one unpadded sentence."""

    def ln(x, p):
        mu = x.mean(-1, keepdims=True)
        normalised = (x - mu) / numpy.sqrt(((x - mu) ** 2).mean(-1, keepdims=True) + 1e-12)
        return normalised * w[p + ".weight"] + w[p + ".bias"]

    def linear(x, p):
        return x @ w[p + ".weight"].T + w[p + ".bias"]

    erf = numpy.vectorize(math.erf)
    s, d = len(ids), H // HEADS
    x = ln(
        w["embeddings.word_embeddings.weight"][ids]
        + w["embeddings.position_embeddings.weight"][:s]
        + w["embeddings.token_type_embeddings.weight"][0],
        "embeddings.LayerNorm",
    )
    for i in range(LAYERS):
        p = f"encoder.layer.{i}."
        q, k, v = (
            linear(x, p + f"attention.self.{n}").reshape(s, HEADS, d).transpose(1, 0, 2)
            for n in ("query", "key", "value")
        )
        scores = q @ k.transpose(0, 2, 1) / math.sqrt(d)
        att = numpy.exp(scores - scores.max(-1, keepdims=True))
        ctx = (att / att.sum(-1, keepdims=True) @ v).transpose(1, 0, 2).reshape(s, H)
        h1 = ln(x + linear(ctx, p + "attention.output.dense"), p + "attention.output.LayerNorm")
        inner = linear(h1, p + "intermediate.dense")
        x = ln(h1 + linear(0.5 * inner * (1 + erf(inner / math.sqrt(2))), p + "output.dense"), p + "output.LayerNorm")
    return x


def padded_batch(tmp_path, rng, backend):
    w = checkpoint(tmp_path, rng)
    model = load_model(tmp_path, "float32", backend, progress=False)
    sentences = [rng.integers(1, VOCAB, n) for n in (9, 5, 12)]
    ids = numpy.zeros((3, 12), numpy.int64)
    mask = numpy.zeros((3, 12), numpy.int64)
    for b, sentence in enumerate(sentences):
        ids[b, : len(sentence)], mask[b, : len(sentence)] = sentence, 1
    hidden = host(model.forward(ids, mask))
    embeddings = host(model.embed(ids, mask))
    for b, sentence in enumerate(sentences):
        want = reference_hidden(w, sentence)
        assert rel_error(hidden[b, : len(sentence)], want) < 1e-5
        pooled = want.mean(0)
        assert rel_error(embeddings[b], pooled / numpy.linalg.norm(pooled)) < 1e-5
    assert numpy.allclose(numpy.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)


def test_padded_batch_matches_each_sentence(tmp_path, rng):
    padded_batch(tmp_path, rng, "numpy")


@pytest.mark.gpu
def test_gpu_padded_batch_matches_each_sentence(tmp_path, rng):
    padded_batch(tmp_path, rng, "cupy")


def test_errors(tmp_path, rng):
    checkpoint(tmp_path, rng)
    model = BERT(tmp_path, numpy.float32, "numpy", progress=False)
    with pytest.raises(ValueError, match=r"input_ids: 17 tokens exceed the model's 16 positions"):
        model.forward(numpy.ones((1, 17), int))
    with pytest.raises(ValueError, match=r"attention_mask: expected shape \(1, 3\)"):
        model.forward(numpy.ones((1, 3), int), numpy.ones((1, 4), int))
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, hidden_act="swish")))
    with pytest.raises(ValueError, match=r"hidden_act 'swish' is not one of"):
        BERT(tmp_path, numpy.float32, "numpy")
