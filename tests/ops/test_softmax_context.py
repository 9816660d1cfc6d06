"""SoftmaxContextOp: its checks, its reference (attention_reference, the NumPy path) and its dispatch. Prompt then
decode steps through a KVCache against full attention recomputed per step, grouped-query heads, both rotary
pairings, padded batches against each sequence alone, bidirectional, local window, alibi, on NumPy and on the GPU
(whichever kernels the op takes there; the kernels' own tests: test_decode_attention.py,
test_prefill_attention.py, test_prefill_attention_sm90.py, test_rotary_append.py); the reference is a per-query
float64 loop over one sequence's whole history (and torch's scaled_dot_product_attention for the NumPy path in
float64)."""

import numpy
import pytest

from cupy_transformer import ops
from cupy_transformer.kv_cache import KVCache
from cupy_transformer.ops.softmax_context import attention_reference
from tests.helpers import TOL_CHAINED, host, random, rel_error, side_stream
from tests.ops.common import attention_config as cfg
from tests.ops.common import history, nan_past


def backend(gpu):
    if gpu:
        import cupy

        return cupy, "cupy"
    return numpy, "numpy"


CONFIGS = {
    "GQA, rotate_half": dict(rotary_dim=32, rotate_half=True, rotate_every_two=False),
    "MHA, every_two on 16 of 32 dims": dict(kv=4, rotary_dim=16, rope_theta=500.0),
    "MQA, no rotary, window 3": dict(kv=1, local_attention=True, window_size=3),
}


def prompt_then_decode(rng, dtype, name, gpu):
    xp, kind = backend(gpu)
    c = cfg(dtype, **CONFIGS[name])
    op = ops.SoftmaxContextOp(c)
    width = (c.heads + 2 * c.num_kv) * c.head_size
    tokens = random(rng, (2, 9, width), dtype)  # 5 prompt tokens, then 4 decode steps
    cache = KVCache(2, 2, c.num_kv, 12, c.head_size, dtype, backend=kind)
    exact = [history(tokens[b], c, numpy.arange(9)) for b in range(2)]
    for first, count in [(0, 5), (5, 1), (6, 1), (7, 1), (8, 1)]:
        start = cache.reserve(count)
        for layer in (0, 1):  # both layers see the same step; each has its own block of the cache
            step = xp.asarray(numpy.ascontiguousarray(tokens[:, first : first + count]))
            ctx, keys, values = op(step, cache=cache, layer_id=layer, start=start)
            assert ctx.shape == (2, count, c.heads * c.head_size) and ctx.dtype == dtype
            assert ctx.flags.c_contiguous  # the next op (a projection) requires it
            assert keys.shape == (2, c.num_kv, first + count, c.head_size)
            got = host(ctx).astype(numpy.float64)
            want = numpy.stack([e[first : first + count] for e in exact])
            assert rel_error(got, want) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float16], ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_prompt_then_decode_matches_full_attention(rng, dtype, name):
    prompt_then_decode(rng, dtype, name, gpu=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float16], ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_gpu_prompt_then_decode_matches_full_attention(rng, dtype, name):
    prompt_then_decode(rng, dtype, name, gpu=True)


def two_sequences(rng, gpu, steps):
    """Prompts of 3 and 5 tokens, each followed by ``steps`` more, and each history's context run alone (all
    at once, no cache): (xp, kind, config, op, width, histories, contexts alone)."""
    xp, kind = backend(gpu)
    c = cfg(numpy.float32, rotary_dim=32, rotate_half=True, rotate_every_two=False)
    op = ops.SoftmaxContextOp(c)
    width = (c.heads + 2 * c.num_kv) * c.head_size
    real = [random(rng, (n + steps, width), numpy.float32) for n in (3, 5)]
    alone = [host(op(xp.asarray(r[None].copy()))[0])[0] for r in real]
    for r, a in zip(real, alone):
        assert rel_error(a, history(r, c, numpy.arange(len(r)))) < 1e-5
    return xp, kind, c, op, width, real, alone


