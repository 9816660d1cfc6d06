"""An injected ``*ForCausalLM``'s ``generate()`` on our decode loop (``interop.causal_lm``: ``generation.Decoder``
over the model's own memory) against the original model's ``generate()``: greedy tokens identical (left-padded
batches, a batch of one, eos mid-way and the early stop, lengths from the model's generation_config), sampling
reproducible and drawing only allowed tokens, and the calls it does not serve falling back to Hugging Face's loop
with the original's result. fp32 on the CPU (the NumPy path); on CUDA (marked gpu) fp32 through the captured
graph, identical to the original for 64 tokens, and fp16 within a stated bound."""

import copy

import pytest

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cupy_transformer.interop.torch import _ATTRIBUTE, inject  # noqa: E402
from tests.interop.test_inject import CUDA, VOCAB, build, padded_batch  # noqa: E402

FAMILIES = ["gpt2", "llama", "qwen2"]


def fast(model):
    """The injected model's ``causal_lm.FastGenerate``: ``served`` calls, ``decoders`` by (batch, capacity)."""
    return getattr(model.base_model, _ATTRIBUTE).fast


def pair(family, device="cpu", dtype=torch.float32, fast_generate=True):
    original = build(family).to(device=device, dtype=dtype)
    return original, inject(copy.deepcopy(original), fast_generate=fast_generate)


def both(original, injected, ids, seed=None, **options):
    """(the original's output, the injected model's) for the same ``generate`` call."""
    outputs = []
    for model in (original, injected):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            outputs.append(model.generate(ids, **options))
    return outputs


def teacher_forced(model, tokens, mask):
    """``model``'s logits for each new token of ``tokens`` (the prompts [B, S] with mask ``mask``, then the new
    tokens) given the ones before it: [B, new, vocab], positions counted as ``generate`` counts them."""
    full = torch.cat([mask, mask.new_ones(mask.shape[0], tokens.shape[1] - mask.shape[1])], 1)
    positions = (full.cumsum(1) - 1).clamp(min=0)
    with torch.no_grad():
        return model(tokens, attention_mask=full, position_ids=positions).logits[:, mask.shape[1] - 1 : -1].float()


def batch_of_three(device="cpu"):
    """Three prompts of 9, 6 and 4 tokens, left-padded, with their mask."""
    ids = torch.randint(1, VOCAB, (3, 9), generator=torch.Generator().manual_seed(3))
    mask = (torch.arange(9) >= torch.tensor([[0], [3], [5]])).long()
    return (ids * mask).to(device), mask.to(device)


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_padded_batch_and_batch_of_one(family):
    original, injected = pair(family)
    ids, mask = padded_batch()
    want, got = both(original, injected, ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, want) and got.dtype == torch.int64 and got.shape == (2, 9 + 16)
    assert len(set(want[0, 9:].tolist())) > 3  # distinct tokens, not one repeated
    # Decoders by (batch, capacity): 25 tokens rounded up (generation.decoder_capacity), to these models' 128 positions
    assert fast(injected).served == 1 and list(fast(injected).decoders) == [(2, 128)]
    # A batch of one without a mask (Hugging Face infers it: no pad token in the prompt, all ones), and a second
    # call of the first shape, which reuses its decoder.
    want, got = both(original, injected, ids[:1], max_new_tokens=12, do_sample=False)
    assert torch.equal(got, want) and got.shape == (1, 21)
    decoder = fast(injected).decoders[(2, 128)]
    want, got = both(original, injected, ids, attention_mask=mask, max_new_tokens=16, do_sample=False)
    assert torch.equal(got, want) and fast(injected).decoders[(2, 128)] is decoder
    # Another length (a shorter prompt, fewer new tokens): the same decoder.
    want, got = both(original, injected, ids[:, 2:], attention_mask=mask[:, 2:], max_new_tokens=7, do_sample=False)
    assert torch.equal(got, want) and fast(injected).decoders[(2, 128)] is decoder
    # A static cache asks for what our loop does anyway (fixed shapes, a captured step): served, the same decoder.
    want, got = both(original, injected, ids, attention_mask=mask, max_new_tokens=16, do_sample=False,
                     cache_implementation="static")  # fmt: skip
    assert torch.equal(got, want) and fast(injected).decoders[(2, 128)] is decoder
    assert fast(injected).served == 5


