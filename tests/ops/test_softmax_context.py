"""SoftmaxContextOp: prompt then decode steps through a KVCache against full attention recomputed per step,
grouped-query heads, both rotary pairings, padded batches against each sequence alone, bidirectional,
local window, alibi; the reference is a per-query float64 loop over one sequence's whole history (and torch's
scaled_dot_product_attention for the NumPy path in float64)."""

import math

import numpy
import pytest

from cupy_transformer import ops
from cupy_transformer.kv_cache import KVCache
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import random, rel_error
from tests.ops.common import TOL
from tests.ops.test_rotary import turned


def cfg(dtype, heads=4, kv=2, d=32, **kw):
    return ops.InferenceConfig(hidden_size=heads * d, heads=heads, num_kv=kv, dtype=dtype, **kw)


def history(qkv, c, positions, keep=None, alibi=None, scale=None):
    """float64 attention of every token of one sequence over its history: ``qkv`` [T, (h + 2kv) d],
    ``positions`` [T], ``keep`` [T] keys that may be seen, ``alibi`` [h, T]. Returns [T, h d]."""
    h, kv, d = c.heads, c.num_kv, c.head_size
    t = qkv.shape[0]
    x = qkv.astype(numpy.float64)
    q = x[:, : h * d].reshape(t, h, d).transpose(1, 0, 2)[None]
    k = x[:, h * d:(h + kv) * d].reshape(t, kv, d).transpose(1, 0, 2)[None]
    v = x[:, (h + kv) * d:].reshape(t, kv, d).transpose(1, 0, 2)
    if c.rotary_style:
        q = turned(q, positions[None], c.rotary_dim, c.rope_theta, c.rotary_style)
        k = turned(k, positions[None], c.rotary_dim, c.rope_theta, c.rotary_style)
    q, k = q[0], k[0]
    scale = 1 / math.sqrt(d) if scale is None else scale
    out = numpy.zeros((t, h, d))
    for i in range(h):
        g = i // (h // kv)
        for s in range(t):
            keys = [j for j in range(t) if (keep is None or keep[j]) and (not c.triangular_masking or j <= s)
                    and (not c.local_attention or j > s - c.window_size)]
            z = numpy.array([q[i, s] @ k[g, j] * scale + (alibi[i, j] if alibi is not None else 0.0) for j in keys])
            if keys:
                p = numpy.exp(z - z.max())
                out[s, i] = (p / p.sum()) @ v[g, keys]
    return out.reshape(t, h * d)


def backend(gpu):
    if gpu:
        import cupy

        return cupy, "cupy"
    return numpy, "numpy"


def host(a):
    return a.get() if hasattr(a, "get") else a


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
            step = xp.asarray(numpy.ascontiguousarray(tokens[:, first:first + count]))
            ctx, keys, values = op(step, cache=cache, layer_id=layer, start=start)
            assert ctx.shape == (2, count, c.heads * c.head_size) and ctx.dtype == dtype
            assert ctx.flags.c_contiguous  # the next op (a projection) requires it
            assert keys.shape == (2, c.num_kv, first + count, c.head_size)
            got = host(ctx).astype(numpy.float64)
            want = numpy.stack([e[first:first + count] for e in exact])
            assert rel_error(got, want) < TOL[numpy.dtype(dtype)]


@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float16], ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_prompt_then_decode_matches_full_attention(rng, dtype, name):
    prompt_then_decode(rng, dtype, name, gpu=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [numpy.float32, numpy.float16], ids=str)
@pytest.mark.parametrize("name", CONFIGS)
def test_gpu_prompt_then_decode_matches_full_attention(rng, dtype, name):
    prompt_then_decode(rng, dtype, name, gpu=True)