def padded_batch(rng, gpu):
    """Left-padded prompts of 3 and 5 tokens, then 2 decode steps: each sequence as it would be alone."""
    xp, kind, c, op, width, real, alone = two_sequences(rng, gpu, 2)
    cache = KVCache(1, 2, c.num_kv, 10, c.head_size, numpy.float32, backend=kind)
    prompt = numpy.zeros((2, 5, width), numpy.float32)
    prompt[0, 2:], prompt[1] = real[0][:3], real[1][:5]
    keep = numpy.array([[False, False, True, True, True], [True] * 5])
    positions = numpy.array([[0, 0, 0, 1, 2], [0, 1, 2, 3, 4]])
    ctx, _, _ = op(xp.asarray(prompt), xp.asarray(keep), cache, 0, cache.reserve(5), xp.asarray(positions))
    got = host(ctx)
    assert rel_error(got[0, 2:], alone[0][:3]) < 1e-5 and rel_error(got[1], alone[1][:5]) < 1e-5
    for step in range(2):
        keep = numpy.concatenate([keep, numpy.ones((2, 1), bool)], axis=1)
        positions = numpy.array([[3 + step], [5 + step]])
        token = numpy.stack([real[0][3 + step], real[1][5 + step]])[:, None]
        ctx, _, _ = op(xp.asarray(token), xp.asarray(keep), cache, 0, cache.reserve(1), xp.asarray(positions))
        got = host(ctx)
        assert rel_error(got[0, 0], alone[0][3 + step]) < 1e-5 and rel_error(got[1, 0], alone[1][5 + step]) < 1e-5


BACKENDS = [pytest.param(False, id="numpy"), pytest.param(True, id="gpu", marks=pytest.mark.gpu)]


@pytest.mark.parametrize("gpu", BACKENDS)
def test_padded_batch_gives_each_sequence_alone(rng, gpu):
    padded_batch(rng, gpu)


def right_padded_batch(rng, gpu):
    """Right-padded prompts of 3 and 5 tokens (junk in the pads) in one causal prefill, the cache trimmed to
    each prompt (set_lengths) and NaN past it, then 3 decode steps with no mask or positions: each sequence as
    it would be alone."""
    xp, kind, c, op, width, real, alone = two_sequences(rng, gpu, 3)
    lengths = [3, 5]
    cache = KVCache(1, 2, c.num_kv, 10, c.head_size, numpy.float32, backend=kind)
    prompt = random(rng, (2, 5, width), numpy.float32)
    prompt[0, :3], prompt[1] = real[0][:3], real[1][:5]
    ctx, _, _ = op(xp.asarray(prompt), cache=cache, start=cache.reserve(5))
    got = host(ctx)  # the pad's outputs (sequence 0, tokens 3 and 4) are unused
    assert rel_error(got[0, :3], alone[0][:3]) < 1e-5 and rel_error(got[1], alone[1][:5]) < 1e-5
    cache.set_lengths(lengths)
    nan_past(cache, lengths)
    for step in range(3):
        start = cache.reserve(1)
        assert start.tolist() == [3 + step, 5 + step]
        token = numpy.stack([real[0][3 + step], real[1][5 + step]])[:, None]
        ctx, _, _ = op(xp.asarray(token), cache=cache, start=start)
        got = host(ctx)
        assert rel_error(got[0, 0], alone[0][3 + step]) < 1e-5 and rel_error(got[1, 0], alone[1][5 + step]) < 1e-5


@pytest.mark.parametrize("gpu", BACKENDS)
def test_right_padded_batch_trimmed_with_set_lengths_gives_each_sequence_alone(rng, gpu):
    right_padded_batch(rng, gpu)


def alibi_on_one_rank_of_two(rng, gpu):
    """mp_size 2: each rank's op gets its 4 of 8 heads' fused projection and its heads' rows of the whole
    model's alibi (a contiguous copy: the op takes C-contiguous arrays); a 37-token prompt, then 2 decode
    steps through a cache (on a GPU: the prefill and decode kernels), each rank against float64 attention
    over its own heads."""
    xp, kind = backend(gpu)
    dtype = numpy.float16
    whole = cfg(dtype, heads=8, kv=2, d=64, mp_size=2)
    rank_heads = cfg(dtype, heads=4, kv=1, d=64)  # what one rank computes, for the reference
    op = ops.SoftmaxContextOp(whole)
    alibi = random(rng, (2, 8, 1, 39), dtype, scale=0.5)
    for rank in (0, 1):
        tokens = random(rng, (2, 39, 6 * 64), dtype)
        mine = alibi[:, 4 * rank : 4 * rank + 4, 0]  # [B, 4, T]
        exact = [history(tokens[b], rank_heads, numpy.arange(39), alibi=mine[b]) for b in range(2)]
        cache = KVCache(1, 2, 1, 39, 64, dtype, backend=kind)
        for first, count in [(0, 37), (37, 1), (38, 1)]:
            rows = xp.asarray(numpy.ascontiguousarray(alibi[:, 4 * rank : 4 * rank + 4, :, : first + count]))
            step = xp.asarray(numpy.ascontiguousarray(tokens[:, first : first + count]))
            ctx, _, _ = op(step, cache=cache, layer_id=0, start=cache.reserve(count), alibi=rows)
            want = numpy.stack([e[first : first + count] for e in exact])
            assert rel_error(host(ctx).astype(numpy.float64), want) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.parametrize("gpu", BACKENDS)
