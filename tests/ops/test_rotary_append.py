"""ops/rotary_append.py (kernels_cu/rotary_append.cu): rotary and the KV-cache append in one pass over the fused
projection, against float64 rotary (tests/ops/test_rotary.py's turned)."""

import numpy
import pytest

from cupy_transformer.kv_cache import KVCache
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import TOL_CHAINED, host, random, rel_error
from tests.ops.common import attention_config as cfg
from tests.ops.test_rotary import turned


@pytest.mark.gpu
@pytest.mark.parametrize(
    "dtype, style, rotary_dim, given",
    [(numpy.float16, "half", 64, False), (numpy.float32, "every_two", 24, True), (FLOAT_DTYPES[-1], "half", 32, True)],
    ids=["fp16 half at the slots", "fp32 every_two 24 of 64", f"{FLOAT_DTYPES[-1]} half 32 of 64"],
)
def test_gpu_rotary_append_kernel_writes_only_its_slots(rng, dtype, style, rotary_dim, given):
    """rotary_append.cu through rotary_append: 5 tokens into layer 1 at slots 2 and 9 of a 2-layer cache full
    of NaN; the queries and the written K slots against float64 rotary (at position_ids, or at the slots), the V
    slots copied exactly, every other slot (layer 0 too) still NaN."""
    import cupy

    from cupy_transformer.ops.rotary_append import rotary_append
    from cupy_transformer.runtime.lru import device_int32

    h, kv, d, s = 4, 2, 64, 5
    c = cfg(
        dtype,
        heads=h,
        kv=kv,
        d=d,
        rotary_dim=rotary_dim,
        rotate_half=style == "half",
        rotate_every_two=style == "every_two",
        rope_theta=20000.0,
    )
    cache = KVCache(2, 2, kv, 16, d, dtype, backend="cupy")
    cache.keys[...], cache.values[...] = numpy.nan, numpy.nan
    qkv = random(rng, (2, s, (h + 2 * kv) * d), dtype)
    start = numpy.array([2, 9])
    positions = numpy.array([[0, 0, 1, 2, 3], [40, 41, 42, 43, 44]]) if given else start[:, None] + numpy.arange(s)
    q, k = rotary_append(
        cupy.asarray(qkv), cupy.asarray(positions) if given else None, c, h, kv, d, cache, 1, device_int32(start)
    )
    assert k is None  # with a cache, the keys are read from it
    x = qkv.reshape(2, s, h + 2 * kv, d).transpose(0, 2, 1, 3)  # [B, heads, S, d]
    assert rel_error(q, turned(x[:, :h], positions, rotary_dim, 20000.0, style)) < TOL_CHAINED[numpy.dtype(dtype)]
    want_k = turned(x[:, h : h + kv], positions, rotary_dim, 20000.0, style)
    keys, values = host(cache.keys).astype(numpy.float32), host(cache.values).astype(numpy.float32)
    written = numpy.zeros(keys.shape, bool)
    for b in range(2):
        at = slice(start[b], start[b] + s)
        written[1, b, :, at] = True
        assert rel_error(keys[1, b, :, at], want_k[b]) < TOL_CHAINED[numpy.dtype(dtype)]
        assert (values[1, b, :, at] == x[b, h + kv :].astype(numpy.float32)).all()
    assert numpy.isnan(keys[~written]).all() and numpy.isnan(values[~written]).all()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32], ids=["fp16", "fp32"])
def test_gpu_tokens_whose_slots_fall_outside_the_cache_write_nothing(rng, dtype):
    """Device starts -2 and 13 for 5 tokens into the last layer of a 16-slot cache full of NaN: slots -2, -1, 16
    and 17 fall outside (they would take layer 0's rows and memory past the cache): those tokens' queries are NaN
    and nothing is written for them; the other tokens' queries and slots are rotary_append's at valid starts, and
    every slot not theirs (layer 0 too) is still NaN."""
    import cupy

    from cupy_transformer.ops.rotary_append import rotary_append
    from cupy_transformer.runtime.lru import device_int32

    h, kv, d, s = 4, 2, 64, 5
    c = cfg(dtype, heads=h, kv=kv, d=d, rotary_dim=d, rotate_half=True, rotate_every_two=False, rope_theta=10000.0)
    cache = KVCache(2, 2, kv, 16, d, dtype, backend="cupy")
    cache.keys[...], cache.values[...] = numpy.nan, numpy.nan
    qkv = random(rng, (2, s, (h + 2 * kv) * d), dtype)
    start = numpy.array([-2, 13])
    q, _ = rotary_append(cupy.asarray(qkv), None, c, h, kv, d, cache, 1, device_int32(start))
    q, keys, values = host(q).astype(numpy.float32), host(cache.keys), host(cache.values)
    x = qkv.reshape(2, s, h + 2 * kv, d).transpose(0, 2, 1, 3)
    slots = start[:, None] + numpy.arange(s)
    inside = (slots >= 0) & (slots < 16)
    want_q = turned(x[:, :h], slots, d, 10000.0, "half")
    want_k = turned(x[:, h : h + kv], slots, d, 10000.0, "half")
    written = numpy.zeros(keys.shape, bool)
    for b in range(2):
        assert numpy.isnan(q[b][:, ~inside[b]]).all()
        ok = inside[b]
        assert rel_error(q[b][:, ok], want_q[b][:, ok]) < TOL_CHAINED[numpy.dtype(dtype)]
        at = slots[b][ok]
        written[1, b, :, at] = True
        assert rel_error(keys[1, b][:, at].astype(numpy.float32), want_k[b][:, ok]) < TOL_CHAINED[numpy.dtype(dtype)]
        assert (values[1, b][:, at] == x[b, h + kv :][:, ok]).all()
    assert numpy.isnan(keys[~written].astype(numpy.float32)).all()
    assert numpy.isnan(values[~written].astype(numpy.float32)).all()
