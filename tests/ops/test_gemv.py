"""ops.gemv: gemv.cu's kernels for up to 16 rows (fp32: 8; both layouts, split-K or not, epilogue) and their
geometry."""

import numpy
import pytest

from cupy_transformer.ops import ActivationType
from cupy_transformer.ops.gemv import GEMV_MAX_ROWS, gemv, gemv_fits, gemv_k_per_split, kn_chunks_a_batch, nk_geometry
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import TOL_CHAINED, TOL_ROUNDED, random, rel_error, side_stream
from tests.ops.common import act as exact_act
from tests.ops.common import dense, f64, on_backend, weight

EPILOGUES = [None, ActivationType.GELU, ActivationType.ReLU, ActivationType.GELU_EXACT]


def check(rng, dtype, rows, k, n, transposed, with_bias, act):
    """The GEMV kernel against float64 math where it applies (``gemv_fits``, up to 16 rows, fp32 8); returns the
    arrays and its result (None where it does not apply: ops.matmul runs cuBLAS there, test_matmul)."""
    host = {
        "x": random(rng, (rows, k), dtype),
        "w": weight(rng, k, n, dtype, transposed),
        "bias": random(rng, (n,), dtype) if with_bias else None,
    }
    a = on_backend(host, gpu=True)
    if rows > GEMV_MAX_ROWS or not gemv_fits(a["x"], a["w"], transposed, a["bias"], act):
        return a, None
    z = f64(a["x"]) @ dense(f64(a["w"]), transposed) + (f64(a["bias"]) if with_bias else 0)
    exact = z if act is None else exact_act(z, act)
    y = gemv(a["x"], a["w"], transposed, a["bias"], act)
    assert y.shape == (rows, n) and y.dtype == dtype
    assert rel_error(y, exact) < TOL_CHAINED[numpy.dtype(dtype)]
    return a, y


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 13, 16])
@pytest.mark.parametrize(
    "k, n", [(64, 40), (1600, 6400), (4096, 4096 + 8), (11008, 1000), (2072, 520), (768, 1001)], ids=str
)
def test_gpu_shapes(rng, poisoned_allocations, dtype, transposed, rows, k, n):
    # (64, 40): one split, a partial tile; (11008, 1000): many splits; (2072, 520): splits that are not whole
    # block steps and a last split ending in half a chunk (with 132 SMs, [in, out]: splits of 144 k, the last
    # of 56: 16 and 24 k into a chunk pair); n = 1001 with [in, out] weights is not a whole number of 16-byte
    # vectors: no GEMV (test_matmul's test_gpu_shapes runs every shape, and 17 rows, through ops.matmul). 9-16 rows
    # (fp16 / bf16): the kernels with x rows g and g + 8 a lane (X8 = 2); fp32 runs the FMA kernels up to 8.
    check(rng, dtype, rows, k, n, transposed, with_bias=True, act=None)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("act", EPILOGUES, ids=lambda a: getattr(a, "name", "none"))
def test_gpu_epilogue(rng, poisoned_allocations, dtype, transposed, act):
    check(rng, dtype, 4, 1000, 1600, transposed, with_bias=True, act=act)
    check(rng, dtype, 1, 1000, 1600, transposed, with_bias=False, act=act)


@pytest.mark.gpu
def test_gpu_small_decode_products(rng, poisoned_allocations):
    """The decode products test_matmul's timing and plan-cache tests run through ops.matmul."""
    _, y = check(rng, numpy.float16, 3, 320, 136, transposed=True, with_bias=True, act=ActivationType.GELU)
    assert y is not None
    _, y = check(rng, numpy.float16, 3, 256, 96, transposed=False, with_bias=True, act=ActivationType.ReLU)
    assert y is not None


@pytest.mark.gpu
def test_gpu_split_k_is_deterministic_and_resets(rng):
    """The split sum is added in a fixed order, and the tile counters are left at zero for the next call."""
    a, y = check(rng, numpy.float16, 2, 8192, 512, transposed=False, with_bias=True, act=ActivationType.GELU)
    for _ in range(3):
        again = gemv(a["x"], a["w"], transposed=False, bias=a["bias"], act=ActivationType.GELU)
        assert (again == y).all()