def nan_past(cache, lengths):
    """NaN in every cache slot past each sequence's length (slots that may hold anything, and must never be
    read: 0 x NaN is NaN)."""
    for b, n in enumerate(lengths):
        cache.keys[:, b, :, n:], cache.values[:, b, :, n:] = numpy.nan, numpy.nan


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
        mine = alibi[:, 4 * rank:4 * rank + 4, 0]  # [B, 4, T]
        exact = [history(tokens[b], rank_heads, numpy.arange(39), alibi=mine[b]) for b in range(2)]
        cache = KVCache(1, 2, 1, 39, 64, dtype, backend=kind)
        for first, count in [(0, 37), (37, 1), (38, 1)]:
            rows = xp.asarray(numpy.ascontiguousarray(alibi[:, 4 * rank:4 * rank + 4, :, :first + count]))
            step = xp.asarray(numpy.ascontiguousarray(tokens[:, first:first + count]))
            ctx, _, _ = op(step, cache=cache, layer_id=0, start=cache.reserve(count), alibi=rows)
            want = numpy.stack([e[first:first + count] for e in exact])
            assert rel_error(host(ctx).astype(numpy.float64), want) < TOL[numpy.dtype(dtype)]


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
    ctx, _, _ = op(qkv, keep, alibi=alibi, norm_factor=32 ** -0.25)  # DeepSpeed's norm_factor: scale = nf^2
    for b in range(2):
        want = history(qkv[b], c, numpy.arange(6), keep[b], alibi[b, :, 0])
        rows = 6 if b == 0 else 4  # padded queries are not compared: their outputs are unused
        assert rel_error(ctx[b, :rows], want[:rows]) < 1e-6
    additive = numpy.where(keep, 0.0, -1e9).astype(numpy.float32)
    again, _, _ = op(qkv, additive, alibi=alibi.reshape(4, 1, 6), scale=32 ** -0.5)
    assert rel_error(again[0], ctx[0]) < 1e-6 and rel_error(again[1, :4], ctx[1, :4]) < 1e-6


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
    assert rel_error(ctx, ref) < TOL[numpy.dtype(numpy.float16)]


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
    q, k, v = (x[..., a * d:(a + n) * d].reshape(b, t, n, d).transpose(1, 2)
               for a, n in ((0, h), (h, kv), (h + kv, kv)))
    k, v = k.repeat_interleave(h // kv, dim=1), v.repeat_interleave(h // kv, dim=1)
    out = F.scaled_dot_product_attention(q[:, :, t - (queries or t):], k, v, **kw)
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
    with pytest.raises(ValueError, match=r"query_key_value: expected a last dimension of \(heads 4 \+ 2 x kv heads 2\)"):
        op(qkv[..., :-32].copy())
    with pytest.raises(ValueError, match=r"head size 12 \(hidden_size / heads\): expected a multiple of 8 up to 256"):
        ops.SoftmaxContextOp(ops.InferenceConfig(hidden_size=48, heads=4, dtype=numpy.float16))(qkv)
    with pytest.raises(ValueError, match=r"attn_mask: expected a \[batch, keys\] = \[2, 3 or more\] mask over key slots"):
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


def twin_caches(rng, dtype, kv, tokens, d, lengths, kinds=("numpy", "cupy")):
    """One-layer caches of each kind holding the same random keys and values, sequences of ``lengths``."""
    caches = [KVCache(1, len(lengths), kv, tokens, d, dtype, backend=kind) for kind in kinds]
    content = [random(rng, (1, len(lengths), kv, tokens, d), dtype) for _ in range(2)]
    for cache in caches:
        if cache.kind == "numpy":
            xp = numpy
        else:
            import cupy as xp
        cache.keys[...], cache.values[...] = xp.asarray(content[0]), xp.asarray(content[1])
        cache.set_lengths(lengths)
    return caches


@pytest.fixture(params=["launcher's", "4 warps, 5 chunks", "one chunk", "8 warps, one chunk"])
def decode_chunks(request, monkeypatch):
    """How a decode test splits the keys: as the launcher does for its few sequences (on a GPU whose kernel has
    8-warp blocks, those, in up to 16 chunks a (sequence, kv head), merged by the last block), in 4-warp blocks
    and 5 chunks (fewer where the keys take fewer), or in one chunk as for batches that fill the GPU (each
    block writes its context straight), in blocks of 4 warps or of 8 (the tensor-core kernel's)."""
    from cupy_transformer.ops import softmax_context

    warps, chunks = {"4 warps, 5 chunks": (4, 5), "one chunk": (4, 1), "8 warps, one chunk": (8, 1)}.get(
        request.param, (None, None))

    def forced(kernels, pairs):
        if warps not in kernels:
            pytest.skip("attention_partial (fp32, or head sizes the tensor-core kernel lacks) has 4-warp blocks")
        return warps, chunks

    if warps:
        monkeypatch.setattr(softmax_context, "_decode_geometry", forced)
    return request.param


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "heads, kv, d", [(8, 1, 128), (32, 4, 128), (12, 1, 128), (4, 4, 80), (6, 2, 96), (2, 2, 256), (16, 2, 64)])
def test_gpu_decode_kernel_on_long_contexts(rng, decode_chunks, dtype, heads, kv, d):
    """The decode kernel (one token, a cache, a per-key mask, alibi) against the NumPy reference on the same
    cache: sequences holding 0, 776 and 16383 tokens (keys up to 16384, no multiple of a chunk)."""
    import cupy

    c = cfg(dtype, heads=heads, kv=kv, d=d, rotary_dim=d, rotate_half=True, rotate_every_two=False)
    op = ops.SoftmaxContextOp(c)
    caches = twin_caches(rng, dtype, kv, 16384, d, [0, 776, 16383])
    qkv = random(rng, (3, 1, (heads + 2 * kv) * d), dtype)
    keep = rng.random((3, 16384)) < 0.9
    alibi = random(rng, (3, heads, 1, 16384), dtype, scale=0.5)
    want, _, _ = op(qkv, keep, caches[0], 0, caches[0].reserve(1), alibi=alibi)
    got, keys, _ = op(cupy.asarray(qkv), cupy.asarray(keep), caches[1], 0, caches[1].reserve(1), alibi=cupy.asarray(alibi))
    assert keys.shape == (3, kv, 16384, d)
    assert rel_error(got, want) < TOL[numpy.dtype(dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [t for t in FLOAT_DTYPES if numpy.dtype(t).itemsize == 2], ids=str)
@pytest.mark.parametrize("heads, kv, d", [(16, 1, 32), (12, 3, 64), (4, 2, 128)])
def test_gpu_decode_kernel_with_an_additive_mask(rng, poisoned_allocations, decode_chunks, dtype, heads, kv, d):
    """The tensor-core decode kernel with an additive mask and a sliding window (keys from lo > 0), 16 query
    heads on one kv head (every row of the products), ragged lengths."""
    import cupy

    c = cfg(dtype, heads=heads, kv=kv, d=d, local_attention=True, window_size=700)
    op = ops.SoftmaxContextOp(c)
    caches = twin_caches(rng, dtype, kv, 1000, d, [999, 333])
    qkv = random(rng, (2, 1, (heads + 2 * kv) * d), dtype)
    additive = numpy.where(rng.random((2, 1000)) < 0.8, 0.0, -1e4).astype(dtype)
    want, _, _ = op(qkv, additive, caches[0], 0, caches[0].reserve(1))
    got, _, _ = op(cupy.asarray(qkv), cupy.asarray(additive), caches[1], 0, caches[1].reserve(1))
    assert rel_error(got, want) < TOL[numpy.dtype(dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, heads, kv, d", [(numpy.float32, 6, 2, 64), (numpy.float16, 8, 1, 48),
                                                 (numpy.float16, 2, 1, 200)], ids=["fp32", "fp16 d48", "fp16 d200"])
def test_gpu_cuda_core_decode_kernel(rng, poisoned_allocations, monkeypatch, decode_chunks, dtype, heads, kv, d):
    """attention_partial (fp32, or a head size the tensor-core kernel lacks; 3, 8 and 2 query heads a kv head)
    on a decode step after a 150-token prompt, one sequence trimmed to 77 (151 and 78 keys: no multiple of a
    64-key chunk) and the slots past each sequence NaN; against float64 attention over each one's history."""
    import cupy
    from cupy_transformer.ops import softmax_context

    assert not softmax_context._decode_on_tensor_cores(dtype, d)
    launch, calls = softmax_context._decode, []

    def counted(*args):
        calls.append(args)
        return launch(*args)

    monkeypatch.setattr(softmax_context, "_decode", counted)
    c = cfg(dtype, heads=heads, kv=kv, d=d, rotary_dim=d, rotate_half=True, rotate_every_two=False)
    op = ops.SoftmaxContextOp(c)
    tokens = random(rng, (2, 151, (heads + 2 * kv) * d), dtype)
    cache = KVCache(1, 2, kv, 160, d, dtype, backend="cupy")
    op(cupy.asarray(tokens[:, :150].copy()), cache=cache, start=cache.reserve(150))
    cache.set_lengths([150, 77])
    nan_past(cache, [150, 77])
    ctx, _, _ = op(cupy.asarray(tokens[:, 150:].copy()), cache=cache, start=cache.reserve(1))
    assert len(calls) == 1
    want = [history(tokens[0], c, numpy.arange(151))[-1],
            history(numpy.concatenate([tokens[1, :77], tokens[1, 150:]]), c, numpy.arange(78))[-1]]
    assert rel_error(ctx[:, 0], numpy.stack(want)) < TOL[numpy.dtype(dtype)]


PREFILL_RULES = {  # attention rule, mask, alibi
    "causal": dict(), "causal, key mask, alibi": dict(mask="bool", alibi=True), "causal, key mask": dict(mask="bool"),
    "bidirectional, key mask": dict(triangular_masking=False, mask="bool"),
    "bidirectional": dict(triangular_masking=False), "window 40, additive mask": dict(
        local_attention=True, window_size=40, mask="additive"),
}


@pytest.fixture(params=["launcher's", "two warpgroups", "a block an item", "3 persistent blocks", "mma.sync"])
def prefill_kernel(request, monkeypatch):
    """Which prefill kernel a test runs: the launcher's choice (on an H100/H200, prefill_attention_sm90.cu for
    head sizes 64-128, with one warpgroup a block for short causal or masked prompts at 64, persistent blocks
    for short prompts), that kernel with two warpgroups a block for those too, with a block an item, or as 3 persistent
    blocks (each takes many items in turn), or prefill_attention.cu's there too (the kernel of other GPUs). A
    test whose head size and length give the launcher's kernel under "two warpgroups" skips it."""
    from cupy_transformer.ops import softmax_context
    from cupy_transformer.runtime.kernels import compute_capability

    if request.param != "launcher's" and compute_capability() != 90:
        pytest.skip("the launcher takes prefill_attention.cu here already")
    if request.param == "two warpgroups":
        monkeypatch.setattr(softmax_context, "PREFILL_SM90_SHORT", 0)
    if request.param == "a block an item":
        monkeypatch.setattr(softmax_context, "PREFILL_SM90_PERSIST", 0)
    if request.param == "3 persistent blocks":
        monkeypatch.setattr(softmax_context, "PREFILL_SM90_PERSIST", 1 << 30)
        monkeypatch.setattr(softmax_context, "wave_blocks", lambda *args: 3)
    if request.param == "mma.sync":
        monkeypatch.setattr(softmax_context, "SM90_PREFILL", False)
    return request.param


def skip_the_launchers(prefill_kernel, d):
    """Skips a ``prefill_kernel`` variant that runs the launcher's own kernel at head size ``d``."""
    from cupy_transformer.ops.softmax_context import PREFILL_SM90_TILE

    if prefill_kernel not in ("launcher's", "two warpgroups") and d not in PREFILL_SM90_TILE:
        pytest.skip("this head size runs prefill_attention.cu already")
    if prefill_kernel == "two warpgroups" and d != 64:
        pytest.skip("this head size runs two warpgroups a block already")


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [t for t in FLOAT_DTYPES if numpy.dtype(t).itemsize == 2], ids=str)
@pytest.mark.parametrize("heads, kv, d", [(4, 2, 32), (2, 1, 64), (4, 4, 80), (6, 2, 96), (8, 2, 128)])
@pytest.mark.parametrize("rule", PREFILL_RULES)
def test_gpu_prefill_kernel_after_a_past(rng, poisoned_allocations, prefill_kernel, dtype, heads, kv, d, rule):
    """The prefill kernel against the NumPy reference on the same cache: 77 tokens (no multiple of a tile)
    after pasts of 0, 50 and 130 tokens; the GPU cache holds NaN in every slot no sequence has written."""
    import cupy

    skip_the_launchers(prefill_kernel, d)

    options = dict(PREFILL_RULES[rule])
    mask_kind, with_alibi = options.pop("mask", None), options.pop("alibi", False)
    c = cfg(dtype, heads=heads, kv=kv, d=d, rotary_dim=d, rotate_half=True, rotate_every_two=False, **options)
    op = ops.SoftmaxContextOp(c)
    pasts, s, room = [0, 50, 130], 77, 224
    content = [random(rng, (1, 3, kv, room, d), dtype) for _ in range(2)]
    caches = [KVCache(1, 3, kv, room, d, dtype, backend=kind) for kind in ("numpy", "cupy")]
    for cache in caches:
        xp = numpy if cache.kind == "numpy" else cupy
        cache.keys[...], cache.values[...] = xp.asarray(content[0]), xp.asarray(content[1])
        if xp is cupy:
            nan_past(cache, pasts)
        cache.set_lengths(pasts)
    qkv = random(rng, (3, s, (heads + 2 * kv) * d), dtype)
    keep = rng.random((3, room)) < 0.8
    mask = {None: None, "bool": keep, "additive": numpy.where(keep, 0.0, -30.0).astype(dtype)}[mask_kind]
    alibi = random(rng, (3, heads, 1, max(pasts) + s), dtype, scale=0.5) if with_alibi else None
    want, _, _ = op(qkv, mask, caches[0], 0, caches[0].reserve(s), alibi=alibi)
    on_gpu = [None if a is None else cupy.asarray(a) for a in (qkv, mask, alibi)]
    got, _, _ = op(on_gpu[0], on_gpu[1], caches[1], 0, caches[1].reserve(s), alibi=on_gpu[2])
    assert got.flags.c_contiguous
    assert rel_error(got, want) < TOL[numpy.dtype(dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [t for t in FLOAT_DTYPES if numpy.dtype(t).itemsize == 2], ids=str)
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("rotary", [False, True], ids=["views", "turned k"])
def test_gpu_prefill_kernel_without_a_cache(rng, poisoned_allocations, prefill_kernel, dtype, d, rotary):
    """A prompt without a cache: K and V are read where they are (views of the projection), or K turned by
    rotary into an array of its own while V stays a view, so the two have different strides."""
    import cupy

    skip_the_launchers(prefill_kernel, d)

    turn = dict(rotary_dim=d, rotate_half=True, rotate_every_two=False) if rotary else {}
    c = cfg(dtype, heads=4, kv=2, d=d, **turn)
    op = ops.SoftmaxContextOp(c)
    qkv = random(rng, (2, 150, 8 * d), dtype)
    want, _, _ = op(qkv)
    got, _, _ = op(cupy.asarray(qkv))
    assert rel_error(got, want) < TOL[numpy.dtype(dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize("d", [48, 256])
def test_gpu_prefill_at_head_sizes_without_a_kernel(rng, poisoned_allocations, d):
    """fp16 prefill at head sizes no prefill kernel takes (the rotary + append kernel, then fp32 array
    operations): a 37-token prompt, then 13 tokens after pasts of 37 and 20 (set_lengths); float64 reference."""
    import cupy
    from cupy_transformer.ops.softmax_context import PREFILL_GEOMETRY

    assert d not in PREFILL_GEOMETRY
    dtype = numpy.float16
    c = cfg(dtype, heads=4, kv=2, d=d, rotary_dim=d, rotate_half=True, rotate_every_two=False)
    op = ops.SoftmaxContextOp(c)
    tokens = random(rng, (2, 50, 8 * d), dtype)
    exact = [history(tokens[0], c, numpy.arange(50)),
             history(numpy.concatenate([tokens[1, :20], tokens[1, 37:]]), c, numpy.arange(33))]
    cache = KVCache(1, 2, 2, 64, d, dtype, backend="cupy")
    ctx, _, _ = op(cupy.asarray(tokens[:, :37].copy()), cache=cache, start=cache.reserve(37))
    assert rel_error(ctx[0], exact[0][:37]) < TOL[numpy.dtype(dtype)]
    assert rel_error(ctx[1, :20], exact[1][:20]) < TOL[numpy.dtype(dtype)]
    cache.set_lengths([37, 20])
    ctx, _, _ = op(cupy.asarray(tokens[:, 37:].copy()), cache=cache, start=cache.reserve(13))
    assert rel_error(ctx, numpy.stack([exact[0][37:], exact[1][20:]])) < TOL[numpy.dtype(dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize("span", [1, 2, 5, 64])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_prefill_grid_in_groups_of_any_span(rng, poisoned_allocations, prefill_kernel, monkeypatch, span, d):
    """The prefill grid walks its (sequence, head) pairs in groups of ``span`` (12 pairs of 3 row blocks here,
    5 with one warpgroup a block: one pair a group, groups splitting a kv head's two query heads, a last group
    of 2, all in one): every block still computes its own rows, causal over a 300-token prompt."""
    import cupy
    from cupy_transformer.ops import softmax_context

    skip_the_launchers(prefill_kernel, d)

    monkeypatch.setattr(softmax_context, "prefill_span", lambda *args: span)
    c = cfg(numpy.float16, heads=4, kv=2, d=d)
    op = ops.SoftmaxContextOp(c)
    qkv = random(rng, (3, 300, 8 * d), numpy.float16)
    want, _, _ = op(qkv)
    got, _, _ = op(cupy.asarray(qkv))
    assert rel_error(got, want) < TOL[numpy.dtype(numpy.float16)]


@pytest.mark.gpu
def test_gpu_persistent_prefill_leaves_its_counter_at_zero(rng, poisoned_allocations, monkeypatch):
    """Persistent prefill blocks claim their work items from a counter of the stream's split workspace, which
    the last block done resets: three calls in a row on one stream and one on another, each as 3 blocks
    taking 32 items, all match the reference, and the counters read zero after each."""
    import cupy
    from cupy_transformer.ops import softmax_context
    from cupy_transformer.runtime.kernels import compute_capability, split_workspace

    if compute_capability() != 90:
        pytest.skip("persistent blocks are the Hopper prefill kernel's")
    monkeypatch.setattr(softmax_context, "wave_blocks", lambda *args: 3)
    op = ops.SoftmaxContextOp(cfg(numpy.float16, heads=4, kv=2, d=64))
    qkv = random(rng, (2, 200, 8 * 64), numpy.float16)
    want, _, _ = op(qkv)
    for stream in [cupy.cuda.Stream.null] * 3 + [cupy.cuda.Stream(non_blocking=True)]:
        with stream:
            got, _, _ = op(cupy.asarray(qkv))
            assert rel_error(got, want) < TOL[numpy.dtype(numpy.float16)]
            assert not split_workspace(0, 2)[1][:2].any()


@pytest.mark.gpu
@pytest.mark.parametrize("rise", [6.0, 60.0, -60.0])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_gpu_prefill_with_scores_rising_along_the_keys(rng, poisoned_allocations, prefill_kernel, rise, causal):
    """Scores that climb (or fall) along the keys, by about 0.9 or 9 (log2 units) a tile of 64 keys, so a
    row's running maximum moves on many tiles: by less than the lazy rule's 8 (a stale maximum, exp2 values
    up to 256) and by more (o and l rescaled); fp16 against the float64 reference, 600 tokens, d 64."""
    import cupy

    if prefill_kernel == "two warpgroups":
        pytest.skip("600 tokens run two warpgroups a block already")

    c = cfg(numpy.float16, heads=2, kv=2, d=64, triangular_masking=causal)
    op = ops.SoftmaxContextOp(c)
    qkv = random(rng, (2, 600, 6 * 64), numpy.float32, scale=0.3)
    qkv[:, :, 0:128:64] = 8.0  # the two query heads' first dimension
    qkv[:, :, 128:256:64] = numpy.linspace(0.0, rise, 600, dtype=numpy.float32)[None, :, None]  # the keys'
    qkv = qkv.astype(numpy.float16)
    want, _, _ = op(qkv)
    got, _, _ = op(cupy.asarray(qkv))
    assert rel_error(got, want) < TOL[numpy.dtype(numpy.float16)]


@pytest.mark.gpu
def test_gpu_capture_raises(rng):
    """A decode step captured into a CUDA graph would replay its positions and key ranges (host values):
    the op refuses before writing anything."""
    import cupy

    op = ops.SoftmaxContextOp(cfg(numpy.float16, heads=4, kv=2, d=64))
    cache = KVCache(1, 2, 2, 16, 64, numpy.float16, backend="cupy")
    op(cupy.asarray(random(rng, (2, 3, 8 * 64), numpy.float16)), cache=cache, start=cache.reserve(3))
    step, start = cupy.asarray(random(rng, (2, 1, 8 * 64), numpy.float16)), cache.reserve(1)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(RuntimeError, match="cannot be captured"):
                op(step, cache=cache, start=start)
        finally:
            stream.end_capture()


@pytest.mark.gpu
def test_gpu_prefill_kernel_on_a_long_context(rng, poisoned_allocations, prefill_kernel):
    """300 queries after pasts of 0, 4000 and 16084 tokens (keys up to 16384), causal with a key mask."""
    import cupy

    if prefill_kernel == "two warpgroups":
        pytest.skip("head size 128 runs two warpgroups a block already")

    c = cfg(numpy.float16, heads=4, kv=2, d=128, rotary_dim=64, rope_theta=500000.0)
    op = ops.SoftmaxContextOp(c)
    pasts, s, room = [0, 4000, 16084], 300, 16384
    content = [random(rng, (1, 3, 2, room, 128), numpy.float16) for _ in range(2)]
    caches = [KVCache(1, 3, 2, room, 128, numpy.float16, backend=kind) for kind in ("numpy", "cupy")]
    for cache in caches:
        xp = numpy if cache.kind == "numpy" else cupy
        cache.keys[...], cache.values[...] = xp.asarray(content[0]), xp.asarray(content[1])
        cache.set_lengths(pasts)
    qkv = random(rng, (3, s, 8 * 128), numpy.float16)
    keep = rng.random((3, room)) < 0.95
    want, _, _ = op(qkv, keep, caches[0], 0, caches[0].reserve(s))
    got, _, _ = op(cupy.asarray(qkv), cupy.asarray(keep), caches[1], 0, caches[1].reserve(s))
    assert rel_error(got, want) < TOL[numpy.dtype(numpy.float16)]


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
        ctx, _, _ = op(xp.asarray(tokens[:, t:t + 1].copy()), cache=cache, start=cache.reserve(1))
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


@pytest.mark.gpu
@pytest.mark.parametrize("dtype, style, rotary_dim, given", [
    (numpy.float16, "half", 64, False), (numpy.float32, "every_two", 24, True), (FLOAT_DTYPES[-1], "half", 32, True)],
    ids=["fp16 half at the slots", "fp32 every_two 24 of 64", f"{FLOAT_DTYPES[-1]} half 32 of 64"])
def test_gpu_rotary_append_kernel_writes_only_its_slots(rng, dtype, style, rotary_dim, given):
    """rotary_append.cu through _rotary_append: 5 tokens into layer 1 at slots 2 and 9 of a 2-layer cache full
    of NaN; the queries and the written K slots against float64 rotary (at position_ids, or at the slots), the V
    slots copied exactly, every other slot (layer 0 too) still NaN."""
    import cupy
    from cupy_transformer.ops.softmax_context import _on_device, _rotary_append

    h, kv, d, s = 4, 2, 64, 5
    c = cfg(dtype, heads=h, kv=kv, d=d, rotary_dim=rotary_dim, rotate_half=style == "half",
            rotate_every_two=style == "every_two", rope_theta=20000.0)
    cache = KVCache(2, 2, kv, 16, d, dtype, backend="cupy")
    cache.keys[...], cache.values[...] = numpy.nan, numpy.nan
    qkv = random(rng, (2, s, (h + 2 * kv) * d), dtype)
    start = numpy.array([2, 9])
    positions = numpy.array([[0, 0, 1, 2, 3], [40, 41, 42, 43, 44]]) if given else start[:, None] + numpy.arange(s)
    q, k = _rotary_append(cupy.asarray(qkv), cupy.asarray(positions) if given else None, c, h, kv, d, cache, 1,
                          start, _on_device(start))
    assert k is None  # with a cache, the keys are read from it
    x = qkv.reshape(2, s, h + 2 * kv, d).transpose(0, 2, 1, 3)  # [B, heads, S, d]
    assert rel_error(q, turned(x[:, :h], positions, rotary_dim, 20000.0, style)) < TOL[numpy.dtype(dtype)]
    want_k = turned(x[:, h:h + kv], positions, rotary_dim, 20000.0, style)
    keys, values = host(cache.keys).astype(numpy.float32), host(cache.values).astype(numpy.float32)
    written = numpy.zeros(keys.shape, bool)
    for b in range(2):
        at = slice(start[b], start[b] + s)
        written[1, b, :, at] = True
        assert rel_error(keys[1, b, :, at], want_k[b]) < TOL[numpy.dtype(dtype)]
        assert (values[1, b, :, at] == x[b, h + kv:].astype(numpy.float32)).all()
    assert numpy.isnan(keys[~written]).all() and numpy.isnan(values[~written]).all()
