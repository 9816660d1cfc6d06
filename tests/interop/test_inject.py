"""``cupy_transformer.interop.torch.inject`` on tiny random Hugging Face decoders (GPT-2, LLaMA with grouped-query
heads, Qwen2 with QKV biases, Mistral), an injected deep copy against the original: logits and hidden states of a
left-padded batch, greedy / sampled / beam-search / static-cache generation, caches handed between calls (and
between the two models: both hold the same rotated keys), state_dict and parameter memory unchanged, refusals
that change nothing. fp32 on the CPU (the NumPy path); the same on CUDA, and fp16 / bf16 within stated bounds, in
the tests marked gpu."""

import copy

import pytest

from tests.helpers import rel_error

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from cupy_transformer.interop.torch import InjectedBlock, inject  # noqa: E402

VOCAB = 100
FAMILIES = ["gpt2", "llama", "qwen2", "mistral"]
CUDA = pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")


def build(family: str, **options):
    """A tiny random model of ``family`` in eval mode, the same each call for the same options. Weights are drawn
    wider than the default initialisation so that the logits are spread (distinct greedy tokens)."""
    torch.manual_seed(0)
    common = dict(vocab_size=VOCAB, initializer_range=0.3, bos_token_id=1, eos_token_id=None, pad_token_id=0)
    if family == "gpt2":
        cfg = transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, n_positions=128, **common, **options)
        return transformers.GPT2LMHeadModel(cfg).eval()
    shape = dict(hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
    shape.update(intermediate_size=160, max_position_embeddings=128, rope_theta=500.0, **common)
    config, model = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[family]
    if family == "mistral":
        shape["sliding_window"] = None
    shape.update(options)
    return model(config(**shape)).eval()


def pair(family: str, device="cpu", dtype=torch.float32, **options):
    """(original, injected deep copy) on ``device`` in ``dtype``."""
    original = build(family, **options).to(device=device, dtype=dtype)
    return original, inject(copy.deepcopy(original))


def padded_batch(device="cpu", rng_seed=1):
    """Two prompts, the second left-padded by 3 (token 0), with their attention mask."""
    generator = torch.Generator().manual_seed(rng_seed)
    ids = torch.randint(1, VOCAB, (2, 9), generator=generator)
    mask = torch.ones(2, 9, dtype=torch.long)
    ids[1, :3], mask[1, :3] = 0, 0
    return ids.to(device), mask.to(device)


def generate_both(original, injected, device="cpu", seed=None, **options):
    ids, mask = padded_batch(device)
    outputs = []
    for model in (original, injected):
        if seed is not None:
            torch.manual_seed(seed)
        with torch.no_grad():
            outputs.append(model.generate(ids, attention_mask=mask, pad_token_id=0, **options))
    return outputs


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_and_hidden_states_of_a_padded_batch(family):
    original, injected = pair(family)
    assert isinstance(injected.base_model.layers[0] if family != "gpt2" else injected.transformer.h[0], InjectedBlock)
    ids, mask = padded_batch()
    with torch.no_grad():
        want = original(ids, attention_mask=mask, output_hidden_states=True)
        got = injected(ids, attention_mask=mask, output_hidden_states=True)
    keep = mask.bool()  # padded positions' outputs are not defined
    assert rel_error(got.logits[keep], want.logits[keep]) < 1e-4
    assert len(got.hidden_states) == len(want.hidden_states) == 3
    for ours, theirs in zip(got.hidden_states, want.hidden_states):
        assert rel_error(ours[keep], theirs[keep]) < 1e-4
    assert want.logits[keep].std() > 1  # spread logits: the greedy tests below compare distinct tokens


@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_of_a_padded_batch(family):
    want, got = generate_both(*pair(family), max_new_tokens=20, do_sample=False)
    assert torch.equal(got, want)
    assert len(set(want[0, 9:].tolist())) > 3  # not one token repeated


@pytest.mark.parametrize("family", FAMILIES)
def test_sampling_with_a_fixed_seed(family):
    """Hugging Face's sampling loop over the injected forward draws the original's tokens (``fast_generate=False``:
    our own loop, the default, draws with its own sampler; tests/interop/test_inject_generate.py tests it)."""
    original = build(family)
    injected = inject(copy.deepcopy(original), fast_generate=False)
    want, got = generate_both(original, injected, seed=7, max_new_tokens=20, do_sample=True, top_k=0, temperature=0.8)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_beam_search(family):
    want, got = generate_both(*pair(family), max_new_tokens=16, num_beams=3, do_sample=False)
    assert torch.equal(got, want)


@pytest.mark.parametrize("family", FAMILIES)
def test_static_cache_generation(family):
    original, injected = pair(family)
    dynamic, _ = generate_both(original, injected, max_new_tokens=16, do_sample=False)
    want, got = generate_both(original, injected, max_new_tokens=16, do_sample=False, cache_implementation="static")
    assert torch.equal(got, want) and torch.equal(got, dynamic)


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated:FutureWarning")
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_cache_handed_between_calls_and_models(family):
    """A prompt, then two single-token steps each given the cache the call before returned (as ``cache``, then as
    ``past_key_values``, transformers 5's deprecated name); the caches of both models hold the same (rotated) keys
    and values, so the injected model also continues from the original's cache."""
    original, injected = pair(family)
    ids, mask = padded_batch()
    with torch.no_grad():
        first = {m: m(ids, attention_mask=mask, use_cache=True) for m in (original, injected)}
        for out in first.values():
            assert out.cache is not None and out.cache.get_seq_length() == 9
        theirs, ours = first[original].cache, first[injected].cache
        for layer_theirs, layer_ours in zip(theirs.layers, ours.layers):
            for a, b in ((layer_ours.keys, layer_theirs.keys), (layer_ours.values, layer_theirs.values)):
                assert rel_error(a.transpose(1, 2)[mask.bool()], b.transpose(1, 2)[mask.bool()]) < 1e-4
        token = first[original].logits[:, -1:].argmax(-1)
        positions = mask.sum(-1, keepdim=True)  # as generate counts them for a left-padded batch
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        step = dict(attention_mask=mask, position_ids=positions, use_cache=True)
        want = original(token, cache=copy.deepcopy(theirs), **step)
        got = injected(token, cache=ours, **step)
        crossed = injected(token, cache=theirs, **step)  # the original's cache, continued by ours
        assert rel_error(got.logits, want.logits) < 1e-4 and rel_error(crossed.logits, want.logits) < 1e-4
        assert got.cache.get_seq_length() == 10
        token = want.logits.argmax(-1)
        mask = torch.cat([mask, torch.ones(2, 1, dtype=mask.dtype)], 1)
        step = dict(attention_mask=mask, position_ids=positions + 1)
        want = original(token, past_key_values=want.cache, **step)
        got = injected(token, past_key_values=got.cache, **step)
    assert rel_error(got.logits, want.logits) < 1e-4


def storage_bytes(model) -> int:
    """Bytes of the distinct storages behind the model's parameters."""
    storages = {p.untyped_storage().data_ptr(): p.untyped_storage().nbytes() for p in model.parameters()}
    return sum(storages.values())


@pytest.mark.parametrize("family", ["gpt2", "qwen2"])
def test_state_dict_unchanged_and_parameters_not_copied(family):
    original = build(family)
    model = copy.deepcopy(original)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    size = storage_bytes(model)
    inject(model)
    after = model.state_dict()
    assert list(after) == list(before)
    assert all(torch.equal(after[k], v) for k, v in before.items())
    assert storage_bytes(model) == size
    if family == "qwen2":  # q, k, v (weights and biases) and up, gate share one storage per layer
        attn = model.model.layers[0].self_attn
        assert attn.q_proj.weight.untyped_storage().data_ptr() == attn.v_proj.weight.untyped_storage().data_ptr()
        assert attn.q_proj.bias.untyped_storage().data_ptr() == attn.k_proj.bias.untyped_storage().data_ptr()
    if family == "gpt2":  # each Conv1D weight [in, out] a transposed view of [out, in] storage
        assert all(conv1d_relaid(model))
    assert inject(model) is model  # a second injection changes nothing
    # A moved model (new, separate storages) is fused again on its next call and still matches.
    model.to(torch.float64).to(torch.float32)
    if family == "gpt2":  # relaid only where a move made them [in, out] again
        for m in model.transformer.h[0].mlp.c_fc, model.transformer.h[1].attn.c_proj:
            m.weight.data = m.weight.detach().contiguous()
        assert not all(conv1d_relaid(model))
    ids, mask = padded_batch()
    with torch.no_grad():
        want, got = original(ids, attention_mask=mask).logits, model(ids, attention_mask=mask).logits
    assert rel_error(got[mask.bool()], want[mask.bool()]) < 1e-4
    assert storage_bytes(model) == size
    if family == "gpt2":
        assert all(conv1d_relaid(model))


def conv1d_relaid(model):
    """Per Conv1D weight of a GPT-2 model, whether its storage is [out, in] (its [in, out] a transposed view)."""
    modules = [(b.attn.c_attn, b.attn.c_proj, b.mlp.c_fc, b.mlp.c_proj) for b in model.transformer.h]
    return [m.weight.t().is_contiguous() for block in modules for m in block]


@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_replaced_parameters_are_read_on_the_next_call(family):
    """A Parameter the user replaces after injection (a new object in its module, as ``module.weight =
    nn.Parameter(...)`` or a conversion that makes new Parameters does) is what the next call computes with, as is
    one loaded in place; the original model given the same Parameters agrees."""
    original, injected = pair(family)
    ids, mask = padded_batch()
    norm = {"gpt2": lambda m: m.transformer.h[1].ln_2, "llama": lambda m: m.model.layers[1].post_attention_layernorm}
    head_in = {"gpt2": lambda m: m.transformer.h[0].mlp.c_fc, "llama": lambda m: m.model.layers[0].mlp.up_proj}
    with torch.no_grad():
        injected(ids, attention_mask=mask)  # the views of the first weights
        for model in (original, injected):
            generator = torch.Generator().manual_seed(3)
            module = norm[family](model)
            module.weight = torch.nn.Parameter(torch.rand(module.weight.shape, generator=generator) + 0.5)
            head_in[family](model).weight.mul_(1.5)  # in place: the same storage, new values
        want, got = original(ids, attention_mask=mask).logits, injected(ids, attention_mask=mask).logits
        before = build(family)(ids, attention_mask=mask).logits
    assert rel_error(got[mask.bool()], want[mask.bool()]) < 1e-4
    assert rel_error(want[mask.bool()], before[mask.bool()]) > 1e-2  # the change mattered


def test_output_attentions_is_refused():
    original, injected = pair("llama")
    ids, mask = padded_batch()
    with pytest.raises(ValueError, match="output_attentions=True: not supported"):
        injected(ids, attention_mask=mask, output_attentions=True)
    with torch.no_grad():  # nothing changed: it still runs and matches
        assert rel_error(injected(ids).logits, original(ids).logits) < 1e-4


@pytest.mark.parametrize(
    ("family", "options", "error", "match"),
    [
        ("gpt2", dict(scale_attn_by_inverse_layer_idx=True), ValueError, "scale_attn_by_inverse_layer_idx=True"),
        ("gpt2", dict(add_cross_attention=True), ValueError, "add_cross_attention=True"),
        ("gpt2", dict(activation_function="silu"), ValueError, "activation_function 'silu'"),
        ("mistral", dict(sliding_window=8), ValueError, "sliding_window 8"),
        ("qwen2", dict(use_sliding_window=True, sliding_window=8, max_window_layers=0), ValueError, "layer_types"),
        ("llama", dict(rope_scaling=dict(rope_type="linear", factor=2.0)), ValueError, "rope scaling"),
        ("llama", dict(head_dim=8), ValueError, "head_dim 8 x 4 heads"),
    ],
)
def test_unsupported_config_is_refused_before_anything_changes(family, options, error, match):
    model = build(family, **options)
    blocks = list(model.base_model.h if family == "gpt2" else model.base_model.layers)
    with pytest.raises(error, match=match):
        inject(model)
    now = model.base_model.h if family == "gpt2" else model.base_model.layers
    assert all(a is b for a, b in zip(now, blocks)) and "forward" not in vars(model.base_model)


def test_other_objects_and_split_models_are_refused():
    with pytest.raises(TypeError, match="expected a transformers PreTrainedModel"):
        inject(torch.nn.Linear(4, 4))
    neox = transformers.GPTNeoXModel(
        transformers.GPTNeoXConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4, intermediate_size=64)
    )
    with pytest.raises(TypeError, match="unsupported: expected a model built on one of GPT2Model"):
        inject(neox)
    bert = transformers.BertModel(transformers.BertConfig(hidden_size=32, num_hidden_layers=1, num_attention_heads=4))
    from cupy_transformer.interop.bert_inject import InjectedBertLayer

    assert inject(bert) is bert and isinstance(bert.encoder.layer[0], InjectedBertLayer)  # interop.bert_inject's
    model = build("gpt2")
    model.transformer.ln_f.to("meta")
    with pytest.raises(ValueError, match="split over"):
        inject(model)
    model = build("gpt2").to(torch.float64)
    with pytest.raises(TypeError, match="float16, bfloat16 or float32"):
        inject(model)
    assert not isinstance(model.transformer.h[0], InjectedBlock)