@pytest.mark.gpu
def test_gpu_captured_graph_outlives_a_larger_workspace(rng):
    """A larger split launch on a stream grows the split workspace; a graph captured there before still
    writes the old one when replayed, so it is kept, not freed (freed, the pool would hand it to the next
    arrays of its size, and the replay would write over them)."""
    import cupy

    from cupy_transformer.runtime.kernels import sm_count, split_workspace

    host = {"x": random(rng, (2, 4096), numpy.float16), "w": weight(rng, 4096, 1024, numpy.float16, transposed=False)}
    a = on_backend(host, gpu=True)
    assert gemv_k_per_split(4096, 1024 // 32, 16, 2, sm_count()) < 4096  # the launch splits K: it uses the workspace
    stream = side_stream()
    with stream:
        gemv(a["x"], a["w"], transposed=False)  # warm: kernels, pool, workspace
        stream.begin_capture()
        y = gemv(a["x"], a["w"], transposed=False)
        graph = stream.end_capture()
        sizes = [w.size for w in split_workspace(0, 0)]
        grown = split_workspace(4 * sizes[0], 4 * sizes[1])  # as a larger launch would
        assert all(w.size >= 4 * n for w, n in zip(grown, sizes))
        fillers = [cupy.full(n, 7, dtype) for n, dtype in zip(sizes, (cupy.float32, cupy.int32))]
        a["x"][...] = cupy.asarray(random(rng, (2, 4096), numpy.float16))
        graph.launch()
    stream.synchronize()
    assert all(bool((f == 7).all()) for f in fillers)
    assert rel_error(y, f64(a["x"]) @ f64(a["w"])) < TOL_CHAINED[numpy.dtype(numpy.float16)]


@pytest.mark.gpu
def test_gpu_split_workspace_does_not_grow_during_capture(rng):
    """The first split launch on a stream, made while capturing: the workspace cannot be made and zeroed
    there (a captured memset runs only at replay), so it raises, naming what to do."""
    a = on_backend(
        {"x": random(rng, (2, 4096), numpy.float16), "w": weight(rng, 4096, 1024, numpy.float16, transposed=False)},
        gpu=True,
    )
    gemv(a["x"], a["w"], transposed=False)  # compiled: only the new stream's workspace is missing below
    stream = side_stream()
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(RuntimeError, match="run the step once on this stream before capturing"):
                gemv(a["x"], a["w"], transposed=False)
        finally:
            stream.end_capture()


def test_nk_geometry_holds_the_tiles_in_one_wave():
    """[out, in]: fine tiles at 1 block a SM while coarse ones would leave SMs idle and rows are of K <= 3072 (at any
    width for K 2048-3072 and up to 8 rows of x),
    coarse at 3 blocks a SM where 2 would leave a second, partial wave or where rows of K <= 1024 fill more than one
    wave at 3 (not for 9-16 rows of x), else coarse at 2 (132 SMs)."""
    geometry = {n: nk_geometry(n, 4096, sms=132) for n in (4096, 4232, 6400, 8448, 8480, 11008, 12672, 12704, 16384)}
    assert geometry == {
        4096: (2, 1, 2),
        4232: (2, 1, 2),
        6400: (2, 1, 2),
        8448: (2, 1, 2),
        8480: (2, 1, 3),
        11008: (2, 1, 3),
        12672: (2, 1, 3),
        12704: (2, 1, 2),
        16384: (2, 1, 2),
    }
    short = {(n, k): nk_geometry(n, k, sms=132) for n in (256, 2048, 4232, 11008) for k in (768, 3072, 3080)}
    assert short == {
        (256, 768): (1, 4, 1),
        (256, 3072): (1, 4, 1),
        (256, 3080): (2, 1, 2),
        (2048, 768): (1, 4, 1),
        (2048, 3072): (1, 4, 1),
        (2048, 3080): (2, 1, 2),
        (4232, 768): (2, 1, 2),
        (4232, 3072): (1, 4, 1),
        (4232, 3080): (2, 1, 2),
        (11008, 768): (2, 1, 3),
        (11008, 3072): (1, 4, 1),
        (11008, 3080): (2, 1, 3),
    }
    assert nk_geometry(11008, 4096, 132, rows=8) == (2, 1, 3) and nk_geometry(11008, 4096, 132, rows=9) == (2, 1, 2)
    vocab = {(n, k): nk_geometry(n, k, sms=132) for n in (12704, 12736, 50257) for k in (768, 1024, 1032)}
    assert vocab == {
        (12704, 768): (2, 1, 3),  # 397 tiles: past one wave at 3 a SM
        (12704, 1024): (2, 1, 3),
        (12704, 1032): (2, 1, 2),
        (12736, 768): (2, 1, 3),
        (12736, 1024): (2, 1, 3),
        (12736, 1032): (2, 1, 2),
        (50257, 768): (2, 1, 3),  # GPT-2 small's LM head
        (50257, 1024): (2, 1, 3),
        (50257, 1032): (2, 1, 2),
    }
    assert nk_geometry(50257, 768, 132, rows=9) == (2, 1, 2)
    wide = {(n, k): nk_geometry(n, k, sms=132) for n in (16384, 128256) for k in (2040, 2048, 3072, 3080)}
    assert wide == {
        (16384, 2040): (2, 1, 2),
        (16384, 2048): (1, 4, 1),  # LLaMA-1B's up|gate
        (16384, 3072): (1, 4, 1),
        (16384, 3080): (2, 1, 2),
        (128256, 2040): (2, 1, 2),
        (128256, 2048): (1, 4, 1),  # its LM head
        (128256, 3072): (1, 4, 1),
        (128256, 3080): (2, 1, 2),
    }
    assert nk_geometry(16384, 2048, 132, rows=9) == (2, 1, 2)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [t for t in FLOAT_DTYPES if numpy.dtype(t).itemsize == 2], ids=str)
