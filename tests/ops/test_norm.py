"""layer_norm / rms_norm: NumPy path and CUDA path against float64 math; bad input."""

import numpy
import pytest

from cupy_transformer import ops
from cupy_transformer.ops import norm as norm_module
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import TOL_ROUNDED, random, rel_error


def exact_layer_norm(x, gamma, beta, eps):
    x = x.astype(numpy.float64)
    y = (x - x.mean(-1, keepdims=True)) / numpy.sqrt(x.var(-1, keepdims=True) + eps) * gamma.astype(numpy.float64)
    return y if beta is None else y + beta.astype(numpy.float64)


def exact_rms_norm(x, gamma, eps):
    x = x.astype(numpy.float64)
    return x / numpy.sqrt((x * x).mean(-1, keepdims=True) + eps) * gamma.astype(numpy.float64)


def make_inputs(rng, shape, dtype):
    # An offset mean exercises the two-pass variance; gamma/beta away from 1/0 exercise the affine part.
    x = random(rng, shape, dtype, scale=2.0, offset=0.5)
    gamma = random(rng, shape[-1:], dtype, scale=0.5, offset=1.0)
    beta = random(rng, shape[-1:], dtype, scale=0.5)
    return x, gamma, beta


# Widths: 1, odd, a multiple of 8 that is not of the block, DeepSpeed-style sizes, and long rows that take
# the multi-pass path (65544 fp16 = 8193 vectors; 70001 = scalar path beyond registers).
CPU_SHAPES = [(1,), (3, 1), (2, 7), (5, 384), (3, 1000), (2, 3, 1001), (2, 4104)]
# Warp-per-row launches cover 4 rows a block: (5, 384) and (13, 1024) leave a partial block.
# (2, 65536) fp16 and (3, 8191) fill 1024 threads x 8 registers-held vectors.
GPU_SHAPES = CPU_SHAPES + [
    (2, 65536),
    (3, 8191),
    (13, 1024),
    (64, 768),
    (7, 1600),
    (3, 4096 + 8),
    (512, 4095),
    (3, 65544),
    (2, 70001),
    (8192, 4096),
]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", CPU_SHAPES, ids=str)
def test_numpy_path_matches_float64(rng, dtype, shape):
    x, gamma, beta = make_inputs(rng, shape, dtype)
    y = ops.layer_norm(x, gamma, beta, eps=1e-5)
    assert isinstance(y, numpy.ndarray) and y.dtype == dtype and y.shape == x.shape
    assert rel_error(y, exact_layer_norm(x, gamma, beta, 1e-5)) < TOL_ROUNDED[dtype]
    assert rel_error(ops.rms_norm(x, gamma, eps=1e-6), exact_rms_norm(x, gamma, 1e-6)) < TOL_ROUNDED[dtype]
    no_beta = ops.layer_norm(x, gamma, eps=1e-5)
    if shape[-1] == 1:  # a width-1 row normalises to exactly 0
        assert not no_beta.any()
    else:
        assert rel_error(no_beta, exact_layer_norm(x, gamma, None, 1e-5)) < TOL_ROUNDED[dtype]


def test_numpy_path_writes_out(rng):
    x, gamma, beta = make_inputs(rng, (4, 33), numpy.float32)
    out = numpy.full_like(x, numpy.nan)
    y = ops.layer_norm(x, gamma, beta, out=out)
    assert y is out
    assert rel_error(out, exact_layer_norm(x, gamma, beta, 1e-5)) < 1e-5


