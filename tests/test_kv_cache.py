"""KVCache: reserve / write / read back, sequences of different lengths, capacity checked before any write."""

import numpy
import pytest

from cupy_transformer.kv_cache import KVCache
from cupy_transformer.runtime.arrays import array_module
from tests.helpers import host, random, side_stream


def round_trip(rng, backend):
    cache = KVCache(layers=2, batch=2, kv_heads=3, max_tokens=12, head_dim=8, dtype=numpy.float16, backend=backend)
    xp = array_module(backend)
    assert cache.backend == backend and isinstance(cache.keys, xp.ndarray)
    expect = numpy.zeros((2, 2, 2, 3, 12, 8), numpy.float16)  # keys/values, layer, sequence, head, token, dim
    for tokens in (5, 1, 1):  # a prompt, then two decode steps
        start = cache.reserve(tokens)
        for layer in range(2):
            k = random(rng, (2, 3, tokens, 8), numpy.float16)
            v = random(rng, (2, 3, tokens, 8), numpy.float16)
            cache.write(layer, xp.asarray(k), xp.asarray(v), start)
            for b in range(2):
                expect[0, layer, b, :, start[b] : start[b] + tokens] = k[b]
                expect[1, layer, b, :, start[b] : start[b] + tokens] = v[b]
    assert cache.lengths.tolist() == [7, 7]
    assert (host(cache.keys) == expect[0]).all() and (host(cache.values) == expect[1]).all()

    cache.set_lengths([2, 7])  # sequence 0 drops its last 5 tokens (e.g. right padding)
    start = cache.reserve(3)
    assert start.tolist() == [2, 7] and cache.lengths.tolist() == [5, 10]
    k, v = random(rng, (2, 3, 3, 8), numpy.float16), random(rng, (2, 3, 3, 8), numpy.float16)
    cache.write(1, xp.asarray(k), xp.asarray(v), start)
    assert (host(cache.keys)[1, 0, :, 2:5] == k[0]).all() and (host(cache.keys)[1, 1, :, 7:10] == k[1]).all()
    assert (host(cache.values)[1, 0, :, 5:7] == expect[1, 1, 0, :, 5:7]).all()  # past its length: untouched
    return cache


def test_round_trip_numpy(rng):
    round_trip(rng, "numpy")


@pytest.mark.gpu
def test_round_trip_gpu(rng):
    round_trip(rng, "cupy")


def test_capacity_is_checked_before_anything_changes(rng):
    cache = KVCache(layers=1, batch=2, kv_heads=1, max_tokens=8, head_dim=4, dtype=numpy.float32, backend="numpy")
    cache.reserve(5)
    with pytest.raises(ValueError, match=r"KV cache full: sequence 0 holds 5 of 8 tokens and cannot take 4 more"):
        cache.reserve(4)
    assert cache.lengths.tolist() == [5, 5]
    cache.set_lengths([1, 5])
    with pytest.raises(ValueError, match=r"KV cache full: sequence 1 holds 5 of 8 tokens"):
        cache.reserve(4)
    assert cache.reserve(3).tolist() == [1, 5]
    cache.reset()
    assert cache.lengths.tolist() == [0, 0] and cache.reserve(8).tolist() == [0, 0]


def test_advance_counts_as_reserve_does_and_checks_first():
    """``advance``: ``reserve``'s count and capacity check without the starts."""
    cache = KVCache(layers=1, batch=2, kv_heads=1, max_tokens=8, head_dim=4, dtype=numpy.float32, backend="numpy")
    cache.set_lengths([1, 5])
    cache.advance(2)
    assert cache.lengths.tolist() == [3, 7]
    with pytest.raises(ValueError, match=r"KV cache full: sequence 1 holds 7 of 8 tokens and cannot take 2 more"):
        cache.advance(2)
    assert cache.lengths.tolist() == [3, 7] and cache.reserve(1).tolist() == [3, 7]