@pytest.mark.parametrize("rows", [1, 8, 16])
def test_gpu_nk_at_three_blocks_a_sm(rng, poisoned_allocations, dtype, rows):
    """[out, in] with a width whose coarse tiles take 3 blocks a SM for one wave, the last tile partial (16 rows: at
    2 a SM)."""
    from cupy_transformer.runtime.kernels import sm_count

    n = 32 * (2 * sm_count() + 8) + 8
    assert nk_geometry(n, 520, sm_count())[2] == 3
    assert check(rng, dtype, rows, 520, n, transposed=True, with_bias=True, act=ActivationType.GELU)[1] is not None


def test_kn_chunks_a_batch_shares_chunks_evenly():
    # A split's 16-k chunks go in batches to 8 warps in turn: 4 a batch unless 2 leave the busiest warp less.
    assert kn_chunks_a_batch(1600) == 2  # 100 chunks: 14 chunk-times at 2, 16 at 4
    assert kn_chunks_a_batch(1280) == 2  # 80: 10 against 12
    assert kn_chunks_a_batch(64) == 2  # 4 chunks: two warps with 2 each rather than one with 4
    assert [kn_chunks_a_batch(k) for k in (320, 2048, 5504)] == [4, 4, 4]  # ties take 4


# ---- The fused GEMV: the norm as its prologue, the residual add as its epilogue ----

NORM_MODES = ["layer_norm", "layer_norm_no_beta", "rms_norm"]
HALF_DTYPES = [t for t in FLOAT_DTYPES if numpy.dtype(t).itemsize == 2]


def norm_inputs(rng, dtype, rows, k, n, transposed, mode, with_bias):
    """x, W, bias and a GemvNorm (gamma around 1, beta around 0: random, never trivial) on the host."""
    from cupy_transformer.ops.gemv import GemvNorm

    x = random(rng, (rows, k), dtype, scale=2.0, offset=0.5)
    norm = GemvNorm(
        mode,
        random(rng, (k,), dtype, scale=0.2, offset=1.0),
        random(rng, (k,), dtype, scale=0.2) if mode == "layer_norm" else None,
        1e-5,
    )
    return x, weight(rng, k, n, dtype, transposed), random(rng, (n,), dtype) if with_bias else None, norm


