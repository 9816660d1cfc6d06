"""embed and embedding_reference: the reference's one rounding of the float64 sum, rows copied as they are without
positions, index dtypes and layouts, argument checks. On a GPU: the kernel equals the reference exactly (fp16, bf16,
fp32; hidden sizes of whole 16-byte vectors and odd ones; a misaligned table; int32 and int64 indices), over
poisoned allocations and into ``out``.

Exact equality on the GPU: the kernel sums two values of p significant bits in fp32 and rounds once to the dtype,
the reference in float64. Rounding the sum to q >= 2p + 2 bits first and then to p gives the exact sum rounded to p
(fp16: p 11, bf16: p 8, both through fp32's 24; fp32: p 24 through float64's 53), so both equal the exact sum rounded
once. Only subnormals could differ (-ftz on the GPU); the tests' values are normal."""

import numpy
import pytest

from cupy_transformer import ops
from cupy_transformer.ops.embedding import embedding_reference
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import random


def _inputs(rng, dtype, batch, seq, hidden, vocab=50, positions=40, index=numpy.int64):
    table = random(rng, (vocab, hidden), dtype, scale=2.0)
    position_table = random(rng, (positions, hidden), dtype, scale=0.5)
    ids = rng.integers(0, vocab, (batch, seq)).astype(index)
    pos = rng.integers(0, positions, (batch, seq)).astype(index)
    return ids, table, pos, position_table


def test_reference_rounds_the_float64_sum_once():
    """fp16 around 1 (spacing 2^-10): 1 + 2^-11 is a tie (to even: 1), 1 + 3 * 2^-12 rounds up, 2048 + 1 (spacing 2
    there) is a tie to 2048, 2048 + 3 rounds to 2052."""
    table = numpy.array([[1.0, 1.0, 2048.0, 2048.0]], numpy.float16)
    position_table = numpy.array([[2.0**-11, 3 * 2.0**-12, 1.0, 3.0]], numpy.float16)
    out = embedding_reference(numpy.zeros((1, 1), numpy.int64), table, numpy.zeros((1, 1), numpy.int64), position_table)
    assert out.dtype == numpy.float16
    assert out.tolist() == [[[1.0, 1.0 + 2.0**-10, 2048.0, 2052.0]]]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_reference_is_the_sum_of_the_rows(rng, dtype):
    ids, table, positions, position_table = _inputs(rng, dtype, 3, 5, 12)
    out = embedding_reference(ids, table, positions, position_table)
    exact = table.astype(numpy.float64)[ids] + position_table.astype(numpy.float64)[positions]
    assert out.dtype == dtype and out.shape == (3, 5, 12)
    assert numpy.array_equal(out, exact.astype(dtype))
    assert numpy.array_equal(embedding_reference(ids, table), table[ids])


def test_numpy_arrays_run_the_reference_into_out(rng):
    ids, table, positions, position_table = _inputs(rng, numpy.float32, 2, 7, 9)
    out = numpy.full((2, 7, 9), numpy.nan, numpy.float32)
    assert ops.embed(ids, table, positions, position_table, out=out) is out
    assert numpy.array_equal(out, embedding_reference(ids, table, positions, position_table))
    assert numpy.array_equal(ops.embed(ids, table), table[ids])


def test_any_integer_ids_and_strided_views_are_taken(rng):
    """int32 and int64 as they are; int16, uint8 and a transposed view are copied to int64 first: the same rows."""
    ids, table, positions, position_table = _inputs(rng, numpy.float16, 4, 6, 8)
    expected = embedding_reference(ids, table, positions, position_table)
    for convert in (numpy.int32, numpy.int16, numpy.uint8):
        got = ops.embed(ids.astype(convert), table, positions.astype(convert), position_table)
        assert numpy.array_equal(got, expected), convert
    strided = numpy.ascontiguousarray(ids.T).T
    assert not strided.flags.c_contiguous
    assert numpy.array_equal(ops.embed(strided, table), table[ids])