def test_alibi_on_one_rank_of_two(rng, gpu):
    alibi_on_one_rank_of_two(rng, gpu)


def test_bidirectional_with_padding_alibi_and_norm_factor(rng):
    c = cfg(numpy.float32, heads=2, kv=2, d=32, triangular_masking=False)
    op = ops.SoftmaxContextOp(c)
    qkv = random(rng, (2, 6, 6 * 32), numpy.float32)
    keep = numpy.ones((2, 6), bool)
    keep[1, 4:] = False  # the second sequence is right-padded
    alibi = random(rng, (2, 2, 1, 6), numpy.float32)
    ctx, _, _ = op(qkv, keep, alibi=alibi, norm_factor=32**-0.25)  # DeepSpeed's norm_factor: scale = nf^2
    for b in range(2):
        want = history(qkv[b], c, numpy.arange(6), keep[b], alibi[b, :, 0])
        rows = 6 if b == 0 else 4  # padded queries are not compared: their outputs are unused
        assert rel_error(ctx[b, :rows], want[:rows]) < 1e-6
    additive = numpy.where(keep, 0.0, -1e9).astype(numpy.float32)
    again, _, _ = op(qkv, additive, alibi=alibi.reshape(4, 1, 6), scale=32**-0.5)
    assert rel_error(again[0], ctx[0]) < 1e-6 and rel_error(again[1, :4], ctx[1, :4]) < 1e-6


@pytest.mark.gpu
def test_gpu_prefill_through_a_cache_over_one_layer_with_a_zero_layer_stride(rng, poisoned_allocations):
    """An injected model's view of a Hugging Face cache layer: ``KVCache.over`` one layer's arrays given a leading
    layer axis of stride 0 (as they come through DLPack). fp16, head size 64: the Hopper kernel where one runs
    (its maps come per layer, not from one array of every layer's); against float64 attention."""
    import cupy
    from cupy.lib.stride_tricks import as_strided

    c = cfg(numpy.float16, heads=4, kv=2, d=64)
    tokens = random(rng, (2, 37, 8 * 64), numpy.float16)
    keys, values = (cupy.empty((2, 2, 48, 64), numpy.float16) for _ in range(2))
    cache = KVCache.over(*(as_strided(a, (1, *a.shape), (0, *a.strides)) for a in (keys, values)))
    ctx, _, _ = ops.SoftmaxContextOp(c)(cupy.asarray(tokens), cache=cache, layer_id=0, start=cache.reserve(37))
    want = numpy.stack([history(tokens[b], c, numpy.arange(37)) for b in range(2)])
    assert rel_error(host(ctx).astype(numpy.float64), want) < TOL_CHAINED[numpy.dtype(numpy.float16)]


@pytest.mark.gpu
def test_gpu_matches_torch_sdpa_with_gqa(rng):
    import torch
    import torch.nn.functional as F

    c = cfg(numpy.float16, heads=8, kv=2, d=64)
    qkv = random(rng, (2, 33, 12 * 64), numpy.float16)
    t = torch.from_numpy(qkv).cuda()
    q = t[..., :512].reshape(2, 33, 8, 64).transpose(1, 2)
    k = t[..., 512:640].reshape(2, 33, 2, 64).transpose(1, 2)
    v = t[..., 640:].reshape(2, 33, 2, 64).transpose(1, 2)
    ref = F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).reshape(2, 33, 512)
    ctx, _, _ = ops.SoftmaxContextOp(c)(t)
    assert isinstance(ctx, torch.Tensor)
    assert rel_error(ctx, ref) < TOL_CHAINED[numpy.dtype(numpy.float16)]


