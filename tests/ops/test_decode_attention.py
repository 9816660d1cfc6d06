"""ops/decode_attention.py (kernels_cu/decode_attention.cu): decode steps (one token a sequence, a KV cache)
against SoftmaxContextOp's NumPy path on the same cache, through the op (the launcher's geometry) and through
decode_attention with the geometries the launcher takes for other batches (4-warp blocks in 5 chunks, one chunk,
8-warp blocks)."""

import numpy
import pytest

from cupy_transformer import ops
from cupy_transformer.kv_cache import KVCache
from cupy_transformer.ops.decode_attention import (
    decode_attention,
    decode_attention_qkv,
    decode_max_group,
    decode_on_tensor_cores,
)
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import TOL_CHAINED, host, random, rel_error, side_stream
from tests.ops.common import attention_config as cfg
from tests.ops.common import history, launch_inputs, nan_past


def twin_caches(rng, dtype, kv, tokens, d, lengths, kinds=("numpy", "cupy")):
    """One-layer caches of each kind holding the same random keys and values, sequences of ``lengths``."""
    caches = [KVCache(1, len(lengths), kv, tokens, d, dtype, backend=kind) for kind in kinds]
    content = [random(rng, (1, len(lengths), kv, tokens, d), dtype) for _ in range(2)]
    for cache in caches:
        if cache.backend == "numpy":
            xp = numpy
        else:
            import cupy as xp
        cache.keys[...], cache.values[...] = xp.asarray(content[0]), xp.asarray(content[1])
        cache.set_lengths(lengths)
    return caches


@pytest.fixture(params=["launcher's", "4 warps, 5 chunks", "one chunk", "8 warps, one chunk"])
def decode_chunks(request):
    """How a decode test splits the keys: as the launcher does for its few sequences (on a GPU whose kernel has
    8-warp blocks, those, in up to 16 chunks a (sequence, kv head), merged by the last block; a short sequence
    in one block), in 4-warp blocks and 5 chunks (fewer where the keys take fewer; only sequences of at most 64
    keys in one block: short ones merged too), or in one chunk as for batches that fill the GPU (each block
    writes its context straight), in blocks of 4 warps or of 8 (the tensor-core kernel's). Returns (warps,
    chunks, one_block), or None for the launcher's choice."""
    geometries = {"4 warps, 5 chunks": (4, 5, 64), "one chunk": (4, 1, None), "8 warps, one chunk": (8, 1, None)}
    return geometries.get(request.param)


def decode_step(op, geometry, qkv, mask, cache, start, alibi=None):
    """A decode step on the GPU from NumPy inputs into ``cache`` (a CuPy one) at ``start``: the op's results
    where ``geometry`` is None, else the op's steps up to its launch and decode_attention at ``geometry``
    (warps, chunks, one_block), with the keys and values the op would return (skipped where no decode kernel takes the
    case, or the kernel has no blocks of those warps)."""
    import cupy

    qkv, mask, alibi = (None if a is None else cupy.asarray(a) for a in (qkv, mask, alibi))
    if geometry is None:
        return op(qkv, mask, cache, 0, start, alibi=alibi)
    c = op.config
    if c.heads // c.num_kv > decode_max_group(c.dtype, c.head_size):
        pytest.skip(
            "no decode kernel takes this many query heads a kv head (the op computes it with array "
            "operations, as the launcher's variant checks)"
        )
    if geometry[0] == 8 and not decode_on_tensor_cores(c.dtype, c.head_size):
        pytest.skip("attention_partial (fp32, or head sizes the tensor-core kernel lacks) has 4-warp blocks")
    x = launch_inputs(c, qkv, mask, cache, start, alibi)
    context = decode_attention(
        x.q,
        cache,
        0,
        x.start,
        x.window,
        x.mask,
        x.alibi,
        x.scale,
        warps=geometry[0],
        chunks=geometry[1],
        one_block=geometry[2],
    )
    t = int(x.start.max()) + 1
    return context, cache.keys[0, :, :, :t], cache.values[0, :, :, :t]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize(
    "heads, kv, d", [(8, 1, 128), (32, 4, 128), (12, 1, 128), (4, 4, 80), (6, 2, 96), (2, 2, 256), (16, 2, 64)]
)
def test_gpu_decode_kernel_on_long_contexts(rng, decode_chunks, dtype, heads, kv, d):
    """The decode kernel (one token, a cache, a per-key mask, alibi) against the NumPy reference on the same
    cache: sequences holding 0, 776 and 16383 tokens (keys up to 16384, no multiple of a chunk)."""
    c = cfg(dtype, heads=heads, kv=kv, d=d, rotary_dim=d, rotate_half=True, rotate_every_two=False)
    op = ops.SoftmaxContextOp(c)
    caches = twin_caches(rng, dtype, kv, 16384, d, [0, 776, 16383])
    qkv = random(rng, (3, 1, (heads + 2 * kv) * d), dtype)
    keep = rng.random((3, 16384)) < 0.9
    alibi = random(rng, (3, heads, 1, 16384), dtype, scale=0.5)
    want, _, _ = op(qkv, keep, caches[0], 0, caches[0].reserve(1), alibi=alibi)
    got, keys, _ = decode_step(op, decode_chunks, qkv, keep, caches[1], caches[1].reserve(1), alibi)
    assert keys.shape == (3, kv, 16384, d)
    assert rel_error(got, want) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [t for t in FLOAT_DTYPES if numpy.dtype(t).itemsize == 2], ids=str)
