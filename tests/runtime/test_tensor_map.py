"""runtime/tensor_map.py: the layouts a TMA tile map refuses (CPU: checked before the driver is asked). The
maps themselves run in every prefill GPU test on an H100/H200 (prefill_attention_sm90.cu)."""

import types

import numpy
import pytest

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
