"""MLPGemmOp and GELUGemmOp: every norm x arrangement x activation, both weight layouts, NumPy and GPU."""

import numpy
import pytest

from cupy_transformer.ops import ActivationType, GELUGemmOp, InferenceConfig, MLPGemmOp
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import TOL_CHAINED, random, rel_error
from tests.ops.common import GPU_ROWS, GPU_WIDTHS, dense, f64, layer_norm, mlp_act, on_backend, rms_norm, weight

ACTS = list(ActivationType)
# The issue's sizes on the NumPy path, (rows, width, intermediate); 4096 + 8 at decode rows and a narrower MLP only
# (its float64 GEMMs at full size would slow CI down).
CPU_SIZES = [(rows, 768, 1000) for rows in GPU_ROWS] + [(rows, 4104, 520) for rows in (1, 7)]


def make(rng, dtype, rows, width, inter, act, transposed, with_biases):
    inter1 = 2 * inter if ActivationType(act).gated else inter
    return {
        "input": random(rng, (2, rows, width), dtype),
        "residual": random(rng, (2, rows, width), dtype, scale=2.0, offset=0.2),
        "weight_interm": weight(rng, width, inter1, dtype, transposed),
        "weight_out": weight(rng, inter, width, dtype, transposed),
        "input_bias": random(rng, (width,), dtype, scale=0.5) if with_biases else None,
        "bias": random(rng, (inter1,), dtype, scale=0.5) if with_biases else None,
        "gamma": random(rng, (width,), dtype, scale=0.3, offset=1.0),
        "beta": random(rng, (width,), dtype, scale=0.3),
    }


def check_mlp(rng, dtype, rows, width, inter, norm, after_attn, act, transposed, with_biases, gpu):
    cfg = InferenceConfig(
        hidden_size=width,
        heads=1,
        intermediate_size=inter,
        dtype=dtype,
        norm_type=norm,
        mlp_after_attn=after_attn,
        mlp_act_func_type=act,
        transposed_mode=transposed,
        epsilon=1e-5,
    )
    host = make(rng, dtype, rows, width, inter, act, transposed, with_biases)
    if norm == "RMSNorm":
        host["beta"] = None
    a = on_backend(host, gpu)
    out, residual_add = MLPGemmOp(cfg)(**a)

    r = f64(a["residual"])
    z = r + f64(a["input"]) + (f64(a["input_bias"]) if with_biases else 0) if after_attn else r
    if norm == "LayerNorm":
        xn = layer_norm(z, f64(a["gamma"]), f64(a["beta"]), 1e-5)
    else:
        xn = rms_norm(z, f64(a["gamma"]), 1e-5)
    h = xn @ dense(f64(a["weight_interm"]), transposed) + (f64(a["bias"]) if with_biases else 0)
    exact = mlp_act(h, act) @ dense(f64(a["weight_out"]), transposed)
    tol = TOL_CHAINED[numpy.dtype(dtype)]
    assert out.shape == (2, rows, width) and out.dtype == dtype
    assert rel_error(out, exact) < tol
    assert rel_error(residual_add, xn if norm == "LayerNorm" else z) < tol
    for name in ("input", "residual"):  # nothing is updated in place
        assert (host[name] == (a[name].get() if gpu else a[name])).all()


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("after_attn", [True, False], ids=["sequential", "parallel"])
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_mlp_numpy_path(rng, dtype, norm, after_attn, act):
    check_mlp(
        rng, dtype, 7, 96, 160, norm, after_attn, act, act == ActivationType.GATED_SILU, with_biases=True, gpu=False
    )
    check_mlp(rng, dtype, 1, 100, 72, norm, after_attn, act, transposed=False, with_biases=False, gpu=False)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rows, width, inter", CPU_SIZES)
