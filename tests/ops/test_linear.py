"""LinearOp and VectorMatMulOp: x @ W (+ bias), both weight layouts, every dtype, NumPy and GPU."""

import numpy
import pytest

from cupy_transformer.ops import InferenceConfig, LinearOp, VectorMatMulOp
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import TOL_CHAINED, random, rel_error
from tests.ops.common import GPU_ROWS, GPU_WIDTHS, dense, f64, on_backend, weight

# The issue's sizes on the NumPy path, (rows, width, other width): each width is in- and out-width once; 4096 + 8
# at decode rows only (its float64 GEMMs at 512 rows would slow CI down).
CPU_SIZES = [(rows, 768, 1000) for rows in GPU_ROWS] + [(rows, 4104, 1600) for rows in (1, 7)]


def check(rng, dtype, rows, width, out_features, transposed, with_bias, gpu):
    cfg = InferenceConfig(hidden_size=width, heads=1, dtype=dtype, transposed_mode=transposed)
    host = {
        "input": random(rng, (1, rows, width), dtype),
        "weight": weight(rng, width, out_features, dtype, transposed),
        "bias": random(rng, (out_features,), dtype) if with_bias else None,
    }
    args = on_backend(host, gpu)
    y = LinearOp(cfg)(args["input"], args["weight"], args["bias"])
    exact = f64(args["input"]) @ dense(f64(args["weight"]), transposed)
    if with_bias:
        exact = exact + f64(args["bias"])
    assert y.shape == (1, rows, out_features) and y.dtype == dtype
    assert rel_error(y, exact) < TOL_CHAINED[numpy.dtype(dtype)]
    if not with_bias:
        z = VectorMatMulOp(cfg)(args["input"], args["weight"])
        assert rel_error(z, exact) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
@pytest.mark.parametrize("rows", [1, 7, 33])
def test_numpy_path(rng, dtype, transposed, with_bias, rows):
    check(rng, dtype, rows, 100, 72, transposed, with_bias, gpu=False)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rows, width, other", CPU_SIZES)
def test_numpy_path_issue_sizes(rng, dtype, rows, width, other):
    check(rng, dtype, rows, width, other, transposed=False, with_bias=True, gpu=False)
    check(rng, dtype, rows, other, width, transposed=True, with_bias=False, gpu=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("width", GPU_WIDTHS)
@pytest.mark.parametrize("rows", GPU_ROWS)
def test_gpu(rng, poisoned_allocations, dtype, width, rows):
    check(rng, dtype, rows, width, 3 * width, transposed=False, with_bias=True, gpu=True)
    check(rng, dtype, rows, width, width, transposed=True, with_bias=False, gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_vector_matmul_gpu_in_out(rng, poisoned_allocations, dtype):
    for rows in GPU_ROWS:  # VectorMatMulOp on [in, out] weights (test_gpu gives it [out, in] only)
        check(rng, dtype, rows, 1000, 1600, transposed=False, with_bias=False, gpu=True)
        check(rng, dtype, rows, 1600, 1000, transposed=False, with_bias=False, gpu=True)


def test_bad_input():
    cfg = InferenceConfig(hidden_size=64, heads=4, dtype=numpy.float32)
    x = numpy.ones((2, 3, 64), numpy.float32)
    w = numpy.ones((64, 96), numpy.float32)
    op = LinearOp(cfg)
    with pytest.raises(
        ValueError,
        match=r"weight: expected a \[in, out\] weight whose in-dimension matches the input "
        r"width 64; got shape \(96, 64\)",
    ):
        op(x, w.T.copy())
    with pytest.raises(ValueError, match=r"bias: expected shape \(96,\); got \(64,\)"):
        op(x, w, numpy.ones(64, numpy.float32))
    with pytest.raises(TypeError, match=r"input: expected dtype float32; got float16"):
        op(x.astype(numpy.float16), w)
    with pytest.raises(TypeError, match=r"weight: expected dtype float32; got float16"):
        op(x, w.astype(numpy.float16))
    with pytest.raises(
        ValueError, match=r"input: expected at least one token and a non-zero width; got shape \(2, 0, 64\)"
    ):
        op(numpy.ones((2, 0, 64), numpy.float32), w)
    with pytest.raises(ValueError, match=r"input: expected a 2-D or 3-D array; got 4-D"):
        VectorMatMulOp(cfg)(x[None], w)