def test_eos_mid_way_pads_and_stops_as_hugging_face():
    original, injected = pair("llama")
    ids, mask = padded_batch()
    options = dict(attention_mask=mask, max_new_tokens=16, do_sample=False)
    free, _ = both(original, injected, ids, **options)
    new = free[:, 9:].tolist()
    # An eos that sequence 0 draws at step 3 (its first time) and sequence 1 never: sequence 0 then gets padding.
    step = next(i for i in range(3, 16) if new[0][i] not in new[0][:i] and new[0][i] not in new[1])
    eos = new[0][step]
    want, got = both(original, injected, ids, eos_token_id=eos, pad_token_id=0, **options)
    assert torch.equal(got, want) and got.shape == (2, 25)
    assert got[0, 9 + step] == eos and (got[0, 10 + step :] == 0).all()
    # With a second eos that sequence 1 draws, both end: the output stops at the later one; without a pad token
    # the padding is the first eos (Hugging Face's choice, which warns).
    late = next(i for i in range(step, 16) if new[1][i] not in new[1][:i] and new[1][i] not in new[0][: step + 1])
    eos_list = [eos, new[1][late]]
    for pad in (0, None):
        want, got = both(original, injected, ids, eos_token_id=eos_list, pad_token_id=pad, **options)
        assert torch.equal(got, want) and got.shape == (2, 9 + late + 1), (pad, step, late)
    assert (got[0, 10 + step :] == eos).all()
    assert fast(injected).served == 4


def test_length_from_the_generation_config():
    """No length given: the model's generation_config (max_new_tokens 5 here), else transformers' default (20 new
    tokens, within the model's positions), resolved by Hugging Face's own code."""
    original, injected = pair("gpt2")
    ids, mask = padded_batch()
    want, got = both(original, injected, ids, attention_mask=mask)
    assert torch.equal(got, want) and got.shape == (2, 29)
    for model in (original, injected):
        model.generation_config.max_new_tokens = 5
    want, got = both(original, injected, ids, attention_mask=mask)
    assert torch.equal(got, want) and got.shape == (2, 14) and fast(injected).served == 2
    # min_new_tokens does nothing without an eos (served), and holds an eos back (Hugging Face's loop).
    want, got = both(original, injected, ids, attention_mask=mask, min_new_tokens=5)
    assert torch.equal(got, want) and fast(injected).served == 3
    eos = want[0, 10].item()
    want, got = both(original, injected, ids, attention_mask=mask, min_new_tokens=5, eos_token_id=eos)
    assert torch.equal(got, want) and fast(injected).served == 3


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_sampling_is_seeded_and_draws_allowed_tokens(family):
    """Our sampler's draws (not torch's): reproducible under torch.manual_seed, each new token among the 3 most
    likely under the original's logits for the prefix before it (top_k=3)."""
    original, injected = pair(family)
    ids, mask = padded_batch()
    options = dict(attention_mask=mask, max_new_tokens=12, do_sample=True, top_k=3, temperature=1.5)
    runs = []
    for seed in (5, 5, 6):
        torch.manual_seed(seed)
        runs.append(injected.generate(ids, **options))
    assert torch.equal(runs[0], runs[1]) and not torch.equal(runs[0], runs[2])
    assert runs[0].shape == (2, 21) and fast(injected).served == 3
    for got in runs:
        top = teacher_forced(original, got, mask).topk(3, dim=-1).indices
        assert (top == got[:, 9:, None]).any(-1).all()
    assert len(set(runs[0][:, 9:].flatten().tolist())) > 3


@pytest.mark.parametrize(
    "options",
    [
        dict(num_beams=3),
        dict(repetition_penalty=1.3),
        dict(output_scores=True, return_dict_in_generate=True),
        dict(logits_processor=transformers.LogitsProcessorList([transformers.MinLengthLogitsProcessor(30, 5)])),
        dict(cache_implementation="sliding_window"),
        dict(right_padding=True),
    ],
    ids=["beams", "repetition_penalty", "scores", "logits_processor", "sliding_window_cache", "right_padding"],
)
def test_unserved_calls_fall_back_to_hugging_face(options):
    original, injected = pair("qwen2")
    ids, mask = padded_batch()
    if options.pop("right_padding", False):
        ids, mask = ids.roll(-3, 1), mask.roll(-3, 1)
    want, got = both(original, injected, ids, attention_mask=mask, max_new_tokens=8, do_sample=False, **options)
    if options.get("return_dict_in_generate"):
        assert len(got.scores) == len(want.scores) == 8
        want, got = want.sequences, got.sequences
    assert torch.equal(got, want) and fast(injected).served == 0 and not fast(injected).decoders