def test_mlp_numpy_path_issue_sizes(rng, dtype, rows, width, inter):
    for norm, after_attn, act, transposed, with_biases in (
        ("LayerNorm", True, ActivationType.GELU, False, True),
        ("RMSNorm", False, ActivationType.GATED_SILU, True, False),
    ):
        check_mlp(
            rng, dtype, rows, width, inter, norm, after_attn=after_attn, act=act, transposed=transposed,
            with_biases=with_biases, gpu=False,
        )  # fmt: skip


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("norm", ["LayerNorm", "RMSNorm"])
@pytest.mark.parametrize("after_attn", [True, False], ids=["sequential", "parallel"])
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_mlp_gpu_variants(rng, poisoned_allocations, dtype, norm, after_attn, act):
    check_mlp(rng, dtype, 7, 1000, 1400, norm, after_attn, act, act.gated, with_biases=True, gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("width", GPU_WIDTHS)
@pytest.mark.parametrize("rows", GPU_ROWS)
def test_mlp_gpu_sizes(rng, poisoned_allocations, dtype, width, rows):
    check_mlp(
        rng,
        dtype,
        rows,
        width,
        4 * width,
        "LayerNorm",
        after_attn=True,
        act=ActivationType.GELU,
        transposed=False,
        with_biases=True,
        gpu=True,
    )
    check_mlp(
        rng,
        dtype,
        rows,
        width,
        2 * width + 8,
        "RMSNorm",
        after_attn=True,
        act=ActivationType.GATED_SILU,
        transposed=True,
        with_biases=False,
        gpu=True,
    )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_mlp_gpu_acts_both_layouts(rng, poisoned_allocations, dtype, act):
    # Each activation in both layouts at 1 and 512 rows (test_mlp_gpu_variants: gated ones [out, in] only, others
    # [in, out] only), norms, arrangements and biases varied.
    cases = (  # rows, width, norm, after_attn, transposed, with_biases
        (1, 1600, "LayerNorm", True, True, True),
        (512, 768, "RMSNorm", False, True, False),
        (1, 768, "RMSNorm", True, False, True),
        (512, 1600, "LayerNorm", False, False, False),
    )
    for rows, width, norm, after_attn, transposed, with_biases in cases:
        check_mlp(
            rng, dtype, rows, width, 2 * width + 8, norm, after_attn=after_attn, act=act, transposed=transposed,
            with_biases=with_biases, gpu=True,
        )  # fmt: skip


def check_gelu_gemm(rng, dtype, rows, width, inter, act, transposed, gpu):
    cfg = InferenceConfig(
        hidden_size=width,
        heads=1,
        intermediate_size=inter,
        dtype=dtype,
        mlp_act_func_type=act,
        transposed_mode=transposed,
    )
    host = make(rng, dtype, rows, width, inter, act, transposed, with_biases=True)
    a = on_backend(host, gpu)
    y = GELUGemmOp(cfg)(a["input"], a["weight_interm"], a["bias"], a["weight_out"])
    h = f64(a["input"]) @ dense(f64(a["weight_interm"]), transposed) + f64(a["bias"])
    exact = mlp_act(h, act) @ dense(f64(a["weight_out"]), transposed)
    assert y.shape == (2, rows, width)
    assert rel_error(y, exact) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_gelu_gemm_numpy_path(rng, dtype, act):
    check_gelu_gemm(rng, dtype, 7, 96, 136, act, act == ActivationType.GELU, gpu=False)


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rows, width, inter", [(rows, 1600, 776) for rows in GPU_ROWS])
def test_gelu_gemm_numpy_path_issue_sizes(rng, dtype, rows, width, inter):
    check_gelu_gemm(rng, dtype, rows, width, inter, ActivationType.GELU, transposed=False, gpu=False)
    check_gelu_gemm(rng, dtype, rows, width, inter, ActivationType.GATED_SILU, transposed=True, gpu=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("width", GPU_WIDTHS)
@pytest.mark.parametrize("rows", GPU_ROWS)
def test_gelu_gemm_gpu(rng, poisoned_allocations, dtype, width, rows):
    check_gelu_gemm(rng, dtype, rows, width, 4 * width, ActivationType.GELU, width == 1600, gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=lambda a: a.name)
def test_gelu_gemm_gpu_variants(rng, poisoned_allocations, dtype, act):
    for transposed in (False, True):
        check_gelu_gemm(rng, dtype, 1, 1600, 2 * 1600 + 8, act, transposed, gpu=True)
        check_gelu_gemm(rng, dtype, 512, 768, 2 * 768 + 8, act, transposed, gpu=True)


def test_bad_input(rng):
    cfg = InferenceConfig(hidden_size=64, heads=4, intermediate_size=96, dtype=numpy.float32)
    a = make(rng, numpy.float32, 3, 64, 96, ActivationType.GELU, transposed=False, with_biases=True)
    op = MLPGemmOp(cfg)
    with pytest.raises(ValueError, match=r"input: expected shape \(2, 3, 64\); got \(2, 2, 64\)"):
        op(**{**a, "input": a["input"][:, :2].copy()})
    with pytest.raises(
        ValueError,
        match=r"weight_out: expected a \[in, out\] weight whose in-dimension matches the "
        r"input width 96",
    ):
        op(**{**a, "weight_out": a["weight_out"].T.copy()})
    with pytest.raises(ValueError, match=r"weight_out: expected an out-dimension of the hidden width 64; got 63"):
        op(**{**a, "weight_out": a["weight_out"][:, :63].copy()})
    with pytest.raises(ValueError, match=r"bias: expected shape \(96,\); got \(95,\)"):
        op(**{**a, "bias": a["bias"][:95].copy()})
    with pytest.raises(ValueError, match=r"gamma: the MLP norm needs its scale vector; got None"):
        op(**{**a, "gamma": None})
    gated = InferenceConfig(
        hidden_size=64, heads=4, intermediate_size=96, dtype=numpy.float32, mlp_act_func_type="GATED_SILU"
    )
    with pytest.raises(
        ValueError, match=r"weight_interm: a gated activation needs \[up \| gate\] columns, an even count; got 95"
    ):
        MLPGemmOp(gated)(**{**a, "weight_interm": a["weight_interm"][:, :95].copy(), "bias": None})
    with pytest.raises(
        ValueError, match=r"weight: a gated activation needs \[up \| gate\] columns, an even count; got 95"
    ):
        GELUGemmOp(gated)(a["input"], a["weight_interm"][:, :95].copy(), bias=None, weight_out=a["weight_out"])
