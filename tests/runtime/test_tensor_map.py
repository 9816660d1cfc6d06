"""runtime/tensor_map.py: the layouts a TMA tile map refuses (CPU: checked before the driver is asked), and the
maps a graph's owner holds (``holding``). The maps themselves run in every prefill GPU test on an H100/H200
(prefill_attention_sm90.cu); a decoder's captured pass after the memo has let its maps go, in test_generation.py."""

import threading
import types

import numpy
import pytest

from cupy_transformer.runtime import tensor_map
from cupy_transformer.runtime.tensor_map import tile_map


def stand_in(shape, dtype=numpy.float16, strides=None, address=0x1000):
    """What tile_map reads of an array: dtype, rank, shape, strides and address."""
    dtype = numpy.dtype(dtype)
    strides = strides or tuple(int(numpy.prod(shape[i + 1 :])) * dtype.itemsize for i in range(len(shape)))
    return types.SimpleNamespace(
        dtype=dtype, ndim=len(shape), shape=shape, strides=strides, data=types.SimpleNamespace(ptr=address)
    )


@pytest.mark.parametrize(
    "array, rows, words",
    [
        (stand_in((2, 4, 100, 64), numpy.float32), 64, "fp16 or bf16"),
        (stand_in((4, 100, 64)), 64, "[B, heads, T, D]"),
        (stand_in((2, 4, 100, 32)), 64, "at least 64"),
        (stand_in((2, 4, 100, 68)), 64, "multiple of 8"),
        (stand_in((2, 4, 100, 64), strides=(4 * 100 * 128, 100 * 128, 128, 4)), 64, "contiguous"),
        (stand_in((2, 4, 100, 64), address=0x1008), 64, "address 0x1008"),
        (stand_in((2, 4, 100, 64), strides=(4 * 100 * 136, 100 * 136, 136, 2)), 64, "multiples of 16"),
        (stand_in((2, 4, 100, 64)), 512, "rows 512"),
    ],
)
def test_layouts_a_tile_map_cannot_describe_are_refused(array, rows, words):
    with pytest.raises(ValueError, match="tile_map") as err:
        tile_map(array, rows)
    assert words in str(err.value)


def test_maps_returned_while_holding_are_kept_and_answered_from_there(monkeypatch):
    asked = []

    class Memo:  # the LRU's part: a new value each time it is asked
        def get(self, key, make):
            asked.append(key)
            return object()

    monkeypatch.setattr(tensor_map, "MAPS", Memo())
    a, b = stand_in((2, 4, 100, 64)), stand_in((2, 4, 100, 64), address=0x2000)
    held, inner = {}, {}
    with tensor_map.holding(held):
        first = tile_map(a, 64)
        assert tile_map(a, 64) is first  # from ``held``: the memo is not asked again
        with tensor_map.holding(inner):
            in_inner = tile_map(b, 64)
        assert tile_map(a, 32) is not first  # another box: another map
        elsewhere = threading.Thread(target=tile_map, args=(stand_in((2, 4, 100, 64), address=0x3000), 64))
        elsewhere.start()
        elsewhere.join()  # another thread's map: not held here
    outside = tile_map(a, 64)
    assert outside is not first and len(asked) == 5
    assert list(inner.values()) == [in_inner] and first in held.values() and len(held) == 2


def test_layer_maps_are_each_layers_tile_map_in_one_upload(monkeypatch):
    """``layer_maps`` of a [layers, B, heads, T, D] cache array: row l is the map ``tile_map`` makes of layer l
    (the driver's encoder stood in by one writing its arguments), and all rows come from one upload."""
    import ctypes

    def encode(out, dtype, rank, address, sizes, strides, box, steps, *flags):
        words = [dtype, rank, address, *sizes[:4], *strides[:3], *box[:4], *steps[:4], *flags]
        ctypes.memmove(out, (ctypes.c_uint64 * 16)(*words[:16]), 128)
        return 0

    uploads = []

    class Memo:
        def get(self, key, make):
            return make()

    monkeypatch.setattr(tensor_map, "_encode", encode)
    monkeypatch.setattr(tensor_map, "_upload", lambda host: uploads.append(host.copy()) or uploads[-1])
    monkeypatch.setattr(tensor_map, "MAPS", Memo())
    layers, shape = 3, (2, 4, 100, 64)
    whole = stand_in((layers, *shape), address=0x10000)
    rows = tensor_map.layer_maps(whole, 64)
    assert len(uploads) == 1 and rows.shape == (layers, 128)
    for layer in range(layers):
        one = tile_map(stand_in(shape, address=0x10000 + layer * whole.strides[0]), 64)
        numpy.testing.assert_array_equal(rows[layer], one)
    assert len(uploads) == 1 + layers  # tile_map: one upload a map
    with pytest.raises(ValueError, match=r"layer_maps: expected an fp16 or bf16 \[layers, B, heads, T, D\]"):
        tensor_map.layer_maps(stand_in(shape), 64)


@pytest.mark.gpu
def test_gpu_layer_maps_equal_each_layers_tile_map():
    """On the driver: each row of a cache array's ``layer_maps`` is, byte for byte, ``tile_map`` of that layer
    (a 5-layer fp16 cache of 3 sequences, 2 kv heads, 100 slots, head size 64; boxes of 64 and 128 rows)."""
    cupy = pytest.importorskip("cupy")
    whole = cupy.zeros((5, 3, 2, 100, 64), cupy.float16)
    for rows in (64, 128):
        maps = tensor_map.layer_maps(whole, rows).get()
        for layer in range(whole.shape[0]):
            numpy.testing.assert_array_equal(maps[layer], tile_map(whole[layer], rows).get())