def test_attention_reference_matches_the_per_query_loop(rng):
    """attention_reference on float64 arrays: the last 5 of 9 tokens per sequence (a past of 4) as queries,
    grouped-query heads, causal with a window of 3, a key mask and alibi, against the per-query loop."""
    c = cfg(numpy.float32, heads=4, kv=2, d=16, local_attention=True, window_size=3)
    qkv = rng.standard_normal((2, 9, 8 * 16))
    keep = rng.random((2, 9)) < 0.7
    alibi = rng.standard_normal((2, 4, 1, 9))
    q, k, v = (
        qkv[..., a * 16 : (a + n) * 16].reshape(2, 9, n, 16).transpose(0, 2, 1, 3) for a, n in ((0, 4), (4, 2), (6, 2))
    )
    got = attention_reference(
        q[:, :, 4:], k, v, numpy.array([4, 4]), keep[:, None, None, :], alibi, 0.25, causal=True, window=3
    )
    assert got.shape == (2, 5, 4 * 16) and got.dtype == numpy.float64
    for b in range(2):
        want = history(qkv[b], c, numpy.arange(9), keep[b], alibi[b, :, 0])[4:]
        assert rel_error(got[b], want) < 1e-12


@pytest.mark.parametrize("starts", [[6, 6], [6, 2]], ids=["every slot a key", "a shorter sequence"])
def test_attention_reference_in_float32_on_the_cpu(rng, starts):
    """Inside ``cpu_float32`` (a model's CPU passes) float32 arrays are attended in float32, within float32's
    chained tolerance of the float64 formula; a shorter sequence's slots past its keys (NaN here) stay out of it."""
    from cupy_transformer.runtime.arrays import cpu_float32

    q = random(rng, (2, 4, 1, 16), numpy.float32)
    keys, values = random(rng, (2, 2, 7, 16), numpy.float32), random(rng, (2, 2, 7, 16), numpy.float32)
    start = numpy.array(starts)
    keys[1, :, starts[1] + 1 :] = values[1, :, starts[1] + 1 :] = numpy.nan  # past sequence 1's keys
    want = attention_reference(*(a.astype(numpy.float64) for a in (q, keys, values)), start, scale=0.25)
    with cpu_float32():
        got = attention_reference(q, keys, values, start, scale=0.25)
    assert got.dtype == numpy.float32 and numpy.isfinite(got).all()
    assert rel_error(got, want) < TOL_CHAINED[numpy.dtype(numpy.float32)]
    assert not numpy.array_equal(got, attention_reference(q, keys, values, start, scale=0.25))  # float64 outside


SDPA_TOL = 1e-10  # float64 on both sides: a few roundings of 2^-53 per sum (about 1e-16 seen)


def float64(c, cache=None):
    """``c`` (and ``cache``) switched to float64 after their checks (no kernel takes it; the NumPy path computes
    in float64 anyway), so the path's formula is compared with no rounding."""
    c.dtype = numpy.dtype(numpy.float64)
    if cache is not None:
        cache.dtype = c.dtype
        cache.keys, cache.values = cache.keys.astype(c.dtype), cache.values.astype(c.dtype)
    return c


def torch_sdpa(qkv, c, queries=None, **kw):
    """torch's scaled_dot_product_attention (CPU) on a fused projection [B, T, (h + 2kv) d], K and V expanded
    to the query heads with repeat_interleave: the context [B, queries, h d] of the last ``queries`` tokens."""
    import torch
    import torch.nn.functional as F

    h, kv, d = c.heads, c.num_kv, c.head_size
    x = torch.from_numpy(qkv)
    b, t, _ = x.shape
    q, k, v = (
        x[..., a * d : (a + n) * d].reshape(b, t, n, d).transpose(1, 2) for a, n in ((0, h), (h, kv), (h + kv, kv))
    )
    k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
    out = F.scaled_dot_product_attention(q[:, :, t - (queries or t) :], k, v, **kw)
    return out.transpose(1, 2).reshape(b, -1, h * d).numpy()


def test_numpy_path_matches_torch_sdpa_causal_with_gqa(rng):
    pytest.importorskip("torch")
    c = float64(cfg(numpy.float32, heads=6, kv=2, d=16))
    qkv = rng.standard_normal((2, 11, 10 * 16))
    ctx, _, _ = ops.SoftmaxContextOp(c)(qkv)
    assert rel_error(ctx, torch_sdpa(qkv, c, is_causal=True)) < SDPA_TOL


