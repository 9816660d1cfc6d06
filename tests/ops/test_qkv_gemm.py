"""QKVGemmOp: input norm (LayerNorm / RMSNorm) + QKV projection, NumPy and GPU."""

import numpy
import pytest

from cupy_transformer.ops import InferenceConfig, QKVGemmOp
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import TOL_CHAINED, random, rel_error
from tests.ops.common import GPU_ROWS, GPU_WIDTHS, dense, f64, layer_norm, on_backend, rms_norm, weight

# The issue's sizes on the NumPy path, (rows, width, QKV width); 4096 + 8 at decode rows and a narrower projection
# only (its float64 GEMMs at full size would slow CI down).
CPU_SIZES = [(rows, 1000, 3000) for rows in GPU_ROWS] + [(rows, 4104, 1032) for rows in (1, 7)]


def check(rng, dtype, rows, width, norm, transposed, with_bias, gpu, heads=None, out_features=None):
    heads = heads or (width // 8 if width % 8 == 0 else 1)
    cfg = InferenceConfig(
        hidden_size=width, heads=heads, dtype=dtype, norm_type=norm, transposed_mode=transposed, epsilon=1e-5
    )
    out_features = out_features or 3 * width
    host = {
        "input": random(rng, (2, rows, width), dtype, scale=2.0, offset=0.3),
        "weight": weight(rng, width, out_features, dtype, transposed),
        "bias": random(rng, (out_features,), dtype) if with_bias else None,
        "gamma": random(rng, (width,), dtype, scale=0.3, offset=1.0),
        "beta": random(rng, (width,), dtype, scale=0.3) if norm == "LayerNorm" else None,
    }
    a = on_backend(host, gpu)
    qkv, xn = QKVGemmOp(cfg)(a["input"], a["weight"], a["bias"], a["gamma"], a["beta"])
    x = f64(a["input"])
    if norm == "LayerNorm":
        exact_xn = layer_norm(x, f64(a["gamma"]), f64(a["beta"]), 1e-5)
    else:
        exact_xn = rms_norm(x, f64(a["gamma"]), 1e-5)
    exact_qkv = exact_xn @ dense(f64(a["weight"]), transposed)
    if with_bias:
        exact_qkv = exact_qkv + f64(a["bias"])
    assert qkv.shape == (2, rows, out_features) and xn.shape == (2, rows, width)
    assert rel_error(xn, exact_xn) < TOL_CHAINED[numpy.dtype(dtype)]
    assert rel_error(qkv, exact_qkv) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("rows", [1, 7])
def test_numpy_path(rng, dtype, norm, transposed, rows):
    check(rng, dtype, rows, 96, norm, transposed, with_bias=True, gpu=False)
    check(rng, dtype, rows, 100, norm, transposed, with_bias=False, gpu=False, heads=4)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rows, width, out_features", CPU_SIZES)
def test_numpy_path_issue_sizes(rng, dtype, rows, width, out_features):
    check(rng, dtype, rows, width, "LayerNorm", transposed=False, with_bias=True, gpu=False, out_features=out_features)
    check(rng, dtype, rows, width, "RMSNorm", transposed=True, with_bias=False, gpu=False, out_features=out_features)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("width", GPU_WIDTHS)
@pytest.mark.parametrize("rows", GPU_ROWS)
@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
def test_gpu(rng, poisoned_allocations, dtype, width, rows, norm):
    check(rng, dtype, rows, width, norm, width == 1000, with_bias=True, gpu=True, heads=8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 512])
def test_gpu_transposed_no_bias(rng, poisoned_allocations, dtype, rows):
    check(rng, dtype, rows, 768, "LayerNorm", transposed=True, with_bias=False, gpu=True, heads=8)
    check(rng, dtype, rows, 1600, "RMSNorm", transposed=True, with_bias=False, gpu=True, heads=8)


def test_bad_input():
    cfg = InferenceConfig(hidden_size=64, heads=4, dtype=numpy.float32)
    x, w = numpy.ones((1, 3, 64), numpy.float32), numpy.ones((64, 192), numpy.float32)
    g = numpy.ones(64, numpy.float32)
    with pytest.raises(ValueError, match=r"gamma: expected shape \(64,\); got \(63,\)"):
        QKVGemmOp(cfg)(x, w, bias=None, gamma=g[:63], beta=g)
    with pytest.raises(ValueError, match=r"gamma: the input norm needs its scale vector; got None"):
        QKVGemmOp(cfg)(x, w)
    rms = InferenceConfig(hidden_size=64, heads=4, dtype=numpy.float32, norm_type="RMSNorm")
    with pytest.raises(ValueError, match=r"beta: RMSNorm has no shift; pass None"):
        QKVGemmOp(rms)(x, w, bias=None, gamma=g, beta=g)
    with pytest.raises(
        TypeError, match=r"bias: expected a CuPy array, a NumPy array or a CUDA array.*got builtins.list"
    ):
        QKVGemmOp(cfg)(x, w, [0.0] * 192, g, g)
