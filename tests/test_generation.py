"""generation: greedy tokens against a loop that recomputes the whole sequence each step (no cache), a padded
batch against each prompt alone, seeded sampling, top-k 1 = greedy, EOS, stop strings, streaming, errors.
The model is a tiny random GPT-2 with a word-level tokenizer."""

import numpy
import pytest

from cupy_transformer import generation
from cupy_transformer.models import GPT2
from tests.models import test_gpt2


def word_tokenizer(vocab):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(vocab)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@pytest.fixture
def model_and_tokenizer(tmp_path, rng):
    test_gpt2.checkpoint(tmp_path, rng)
    return GPT2(tmp_path, numpy.float32, "numpy", progress=False), word_tokenizer(test_gpt2.VOCAB)


def greedy_without_cache(model, ids, n):
    ids = list(ids)
    for _ in range(n):
        ids.append(int(model.forward(numpy.array([ids]))[0, -1].argmax()))
    return ids[-n:]


def words(ids):
    return " ".join(f"w{i}" for i in ids)


def test_greedy_matches_recomputing_every_step(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = [3, 17, 5, 9]
    want = greedy_without_cache(model, prompt, 12)
    assert generation.generate(model, tok, [words(prompt)], max_new_tokens=12) == [words(want)]


def test_cpu_passes_take_blas_products_and_the_model_alone_the_reference(model_and_tokenizer, monkeypatch):
    """On the NumPy backend the decoder's prompt pass and steps run their products through BLAS in float32
    (``runtime.arrays.cpu_float32``: the reference's float64 copies made CPU generation 2.5x slower than Hugging
    Face's);
    the model called outside a decoder keeps the reference. The tokens are the reference's (the test above)."""
    import cupy_transformer.ops.matmul as mm

    model, _ = model_and_tokenizer
    calls = []
    blas = mm._blas_product
    monkeypatch.setattr(mm, "_blas_product", lambda *a: calls.append(a[0].shape) or blas(*a))
    model.forward(numpy.array([[3, 17, 5]]))
    assert calls == []
    decoder = generation.Decoder(model, batch=1, capacity=16)
    decoder.prefill([[3, 17, 5]])
    prompt_products = len(calls)
    decoder.step()
    decoder.read(1)
    assert prompt_products > 0 and len(calls) == 2 * prompt_products  # the step's products as the pass's


def test_padded_batch_gives_each_prompt_alone(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompts = [words([3, 17]), words([8, 1, 22, 30, 4, 11])]
    together = generation.generate(model, tok, prompts, max_new_tokens=10)
    alone = [generation.generate(model, tok, [p], max_new_tokens=10)[0] for p in prompts]
    assert together == alone


def test_sampling_is_seeded_and_top_k_1_is_greedy(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = [words([3, 17, 5])]
    greedy = generation.generate(model, tok, prompt, max_new_tokens=8)
    assert generation.generate(model, tok, prompt, max_new_tokens=8, temperature=0.8, top_k=1, seed=1) == greedy
    a = generation.generate(model, tok, prompt, max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7)
    assert a == generation.generate(model, tok, prompt, max_new_tokens=8, temperature=1.5, top_p=0.9, seed=7)
    assert len(a[0].split()) == 8


def test_eos_stop_strings_and_streaming(model_and_tokenizer):
    model, tok = model_and_tokenizer
    prompt = [3, 17, 5, 9]
    greedy = greedy_without_cache(model, prompt, 6)
    k = next(i for i in range(1, 6) if greedy[i] not in greedy[:i])  # a token not generated before
    assert generation.generate(model, tok, [words(prompt)], 6, eos_token_id=greedy[k]) == [words(greedy[:k])]
    text = generation.generate(model, tok, [words(prompt)], 6, stop=[f"w{greedy[k]}"])[0]
    assert text.strip() == words(greedy[:k])
    pieces = []
    full = generation.generate(model, tok, [words(prompt)], 6, stream=lambda b, piece: pieces.append((b, piece)))
    assert "".join(p for _, p in pieces) == full[0] and {b for b, _ in pieces} == {0}


def test_errors(model_and_tokenizer):
    model, tok = model_and_tokenizer
    with pytest.raises(ValueError, match=r"prompts: a prompt encodes to no tokens"):
        generation.generate(model, tok, [""], 3)
    with pytest.raises(ValueError, match=r"max_new_tokens: 4 prompt tokens \+ 21 exceed the model's context"):
        generation.generate(model, tok, [words([1, 2, 3, 4])], 21)
    with pytest.raises(ValueError, match=r"prompts: 30 tokens exceed the model's context of 24"):
        generation.generate(model, tok, [words(range(30))], 1)
    with pytest.raises(ValueError, match=r"max_new_tokens: expected a positive integer"):
        generation.generate(model, tok, [words([1])], 0)


@pytest.mark.gpu
def test_gpu_generation_matches_the_numpy_path(tmp_path, rng):
    """fp32 on the GPU (decode steps through the attention kernel) gives the NumPy path's greedy tokens for a
    padded batch."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    test_gpt2.checkpoint(tmp_path, rng)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(test_gpt2.VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    prompts = [words([3, 17]), words([8, 1, 22, 30, 4, 11])]
    texts = [
        generation.generate(GPT2(tmp_path, numpy.float32, backend, progress=False), tok, prompts, 12)
        for backend in ("numpy", "cupy")
    ]
    assert texts[0] == texts[1]


def test_eos_may_be_several_ids_and_the_host_reads_one_step_behind(model_and_tokenizer):
    """A list of eos ids (Llama-3 configs) stops at any of them; the decoder has drawn one step past the stop
    (it runs a step ahead of the host), and that token is dropped."""
    model, tok = model_and_tokenizer
    prompt = [3, 17, 5, 9]
    greedy = greedy_without_cache(model, prompt, 8)
    k = next(i for i in range(1, 8) if greedy[i] not in greedy[:i])
    assert generation.generate(model, tok, [words(prompt)], 8, eos_token_id=[49, greedy[k]]) == [words(greedy[:k])]
    decoder = generation.Decoder(model, batch=1, capacity=16)
    decoder.prefill([prompt])
    decoder.step()  # step 1 runs before the host reads step 0
    assert decoder.read(0).tolist() == [greedy[0]] and decoder.read(1).tolist() == [greedy[1]]
    with pytest.raises(ValueError, match=r"step: the tokens of steps 0 and 1 are kept; asked for 2"):
        decoder.read(2)
    # The step's state advanced on the backend: positions, cache slots and the sampler's step.
    assert decoder.positions[:, 0].tolist() == [5] and decoder.cache.device_lengths.tolist() == [5]
    assert decoder.cache.lengths.tolist() == [5] and int(decoder.seed_step[1]) == 2


def small_fp16_model(tmp_path, rng, family, vocab=1000):
    """A 3-layer fp16 GPT-2 or LLaMA (8 heads over 2 kv heads) of hidden size 256 on the GPU, and a padded batch's
    prompts of 5, 13 and 1 tokens."""
    from cupy_transformer.models import load_model
    from tests.models import test_llama

    if family == "gpt2":
        test_gpt2.checkpoint(tmp_path, rng, h=256, heads=4, layers=3, vocab=vocab, positions=160)
    else:
        test_llama.checkpoint(
            tmp_path, rng, False, h=256, heads=8, kv=2, inner=512, layers=3, vocab=vocab, positions=160
        )
    model = load_model(tmp_path, "float16", "cupy", progress=False)
    return model, [rng.integers(0, vocab, n).tolist() for n in (5, 13, 1)]


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gpu_captured_steps_draw_the_eager_steps_tokens(tmp_path, rng, family):
    """fp16, a padded batch of three, 100 steps, greedy and seeded top-k / top-p sampling: the decoder replaying
    its CUDA graph draws every token the eager steps draw (the same kernels, the same product choices), with its
    kernels launched programmatically (compute capability 9.0 and later) or not; a run with the same seed draws
    them again."""
    model, prompts = small_fp16_model(tmp_path, rng, family)
    for sampling in (generation.Sampling(), generation.Sampling(0.8, 50, 0.9)):
        runs = []
        for graph, programmatic in ((True, True), (False, True), (True, False)):
            decoder = generation.Decoder(model, batch=3, capacity=13 + 101, cuda_graph=graph, programmatic=programmatic)
            decoder.prefill(prompts, seed=11, sampling=sampling)
            tokens = [decoder.read(0)]
            for step in range(1, 101):
                decoder.step()
                tokens.append(decoder.read(step))
            runs.append(numpy.stack(tokens))
        assert (runs[0] == runs[1]).all() and (runs[0] == runs[2]).all(), sampling
        assert len(numpy.unique(runs[0])) > 10  # not one token repeated


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gpu_greedy_lm_head_draws_the_samplers_tokens(tmp_path, rng, monkeypatch, family):
    """A vocabulary of 20000 (an LM head of one K split, which takes greedy's argmax in its epilogue): a padded
    batch's greedy tokens for 60 steps, captured and eager, are those the written logits and the sampler's kernel
    give (``greedy_head`` turned off), and the step runs no sampler kernel where the head took it."""
    from cupy_transformer import ops
    from cupy_transformer.models import base

    model, prompts = small_fp16_model(tmp_path, rng, family, vocab=20000)
    heads, samplers, original_head, original_sampler = [], [], base.greedy_head, ops.sample_tokens

    def head(*args, **kwargs):
        heads.append(original_head(*args, **kwargs))
        return heads[-1]

    def sampler(*args, **kwargs):
        samplers.append(1)
        return original_sampler(*args, **kwargs)

    monkeypatch.setattr(ops, "sample_tokens", sampler)
    runs = []
    for greedy_head, graph in ((head, True), (head, False), (lambda *a, **k: False, True)):
        monkeypatch.setattr(base, "greedy_head", greedy_head)
        decoder = generation.Decoder(model, batch=3, capacity=13 + 61, cuda_graph=graph)
        decoder.prefill(prompts)
        tokens = [decoder.read(0)]
        heads.clear()
        samplers.clear()
        for step in range(1, 61):
            decoder.step()
            tokens.append(decoder.read(step))
        runs.append(numpy.stack(tokens))
        if greedy_head is head:  # the eager steps (all, or the graph's first two) took the head, and no sampler
            assert True in heads and not samplers
    assert (runs[0] == runs[1]).all() and (runs[0] == runs[2]).all()
    assert len(numpy.unique(runs[0])) > 10


@pytest.mark.gpu
def test_gpu_a_model_whose_attention_takes_the_array_operations_decodes_uncaptured(tmp_path, rng):
    """fp32 LLaMA with 16 query heads over one kv head (the CUDA-core decode kernel takes 8): its prompt pass and its
    steps take attention_reference, whose CuPy einsum calls cuBLAS, refused in a stream capture. The decoder runs
    them eagerly (no capture, no error) and draws what a decoder without CUDA graphs draws, twice over (the second
    prompt pass at a width already run)."""
    from cupy_transformer.models import load_model
    from tests.models import test_llama

    test_llama.checkpoint(tmp_path, rng, False, h=256, heads=16, kv=1, inner=512, layers=2, vocab=500, positions=64)
    model = load_model(tmp_path, "float32", "cupy", progress=False)
    assert not model.layer.attention.kernels(2, 1) and not model.layer.attention.kernels(2, 16)
    prompts = [rng.integers(0, 500, n).tolist() for n in (5, 9)]
    runs = [decode_tokens(generation.Decoder(model, 2, 40, cuda_graph=False), prompts, 20)]
    decoder = generation.Decoder(model, 2, 40)
    runs += [decode_tokens(decoder, prompts, 20) for _ in range(2)]
    assert all((r == runs[0]).all() for r in runs[1:]) and not decoder._graphs


def decode_tokens(decoder, prompts, steps, seed=0, sampling=None):
    """The tokens [steps + 1, B] a decoder draws for ``prompts``: its prompt pass's, then ``steps`` steps'."""
    decoder.prefill(prompts, seed=seed, sampling=sampling)
    tokens = [decoder.read(0)]
    for step in range(1, steps + 1):
        decoder.step()
        tokens.append(decoder.read(step))
    return numpy.stack(tokens)


# Prompt passes one decoder runs in turn: padded, unpadded, sampled, then padded again (its graphs by then), and
# padded prompts of another length in the same width bucket (16: the padded pass's graph, for another last column).
PASSES = [
    ("padded", None),
    ("same width", None),
    ("padded", None),
    ("padded", (0.8, 50, 0.9)),
    ("padded", None),
    ("near", None),
    ("near", None),
]


def passes_prompts(rng, vocab):
    padded = [rng.integers(0, vocab, n).tolist() for n in (5, 13, 1)]
    near = [rng.integers(0, vocab, n).tolist() for n in (4, 7, 11)]
    return {"padded": padded, "same width": [rng.integers(0, vocab, 9).tolist() for _ in range(3)], "near": near}


def test_prompt_widths_round_up_to_buckets():
    """A prompt pass's width: a multiple of 16, past 256 tokens of an eighth of the power of two below (at most 12.5%
    more past 128), at most the cache's capacity; a pass too long to be captured, or whose kernels would outlast its
    launches (tokens x hidden^2 past PROMPT_BUCKET_WORK), keeps its own width."""
    width = generation.prompt_width
    assert [width(1, n, 4096, 768) for n in (1, 5, 16, 17, 100, 129, 256, 257, 1000, 1025)] == [
        16, 16, 16, 32, 112, 144, 256, 288, 1024, 1152
    ]  # fmt: skip
    assert all(width(1, n, 10**6, 768) <= n * 1.125 for n in range(128, 8193))
    assert width(1, 5, 9, 768) == 9 and width(3, 13, 14, 768) == 14
    assert width(16, 600, 4096, 768) == 600 and width(16, 500, 4096, 768) == 512  # 16 x 640 > PROMPT_GRAPH_TOKENS
    # A 7B shape (hidden 4096): up to 1024 tokens; GPT-2 XL (1600): up to 6700.
    assert width(1, 1000, 4096, 4096) == 1024 and width(1, 1025, 4096, 4096) == 1025
    assert width(4, 250, 4096, 4096) == 256 and width(8, 250, 4096, 4096) == 250
    assert width(1, 6000, 8192, 1600) == 6144 and width(1, 6700, 8192, 1600) == 6700


def test_prompts_of_nearby_lengths_share_a_pass_and_draw_their_own_tokens(model_and_tokenizer, rng, monkeypatch):
    """Prompts of 5 and of 9 tokens run one pass of width 16 (right-padded: the last token and position repeated),
    and draw the tokens, positions and cache lengths of passes at their own widths (PROMPT_GRAPH_TOKENS 0: no
    rounding)."""
    model, _ = model_and_tokenizer
    decoder = generation.Decoder(model, batch=2, capacity=20)
    for n in (5, 9):
        prompts = [rng.integers(0, 50, n).tolist(), rng.integers(0, 50, n - 2).tolist()]
        tokens = decode_tokens(decoder, prompts, 4)
        state = decoder.positions.tolist(), decoder.cache.device_lengths.tolist(), decoder.cache.lengths.tolist()
        with monkeypatch.context() as patch:
            patch.setattr(generation, "PROMPT_GRAPH_TOKENS", 0)
            exact = generation.Decoder(model, batch=2, capacity=20)
            assert (decode_tokens(exact, prompts, 4) == tokens).all(), n
            assert state == (exact.positions.tolist(), exact.cache.device_lengths.tolist(), [n + 4] * 2)
            assert list(exact._prompt_inputs) == [("prompt", n, True, generation.Sampling())]
    assert list(decoder._prompt_inputs) == [("prompt", 16, True, generation.Sampling())]


def test_a_decoder_reused_for_other_prompts_draws_what_a_new_one_draws(model_and_tokenizer, rng):
    """One decoder through prompt passes of other widths, with and without padding, greedy and sampled, draws
    each pass's tokens as a decoder made for it does (its padding mask, positions and lengths are rewritten)."""
    model, _ = model_and_tokenizer
    prompts = passes_prompts(rng, 50)
    decoder = generation.Decoder(model, batch=3, capacity=13 + 6)
    for name, sampling in PASSES:
        want = decode_tokens(generation.Decoder(model, batch=3, capacity=13 + 6), prompts[name], 5, 3, sampling)
        assert (decode_tokens(decoder, prompts[name], 5, 3, sampling) == want).all(), name


def test_generate_keeps_its_decoder_for_the_next_call_of_its_size(model_and_tokenizer):
    """``generate`` keeps its decoder on the model for the next call of the same batch size and capacity (rounded up
    to CAPACITY_STEP tokens, at most the context): the same texts as with a new decoder each call; another batch size
    replaces it; a call that raises keeps nothing; ``release`` lets it go."""
    model, tok = model_and_tokenizer
    prompts = [words([3, 17, 5]), words([8, 1, 22, 30])]
    first = generation.generate(model, tok, prompts, max_new_tokens=6, temperature=0.9, seed=5)
    kept = model._generation_decoder
    assert kept.batch == 2 and kept.capacity == min(generation.CAPACITY_STEP, model.max_positions)
    again = generation.generate(model, tok, prompts[::-1], max_new_tokens=9)
    assert model._generation_decoder is kept  # 4 + 9 tokens: the same capacity
    generation.release(model)
    assert model._generation_decoder is None
    # Each call's texts on a new decoder and on the kept one: the same.
    assert generation.generate(model, tok, prompts[::-1], max_new_tokens=9) == again
    assert generation.generate(model, tok, prompts, max_new_tokens=6, temperature=0.9, seed=5) == first
    generation.generate(model, tok, prompts[:1], max_new_tokens=2)
    assert model._generation_decoder is not kept and model._generation_decoder.batch == 1

    def failing(b, piece):
        raise RuntimeError("a stream callback fails")

    with pytest.raises(RuntimeError, match="a stream callback fails"):
        generation.generate(model, tok, prompts[:1], max_new_tokens=4, stream=failing)
    assert model._generation_decoder is None
    assert generation.generate(model, tok, prompts[:1], max_new_tokens=2) == [
        generation.generate(model, tok, prompts[:1], max_new_tokens=2)[0]
    ]


def test_a_deleted_model_goes_with_its_kept_decoder(tmp_path, rng):
    """The kept decoder refers to its model weakly: deleting the model frees both at once (no reference cycle
    waiting for the garbage collector while they hold the weights and the KV cache)."""
    import gc
    import weakref

    test_gpt2.checkpoint(tmp_path, rng)
    model = GPT2(tmp_path, numpy.float32, "numpy", progress=False)
    tok = word_tokenizer(test_gpt2.VOCAB)
    generation.generate(model, tok, [words([3, 17, 5])], max_new_tokens=3)
    model_ref, decoder_ref = weakref.ref(model), weakref.ref(model._generation_decoder)
    gc.disable()
    try:
        del model
        assert model_ref() is None and decoder_ref() is None
    finally:
        gc.enable()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("graph_tokens", [8192, 20])
def test_gpu_repeated_prompt_passes_replay_their_eager_tokens(tmp_path, rng, monkeypatch, family, graph_tokens):
    """fp16: one decoder through prompt passes in turn (padded; unpadded; padded again, now a replayed graph of the
    pass and of its steps; sampled; prompts of other lengths in the padded pass's width bucket, replaying its graph;
    a batch of 2-token prompts) draws each pass's tokens as an eager decoder made for it does, to the bit; the padded
    pass after the unpadded one keeps its padding mask (a decode graph is captured per padding). With
    ``PROMPT_GRAPH_TOKENS`` 20 the passes of 27 to 39 tokens run eagerly at their own widths every time, the 2-token
    one is captured at its own width (6 rows: the decode step's fused products)."""
    monkeypatch.setattr(generation, "PROMPT_GRAPH_TOKENS", graph_tokens)
    model, _ = small_fp16_model(tmp_path, rng, family)
    prompts = dict(passes_prompts(rng, 1000), short=[rng.integers(0, 1000, 2).tolist() for _ in range(3)])
    decoder = generation.Decoder(model, batch=3, capacity=13 + 21)
    for name, sampling in PASSES + [("short", None), ("short", None), ("short", None)]:
        eager = generation.Decoder(model, batch=3, capacity=13 + 21, cuda_graph=False)
        want = decode_tokens(eager, prompts[name], 20, 5, sampling)
        assert (decode_tokens(decoder, prompts[name], 20, 5, sampling) == want).all(), name
    # The padded passes (13 and 11 tokens) ran at width 16 where they are captured, the 2-token ones too.
    hidden = model.config.hidden_size
    width = generation.prompt_width(3, 13, decoder.capacity, hidden)
    assert (("prompt", width, True, generation.Sampling()) in decoder._graphs) == (graph_tokens > 3 * 13)
    assert ("prompt", generation.prompt_width(3, 2, decoder.capacity, hidden), False, generation.Sampling()) in (
        decoder._graphs
    )


@pytest.mark.gpu
def test_gpu_a_captured_prompt_pass_keeps_its_tensor_maps_after_the_memo_lets_them_go(tmp_path, rng):
    """fp16 GPT-2 of head size 64, whose prompt pass on an H100 / H200 reads the cache through tensor maps (device
    arrays its graph holds the addresses of): after the process-wide memo of maps has let them go and their memory
    has been handed out again and overwritten, the replayed pass still draws the eager pass's tokens, since the
    decoder holds its passes' maps. (On other GPUs the pass reads no maps, and this shows the replay only.)"""
    import cupy

    from cupy_transformer.runtime import tensor_map

    model, prompts = small_fp16_model(tmp_path, rng, "gpt2")
    decoder = generation.Decoder(model, batch=3, capacity=13 + 21)
    want = [decode_tokens(decoder, prompts, 20) for _ in range(2)]  # eager, then captured
    assert (want[0] == want[1]).all() and any(key[0] == "prompt" for key in decoder._graphs)
    tensor_map.MAPS.clear()
    with decoder.stream, cupy.cuda.using_allocator(decoder._pool.malloc):
        junk = [cupy.full(32, -1, cupy.int32) for _ in range(256)]  # blocks of the maps' size, overwritten
    assert (decode_tokens(decoder, prompts, 20) == want[0]).all()  # the pass's graph replayed
    del junk


def test_fused_decode_switch_nests_and_restores():
    """``ops.fused_decode(False)`` turns the decode fusions off inside it (``Decoder(fused=False)``'s steps), and each
    exit restores what was set before it."""
    from cupy_transformer import ops
    from cupy_transformer.ops.matmul import fusing

    assert fusing()
    with ops.fused_decode(False):
        assert not fusing()
        with ops.fused_decode(True):
            assert fusing()
        assert not fusing()
    assert fusing()
    with pytest.raises(RuntimeError), ops.fused_decode(False):
        raise RuntimeError("the switch is restored on the way out")
    assert fusing()


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gpt2", "llama"])
def test_gpu_unfused_steps_replay_their_eager_tokens(tmp_path, rng, family):
    """``Decoder(fused=False)``, the kernels before the decode fusions (a norm kernel before each product, rotary +
    append before decode attention), captured and eager: the same greedy tokens for 40 steps of a padded batch, and
    its step launches the norm and rotary_append kernels (and LLaMA's bias_act) that the fused step does not."""
    from cupy_transformer import layers
    from cupy_transformer.ops import matmul as matmul_module
    from cupy_transformer.ops import softmax_context

    model, prompts = small_fp16_model(tmp_path, rng, family)
    calls = {"norm": 0, "rotary_append": 0, "apply_bias_act": 0}

    def counting(module, name):
        original = getattr(module, name)

        def counted(*args, **kwargs):
            calls[name if name != "normalize" else "norm"] += 1
            return original(*args, **kwargs)

        return counted

    runs = []
    for graph in (True, False):
        decoder = generation.Decoder(model, batch=3, capacity=13 + 41, cuda_graph=graph, fused=False)
        decoder.prefill(prompts)
        tokens = [decoder.read(0)]
        for step in range(1, 41):
            decoder.step()
            tokens.append(decoder.read(step))
        runs.append(numpy.stack(tokens))
    assert (runs[0] == runs[1]).all() and len(numpy.unique(runs[0])) > 5
    # One eager unfused step and one eager fused step, their norm, rotary_append and bias_act calls counted (LLaMA's
    # gated activation is the fused step's up|gate product's epilogue).
    originals = layers.normalize, softmax_context.rotary_append, matmul_module.apply_bias_act
    try:
        layers.normalize = counting(layers, "normalize")
        softmax_context.rotary_append = counting(softmax_context, "rotary_append")
        matmul_module.apply_bias_act = counting(matmul_module, "apply_bias_act")
        for fused, want_calls in ((False, True), (True, False)):
            decoder = generation.Decoder(model, batch=3, capacity=13 + 4, cuda_graph=False, fused=fused)
            decoder.prefill(prompts)
            calls.update(norm=0, rotary_append=0, apply_bias_act=0)
            decoder.step()
            decoder.read(1)
            assert (calls["norm"] > 0 and calls["rotary_append"] > 0) == want_calls, (fused, calls)
            assert (calls["apply_bias_act"] > 0) == (want_calls and family == "llama"), (fused, calls)
    finally:
        layers.normalize, softmax_context.rotary_append, matmul_module.apply_bias_act = originals


def write_json(path, value):
    import json

    path.write_text(json.dumps(value))


def json_of(path):
    import json

    return json.loads(path.read_text())


def load_model_fp32(path):
    from cupy_transformer.models import load_model

    return load_model(path, "float32", "numpy", progress=False)


@pytest.mark.parametrize("hit", [0, 1])
def test_eos_list_from_generation_config_stops_where_transformers_does(tmp_path, rng, hit):
    """A Llama-3-style checkpoint: config.json's eos_token_id is one id, generation_config.json's a list (which
    wins, as in transformers) and its max_new_tokens; our greedy generate stops where transformers' does, at
    either id of the list (``hit``: which one the greedy tokens reach)."""
    torch = pytest.importorskip("torch")
    transformers = pytest.importorskip("transformers")
    from tests.models.test_parity import save, tiny_llama, word_tokenizer

    save(tiny_llama(), tmp_path)
    tok = word_tokenizer(tmp_path, 50)
    prompt = rng.integers(1, 50, 5).tolist()
    with torch.no_grad():
        free = (
            transformers.LlamaForCausalLM.from_pretrained(tmp_path)
            .generate(torch.tensor([prompt]), max_new_tokens=16, do_sample=False, eos_token_id=None, pad_token_id=0)[
                0, len(prompt) :
            ]
            .tolist()
        )
    k = next(i for i in range(3, 16) if free[i] not in free[:i])  # stop after a few tokens
    unused = next(t for t in range(50) if t not in free)
    eos = [free[k], unused] if hit == 0 else [unused, free[k]]
    write_json(tmp_path / "config.json", {**json_of(tmp_path / "config.json"), "eos_token_id": free[0]})
    write_json(tmp_path / "generation_config.json", {"eos_token_id": eos, "max_new_tokens": 16, "do_sample": False})
    hf = transformers.LlamaForCausalLM.from_pretrained(tmp_path)
    assert hf.generation_config.eos_token_id == eos
    with torch.no_grad():
        want = hf.generate(torch.tensor([prompt]), pad_token_id=0)[0, len(prompt) :].tolist()
    assert want == free[:k] + [free[k]]  # transformers keeps the eos token; we drop it
    model = load_model_fp32(tmp_path)
    defaults = generation.generation_defaults(tmp_path)
    assert defaults.eos_token_id == tuple(eos) and defaults.max_new_tokens == 16
    assert generation.generate(model, tok, [words(prompt)], defaults=defaults) == [words(free[:k])]


def test_generation_defaults_come_from_generation_config_json_else_config_json(tmp_path, rng):
    test_gpt2.checkpoint(tmp_path, rng)
    config = json_of(tmp_path / "config.json")
    assert generation.generation_defaults(tmp_path) == generation.GenerationDefaults()
    write_json(tmp_path / "config.json", {**config, "eos_token_id": [7, 9], "temperature": 0.7})
    assert generation.generation_defaults(tmp_path) == generation.GenerationDefaults((7, 9), temperature=0.7)
    # Llama-3's generation_config.json: all of it is read, config.json's settings are not.
    llama3 = {"bos_token_id": 1, "do_sample": True, "eos_token_id": [3, 4], "max_length": 20, "top_p": 0.9}
    write_json(tmp_path / "generation_config.json", {**llama3, "temperature": 0.6})
    assert generation.generation_defaults(tmp_path) == generation.GenerationDefaults(
        (3, 4), True, 0.6, None, 0.9, None, 20
    )
    write_json(tmp_path / "generation_config.json", {"eos_token_id": 5})
    assert generation.generation_defaults(tmp_path).eos_token_id == (5,)
    bad = [
        ({"eos_token_id": "2"}, r"generation_config.json: eos_token_id must be a token id or a list of token ids"),
        ({"eos_token_id": [2, -1]}, r"eos_token_id must be a token id or a list"),
        ({"do_sample": "yes"}, r"generation_config.json: do_sample must be true, false or null; got 'yes'"),
        ({"top_k": 2.5}, r"generation_config.json: top_k must be an integer or null; got 2.5"),
        ({"top_p": 0}, r"generation_config.json: top_p: expected a number in \(0, 1\]"),
        ([1], r"generation_config.json: expected a JSON object; got a list"),
    ]
    for value, message in bad:
        write_json(tmp_path / "generation_config.json", value)
        with pytest.raises(ValueError, match=message):
            generation.generation_defaults(tmp_path)


def test_settings_given_win_over_the_checkpoints_which_win_over_the_fallbacks():
    resolve, G, S = generation.resolve_settings, generation.GenerationDefaults, generation.Sampling
    assert resolve(None, 5, 100) == (20, S(), frozenset())  # greedy, 20 new tokens, no eos
    assert resolve(None, 5, 100, temperature=0.5) == (20, S(0.5, 50, 1.0), frozenset())  # transformers' top_k 50
    llama3 = G((3, 4), True, 0.6, None, 0.9, None, 40)
    n, sampling, eos = resolve(llama3, 5, 100)
    assert (n, eos) == (35, {3, 4}) and sampling == S(*(float(numpy.float32(v)) for v in (0.6, 50, 0.9)))
    assert resolve(llama3, 5, 100, 7, temperature=0.0, eos_token_id=[]) == (7, S(), frozenset())
    assert resolve(llama3, 5, 100, top_k=3, eos_token_id=2)[1:] == (S(sampling.temperature, 3, sampling.top_p), {2})
    assert resolve(G(do_sample=False, temperature=0.6), 5, 100)[1] == S()  # do_sample false: greedy
    assert resolve(G(max_new_tokens=8, max_length=9), 5, 100)[0] == 8  # max_new_tokens wins over max_length
    assert resolve(G(max_length=4096), 5, 100)[0] == 95  # a length not given is cut to the context
    with pytest.raises(ValueError, match=r"max_new_tokens: not given, and the checkpoint's max_length 5 less 5"):
        resolve(G(max_length=5), 5, 100)
    with pytest.raises(ValueError, match=r"max_new_tokens: 5 prompt tokens \+ 96 exceed the model's context"):
        resolve(None, 5, 100, 96)
    with pytest.raises(ValueError, match=r"temperature: expected a finite number >= 0"):
        resolve(llama3, 5, 100, temperature=float("nan"))
    with pytest.raises(ValueError, match=r"top_p: expected a number in \(0, 1\]"):
        resolve(None, 5, 100, top_p=0.0)  # checked though greedy ignores it


STREAM_TEXT = "café 🚀 naïve — 日本語 über straße 🙂 ok"


def byte_level_bpe(merges=20):
    """A GPT-2-style byte-level BPE tokenizer (all 256 bytes and a few merges learnt on STREAM_TEXT, so that
    tokens cut its characters: " na\\xc3" then "\\xafve")."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=len(alphabet) + merges, initial_alphabet=alphabet, show_progress=False)
    tok.train_from_iterator([STREAM_TEXT] * 3, trainer)
    return tok


class ScriptedDecoder:
    """generation.Decoder's interface drawing scripted tokens: ``model.script[b]`` for sequence b."""

    def __init__(self, model, batch, capacity, cuda_graph=True):
        self.script, self.steps = model.script, 0

    def prefill(self, prompts, seed=0, sampling=None):
        pass

    def step(self):
        self.steps += 1

    def read(self, step):
        return numpy.array([s[step] for s in self.script])


class ScriptedModel:
    max_positions = 1000

    def __init__(self, script):
        self.script = script


def streamed_and_returned(model, tok, prompts, **kwargs):
    pieces = [[] for _ in prompts]
    texts = generation.generate(model, tok, prompts, stream=lambda b, piece: pieces[b].append(piece), **kwargs)
    assert all(piece for p in pieces for piece in p)  # no empty pieces
    return ["".join(p) for p in pieces], texts


def cut_at_stop(text, stop):
    cuts = [text.find(s) for s in stop if s and s in text]
    return text[: min(cuts)] if cuts else text


def test_streamed_text_is_the_result_for_scripted_multibyte_tokens_and_stops(monkeypatch, rng):
    """Tokens that cut characters (the text's own, and random byte tokens that make invalid UTF-8), stop strings
    spanning tokens, one met by the first token, one never met, and "" (ignored): the stream's pieces join to the
    result, which is decode(the tokens) cut before the first stop."""
    monkeypatch.setattr(generation, "Decoder", ScriptedDecoder)
    tok = byte_level_bpe()
    ids = tok.encode(STREAM_TEXT).ids
    assert any("\ufffd" in tok.decode([i]) for i in ids)  # some tokens hold part of a character
    scripts = [ids, rng.integers(0, tok.get_vocab_size(), 40).tolist(), ids[:3] + rng.integers(200, 290, 20).tolist()]
    stops = [(), ("naïve",), ("ï",), ("🚀 n", "über"), ("caf",), ("c",), ("zzz", ""), ("ok",), ("\u65e5\u672c",)]
    for script in scripts:
        for stop in stops:
            model = ScriptedModel([script, list(reversed(script))])
            n = len(script)
            streamed, returned = streamed_and_returned(model, tok, ["a", "b"], max_new_tokens=n, stop=stop)
            assert streamed == returned, (script, stop)
            assert returned == [cut_at_stop(tok.decode(s), stop) for s in model.script], (script, stop)
    streamed, returned = streamed_and_returned(ScriptedModel([ids]), tok, ["a"], max_new_tokens=len(ids), stop=["c"])
    assert streamed == returned == [""]  # a stop in the very first token: nothing shown
    eos = ids[5]
    streamed, returned = streamed_and_returned(
        ScriptedModel([ids]), tok, ["a"], max_new_tokens=len(ids), eos_token_id=eos
    )
    assert streamed == returned == [tok.decode(ids[:5])]  # an incomplete character at eos is shown as decode shows it


def test_streamed_text_is_the_result_for_sampled_byte_level_tokens(tmp_path, rng):
    """A tiny random GPT-2 over a byte-level BPE vocabulary, sampled at temperature 1 with several seeds: the
    draws cut characters and make invalid UTF-8; the stream still joins to the result, stop strings or not."""
    tok = byte_level_bpe()
    test_gpt2.checkpoint(tmp_path, rng, vocab=tok.get_vocab_size(), positions=64)
    model = GPT2(tmp_path, numpy.float32, "numpy", progress=False)
    seen = ""
    for seed in range(6):
        for stop in ((), ("\ufffd\ufffd",), ("é", "ï", " ")):
            kwargs = dict(max_new_tokens=40, temperature=1.0, top_k=0, seed=seed, stop=stop)
            streamed, returned = streamed_and_returned(model, tok, ["café", "naïve 🚀"], **kwargs)
            assert streamed == returned, (seed, stop)
            seen += "".join(returned)
    assert any(ord(c) > 127 and c != "\ufffd" for c in seen) and "\ufffd" in seen


def test_text_is_decoded_a_few_tokens_at_a_time(monkeypatch):
    """Each step decodes a window of a few tokens, not the whole continuation (only the result is decoded
    whole)."""
    monkeypatch.setattr(generation, "Decoder", ScriptedDecoder)
    tok, windows = byte_level_bpe(), []

    class Counting:
        def encode(self, text):
            return tok.encode(text)

        def decode(self, ids):
            windows.append(len(ids))
            return tok.decode(ids)

    ids = tok.encode(STREAM_TEXT * 3).ids
    pieces = []
    text = generation.generate(ScriptedModel([ids]), Counting(), ["a"], len(ids), stream=lambda _, p: pieces.append(p))
    assert text == ["".join(pieces)] == [STREAM_TEXT * 3] and len(ids) > 30
    assert windows[-1] == len(ids) and max(windows[:-1]) <= 8  # a character cut over several tokens widens it


@pytest.mark.parametrize(
    "family, tensor, value, where",
    [
        ("llama", "model.layers.1.mlp.down_proj.weight", numpy.nan, r"layer 1's output \(model\.layers\.1\.\*\)"),
        (
            "llama",
            "model.layers.0.post_attention_layernorm.weight",
            numpy.inf,
            r"layer 0's output \(model\.layers\.0\.\*\)",
        ),
        ("llama", "model.norm.weight", numpy.nan, r"the final norm or the LM head"),
        ("gpt2", "transformer.h.1.mlp.c_fc.bias", -numpy.inf, r"layer 1's output \(transformer\.h\.1\.\*\)"),
        ("gpt2", "transformer.wpe.weight", numpy.nan, r"the token embeddings"),
    ],
)
def test_non_finite_weights_are_an_error_naming_the_first_layer(tmp_path, rng, family, tensor, value, where):
    """One NaN or inf weight: generate raises (not an empty text) and names where non-finite values first
    appear; a padded batch's padding rows are not mistaken for them."""
    from safetensors.numpy import load_file, save_file

    from tests.models import test_llama

    if family == "llama":
        test_llama.checkpoint(tmp_path, rng, False)
    else:
        test_gpt2.checkpoint(tmp_path, rng)
    tok = word_tokenizer(test_gpt2.VOCAB if family == "gpt2" else test_llama.VOCAB)
    prompts = [words([3, 17, 5, 9]), words([8, 1])]
    assert generation.generate(load_model_fp32(tmp_path), tok, prompts, 3)  # finite weights: no error
    weights = load_file(tmp_path / "model.safetensors")
    weights[tensor].reshape(-1)[rng.integers(weights[tensor].shape[-1])] = value  # in the first row: position 0
    save_file(weights, tmp_path / "model.safetensors")
    message = rf"non-finite values \(NaN or inf\) first appear in {where}: the checkpoint holds non-finite weights\?"
    with pytest.raises(ValueError, match=message):
        generation.generate(load_model_fp32(tmp_path), tok, prompts, 3)