def test_bad_arguments_are_named_errors(rng):
    with pytest.raises(ValueError, match=r"max_tokens: expected a positive integer; got 0"):
        KVCache(layers=1, batch=1, kv_heads=1, max_tokens=0, head_dim=4, backend="numpy")
    with pytest.raises(TypeError, match=r"dtype: expected one of"):
        KVCache(layers=1, batch=1, kv_heads=1, max_tokens=4, head_dim=4, dtype=numpy.int32, backend="numpy")
    with pytest.raises(ValueError, match=r"backend: expected 'cupy' or 'numpy'"):
        KVCache(layers=1, batch=1, kv_heads=1, max_tokens=4, head_dim=4, backend="torch")
    cache = KVCache(layers=2, batch=2, kv_heads=2, max_tokens=6, head_dim=4, dtype=numpy.float16, backend="numpy")
    k = random(rng, (2, 2, 3, 4), numpy.float16)
    start = cache.reserve(3)
    with pytest.raises(ValueError, match=r"layer: expected an integer in \[0, 1\]; got 2"):
        cache.write(2, k, k, start)
    with pytest.raises(ValueError, match=r"k: expected shape"):
        cache.write(0, k[:, :1].copy(), k, start)
    with pytest.raises(TypeError, match=r"v: expected dtype float16"):
        cache.write(0, k, k.astype(numpy.float32), start)
    with pytest.raises(ValueError, match=r"start: 3 tokens from \[4, 4\] do not fit 6 positions"):
        cache.write(0, k, k, numpy.array([4, 4]))
    with pytest.raises(ValueError, match=r"start: expected 2 integer positions"):
        cache.write(0, k, k, numpy.array([0.0, 0.0]))
    with pytest.raises(ValueError, match=r"tokens: expected a positive integer"):
        cache.reserve(0)
    with pytest.raises(ValueError, match=r"lengths: expected values in \[0, 6\]"):
        cache.set_lengths([7, 0])
    with pytest.raises(TypeError, match=r"k: expected a CuPy array, a NumPy array"):
        cache.write(0, object(), k, start)


def test_cache_over_external_arrays_writes_into_them(rng):
    keys = random(rng, (1, 2, 2, 6, 4), numpy.float32)
    values = random(rng, (1, 2, 2, 6, 4), numpy.float32)
    cache = KVCache.over(keys, values)
    assert (cache.layers, cache.batch, cache.kv_heads, cache.max_tokens, cache.head_dim) == (1, 2, 2, 6, 4)
    assert cache.backend == "numpy" and cache.dtype == numpy.float32 and cache.lengths.tolist() == [0, 0]
    k, v = random(rng, (2, 2, 3, 4), numpy.float32), random(rng, (2, 2, 3, 4), numpy.float32)
    before = keys.copy()
    cache.write(0, k, v, numpy.array([2, 2]))
    assert numpy.array_equal(keys[0, :, :, 2:5], k) and numpy.array_equal(values[0, :, :, 2:5], v)
    assert numpy.array_equal(keys[0, :, :, :2], before[0, :, :, :2])  # the rest untouched
    with pytest.raises(ValueError, match=r"keys, values: expected \[layers, batch, kv_heads, max_tokens, head_dim\]"):
        KVCache.over(keys, values[:, :1])
    with pytest.raises(ValueError, match="keys: expected a non-empty C-contiguous array"):
        KVCache.over(keys[..., ::2], values[..., ::2])
    with pytest.raises(TypeError, match="keys: expected one of float16"):
        KVCache.over(keys.astype(numpy.float64), values.astype(numpy.float64))


def test_cache_over_external_arrays_makes_device_lengths_when_asked(rng):
    """A cache ``over`` other arrays (as an injected layer makes every step) holds no device counts until asked for;
    then zeros, and ``sync_device`` copies ``lengths`` there, as for a cache of its own."""
    keys = random(rng, (1, 2, 2, 6, 4), numpy.float16)
    cache = KVCache.over(keys, keys.copy())
    assert cache._device_lengths is None
    cache.reserve(3)
    assert cache.device_lengths.tolist() == [0, 0] and cache.device_lengths.dtype == numpy.int32
    cache.sync_device()
    assert cache.device_lengths.tolist() == [3, 3]


@pytest.mark.gpu
def test_gpu_device_lengths_first_asked_for_inside_a_capture_is_refused(rng):
    """Made inside a capture, the counts would be made anew (zeroed) by every replay: a cache ``over`` GPU arrays
    refuses that; one of its own made them at construction."""
    import cupy

    keys = cupy.asarray(random(rng, (1, 2, 2, 6, 4), numpy.float16))
    over, own = KVCache.over(keys, keys.copy()), KVCache(1, 2, 2, 6, 4, backend="cupy")
    stream = side_stream()
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(RuntimeError, match="inside a CUDA-graph capture"):
                _ = over.device_lengths
            own.device_lengths[...] += 1  # captured: the array itself, no new one
        finally:
            stream.end_capture()
    over.sync_device()
    assert over.device_lengths.tolist() == [0, 0]