def test_fast_generate_off():
    original, injected = pair("gpt2", fast_generate=False)
    ids, mask = padded_batch()
    assert "generate" not in vars(injected) and fast(injected) is None
    want, got = both(original, injected, ids, attention_mask=mask, max_new_tokens=8, do_sample=False)
    assert torch.equal(got, want)
    with pytest.raises(TypeError, match="fast_generate: expected True or False; got 'yes'"):
        inject(build("gpt2"), fast_generate="yes")


def test_moved_weights_drop_the_decoders():
    """A captured graph holds the weights' addresses: after ``.to()`` moves them, the decoders are built again."""
    original, injected = pair("llama")
    ids, mask = padded_batch()
    options = dict(attention_mask=mask, max_new_tokens=8, do_sample=False)
    want, got = both(original, injected, ids, **options)
    decoder = fast(injected).decoders[(2, 128)]
    injected.to(torch.float64).to(torch.float32)
    want, got = both(original, injected, ids, **options)
    assert torch.equal(got, want) and fast(injected).decoders[(2, 128)] is not decoder
    copied = copy.deepcopy(injected)  # a copy starts without decoders and builds its own
    assert not fast(copied).decoders and torch.equal(both(original, copied, ids, **options)[1], want)


# GPU: the captured path. fp32 identical to the original for 64 tokens; fp16 each token near the fp32 best.


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("family", FAMILIES)
def test_cuda_fp32_greedy_through_the_captured_graph(family):
    original, injected = pair(family, "cuda")
    ids, mask = batch_of_three("cuda")
    want, got = both(original, injected, ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
    assert got.device == ids.device and got.shape == (3, 9 + 64)
    assert torch.equal(got.cpu(), want.cpu())
    decoder = fast(injected).decoders[(3, 128)]
    assert decoder.steps == 63 and decoder._graphs  # every step after the second replayed the captured graph


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
@pytest.mark.parametrize("family", FAMILIES)
def test_half_greedy_picks_near_the_fp32_best(family, device):
    """fp16 greedy through our loop (the captured graph on CUDA) against the fp32 original. The tokens may part from
    the fp32 run's where two candidates are within rounding (on the CPU, after 28-52 of the 64 tokens in 4 of the 9
    sequences), so each step is checked on its own prefix: under the fp32 original's logits the token fp16 picked is
    within 0.15 of that step's best (measured on the CPU: at most 0.005-0.021; our fp16 logits are within 0.02-0.06
    of fp32 on logits up to 9, test_inject's test_half_logits_within_bound: 0.15 leaves room for both sides)."""
    reference = build(family).to(device)
    injected = inject(build(family).to(device=device, dtype=torch.float16))
    ids, mask = batch_of_three(device)
    with torch.no_grad():
        got = injected.generate(ids, attention_mask=mask, max_new_tokens=64, do_sample=False)
    logits = teacher_forced(reference, got, mask)
    picked = logits.gather(-1, got[:, 9:, None])[..., 0]
    gap = logits.max(-1).values - picked
    assert gap.max().item() <= 0.15, gap.max().item()
    assert fast(injected).served == 1 and (device == "cpu" or fast(injected).decoders[(3, 128)]._graphs)


def test_text_generation_pipeline_is_served():
    """transformers' pipeline calls ``model.generate`` with its own generation_config: served, the original's text."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tokenizer = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="w0", eos_token="w1")
    tokenizer.padding_side = "left"
    original, injected = pair("llama")
    texts = []
    for model in (original, injected):
        pipe = transformers.pipeline("text-generation", model=model, tokenizer=tokenizer, device="cpu")
        texts.append(pipe(["w5 w6 w7", "w9 w3 w4 w8 w2"], max_new_tokens=8, do_sample=False, batch_size=2))
    assert texts[0] == texts[1] and fast(injected).served == 1