@pytest.mark.parametrize("rows", [37, 1000])
def test_every_launch_config_is_instantiated(rows):
    names = set(norm_module.NORM_KERNELS.name_expressions)
    placements = [  # (row tensors, per-column vectors): aligned; misaligned alike; x and out apart; gamma off
        ({"x": 0, "out": 256}, {"gamma": 512}),
        ({"x": 2, "out": 514}, {"gamma": 6}),
        ({"x": 4, "out": 8}, {"gamma": 0}),
        ({"x": 0, "out": 256}, {"gamma": 514}),
    ]
    for dtype in FLOAT_DTYPES:
        for width in (1, 7, 8, 64, 127, 384, 1000, 1001, 1024, 1032, 4096, 4095, 8192 * 8, 8193 * 8, 70001):
            for rows_at, params_at in placements:
                name, grid, block, _ = norm_module.launch_config(
                    rows=rows, width=width, dtype=dtype, rows_at=rows_at, params_at=params_at
                )
                assert name in names
                vec, vpt = (int(a) for a in name.split("<")[1].split(",")[1:3])
                threads, rows_per_block = (block + (1,))[:2]
                assert threads % 32 == 0 and 32 <= threads * rows_per_block <= 1024
                assert grid[0] * rows_per_block >= rows  # every row has a block or a warp
                if vpt:  # register-held rows: only for aligned placements, and the registers cover the row
                    assert rows_at is placements[0][0] and width % vec == 0 and threads * vpt * vec >= width


# --- bad input: each names the argument ------------------------------------------------------------


def test_bad_dtype():
    with pytest.raises(TypeError, match=r"x: expected dtype float16, float32.*got int32"):
        ops.layer_norm(numpy.ones((2, 8), numpy.int32), numpy.ones(8, numpy.float32))
    with pytest.raises(TypeError, match=r"gamma: expected dtype float16; got float32"):
        ops.layer_norm(numpy.ones((2, 8), numpy.float16), numpy.ones(8, numpy.float32))


def test_bad_rank():
    with pytest.raises(ValueError, match=r"x: expected an array of at least 1 dimension"):
        ops.layer_norm(numpy.array(1.0, numpy.float32), numpy.ones(1, numpy.float32))
    with pytest.raises(ValueError, match=r"gamma: expected shape \(8,\); got \(1, 8\)"):
        ops.rms_norm(numpy.ones((2, 8), numpy.float32), numpy.ones((1, 8), numpy.float32))


def test_mismatched_gamma_and_beta_length():
    x = numpy.ones((2, 8), numpy.float32)
    with pytest.raises(ValueError, match=r"gamma: expected shape \(8,\); got \(7,\)"):
        ops.layer_norm(x, numpy.ones(7, numpy.float32))
    with pytest.raises(ValueError, match=r"beta: expected shape \(8,\); got \(9,\)"):
        ops.layer_norm(x, numpy.ones(8, numpy.float32), numpy.ones(9, numpy.float32))


def test_non_contiguous():
    x = numpy.ones((4, 16), numpy.float32)[:, ::2]
    with pytest.raises(ValueError, match=r"x: expected a C-contiguous array"):
        ops.layer_norm(x, numpy.ones(8, numpy.float32))


def test_bad_eps_and_out_and_empty_width():
    x, g = numpy.ones((2, 8), numpy.float32), numpy.ones(8, numpy.float32)
    for eps in (-1.0, float("nan"), "1e-5", True):
        with pytest.raises(ValueError, match=r"eps: expected a finite number >= 0"):
            ops.layer_norm(x, g, eps=eps)
    with pytest.raises(ValueError, match=r"out: expected shape \(2, 8\); got \(2, 9\)"):
        ops.layer_norm(x, g, out=numpy.empty((2, 9), numpy.float32))
    with pytest.raises(ValueError, match=r"x: expected a last dimension of at least 1"):
        ops.layer_norm(numpy.ones((2, 0), numpy.float32), numpy.ones(0, numpy.float32))


def test_not_an_array():
    with pytest.raises(TypeError, match=r"x: expected a CuPy array, a NumPy array or a CUDA array"):
        ops.layer_norm([[1.0, 2.0]], numpy.ones(2, numpy.float32))