def _bad(**change):
    rng = numpy.random.default_rng(0)
    ids, table, positions, position_table = _inputs(rng, numpy.float16, 2, 3, 8)
    arguments = dict(ids=ids, table=table, positions=positions, position_table=position_table)
    arguments.update(change)
    return arguments


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (_bad(ids=numpy.zeros((2, 3), numpy.float32)), TypeError, r"ids: expected dtype int32, int64; got float32"),
        (_bad(ids=numpy.zeros(3, numpy.int64)), ValueError, r"ids: expected shape \(\*, \*\); got \(3,\)"),
        (_bad(ids=[[0, 1]]), TypeError, r"ids: expected a CuPy array, a NumPy array"),
        (_bad(table=numpy.zeros(8, numpy.float16)), ValueError, r"table: expected a 2-D array; got 1-D"),
        (_bad(table=numpy.zeros((5, 8), numpy.int32)), TypeError, r"table: expected dtype float16, float32"),
        (_bad(table=numpy.zeros((10, 16), numpy.float16)[:, ::2]), ValueError, r"table: expected a C-contiguous array"),
        (_bad(positions=numpy.zeros((2, 4), numpy.int64)), ValueError, r"positions: expected shape \(2, 3\); got"),
        (_bad(positions=numpy.zeros((2, 3), numpy.float64)), TypeError, r"positions: expected dtype int32, int64"),
        (
            _bad(position_table=numpy.zeros((5, 8), numpy.float32)),
            TypeError,
            r"position_table: expected dtype float16; got float32",
        ),
        (
            _bad(position_table=numpy.zeros((5, 9), numpy.float16)),
            ValueError,
            r"position_table: expected shape \(\*, 8\); got \(5, 9\)",
        ),
        (_bad(position_table=None), ValueError, r"position_table: needed with positions \(both or neither\)"),
        (_bad(positions=None), ValueError, r"positions: needed with position_table \(both or neither\)"),
        (_bad(out=numpy.zeros((2, 3, 9), numpy.float16)), ValueError, r"out: expected shape \(2, 3, 8\); got"),
        (_bad(out=numpy.zeros((2, 3, 8), numpy.float32)), TypeError, r"out: expected dtype float16; got float32"),
    ],
)
def test_bad_arguments_name_the_argument(arguments, error, message):
    with pytest.raises(error, match=message):
        ops.embed(**arguments)


# --- GPU ---


def _on_gpu(*arrays):
    import cupy

    return [None if a is None else cupy.asarray(a) for a in arrays]


@pytest.mark.gpu
@pytest.mark.parametrize("hidden", [768, 771, 8, 1, 4096])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gpu_embed_equals_the_reference(rng, poisoned_allocations, dtype, hidden):
    """Batch x sequence 1 x 1 (a decode step), 3 x 7 and 5 x 33; int64 and int32 indices; with and without
    positions: every element equal to the reference's."""
    for (batch, seq), index in zip([(1, 1), (3, 7), (5, 33)], [numpy.int32, numpy.int64, numpy.int32]):
        ids, table, positions, position_table = _inputs(rng, dtype, batch, seq, hidden, index=index)
        got = ops.embed(*_on_gpu(ids, table, positions, position_table))
        assert got.dtype == dtype and got.shape == (batch, seq, hidden)
        assert numpy.array_equal(got.get(), embedding_reference(ids, table, positions, position_table)), (batch, seq)
        assert numpy.array_equal(ops.embed(*_on_gpu(ids, table)).get(), table[ids]), (batch, seq)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gpu_embed_into_out_and_from_a_misaligned_table(rng, dtype):
    """A table starting one element past a 16-byte boundary (hidden 64: whole vectors, read one element an access),
    positions int32 with ids int64, into a NaN-filled ``out``."""
    import cupy

    ids, table, positions, position_table = _inputs(rng, dtype, 4, 9, 64, index=numpy.int64)
    positions = positions.astype(numpy.int32)
    storage = cupy.empty(table.size + 1, dtype)
    shifted = storage[1:].reshape(table.shape)
    shifted[...] = cupy.asarray(table)
    out = cupy.full((4, 9, 64), numpy.nan, dtype)
    g_ids, g_positions, g_position_table = _on_gpu(ids, positions, position_table)
    assert ops.embed(g_ids, shifted, g_positions, g_position_table, out=out) is out
    assert numpy.array_equal(out.get(), embedding_reference(ids, table, positions, position_table))


@pytest.mark.gpu
def test_gpu_embed_refuses_out_over_an_input(rng):
    ids, table, positions, position_table = _on_gpu(*_inputs(rng, numpy.float16, 1, 2, 8))
    with pytest.raises(ValueError, match="out: must not overlap the input table"):
        ops.embed(ids, table, positions, position_table, out=table[:2].reshape(1, 2, 8))