def test_fused_reference_is_the_float64_math(rng):
    """matmul_reference's norm= and residual= against float64 formulas written apart from ops.norm (tests.ops.common):
    the normalised row rounded to the dtype, the product; round(residual + x @ W + bias)."""
    from cupy_transformer.ops.matmul import matmul_reference
    from tests.ops.common import layer_norm, rms_norm

    for dtype in FLOAT_DTYPES:
        for mode in NORM_MODES:
            x, w, bias, norm = norm_inputs(rng, dtype, 3, 72, 40, False, mode, with_bias=True)
            g, b = f64(norm.gamma), f64(norm.beta)
            xn = rms_norm(f64(x), g, norm.eps) if mode == "rms_norm" else layer_norm(f64(x), g, b, norm.eps)
            got = matmul_reference(x, w, False, bias, ActivationType.GELU, norm=norm)
            want = exact_act(f64(xn.astype(dtype)) @ f64(w) + f64(bias), ActivationType.GELU)
            assert got.dtype == dtype and rel_error(got, want) < TOL_CHAINED[numpy.dtype(dtype)], (dtype, mode)
        x, w, bias, _ = norm_inputs(rng, dtype, 3, 72, 40, True, "rms_norm", with_bias=True)
        r = random(rng, (3, 40), dtype)
        got = matmul_reference(x, w, True, bias, residual=r)
        want = f64(r) + f64(x) @ f64(w).T + f64(bias)
        # one rounding of the float64 sum
        assert got.dtype == dtype and rel_error(got, want) < TOL_ROUNDED[numpy.dtype(dtype)]


def test_prologue_fits_bounds_shared_memory_and_slots():
    """The fused norm falls back (the caller normalises first) where the block's normalised rows pass
    PROLOGUE_SHARED_BYTES or the row passes NORM_MAX_SLOTS (the prologue sums a slot a lane over at most 32 warps),
    past NORM_MAX_ROWS rows, and for fp32."""
    from cupy_transformer.ops.gemv import PROLOGUE_SHARED_BYTES, prologue_fits, prologue_stride

    assert prologue_stride(1600) == 1632 and prologue_stride(2048) == 2080 and prologue_stride(16) == 96
    assert all(prologue_stride(k) * 2 % 128 == 64 for k in (16, 768, 1000, 4096))  # rows in distinct banks
    assert prologue_fits(8, 2048, 2048, 2)  # LLaMA-1B, one split: 8 x 2080 x 2 bytes
    assert 8 * prologue_stride(2048) * 2 <= PROLOGUE_SHARED_BYTES < 8 * prologue_stride(2304) * 2
    assert not prologue_fits(8, 2304, 2304, 2) and prologue_fits(7, 2304, 2304, 2)
    assert prologue_fits(8, 4096, 1024, 2) and not prologue_fits(8, 4096, 4096, 2) and prologue_fits(1, 4096, 4096, 2)
    assert prologue_fits(1, 8192, 2048, 2) and not prologue_fits(1, 8200, 2048, 2)  # 1025 slots
    assert not prologue_fits(1, 64, 64, 4)  # fp32: the FMA kernels have no prologue
    assert prologue_fits(8, 64, 64, 2) and not prologue_fits(9, 64, 64, 2)  # up to NORM_MAX_ROWS


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("mode", NORM_MODES)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("k", [776, 1600, 4104])
def test_gpu_norm_prologue(rng, poisoned_allocations, dtype, transposed, mode, rows, k):
    """gemv(x, norm=NORM) against the reference (NORM in float64, rounded; the product in float64, rounded), and
    within a rounding of norm.cu's kernel followed by the plain GEMV (the prologue's one pass over shifted values
    against that kernel's two passes; the fused kernel accumulates as the plain one at the same geometry). Rows of
    a mean 64 times their spread (the third case) would lose the variance to cancellation without the shift.
    K = 776, 4104: not multiples of the 32-k chunks or of a warp's 32 slots; N = 1032: a partial tile."""
    from cupy_transformer.ops.gemv import gemv_fused_fits
    from cupy_transformer.ops.matmul import matmul_reference
    from cupy_transformer.ops.norm import normalize

    n = 1032
    for with_bias, act, offset in ((True, ActivationType.GELU, 0), (False, None, 0), (True, None, 64)):
        x, w, bias, norm = norm_inputs(rng, dtype, rows, k, n, transposed, mode, with_bias)
        x = (x.astype(numpy.float32) + offset).astype(dtype)
        a = on_backend({"x": x, "w": w, "bias": bias, "gamma": norm.gamma, "beta": norm.beta}, gpu=True)
        gpu_norm = norm._replace(gamma=a["gamma"], beta=a["beta"])
        assert gemv_fits(a["x"], a["w"], transposed, a["bias"], act)
        assert gemv_fused_fits(a["x"], a["w"], transposed, a["bias"], act, norm=gpu_norm)
        y = gemv(a["x"], a["w"], transposed, a["bias"], act, norm=gpu_norm)
        assert y.shape == (rows, n) and y.dtype == dtype
        want = matmul_reference(x, w, transposed, bias, act, norm=norm)
        assert rel_error(y, want) < TOL_CHAINED[numpy.dtype(dtype)]
        # Beside norm.cu's kernel + the plain GEMV: the same values' code, the statistics summed otherwise: within
        # a rounding of the output.
        xn = normalize(mode, a["x"], a["gamma"], a["beta"], norm.eps)
        unfused = gemv(xn, a["w"], transposed, a["bias"], act)
        assert rel_error(y, unfused) < TOL_ROUNDED[numpy.dtype(dtype)], "the fused norm is not norm.cu's + the GEMV"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("rows", [1, 3, 8, 11, 16])