# --- GPU ---------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("shape", GPU_SHAPES, ids=str)
def test_gpu_matches_float64(rng, dtype, shape):
    import cupy

    x, gamma, beta = make_inputs(rng, shape, dtype)
    xd, gd, bd = cupy.asarray(x), cupy.asarray(gamma), cupy.asarray(beta)
    for mode, call, exact in (
        (
            "layer_norm",
            lambda out: ops.layer_norm(xd, gd, bd, eps=1e-5, out=out),
            exact_layer_norm(x, gamma, beta, 1e-5),
        ),
        ("no beta", lambda out: ops.layer_norm(xd, gd, eps=1e-5, out=out), exact_layer_norm(x, gamma, None, 1e-5)),
        ("rms_norm", lambda out: ops.rms_norm(xd, gd, eps=1e-6, out=out), exact_rms_norm(x, gamma, 1e-6)),
    ):
        out = cupy.full(shape, numpy.nan, dtype=dtype)  # poisoned: an unwritten element fails the check
        y = call(out)
        assert y is out
        if shape[-1] == 1 and mode == "no beta":
            assert not cupy.isnan(y).any() and not y.any()  # a width-1 row normalises to exactly 0
            continue
        err = rel_error(y, exact)
        assert err < TOL_ROUNDED[numpy.dtype(dtype)], (mode, err)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("width", [1024, 1001, 70001])
@pytest.mark.parametrize(
    "offsets",  # elements by which x, out, gamma, beta start past a 16-byte boundary
    [(1, 1, 1, 1), (3, 0, 0, 0), (0, 0, 0, 1), (0, 0, 2, 0)],
    ids=["misaligned alike", "misaligned apart", "beta misaligned", "gamma misaligned"],
)
def test_gpu_misaligned_arrays(rng, dtype, width, offsets):
    """Views that start off 16-byte alignment: vector body with element-wise ends, or all element-wise."""
    import cupy

    rows = 5
    x, gamma, beta = make_inputs(rng, (rows, width), dtype)

    def view(host, offset):
        a = cupy.empty(host.size + 8, dtype)[offset : offset + host.size].reshape(host.shape)
        a[...] = cupy.asarray(host)
        return a

    xd, out, gd, bd = (view(a, o) for a, o in zip((x, x, gamma, beta), offsets))
    assert [a.data.ptr % 16 != 0 for a in (xd, out, gd, bd)] == [o != 0 for o in offsets]
    out[...] = numpy.nan
    y = ops.layer_norm(xd, gd, bd, out=out)
    assert rel_error(y, exact_layer_norm(x, gamma, beta, 1e-5)) < TOL_ROUNDED[numpy.dtype(dtype)]
    out[...] = numpy.nan
    y = ops.rms_norm(xd, gd, out=out)
    assert rel_error(y, exact_rms_norm(x, gamma, 1e-6)) < TOL_ROUNDED[numpy.dtype(dtype)]


@pytest.mark.gpu
def test_gpu_empty_batch_and_matches_numpy_path(rng):
    import cupy

    g = cupy.ones(16, cupy.float16)
    assert ops.layer_norm(cupy.empty((0, 16), cupy.float16), g).shape == (0, 16)
    x, gamma, beta = make_inputs(rng, (3, 1000), numpy.float16)
    gpu = ops.rms_norm(cupy.asarray(x), cupy.asarray(gamma)).get()
    cpu = ops.rms_norm(x, gamma)
    # Same math, same roundings: at most one fp16 ulp apart.
    gpu, cpu = gpu.astype(numpy.float32), cpu.astype(numpy.float32)
    assert numpy.max(numpy.abs(gpu - cpu) / numpy.maximum(numpy.abs(cpu), 1e-3)) < 2e-3


@pytest.mark.gpu
def test_gpu_bad_input():
    import cupy

    x, g = cupy.ones((4, 16), cupy.float32), cupy.ones(16, cupy.float32)
    with pytest.raises(ValueError, match=r"x: expected a C-contiguous array"):
        ops.layer_norm(x[:, ::2], g[:8])
    with pytest.raises(ValueError, match=r"out: must not overlap the input x"):
        ops.layer_norm(x, g, out=x)
    with pytest.raises(TypeError, match=r"gamma: expected a GPU array like x; got numpy.ndarray"):
        ops.layer_norm(x, numpy.ones(16, numpy.float32))
    with pytest.raises(TypeError, match=r"gamma: expected dtype float32; got float16"):
        ops.layer_norm(x, g.astype(cupy.float16))


