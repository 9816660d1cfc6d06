"""ResidualAddOp: the three arrangements with tensor-parallel pre-division, NumPy and GPU."""

import numpy
import pytest

from cupy_transformer.ops import InferenceConfig, ResidualAddOp
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import TOL_ROUNDED, random, rel_error
from tests.ops.common import GPU_ROWS, GPU_WIDTHS, f64, on_backend

ARRANGEMENTS = {  # name: (pre_layer_norm, mlp_after_attn)
    "pre-LN": (True, True),
    "post-LN": (False, True),
    "parallel": (True, False),
}


def exact(a, arrangement, mp, add_bias):
    h, r, att, r_add = f64(a["hidden_state"]), f64(a["residual"]), f64(a["attention_output"]), f64(a["residual_add"])
    ab = f64(a["attention_bias"]) if add_bias and a["attention_bias"] is not None else 0
    fb = f64(a["final_bias"]) if a["final_bias"] is not None else 0
    if arrangement == "pre-LN":
        return h + (r + att + ab + fb) / mp
    if arrangement == "post-LN":
        return h + ((r_add if r_add is not None else r) + fb) / mp
    return h + att + (r + fb + ab) / mp


def check(rng, dtype, rows, width, arrangement, mp, with_biases, add_bias, gpu, with_residual_add=True):
    pre, after = ARRANGEMENTS[arrangement]
    cfg = InferenceConfig(
        hidden_size=width,
        heads=mp,
        dtype=dtype,
        pre_layer_norm=pre,
        mlp_after_attn=after,
        mp_size=mp,
        intermediate_size=4 * mp,
    )
    host = {
        "hidden_state": random(rng, (2, rows, width), dtype),
        "residual": random(rng, (2, rows, width), dtype, scale=2.0),
        "attention_output": random(rng, (2, rows, width), dtype),
        "residual_add": (
            random(rng, (2, rows, width), dtype) if with_residual_add and arrangement == "post-LN" else None
        ),
        "attention_bias": random(rng, (width,), dtype) if with_biases else None,
        "final_bias": random(rng, (width,), dtype) if with_biases else None,
    }
    a = on_backend(host, gpu)
    y = ResidualAddOp(cfg)(
        a["hidden_state"],
        a["residual"],
        add_bias,
        a["attention_output"],
        a["residual_add"],
        a["attention_bias"],
        a["final_bias"],
    )
    assert y.shape == (2, rows, width) and y.dtype == dtype
    assert rel_error(y, exact(a, arrangement, mp, add_bias)) < TOL_ROUNDED[numpy.dtype(dtype)]
    assert (host["residual"] == (a["residual"].get() if gpu else a["residual"])).all()  # not updated in place


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("arrangement", list(ARRANGEMENTS))
@pytest.mark.parametrize("mp", [1, 2])
@pytest.mark.parametrize("biases", ["both", "no add_bias", "none"])
def test_numpy_path(rng, dtype, arrangement, mp, biases):
    check(
        rng,
        dtype,
        rows=5,
        width=100,
        arrangement=arrangement,
        mp=mp,
        with_biases=biases != "none",
        add_bias=biases == "both",
        gpu=False,
    )
    if arrangement == "post-LN":
        check(
            rng,
            dtype,
            rows=1,
            width=96,
            arrangement=arrangement,
            mp=mp,
            with_biases=True,
            add_bias=True,
            gpu=False,
            with_residual_add=False,
        )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("arrangement", list(ARRANGEMENTS))
@pytest.mark.parametrize("width", GPU_WIDTHS + [1001, 3])  # 1001: runs crossing rows, a tail; 3: under a run
@pytest.mark.parametrize("rows", GPU_ROWS)
def test_gpu(rng, poisoned_allocations, dtype, arrangement, width, rows):
    mp = 2 if width % 2 == 0 else 1  # the config needs heads (= mp here) to divide the width
    check(rng, dtype, rows, width, arrangement, mp, with_biases=True, add_bias=True, gpu=True)
    check(rng, dtype, rows, width, arrangement, mp=1, with_biases=False, add_bias=False, gpu=True)


@pytest.mark.gpu
def test_gpu_in_place_through_out(rng):
    import cupy

    cfg = InferenceConfig(hidden_size=64, heads=4, dtype=numpy.float32)
    h, r, a = (cupy.asarray(random(rng, (3, 64), numpy.float32)) for _ in range(3))
    expected = (h + r + a).get()
    y = ResidualAddOp(cfg)(h, r, add_bias=False, attention_output=a, out=r)
    assert y is r and rel_error(r, expected) < 1e-6


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gpu_misaligned_views(rng, dtype):
    """A view that starts off 16-byte alignment takes one element an access, for every term."""
    import cupy

    cfg = InferenceConfig(hidden_size=1001, heads=1, dtype=dtype)
    host = [random(rng, shape, dtype) for shape in ((3, 1001), (3, 1001), (3, 1001), (1001,))]
    h, r, a, b = (cupy.asarray(x) for x in host)
    r_view = cupy.empty(r.size + 8, dtype)[1 : 1 + r.size].reshape(r.shape)
    r_view[...] = r
    out = cupy.full(r.shape, numpy.nan, dtype)
    y = ResidualAddOp(cfg)(h, r_view, add_bias=False, attention_output=a, final_bias=b, out=out)
    h, r, a, b = (x.astype(numpy.float64) for x in host)
    assert y is out and rel_error(y, h + r + a + b) < TOL_ROUNDED[numpy.dtype(dtype)]


def test_bad_input(rng):
    cfg = InferenceConfig(hidden_size=64, heads=4, dtype=numpy.float32)
    h = numpy.ones((2, 3, 64), numpy.float32)
    op = ResidualAddOp(cfg)
    with pytest.raises(ValueError, match=r"attention_output: needed for pre-LN and parallel layers; got None"):
        op(h, h, False)
    with pytest.raises(ValueError, match=r"residual: expected shape \(2, 3, 64\); got \(2, 3, 63\)"):
        op(h, h[..., :63].copy(), False, h)
    with pytest.raises(ValueError, match=r"final_bias: expected shape \(64,\); got \(63,\)"):
        op(h, h, False, h, final_bias=numpy.ones(63, numpy.float32))
    with pytest.raises(TypeError, match=r"hidden_state: expected dtype float32; got float16"):
        op(h.astype(numpy.float16), h, False, h)