def test_numpy_path_matches_torch_sdpa_bidirectional_with_key_padding(rng):
    torch = pytest.importorskip("torch")
    c = float64(cfg(numpy.float32, heads=4, kv=1, d=16, triangular_masking=False))
    qkv = rng.standard_normal((3, 7, 6 * 16))
    keep = numpy.ones((3, 7), bool)
    keep[1, 5:], keep[2, :3] = False, False  # right- and left-padded
    ctx, _, _ = ops.SoftmaxContextOp(c)(qkv, keep, scale=0.3)
    want = torch_sdpa(qkv, c, attn_mask=torch.from_numpy(keep)[:, None, None], scale=0.3)
    assert rel_error(ctx, want) < SDPA_TOL


def test_numpy_path_matches_torch_sdpa_decoding_after_a_prompt(rng):
    """A 9-token prompt through a cache, then one token (Q = 1) against the 10 keys (all seen: no causal mask)."""
    pytest.importorskip("torch")
    cache = KVCache(1, 2, 2, 12, 16, numpy.float32, backend="numpy")
    c = float64(cfg(numpy.float32, heads=4, kv=2, d=16), cache)
    op = ops.SoftmaxContextOp(c)
    qkv = rng.standard_normal((2, 10, 8 * 16))
    ctx, _, _ = op(qkv[:, :9].copy(), cache=cache, start=cache.reserve(9))
    assert rel_error(ctx, torch_sdpa(qkv[:, :9].copy(), c, is_causal=True)) < SDPA_TOL
    ctx, keys, _ = op(qkv[:, 9:].copy(), cache=cache, start=cache.reserve(1))
    assert keys.shape == (2, 2, 10, 16)
    assert rel_error(ctx, torch_sdpa(qkv, c, queries=1)) < SDPA_TOL


def test_bad_inputs_are_named_errors(rng):
    c = cfg(numpy.float16)
    op = ops.SoftmaxContextOp(c)
    qkv = random(rng, (2, 3, 8 * 32), numpy.float16)
    with pytest.raises(
        ValueError, match=r"query_key_value: expected a last dimension of \(heads 4 \+ 2 x kv heads 2\)"
    ):
        op(qkv[..., :-32].copy())
    with pytest.raises(ValueError, match=r"head size 12 \(hidden_size / heads\): expected a multiple of 8 up to 256"):
        ops.SoftmaxContextOp(ops.InferenceConfig(hidden_size=48, heads=4, dtype=numpy.float16))(qkv)
    with pytest.raises(
        ValueError, match=r"attn_mask: expected a \[batch, keys\] = \[2, 3 or more\] mask over key slots"
    ):
        op(qkv, numpy.ones((2, 2), bool))
    with pytest.raises(ValueError, match=r"attn_mask: expected a \[2, 1 or 4, 1 or 3, 3 or more\] mask"):
        op(qkv, numpy.ones((2, 3, 3, 3), bool))
    cache = KVCache(1, 2, 2, 4, 32, numpy.float16, backend="numpy")
    with pytest.raises(ValueError, match=r"start: with a cache, pass where"):
        op(qkv, cache=cache)
    with pytest.raises(ValueError, match=r"KV cache full: sequence 0 holds 3 of 4 tokens and cannot take 3 more"):
        cache.reserve(3)
        op(qkv, cache=cache, start=cache.reserve(3))
    with pytest.raises(ValueError, match=r"cache: expected batch 2, 2 kv heads of size 32"):
        op(qkv, cache=KVCache(1, 2, 4, 8, 32, numpy.float16, backend="numpy"), start=numpy.zeros(2, int))
    with pytest.raises(ValueError, match=r"layer: expected an integer in \[0, 0\]"):
        op(qkv, cache=KVCache(1, 2, 2, 8, 32, numpy.float16, backend="numpy"), layer_id=1, start=numpy.zeros(2, int))
    with pytest.raises(ValueError, match=r"start: positions in a cache"):
        op(qkv, start=numpy.zeros(2, int))
    with pytest.raises(ValueError, match=r"scale, norm_factor: give one"):
        op(qkv, norm_factor=0.5, scale=0.25)
    with pytest.raises(ValueError, match=r"position_ids: expected shape"):
        op(qkv, position_ids=numpy.zeros((2, 4), numpy.int64))
    with pytest.raises(ValueError, match=r"num_kv: expected a divisor of heads 4; got 3"):
        cfg(numpy.float16, kv=3)
    with pytest.raises(ValueError, match=r"rotary_dim: expected an even number up to the head size 32; got 40"):
        cfg(numpy.float16, rotary_dim=40)