@pytest.mark.parametrize("k", [776, 1600, 4104])
def test_gpu_residual_epilogue(rng, poisoned_allocations, dtype, transposed, rows, k):
    """gemv(x, residual=r) = round(r + (x @ W + bias)) against the float64 reference, r unchanged; with r = 0 to the
    bit the plain GEMV's round(x @ W + bias) (the same fp32 sum, then the one rounding)."""
    from cupy_transformer.ops.gemv import gemv_fused_fits
    from cupy_transformer.ops.matmul import matmul_reference

    n = 1032
    for with_bias in (True, False):
        x, w, bias, _ = norm_inputs(rng, dtype, rows, k, n, transposed, "rms_norm", with_bias)
        r = random(rng, (rows, n), dtype, scale=4.0)
        a = on_backend({"x": x, "w": w, "bias": bias, "r": r, "zero": numpy.zeros((rows, n), dtype)}, gpu=True)
        assert gemv_fused_fits(a["x"], a["w"], transposed, a["bias"], residual=a["r"])
        assert not gemv_fused_fits(a["x"], a["w"], transposed, a["bias"], ActivationType.GELU, residual=a["r"])
        y = gemv(a["x"], a["w"], transposed, a["bias"], residual=a["r"])
        assert y.shape == (rows, n) and y.dtype == dtype
        assert bool((a["r"].get() == r).all())  # only read
        assert rel_error(y, matmul_reference(x, w, transposed, bias, residual=r)) < TOL_CHAINED[numpy.dtype(dtype)]
        zero_added = gemv(a["x"], a["w"], transposed, a["bias"], residual=a["zero"])
        assert bool((zero_added == gemv(a["x"], a["w"], transposed, a["bias"])).all())


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
def test_gpu_fused_calls_replay_as_captured(rng, transposed):
    """A norm-prologue call and a residual-epilogue call captured in a CUDA graph (programmatic launches, as a decode
    step runs them) and replayed give the eager calls' bits, for new inputs written into the captured arrays."""
    import cupy

    from cupy_transformer.runtime.programmatic import programmatic_launches

    dtype, rows, k, n = numpy.float16, 3, 1600, 1032
    x, w, bias, norm = norm_inputs(rng, dtype, rows, k, n, transposed, "layer_norm", True)
    a = on_backend({"x": x, "w": w, "bias": bias, "gamma": norm.gamma, "beta": norm.beta}, gpu=True)
    gpu_norm = norm._replace(gamma=a["gamma"], beta=a["beta"])
    w2 = cupy.asarray(weight(rng, n, k, dtype, transposed))

    def step():
        h = gemv(a["x"], a["w"], transposed, a["bias"], ActivationType.GELU, norm=gpu_norm)
        return gemv(h, w2, transposed, residual=a["x"])

    stream = side_stream()
    with stream, programmatic_launches():
        step()  # warm: kernels, the stream's split workspace
        stream.begin_capture()
        captured = step()
        graph = stream.end_capture()
        a["x"][...] = cupy.asarray(random(rng, (rows, k), dtype, scale=2.0, offset=0.5))
        graph.launch()
        eager = step()
    stream.synchronize()
    assert bool(cupy.isfinite(captured).all()) and bool((captured == eager).all())


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("k", [776, 4104])
def test_gpu_early_weights_change_nothing(rng, poisoned_allocations, transposed, k):
    """A block that loads its first weights before it waits (and before the norm prologue) gives the bits of one
    that loads them after, for the plain, norm-prologue and residual-epilogue kernels, eagerly and captured with
    programmatic launches (where the early loads overlap the kernel before). K 776 (1032 columns, short K splits): a
    batch past the split's end; K 4104 (6400 columns, one split): more than ``EARLY_WEIGHTS_K``, where
    the launcher loads late."""
    import cupy

    from cupy_transformer.ops.gemv import EARLY_WEIGHTS_K, _launch_plan
    from cupy_transformer.runtime.programmatic import programmatic_launches

    dtype, rows, n = numpy.float16, 3, 1032 if k == 776 else 6400
    x, w, bias, norm = norm_inputs(rng, dtype, rows, k, n, transposed, "layer_norm", True)
    a = on_backend({"x": x, "w": w, "bias": bias, "gamma": norm.gamma, "beta": norm.beta}, gpu=True)
    gpu_norm = norm._replace(gamma=a["gamma"], beta=a["beta"])
    r = cupy.asarray(random(rng, (rows, n), dtype, scale=4.0))
    per_split = _launch_plan(a["x"], a["w"], transposed, make_workspace=False)[2]
    assert (per_split <= EARLY_WEIGHTS_K) == (k == 776)  # the launcher's own choice: early at 776, late at 4104

    def products(early):
        return [
            gemv(a["x"], a["w"], transposed, a["bias"], early=early),
            gemv(a["x"], a["w"], transposed, a["bias"], ActivationType.GELU, norm=gpu_norm, early=early),
            gemv(a["x"], a["w"], transposed, a["bias"], residual=r, early=early),
        ]

    late = products(False)
    for y in late:
        assert bool(cupy.isfinite(y).all())
    for y, want in zip(products(True), late):
        assert bool((y == want).all())
    stream = side_stream()
    with stream, programmatic_launches():
        products(True)  # warm: the stream's split workspace
        stream.begin_capture()
        captured = products(True) + products(False)
        graph = stream.end_capture()
        for y in captured:
            y.fill(numpy.nan)
        graph.launch()
    stream.synchronize()
    for y, want in zip(captured, late + late):
        assert bool((y == want).all())