@pytest.mark.gpu
def test_torch_tensors_zero_copy_and_errors(rng):
    torch = pytest.importorskip("torch")

    x, gamma, beta = make_inputs(rng, (6, 1600), numpy.float16)
    xt, gt, bt = (torch.from_numpy(a).cuda() for a in (x, gamma, beta))
    out = torch.full_like(xt, float("nan"))
    y = ops.layer_norm(xt, gt, bt, out=out)
    assert isinstance(y, torch.Tensor) and y.is_cuda and y.dtype == torch.float16
    assert y.data_ptr() == out.data_ptr()  # written in place through DLPack, no copy
    assert rel_error(out, exact_layer_norm(x, gamma, beta, 1e-5)) < 1e-3
    # bf16 tensors travel through DLPack too.
    yb = ops.rms_norm(xt.bfloat16(), gt.bfloat16())
    assert yb.dtype == torch.bfloat16 and rel_error(yb, exact_rms_norm(x, gamma, 1e-6)) < 8e-3

    with pytest.raises(ValueError, match=r"x: expected an array on a CUDA GPU.*torch.Tensor on CPU"):
        ops.layer_norm(xt.cpu(), gt)
    with pytest.raises(ValueError, match=r"x: expected a C-contiguous array"):
        ops.layer_norm(xt.t(), gt)
    with pytest.raises(TypeError, match=r"gamma: expected a GPU array like x; got numpy.ndarray"):
        ops.layer_norm(xt, gamma)


@pytest.mark.gpu
def test_torch_producer_stream_is_ordered(rng):
    """x made by a long torch kernel on a side stream: the op must see its final values."""
    torch = pytest.importorskip("torch")

    side = torch.cuda.Stream()
    base = torch.randn(4096, 4096, device="cuda")
    torch.cuda.synchronize()
    with torch.cuda.stream(side):
        x = base @ base  # long enough that an unordered read would see a stale or partial x
        x = x[:64].contiguous()
        y = ops.layer_norm(x, torch.ones(4096, device="cuda"))
    side.synchronize()
    ref = exact_layer_norm((base[:64] @ base).cpu().numpy(), numpy.ones(4096), None, 1e-5)
    assert rel_error(y, ref) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("width", [384, 1001, 4096, 70001])
@pytest.mark.parametrize("mode", ["layer_norm", "rms_norm"])
def test_gpu_pre_add(rng, poisoned_allocations, dtype, width, mode):
    """normalize(x, residual=r, add_bias=b): z = round(x + r + b) written out, and norm(z)."""
    import cupy

    x, gamma, beta = make_inputs(rng, (6, width), dtype)
    r, b = random(rng, (6, width), dtype), random(rng, (width,), dtype)
    args = [cupy.asarray(a) for a in (x, gamma, beta if mode == "layer_norm" else None, r, b) if a is not None]
    if mode == "layer_norm":
        xd, gd, bd, rd, add = args
    else:
        (xd, gd, rd, add), bd = args, None
    y, z = norm_module.normalize(mode, xd, gd, bd, 1e-5, residual=rd, add_bias=add, want_sum=True)
    exact_z = x.astype(numpy.float64) + r + b.astype(numpy.float64)
    if mode == "layer_norm":
        exact = exact_layer_norm(exact_z, gamma, beta, 1e-5)
    else:
        exact = exact_rms_norm(exact_z, gamma, 1e-5)
    assert rel_error(z, exact_z) < TOL_ROUNDED[numpy.dtype(dtype)]
    assert rel_error(y, exact) < TOL_ROUNDED[numpy.dtype(dtype)]