@pytest.mark.parametrize("gpu", BACKENDS)
def test_start_outside_the_cache_raises_before_writing(rng, gpu):
    """A start past the cache's capacity, or negative, through the op itself: a ValueError naming start before
    anything is written (on a GPU, before the rotary + append kernel's launch)."""
    xp, kind = backend(gpu)
    op = ops.SoftmaxContextOp(cfg(numpy.float32, rotary_dim=32, rotate_half=True, rotate_every_two=False))
    cache = KVCache(1, 2, 2, 8, 32, numpy.float32, backend=kind)
    qkv = xp.asarray(random(rng, (2, 3, 8 * 32), numpy.float32))
    whole_cache_mask = xp.ones((2, 8), bool)  # checked after start, whose range sets the width it needs
    for start in ([6, 0], [0, 9], [-1, 0]):
        for mask in (None, whole_cache_mask):
            with pytest.raises(ValueError, match=rf"start: 3 tokens from \[{start[0]}, {start[1]}\] do not fit 8 "):
                op(qkv, mask, cache=cache, start=numpy.array(start))
    with pytest.raises(ValueError, match=r"start: expected 2 integer positions; got float64 of shape \(2,\)"):
        op(qkv, cache=cache, start=numpy.array([0.9, 2.7]))  # not truncated to slots 0 and 2
    assert not host(cache.keys).any() and not host(cache.values).any()


def test_position_ids_outside_int32_are_named_errors(rng):
    """NumPy position_ids must lie in [0, 2^31) (the kernel's int32); GPU ones are trusted (no sync to read
    them). Checked before the cache is written."""
    op = ops.SoftmaxContextOp(cfg(numpy.float32, rotary_dim=32, rotate_half=True, rotate_every_two=False))
    cache = KVCache(1, 2, 2, 8, 32, numpy.float32, backend="numpy")
    qkv = random(rng, (2, 3, 8 * 32), numpy.float32)
    for bad, got in ((-1, "-1 to 4"), (2**31, f"0 to {2**31}")):
        positions = numpy.array([[0, 1, 2], [3, 4, bad]])
        with pytest.raises(ValueError, match=rf"position_ids: expected positions in \[0, 2\^31\); got {got}"):
            op(qkv, cache=cache, start=numpy.zeros(2, numpy.int64), position_ids=positions)
        with pytest.raises(ValueError, match=r"position_ids: expected positions"):
            op(qkv, position_ids=positions)
    assert not cache.keys.any() and not cache.values.any()


@pytest.mark.gpu
@pytest.mark.parametrize("d", [48, 256])
def test_gpu_prefill_at_head_sizes_without_a_kernel(rng, poisoned_allocations, d):
    """fp16 prefill at head sizes no prefill kernel takes (the rotary + append kernel, then fp32 array
    operations): a 37-token prompt, then 13 tokens after pasts of 37 and 20 (set_lengths); float64 reference."""
    import cupy

    from cupy_transformer.ops.prefill_attention import PREFILL_GEOMETRY

    assert d not in PREFILL_GEOMETRY
    dtype = numpy.float16
    c = cfg(dtype, heads=4, kv=2, d=d, rotary_dim=d, rotate_half=True, rotate_every_two=False)
    op = ops.SoftmaxContextOp(c)
    tokens = random(rng, (2, 50, 8 * d), dtype)
    exact = [
        history(tokens[0], c, numpy.arange(50)),
        history(numpy.concatenate([tokens[1, :20], tokens[1, 37:]]), c, numpy.arange(33)),
    ]
    cache = KVCache(1, 2, 2, 64, d, dtype, backend="cupy")
    ctx, _, _ = op(cupy.asarray(tokens[:, :37].copy()), cache=cache, start=cache.reserve(37))
    assert rel_error(ctx[0], exact[0][:37]) < TOL_CHAINED[numpy.dtype(dtype)]
    assert rel_error(ctx[1, :20], exact[1][:20]) < TOL_CHAINED[numpy.dtype(dtype)]
    cache.set_lengths([37, 20])
    ctx, _, _ = op(cupy.asarray(tokens[:, 37:].copy()), cache=cache, start=cache.reserve(13))
    assert rel_error(ctx, numpy.stack([exact[0][37:], exact[1][20:]])) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.gpu