@pytest.mark.gpu
def test_gpu_matmul_fused_outside_a_graph_or_unfit_is_an_error(rng):
    """ops.matmul takes norm= / residual= only where the fused GEMV runs (graph products, fp16/bf16, <= 16 rows)."""
    from cupy_transformer import ops
    from cupy_transformer.ops.matmul import fused_fits, matmul

    x, w, bias, norm = norm_inputs(rng, numpy.float16, 17, 64, 40, False, "rms_norm", True)
    a = on_backend({"x": x, "w": w, "gamma": norm.gamma}, gpu=True)
    gpu_norm = norm._replace(gamma=a["gamma"])
    assert not fused_fits(a["x"][:2], a["w"], False, norm=gpu_norm)  # eager, not under graph_choices
    with ops.graph_choices():
        assert fused_fits(a["x"][:2], a["w"], False, norm=gpu_norm)
        assert not fused_fits(a["x"], a["w"], False, norm=gpu_norm)  # 17 rows
        with pytest.raises(ValueError, match="fused_fits"):
            matmul(a["x"], a["w"], False, norm=gpu_norm)


# ---- The gated activation in the [out, in] epilogue ----


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("act", [ActivationType.GATED_SILU, ActivationType.GATED_GELU], ids=lambda a: a.name)
@pytest.mark.parametrize("rows", [1, 3, 8, 11, 16])
@pytest.mark.parametrize("k, half", [(776, 1032), (4104, 520), (2048, 8192)], ids=str)
def test_gpu_gated_epilogue(rng, poisoned_allocations, dtype, act, rows, k, half):
    """gemv with a gated act on [out, in] weights of [up | gate] rows ([2 half, K]): y [rows, half] = up * act(gate),
    to the bit the plain GEMV followed by bias_act (the same sums; bias_act's math from the rounded product), and
    against the float64 reference; with and without a bias, and with the norm prologue (up to 8 rows) beside the
    fused-norm GEMV followed by bias_act. (776, 1032): one split; (4104, 520): 8 K splits and a half tile of
    32-row tiles; (2048, 8192): LLaMA-1B's up|gate product."""
    from cupy_transformer.ops.bias_act import apply_bias_act
    from cupy_transformer.ops.gemv import gemv_fused_fits
    from cupy_transformer.ops.matmul import matmul_reference

    n = 2 * half
    for with_bias in (True, False):
        x, w, bias, norm = norm_inputs(rng, dtype, rows, k, n, True, "rms_norm", with_bias)
        a = on_backend({"x": x, "w": w, "bias": bias, "gamma": norm.gamma}, gpu=True)
        assert gemv_fits(a["x"], a["w"], True, a["bias"], act)
        y = gemv(a["x"], a["w"], True, a["bias"], act)
        assert y.shape == (rows, half) and y.dtype == dtype
        assert bool((y == apply_bias_act(gemv(a["x"], a["w"], True), a["bias"], act)).all())
        assert rel_error(y, matmul_reference(x, w, True, bias, act)) < TOL_CHAINED[numpy.dtype(dtype)]
        gpu_norm = norm._replace(gamma=a["gamma"])
        if rows <= 8 and gemv_fused_fits(a["x"], a["w"], True, a["bias"], act, norm=gpu_norm):
            y = gemv(a["x"], a["w"], True, a["bias"], act, norm=gpu_norm)
            unfused = apply_bias_act(gemv(a["x"], a["w"], True, norm=gpu_norm), a["bias"], act)
            assert y.shape == (rows, half) and bool((y == unfused).all())
            want = matmul_reference(x, w, True, bias, act, norm=norm)
            assert rel_error(y, want) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.gpu
