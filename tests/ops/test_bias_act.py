"""bias_act: bias + every activation (gated halves too), NumPy and GPU, aligned and not."""

import math

import numpy
import pytest

from cupy_transformer import ops
from cupy_transformer.ops import ActivationType
from cupy_transformer.ops.bias_act import bias_act_reference, erf_float32, gelu_exact_float32
from cupy_transformer.runtime.arrays import FLOAT_DTYPES, cpu_float32
from tests.helpers import TOL_ROUNDED, random, rel_error
from tests.ops.common import f64, mlp_act, on_backend

ACTS = [None] + list(ActivationType)


def check(rng, dtype, shape, act, with_bias, gpu):
    host = {"h": random(rng, shape, dtype, scale=2.0), "bias": random(rng, shape[-1:], dtype) if with_bias else None}
    a = on_backend(host, gpu)
    y = ops.bias_act(a["h"], a["bias"], act)
    z = f64(a["h"]) + (f64(a["bias"]) if with_bias else 0)
    exact = z if act is None else mlp_act(z, act)
    assert y.dtype == dtype and y.shape == exact.shape
    # Gated: act(gate) is rounded before the product (one more rounding than the plain forms).
    assert rel_error(y, exact) < 2 * TOL_ROUNDED[numpy.dtype(dtype)]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=lambda a: getattr(a, "name", "identity"))
def test_numpy_path(rng, dtype, act):
    check(rng, dtype, (3, 5, 64), act, with_bias=True, gpu=False)
    check(rng, dtype, (7, 30), act, with_bias=False, gpu=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("act", ACTS, ids=lambda a: getattr(a, "name", "identity"))
# (3, 1002): 16-byte runs crossing rows, a tail; (9, 6): rows narrower than a run (gated: one element at a time).
@pytest.mark.parametrize("shape", [(1, 16), (7, 1000), (512, 4104), (3, 1002), (5, 37 * 2), (9, 6)], ids=str)
def test_gpu(rng, poisoned_allocations, dtype, act, shape):
    check(rng, dtype, shape, act, with_bias=True, gpu=True)
    check(rng, dtype, shape, act, with_bias=False, gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("offsets", [(1, 1, 0), (0, 0, 3)], ids=["h and out misaligned", "bias misaligned"])
def test_gpu_misaligned_views(rng, dtype, offsets):
    """Views that start off 16-byte alignment take one element an access."""
    import cupy

    h, bias = random(rng, (5, 1002), dtype, scale=2.0), random(rng, (1002,), dtype)

    def view(host, offset):
        a = cupy.empty(host.size + 8, dtype)[offset : offset + host.size].reshape(host.shape)
        a[...] = cupy.asarray(host)
        return a

    hd, out, bd = (view(a, o) for a, o in zip((h, h, bias), offsets))
    assert [a.data.ptr % 16 != 0 for a in (hd, out, bd)] == [o != 0 for o in offsets]
    out[...] = numpy.nan
    y = ops.bias_act(hd, bd, "GELU", out=out)
    assert rel_error(y, mlp_act(f64(h) + f64(bias), ActivationType.GELU)) < 2 * TOL_ROUNDED[numpy.dtype(dtype)]


@pytest.mark.gpu
def test_gpu_in_place(rng):
    import cupy

    h = cupy.asarray(random(rng, (4, 1000), numpy.float16))
    expected = ops.bias_act(h.get(), None, "GELU")
    assert ops.bias_act(h, None, "GELU", out=h) is h
    assert rel_error(h, expected) < 1e-3


def test_bad_input():
    h = numpy.ones((2, 8), numpy.float32)
    with pytest.raises(
        ValueError, match=r"h: a gated activation needs \[up \| gate\] halves, an even last dimension; got 7"
    ):
        ops.bias_act(h[:, :7].copy(), None, "GATED_SILU")
    with pytest.raises(
        ValueError, match=r"activation: expected one of GELU, ReLU, GATED_GELU, GATED_SILU, GELU_EXACT; got 'tanh'"
    ):
        ops.bias_act(h, None, "tanh")
    with pytest.raises(ValueError, match=r"bias: expected shape \(8,\); got \(4,\)"):
        ops.bias_act(h, numpy.ones(4, numpy.float32), "ReLU")
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 4\); got \(2, 8\)"):
        ops.bias_act(h, None, "GATED_GELU", out=h)


def test_float32_erf_matches_math_erf(rng):
    x = numpy.concatenate([rng.standard_normal(20000) * 3, numpy.linspace(-8, 8, 2001)]).astype(numpy.float32)
    assert numpy.abs(erf_float32(x) - numpy.vectorize(math.erf)(x.astype(numpy.float64))).max() < 5e-7


def test_float32_gelu_matches_math_gelu(rng):
    """The CPU's float32 GELU (the rational erf with the 1/2 taken into its numerator) against x Phi(x) in float64:
    within 1e-6 of max(1, |gelu|), as float32 passes allow."""
    x = numpy.concatenate([rng.standard_normal(20000) * 3, numpy.linspace(-8, 8, 2001)]).astype(numpy.float32)
    x64 = x.astype(numpy.float64)
    want = x64 * (1 + numpy.vectorize(math.erf)(x64 / math.sqrt(2))) / 2
    assert (numpy.abs(gelu_exact_float32(x) - want) <= 1e-6 * numpy.maximum(1, numpy.abs(want))).all()


@pytest.mark.parametrize("act", list(ActivationType), ids=lambda a: a.name)
def test_float32_reference_inside_cpu_float32(rng, act):
    """Inside ``cpu_float32`` float32 arrays' bias + activation is computed in float32 (the exact GELUs through
    ``gelu_exact_float32``), within float32's rounded tolerance of the float64 reference; outside it, the reference."""
    h, bias = random(rng, (5, 64), numpy.float32) * 3, random(rng, (64,), numpy.float32)
    want = bias_act_reference(h, bias, act)
    with cpu_float32():
        got = bias_act_reference(h, bias, act)
    assert got.dtype == numpy.float32 and got.shape == want.shape
    assert rel_error(got, want) < TOL_ROUNDED[numpy.dtype(numpy.float32)]
    assert numpy.array_equal(bias_act_reference(h, bias, act), want)