def test_gpu_capture_with_host_slots_raises(rng):
    """A step captured with its cache slots on the host would replay them: the op refuses before writing."""
    import cupy

    op = ops.SoftmaxContextOp(cfg(numpy.float16, heads=4, kv=2, d=64))
    cache = KVCache(1, 2, 2, 16, 64, numpy.float16, backend="cupy")
    op(cupy.asarray(random(rng, (2, 3, 8 * 64), numpy.float16)), cache=cache, start=cache.reserve(3))
    step, start = cupy.asarray(random(rng, (2, 1, 8 * 64), numpy.float16)), cache.reserve(1)
    stream = side_stream()
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(RuntimeError, match="needs its cache slots on the GPU"):
                op(step, cache=cache, start=start)
        finally:
            stream.end_capture()


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, heads, kv, d, window",
    [(numpy.float16, 8, 2, 64, None), (numpy.float16, 4, 4, 128, 5), (numpy.float32, 6, 2, 32, None)],
    ids=["fp16 gqa", "fp16 window", "fp32"],
)
def test_gpu_slots_on_the_device_give_the_host_slots_results(rng, poisoned_allocations, dtype, heads, kv, d, window):
    """A prompt of uneven lengths, then decode steps: with start = cache.device_lengths (the decode kernel and
    rotary + append reading the slots on the GPU, a grid sized for the capacity) the contexts equal those with
    host slots, to the bit, step after step; a CUDA graph of the device-slot step, replayed with the lengths
    advanced on the device, gives the same again."""
    import cupy

    c = cfg(
        dtype,
        heads=heads,
        kv=kv,
        d=d,
        rotary_dim=d,
        rotate_half=True,
        rotate_every_two=False,
        local_attention=window is not None,
        window_size=window or 1,
    )
    op = ops.SoftmaxContextOp(c)
    width = (heads + 2 * kv) * d
    tokens = cupy.asarray(random(rng, (3, 40, width), dtype))
    caches = [KVCache(1, 3, kv, 300, d, dtype, backend="cupy") for _ in range(3)]
    for cache in caches:
        op(cupy.ascontiguousarray(tokens[:, :30]), cache=cache, start=cache.reserve(30))
        cache.set_lengths([30, 17, 4])  # set_lengths also copies them to device_lengths
    steps = []
    for t in range(30, 40):
        x = cupy.ascontiguousarray(tokens[:, t : t + 1])
        host_ctx, _, _ = op(x, cache=caches[0], start=caches[0].reserve(1))
        caches[1].reserve(1)
        device_ctx, keys, _ = op(x, cache=caches[1], start=caches[1].device_lengths)
        caches[1].device_lengths[...] += 1
        assert keys.shape == (3, kv, 300, d)  # the capacity: nothing read on the host
        assert (host(device_ctx) == host(host_ctx)).all(), t
        steps.append(host(host_ctx))
    graph_cache, x = caches[2], cupy.empty((3, 1, width), dtype)
    stream, pool = side_stream(), cupy.cuda.MemoryPool()  # the graph's own memory
    with stream, cupy.cuda.using_allocator(pool.malloc):
        x[...] = tokens[:, 30:31]
        op(x, cache=graph_cache, start=graph_cache.device_lengths)  # warm: workspaces for this stream
        stream.begin_capture()
        ctx, _, _ = op(x, cache=graph_cache, start=graph_cache.device_lengths)
        graph_cache.device_lengths[...] += 1
        graph = stream.end_capture()
        for t in range(30, 40):
            x[...] = tokens[:, t : t + 1]
            graph.launch(stream)
            stream.synchronize()
            assert (host(ctx) == steps[t - 30]).all(), t


def decode_200_steps(rng, gpu):
    """200 decode steps after an 8-token prompt, each against full attention over the whole history."""
    xp, kind = backend(gpu)
    c = cfg(numpy.float32, heads=4, kv=2, d=16, rotary_dim=16, rotate_half=True, rotate_every_two=False)
    op = ops.SoftmaxContextOp(c)
    tokens = random(rng, (2, 208, 8 * 16), numpy.float32)
    exact = [history(tokens[b], c, numpy.arange(208)) for b in range(2)]
    cache = KVCache(1, 2, 2, 208, 16, numpy.float32, backend=kind)
    op(xp.asarray(tokens[:, :8].copy()), cache=cache, start=cache.reserve(8))
    for t in range(8, 208):
        ctx, _, _ = op(xp.asarray(tokens[:, t : t + 1].copy()), cache=cache, start=cache.reserve(1))
        got = host(ctx)[:, 0]
        assert rel_error(got, numpy.stack([exact[0][t], exact[1][t]])) < 1e-5, t
    with pytest.raises(ValueError, match=r"KV cache full: sequence 0 holds 208 of 208 tokens"):
        cache.reserve(1)