def test_gpu_gated_epilogue_where_it_runs(rng, monkeypatch):
    """The gated epilogue takes fp16 / bf16 [out, in] weights whose halves are whole 8-output pieces; ops.matmul
    applies it in a graph's products (graph_choices), not with the decode fusions off (the product, then bias_act)
    and not eagerly, whose result it gives to the bit where the eager product ran the GEMV."""
    from cupy_transformer import ops
    from cupy_transformer.ops import matmul as matmul_module
    from cupy_transformer.ops.matmul import matmul

    silu = ActivationType.GATED_SILU
    x, w, bias, _ = norm_inputs(rng, numpy.float16, 4, 1024, 2064, True, "rms_norm", True)
    a = on_backend({"x": x, "w": w, "bias": bias, "x32": x.astype(numpy.float32)}, gpu=True)
    assert gemv_fits(a["x"], a["w"], True, a["bias"], silu)
    assert not gemv_fits(a["x"], a["w"].T, False, a["bias"], silu)  # [in, out]
    assert not gemv_fits(a["x"], a["w"][:2056], True, None, silu)  # halves of 1028 outputs
    assert not gemv_fits(a["x32"], a["w"].astype(numpy.float32), True, None, silu)  # fp32: the FMA kernels
    acts, plain_gemv = [], matmul_module.gemv

    def recording(x, w, transposed, bias=None, act=None, **kwargs):
        acts.append(act)
        return plain_gemv(x, w, transposed, bias, act, **kwargs)

    monkeypatch.setattr(matmul_module, "gemv", recording)
    eager = matmul(a["x"][None], a["w"], True, a["bias"], silu)
    assert silu not in acts
    with ops.graph_choices():
        graph = matmul(a["x"][None], a["w"], True, a["bias"], silu)
        assert acts[-1] == silu and graph.shape == (1, 4, 1032)
        with ops.fused_decode(False):
            unfused = matmul(a["x"][None], a["w"], True, a["bias"], silu)
            assert acts[-1] is None and bool((unfused == graph).all())
    if matmul_module.gemv_choice(a["x"], a["w"], True):  # the eager product ran the GEMV: the same sums
        assert bool((graph == eager).all())
    else:
        assert rel_error(graph, eager) < TOL_CHAINED[numpy.dtype(numpy.float16)]