@pytest.mark.parametrize("heads, kv, d", [(16, 1, 32), (12, 3, 64), (4, 2, 128)])
def test_gpu_decode_kernel_with_an_additive_mask(rng, poisoned_allocations, decode_chunks, dtype, heads, kv, d):
    """The tensor-core decode kernel with an additive mask and a sliding window (keys from lo > 0), 16 query
    heads on one kv head (every row of the products), ragged lengths."""
    c = cfg(dtype, heads=heads, kv=kv, d=d, local_attention=True, window_size=700)
    op = ops.SoftmaxContextOp(c)
    caches = twin_caches(rng, dtype, kv, 1000, d, [999, 333])
    qkv = random(rng, (2, 1, (heads + 2 * kv) * d), dtype)
    additive = numpy.where(rng.random((2, 1000)) < 0.8, 0.0, -1e4).astype(dtype)
    want, _, _ = op(qkv, additive, caches[0], 0, caches[0].reserve(1))
    got, _, _ = decode_step(op, decode_chunks, qkv, additive, caches[1], caches[1].reserve(1))
    assert rel_error(got, want) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, heads, kv, d",
    [(numpy.float32, 6, 2, 64), (numpy.float16, 8, 1, 48), (numpy.float16, 2, 1, 200)],
    ids=["fp32", "fp16 d48", "fp16 d200"],
)
def test_gpu_cuda_core_decode_kernel(rng, poisoned_allocations, decode_chunks, dtype, heads, kv, d):
    """attention_partial (fp32, or a head size the tensor-core kernel lacks; 3, 8 and 2 query heads a kv head)
    on a decode step after a 150-token prompt, one sequence trimmed to 77 (151 and 78 keys: no multiple of a
    64-key chunk) and the slots past each sequence NaN; against float64 attention over each one's history.
    Through the op, the step must be the decode kernel's (decode_attention gives its context to the bit)."""
    import cupy

    assert not decode_on_tensor_cores(dtype, d)
    c = cfg(dtype, heads=heads, kv=kv, d=d, rotary_dim=d, rotate_half=True, rotate_every_two=False)
    op = ops.SoftmaxContextOp(c)
    tokens = random(rng, (2, 151, (heads + 2 * kv) * d), dtype)
    cache = KVCache(1, 2, kv, 160, d, dtype, backend="cupy")
    op(cupy.asarray(tokens[:, :150].copy()), cache=cache, start=cache.reserve(150))
    cache.set_lengths([150, 77])
    nan_past(cache, [150, 77])
    start = cache.reserve(1)
    ctx, _, _ = decode_step(op, decode_chunks, tokens[:, 150:].copy(), None, cache, start)
    if decode_chunks is None:
        x = launch_inputs(c, cupy.asarray(tokens[:, 150:].copy()), cache=cache, start=start)
        again = decode_attention(x.q, cache, 0, x.start, x.window, x.mask, x.alibi, x.scale)
        assert (host(again) == host(ctx)).all()
    want = [
        history(tokens[0], c, numpy.arange(151))[-1],
        history(numpy.concatenate([tokens[1, :77], tokens[1, 150:]]), c, numpy.arange(78))[-1],
    ]
    assert rel_error(ctx[:, 0], numpy.stack(want)) < TOL_CHAINED[numpy.dtype(dtype)]