def test_unsupported_call_options_are_refused():
    _, injected = pair("gpt2")
    ids, _ = padded_batch()
    with pytest.raises(ValueError, match="token_type_ids: not supported"):
        injected(ids, token_type_ids=ids)
    with pytest.raises(ValueError, match=rf"input_ids: expected token ids in \[0, {VOCAB}\); got"):
        injected(ids + VOCAB)
    with pytest.raises(ValueError, match=r"position_ids: expected positions in \[0, \d+\); got -1\.\."):
        injected(ids, position_ids=torch.full_like(ids, -1))


def test_inject_generate_example(capsys):
    from tests.test_examples import load

    tokens = load("inject_generate").main()
    assert len(tokens) == 2 and "identical to the original's: True" in capsys.readouterr().out


# GPU: the same on CUDA tensors (our kernels), fp32 at the CPU's bounds, fp16 / bf16 within stated bounds.


@pytest.mark.gpu
@CUDA
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
def test_cuda_fp32_logits_greedy_beam_and_static(family):
    original, injected = pair(family, "cuda")
    ids, mask = padded_batch("cuda")
    with torch.no_grad():
        want, got = original(ids, attention_mask=mask).logits, injected(ids, attention_mask=mask).logits
    keep = mask.bool()
    assert rel_error(got[keep].cpu(), want[keep].cpu()) < 1e-4
    # On CUDA generate compiles a static-cache step; the injected model turns that off (TorchDynamo cannot trace our
    # ops), and the original runs uncompiled too, so both compute the same fp32 math.
    original.generation_config.disable_compile = True
    assert injected.generation_config.disable_compile
    for options in (
        dict(max_new_tokens=64, do_sample=False),
        dict(max_new_tokens=16, num_beams=3, do_sample=False),
        dict(max_new_tokens=16, do_sample=False, cache_implementation="static"),
    ):
        want, got = generate_both(original, injected, "cuda", **options)
        assert torch.equal(got.cpu(), want.cpu()), options


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=[pytest.mark.gpu, CUDA])])
@pytest.mark.parametrize("family", ["gpt2", "llama", "qwen2"])
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_half_logits_within_bound(family, dtype, device):
    """Our fp16 / bf16 logits against the fp32 original's: at most 3x Hugging Face's own error in that dtype plus
    1% of the logits' largest magnitude (both round activations to the dtype, in different places; on the CPU ours
    measured 0.6-1.5x theirs, 0.02-0.06 in fp16 and 0.16-0.24 in bf16 on logits up to 9)."""
    reference = build(family).to(device)
    original, injected = pair(family, device, dtype)
    ids, mask = padded_batch(device)
    keep = mask.bool()
    with torch.no_grad():
        exact = reference(ids, attention_mask=mask).logits[keep].float()
        theirs = original(ids, attention_mask=mask).logits[keep].float()
        ours = injected(ids, attention_mask=mask).logits[keep].float()
    theirs_error = (theirs - exact).abs().max().item()
    ours_error = (ours - exact).abs().max().item()
    assert ours_error <= 3 * theirs_error + 0.01 * exact.abs().max().item(), (ours_error, theirs_error)


def test_torch_compile_of_an_injected_model_runs_our_forward_eagerly():
    """TorchDynamo cannot trace CuPy launches: the injected forward is excluded from compilation, so a compiled
    model gives the injected model's logits (and generate's own compile of static-cache steps is off)."""
    original, injected = pair("gpt2")
    ids, mask = padded_batch()
    compiled = torch.compile(injected, backend="eager")
    with torch.no_grad():
        want, got = injected(ids, attention_mask=mask).logits, compiled(ids, attention_mask=mask).logits
    assert torch.equal(got, want) and injected.generation_config.disable_compile