# ---- Greedy's argmax in the [out, in] epilogue (an LM head) ----


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", HALF_DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 3, 8])
@pytest.mark.parametrize("k, n", [(768, 50257), (2048, 20011)], ids=str)
@pytest.mark.parametrize("with_norm", [False, True], ids=["plain", "norm"])
def test_gpu_argmax_epilogue(rng, poisoned_allocations, dtype, rows, k, n, with_norm):
    """gemv(argmax=best) leaves in best[r] the key of row r's first maximum of the product the same GEMV writes
    (rounded to the dtype; the same sums), found by the sampler's greedy kernel too: its index, and its value's
    order key in the high bits; with a bias, and with the norm prologue. A maximum made twice (a weight row copied
    to an earlier row in another tile) gives the earlier index. N 50257 (GPT-2's LM head) and 20011: tiles past
    the last row and one K split."""
    import cupy

    from cupy_transformer.ops.decode_state import argmax_index
    from cupy_transformer.ops.gemv import gemv_argmax_fits
    from cupy_transformer.ops.sampling import sample_tokens

    x, w, bias, norm = norm_inputs(rng, dtype, rows, k, n, True, "layer_norm", with_bias=True)

    def product():
        a = on_backend({"x": x, "w": w, "bias": bias, "gamma": norm.gamma, "beta": norm.beta}, gpu=True)
        gpu_norm = norm._replace(gamma=a["gamma"], beta=a["beta"]) if with_norm else None
        assert gemv_argmax_fits(a["x"], a["w"], True, norm=gpu_norm)
        return a, gpu_norm, gemv(a["x"], a["w"], True, a["bias"], norm=gpu_norm)

    a, gpu_norm, y = product()
    first = int(numpy.argmax(y.get()[0].astype(numpy.float32)))
    if first > 64:  # the maximum again, earlier, in another tile: the first index wins
        w[first // 2], bias[first // 2] = w[first], bias[first]
        a, gpu_norm, y = product()
        assert y.get()[0, first // 2] == y.get()[0, first]
    want = cupy.zeros(rows, cupy.int32)
    sample_tokens(y, want, cupy.zeros(2, cupy.uint64))  # greedy_tokens over the written product
    best = cupy.zeros(rows, cupy.uint64)
    assert gemv(a["x"], a["w"], True, a["bias"], norm=gpu_norm, argmax=best) is None
    got = argmax_index(best.get())
    assert got.tolist() == want.get().tolist()
    assert first <= 64 or got[0] == first // 2
    values = y.get().astype(numpy.float32)[numpy.arange(rows), got]
    assert (values == y.get().astype(numpy.float32).max(axis=1)).all()


@pytest.mark.gpu
def test_gpu_argmax_fits_an_lm_heads_shapes_only(rng):
    """gemv_argmax_fits: fp16 / bf16 [out, in] weights, up to 8 rows, no activation, one K split (GPT-2's LM head
    has it; 64 outputs split their K over the idle SMs: not). gemv refuses what the kernel cannot take before it
    launches: several K splits, a key array of another dtype or length, an activation."""
    from cupy_transformer.ops.gemv import gemv_argmax_fits

    x, w, _, _ = norm_inputs(rng, numpy.float16, 8, 768, 50257, True, "layer_norm", with_bias=False)
    a = on_backend({"x": x, "w": w, "x9": numpy.concatenate([x, x[:1]])}, gpu=True)
    assert gemv_argmax_fits(a["x"], a["w"], True)
    assert not gemv_argmax_fits(a["x9"], a["w"], True)
    assert not gemv_argmax_fits(a["x"], a["w"].T, False)
    assert not gemv_argmax_fits(a["x"], a["w"], True, act=ActivationType.GELU)
    assert not gemv_argmax_fits(a["x"], a["w"][:64], True)
    assert not gemv_argmax_fits(a["x"].astype(numpy.float32), a["w"].astype(numpy.float32), True)
    best = a["x"][0, :8].astype(numpy.uint64) * 0
    with pytest.raises(ValueError, match="argmax: the product takes one K split"):
        gemv(a["x"], a["w"][:64], True, argmax=best)
    with pytest.raises(ValueError, match=r"argmax: expected a uint64 array of shape \(8,\); got int32 \(8,\)"):
        gemv(a["x"], a["w"], True, argmax=best.astype(numpy.int32))
    with pytest.raises(ValueError, match="no activation or residual"):
        gemv(a["x"], a["w"], True, act=ActivationType.GELU, argmax=best)
    assert not best.any()  # nothing ran