# The fused decode step (decode_attention_qkv: the kernel turns the token's query and key and appends its key and
# value itself) against rotary_append then decode_attention, the two launches it replaces.

ROTARY = {
    "none": {},
    "half": dict(rotate_half=True, rotate_every_two=False),
    "every_two": dict(rotate_half=False, rotate_every_two=True),
}


def fused_case(rng, dtype, heads, kv, d, rotary, lengths, capacity=1024):
    """A config with ``rotary`` over half the head (rot < d), a one-layer cache of ``capacity`` slots full of random
    values (twice on the GPU, and its NumPy copy), and a random projection [B, 1, (h + 2 kv) d] for a token in slot
    ``lengths[b]`` of sequence b."""
    import cupy

    c = cfg(dtype, heads=heads, kv=kv, d=d, rotary_dim=d // 2 if ROTARY[rotary] else 0, **ROTARY[rotary])
    content = [random(rng, (1, len(lengths), kv, capacity, d), dtype) for _ in range(2)]
    caches = [KVCache(1, len(lengths), kv, capacity, d, dtype, backend=kind) for kind in ("cupy", "cupy", "numpy")]
    for cache in caches:
        xp = numpy if cache.backend == "numpy" else cupy
        cache.keys[...], cache.values[...] = xp.asarray(content[0]), xp.asarray(content[1])
    qkv = random(rng, (len(lengths), 1, (heads + 2 * kv) * d), dtype)
    return c, caches, content, qkv


def unfused_step(c, qkv, positions, cache, start):
    """rotary_append (q turned, k turned and v written at start[b]) then decode_attention on its q."""
    from cupy_transformer.ops.rotary_append import rotary_append
    from cupy_transformer.runtime.lru import device_int32

    h, kv, d = c.heads, c.num_kv, c.head_size
    first = start if not isinstance(start, numpy.ndarray) else device_int32(start)
    q, _ = rotary_append(qkv, positions, c, h, kv, d, cache, 0, first)
    return decode_attention(q, cache, 0, start, 0, None, None, d**-0.5)


def same_bits(a, b) -> bool:
    return numpy.array_equal(a.get().view(numpy.uint8), b.get().view(numpy.uint8))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rotary", list(ROTARY))
@pytest.mark.parametrize(
    "heads, kv, d", [(8, 8, 64), (16, 4, 128), (16, 2, 80)], ids=["group 1 d64", "group 4 d128", "group 8 d80"]
)
@pytest.mark.parametrize("on_device", [False, True], ids=["host start", "device start"])
@pytest.mark.parametrize("given", [False, True], ids=["at the slots", "position_ids"])
def test_gpu_fused_decode_step_equals_rotary_append_then_decode(
    rng, poisoned_allocations, dtype, rotary, heads, kv, d, on_device, given
):
    """decode_attention_qkv against rotary_append then decode_attention on a twin cache (fp16/bf16 at head sizes
    64 and 128 on tensor cores, 80 and fp32 on CUDA cores; 1, 4 and 8 query heads a kv head), batch 3 with tokens
    in slots 0, 37 (one block) and 700 (several chunks, merged) of 1024, the slots given on the host or on the GPU:
    - the context bit-identical: the same kernel math on the same values (the turned query rounded once to T by
      the same rotary.cuh code as rotary_append's, the new key and value fed from shared memory holding exactly
      what rotary_append writes to the slot);
    - both caches bit-identical (slot start[b] holds rotary_append's turned key and its value), and every other
      slot still the random values it held;
    - the context against the NumPy path's float64 attention (SoftmaxContextOp on a NumPy copy of the cache)."""
    import cupy

    lengths = [0, 37, 700]
    c, (fused, unfused, reference), content, qkv = fused_case(rng, dtype, heads, kv, d, rotary, lengths)
    positions = numpy.array([[5], [37], [1000]]) if given else None
    start = numpy.array(lengths)
    first = cupy.asarray(start, cupy.int32) if on_device else start
    x, pos = cupy.asarray(qkv), None if positions is None else cupy.asarray(positions)
    want = unfused_step(c, x, pos, unfused, first)
    got = decode_attention_qkv(x, pos, c, heads, fused, 0, first, 0, None, None, d**-0.5)
    assert got.shape == (3, 1, heads * d)
    assert same_bits(got, want)
    assert same_bits(fused.keys, unfused.keys) and same_bits(fused.values, unfused.values)
    others = numpy.ones(fused.keys.shape, bool)
    others[0, numpy.arange(3), :, start] = False
    assert (fused.keys.get()[others] == content[0][others]).all()
    assert (fused.values.get()[others] == content[1][others]).all()
    np_ctx, _, _ = ops.SoftmaxContextOp(c)(qkv, cache=reference, start=start, position_ids=positions)
    assert rel_error(got, np_ctx) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, heads, kv, d", [(numpy.float16, 16, 4, 128), (numpy.float32, 8, 1, 80)], ids=["fp16 d128", "fp32 d80"]
)
def test_gpu_device_slots_outside_the_cache_give_nan_and_leave_the_stream_sound(rng, dtype, heads, kv, d):
    """Device slots -1 and the capacity (which the host cannot check without a read) beside a valid one: those
    sequences' contexts NaN, the valid one's bit-identical to rotary_append then decode on a twin cache, nothing of
    the cache written but the valid slot; the next launch on the stream, all slots valid (two several-chunk
    sequences, merged by tickets), bit-identical to the twin's again: no ticket was left short."""
    import cupy

    lengths = [3, 200, 600]
    c, (fused, unfused, _), content, qkv = fused_case(rng, dtype, heads, kv, d, "half", lengths)
    stream = side_stream()
    with stream:
        x = cupy.asarray(qkv)
        bad = cupy.asarray([-1, 200, fused.max_tokens], cupy.int32)
        got = decode_attention_qkv(x, None, c, heads, fused, 0, bad, 0, None, None, d**-0.5).get()
        want = unfused_step(c, x, None, unfused, cupy.asarray(lengths, cupy.int32)).get()  # the twin: valid slots
        assert numpy.isnan(got[0]).all() and numpy.isnan(got[2]).all()
        assert numpy.array_equal(got[1].view(numpy.uint8), want[1].view(numpy.uint8))
        others = numpy.ones(fused.keys.shape, bool)
        others[0, 1, :, 200] = False
        assert (fused.keys.get()[others] == content[0][others]).all()
        assert (fused.values.get()[others] == content[1][others]).all()
        unfused.keys[...], unfused.values[...] = fused.keys, fused.values  # the twin as the refused slots left it
        good = cupy.asarray([4, 201, 601], cupy.int32)
        x[...] = cupy.asarray(random(rng, qkv.shape, dtype))
        got = decode_attention_qkv(x, None, c, heads, fused, 0, good, 0, None, None, d**-0.5)
        want = unfused_step(c, x, None, unfused, good)
        assert same_bits(got, want)


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, heads, kv, d", [(numpy.float16, 16, 4, 128), (numpy.float32, 8, 1, 80)], ids=["fp16 d128", "fp32 d80"]
)
def test_gpu_fused_decode_step_replayed_from_a_cuda_graph(rng, poisoned_allocations, dtype, heads, kv, d):
    """The fused call captured with a device start (programmatic launches where the GPU has them, as the Decoder
    captures), replayed twice with the slots advanced by the caller in between and a new token each time: each
    replay's context and caches bit-identical to rotary_append then decode_attention on a twin cache."""
    import cupy

    from cupy_transformer.runtime import programmatic

    lengths = [3, 200, 600]
    c, (fused, unfused, _), _, qkv = fused_case(rng, dtype, heads, kv, d, "half", lengths)
    start, x = cupy.asarray(lengths, cupy.int32), cupy.asarray(qkv)
    stream, pool = side_stream(), cupy.cuda.MemoryPool()  # the graph's own memory
    with stream, cupy.cuda.using_allocator(pool.malloc):
        warm = KVCache(1, 3, kv, 1024, d, dtype, backend="cupy")
        decode_attention_qkv(x, None, c, heads, warm, 0, start, 0, None, None, d**-0.5)  # this stream's workspace
        with programmatic.programmatic_launches():
            stream.begin_capture()
            ctx = decode_attention_qkv(x, None, c, heads, fused, 0, start, 0, None, None, d**-0.5)
            graph = stream.end_capture()
        for step in range(2):
            x[...] = cupy.asarray(random(rng, qkv.shape, dtype))
            graph.launch(stream)
            want = unfused_step(c, x, None, unfused, start)
            stream.synchronize()
            assert same_bits(ctx, want), step
            assert same_bits(fused.keys, unfused.keys) and same_bits(fused.values, unfused.values), step
            start += 1