@pytest.mark.parametrize("gpu", BACKENDS)
def test_decode_200_steps_matches_full_attention(rng, gpu):
    decode_200_steps(rng, gpu)


def test_mask_over_the_whole_cache_equals_one_over_the_keys(rng):
    """A [B, max_tokens] key mask (one shape every step) gives what the [B, keys] mask gives."""
    c = cfg(numpy.float32, rotary_dim=32, rotate_half=True, rotate_every_two=False)
    op = ops.SoftmaxContextOp(c)
    qkv = random(rng, (2, 4, 8 * 32), numpy.float32)
    keep = numpy.array([[False, True, True, True], [True] * 4])
    results = []
    for width in (4, 16):
        cache = KVCache(1, 2, 2, 16, 32, numpy.float32, backend="numpy")
        mask = numpy.zeros((2, width), bool)
        mask[:, :4] = keep
        results.append(op(qkv, mask, cache, 0, cache.reserve(4))[0])
    assert (results[0] == results[1]).all()


def test_attention_path_takes_the_fused_decode_kernel_for_decode_steps():
    """attention_path (no GPU needed): one token a sequence with a cache and a per-key mask (or none) is the fused
    decode launch (which turns and appends the token itself: no rotary_append) for every dtype, up to 8 query
    heads a kv head on CUDA cores and 16 on tensor cores (fp16/bf16 at their head sizes, compute capability 8.0
    and later); prompts, no cache, masks per query and NumPy arrays are not."""
    from cupy_transformer.ops.softmax_context import attention_path

    f16, f32 = numpy.dtype(numpy.float16), numpy.dtype(numpy.float32)
    #                   gpu, b, h, kv, s, d, dtype, cached, per_key_mask, capability
    assert attention_path(True, 3, 12, 12, 1, 64, f16, True, True, 90) == "decode"
    assert attention_path(True, 3, 32, 8, 1, 80, f32, True, True, 80) == "decode"
    assert attention_path(True, 1, 32, 2, 1, 128, f16, True, True, 80) == "decode"  # 16 a kv head: tensor cores
    assert attention_path(True, 1, 32, 2, 1, 128, f16, True, True, 75) == "reference"  # CUDA cores take 8
    assert attention_path(True, 1, 32, 2, 1, 80, f16, True, True, 90) == "prefill"  # 16 a kv head on CUDA cores
    assert attention_path(True, 1, 16, 2, 1, 80, f16, True, True, 90) == "decode"
    assert attention_path(True, 3, 12, 12, 5, 64, f16, True, True, 90) == "prefill"  # a prompt
    assert attention_path(True, 3, 12, 12, 1, 64, f16, False, True, 90) == "prefill"  # no cache
    assert attention_path(True, 3, 12, 12, 1, 64, f16, True, False, 90) == "reference"  # a mask per query
    assert attention_path(False, 3, 12, 12, 1, 64, f16, True, True, 0) == "reference"  # NumPy
    assert attention_path(True, 70000, 12, 12, 1, 64, f16, True, True, 90) == "reference"  # past a grid's y and z


@pytest.mark.parametrize(
    "dtype, heads, capability, tokens, kernels",
    [
        (numpy.float16, 4, 90, 48, True),
        (numpy.float32, 4, 90, 48, False),  # an fp32 prompt
        (numpy.float16, 4, 75, 48, False),
        (numpy.float32, 4, 90, 1, True),  # a step: the decode kernel takes fp32
        (numpy.float32, 32, 90, 1, False),  # 16 query heads a kv head: past the CUDA-core decode kernel's 8
        (numpy.float16, 32, 90, 1, True),  # on tensor cores
    ],
)
def test_kernels_is_false_where_a_pass_takes_the_array_operations(
    monkeypatch, dtype, heads, capability, tokens, kernels
):
    """A decoder captures a prompt pass or a step only where its attention is a kernel: attention_reference's CuPy
    einsum calls cuBLAS, which CuPy refuses inside a stream capture."""
    from cupy_transformer.ops import softmax_context

    monkeypatch.setattr(softmax_context, "compute_capability", lambda: capability)
    c = cfg(dtype, heads=heads, kv=2, d=64)
    assert ops.SoftmaxContextOp(c).kernels(2, tokens) is kernels
