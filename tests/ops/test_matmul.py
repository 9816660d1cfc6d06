"""ops.matmul: the product dispatch (the GEMV kernel where it timed faster, cuBLASLt otherwise; NumPy: the
reference) and the LM head ``lm_logits``. gemv.cu's kernels themselves: test_gemv."""

import numpy
import pytest

import cupy_transformer.ops.matmul as mm
from cupy_transformer import ops
from cupy_transformer.ops import ActivationType
from cupy_transformer.runtime.arrays import FLOAT_DTYPES, cpu_float32
from tests.helpers import TOL_CHAINED, random, rel_error, side_stream
from tests.ops.common import act as exact_act
from tests.ops.common import dense, f64, on_backend, weight

EPILOGUES = [None, ActivationType.GELU, ActivationType.ReLU, ActivationType.GELU_EXACT]


@pytest.fixture
def fresh_choices():
    """No timed GEMV/cuBLAS choice before the test, and none of its (faked) ones after it."""
    mm.forget_choices()
    yield
    mm.forget_choices()


def check(rng, dtype, rows, k, n, transposed, with_bias, act, gpu):
    """ops.matmul (NumPy: the reference; GPU: the GEMV or cuBLAS, as timed) against float64 math."""
    host = {
        "x": random(rng, (rows, k), dtype),
        "w": weight(rng, k, n, dtype, transposed),
        "bias": random(rng, (n,), dtype) if with_bias else None,
    }
    a = on_backend(host, gpu)
    z = f64(a["x"]) @ dense(f64(a["w"]), transposed) + (f64(a["bias"]) if with_bias else 0)
    exact = z if act is None else exact_act(z, act)
    y = mm.matmul(a["x"], a["w"], transposed, a["bias"], act)
    assert y.shape == (rows, n) and y.dtype == dtype
    assert rel_error(y, exact) < TOL_CHAINED[numpy.dtype(dtype)]
    return a


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("act", EPILOGUES, ids=lambda a: getattr(a, "name", "none"))
def test_numpy_path(rng, dtype, transposed, act):
    check(rng, dtype, 3, 40, 24, transposed, with_bias=True, act=act, gpu=False)


def test_decode_switches_hold_for_the_thread_that_sets_them():
    # A decoder in another thread (a simulated rank, a server's request) with its fusions off or its graph
    # choices on steers only its own products.
    import threading

    seen = []

    def other():
        with ops.fused_decode(False), ops.graph_choices():
            seen.append((mm.fusing(), mm._GRAPH_CHOICES.value()))
            inside.set()
            leave.wait(10)

    inside, leave = threading.Event(), threading.Event()
    thread = threading.Thread(target=other)
    thread.start()
    inside.wait(10)
    here = (mm.fusing(), mm._GRAPH_CHOICES.value())
    leave.set()
    thread.join(10)
    assert seen == [(False, True)] and here == (True, False)


@pytest.mark.parametrize(
    "fusion", ["plain", "bias+GELU", "gated", "residual", "norm"], ids=lambda f: f.replace("+", " ")
)
def test_cpu_float32_products_are_blas_float32_products(rng, fusion):
    """Inside ``cpu_float32`` a float32 NumPy product is BLAS's (not the reference's float64 product, to the
    bit), within float32's chained tolerance of it, whatever the epilogue or prologue; float16 ones and any product
    outside it stay the reference, bit for bit."""
    k, n = 96, 40
    x, w = random(rng, (3, k), numpy.float32), weight(rng, k, n, numpy.float32, transposed=True)
    kwargs = {
        "plain": {},
        "bias+GELU": {"bias": random(rng, (n,), numpy.float32), "act": ActivationType.GELU_EXACT},
        "gated": {"bias": random(rng, (n,), numpy.float32), "act": ActivationType.GATED_SILU},
        "residual": {"bias": random(rng, (n,), numpy.float32), "residual": random(rng, (3, n), numpy.float32)},
        "norm": {"norm": mm.GemvNorm("rms_norm", random(rng, (k,), numpy.float32), None, 1e-5)},
    }[fusion]
    want = mm.matmul_reference(x, w, True, **kwargs)
    with cpu_float32():
        got = mm.matmul(x, w, True, **kwargs)
        half = [a.astype(numpy.float16) for a in (x, w)]
        assert numpy.array_equal(mm.matmul(*half, True), mm.matmul_reference(*half, True))
    assert got.shape == want.shape and got.dtype == numpy.float32
    assert rel_error(got, want) < TOL_CHAINED[numpy.dtype(numpy.float32)]
    assert not numpy.array_equal(got, want)  # BLAS's product, not the reference's
    assert numpy.array_equal(mm.matmul(x, w, True, **kwargs), want)  # outside it: the reference again


@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
def test_cpu_float32_products_of_few_rows_are_each_rows_own(rng, transposed):
    """Inside ``cpu_float32`` a product of up to ``ROW_PRODUCTS`` rows is each row's product alone, to the bit, and
    one of more rows is one BLAS product."""
    k, n = 200, 72
    w = weight(rng, k, n, numpy.float32, transposed)
    bias = random(rng, (n,), numpy.float32)
    with cpu_float32():
        for rows in range(1, mm.ROW_PRODUCTS + 3):
            x = random(rng, (rows, k), numpy.float32)
            got = mm.matmul(x, w, transposed, bias, ActivationType.GELU)
            alone = numpy.concatenate(
                [mm.matmul(x[r : r + 1], w, transposed, bias, ActivationType.GELU) for r in range(rows)]
            )
            one = mm.matmul_reference(x, w, transposed, bias, ActivationType.GELU)  # rounding aside, the same values
            assert rel_error(got, one) < TOL_CHAINED[numpy.dtype(numpy.float32)]
            if rows <= mm.ROW_PRODUCTS:
                assert numpy.array_equal(got, alone)
            else:
                product = x @ (w.T if transposed else w)
                assert numpy.array_equal(got, mm.apply_bias_act(product, bias, ActivationType.GELU, out=product))


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("lead", [(5,), (2, 3)], ids=["[tokens,hidden]", "[B,S,hidden]"])
def test_lm_logits_numpy_path(rng, dtype, lead):
    """x @ weight.T for a [vocab, hidden] weight, against float64 NumPy."""
    x, w = random(rng, lead + (48,), dtype), weight(rng, 48, 136, dtype, transposed=True)
    y = ops.lm_logits(x, w)
    assert isinstance(y, numpy.ndarray) and y.shape == lead + (136,) and y.dtype == dtype
    assert rel_error(y, x.astype(numpy.float64) @ w.astype(numpy.float64).T) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("rows", [1, 7, 512])
def test_gpu_lm_logits(rng, dtype, rows):
    import cupy

    x, w = random(rng, (rows, 1600), dtype), weight(rng, 1600, 5000, dtype, transposed=True)
    y = ops.lm_logits(cupy.asarray(x), cupy.asarray(w))
    assert isinstance(y, cupy.ndarray) and y.shape == (rows, 5000) and y.dtype == dtype
    assert rel_error(y, x.astype(numpy.float64) @ w.astype(numpy.float64).T) < TOL_CHAINED[numpy.dtype(dtype)]


def test_lm_logits_bad_input():
    x, w = numpy.ones((2, 64), numpy.float32), numpy.ones((100, 64), numpy.float32)
    with pytest.raises(
        ValueError,
        match=r"weight: expected a \[out, in\] \(transposed_mode\) weight whose "
        r"in-dimension matches the input width 64; got shape \(64, 100\)",
    ):
        ops.lm_logits(x, w.T.copy())
    with pytest.raises(TypeError, match=r"weight: expected dtype float32; got float16"):
        ops.lm_logits(x, w.astype(numpy.float16))


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9, 16, 17])
@pytest.mark.parametrize(
    "k, n", [(64, 40), (1600, 6400), (4096, 4096 + 8), (11008, 1000), (2072, 520), (768, 1001)], ids=str
)
def test_gpu_shapes(rng, poisoned_allocations, dtype, transposed, rows, k, n):
    # test_gemv's shapes through the dispatch: n = 1001 with [in, out] weights is not a whole number of 16-byte
    # vectors, and 17 rows are too many (fp32: 9): cuBLAS only.
    check(rng, dtype, rows, k, n, transposed, with_bias=True, act=None, gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("act", EPILOGUES, ids=lambda a: getattr(a, "name", "none"))
def test_gpu_epilogue(rng, poisoned_allocations, dtype, transposed, act):
    check(rng, dtype, 4, 1000, 1600, transposed, with_bias=True, act=act, gpu=True)
    check(rng, dtype, 1, 1000, 1600, transposed, with_bias=False, act=act, gpu=True)


@pytest.mark.gpu
def test_gpu_gemv_geometries_through_the_dispatch(rng, poisoned_allocations):
    """test_gemv's split-K and 3-blocks-a-SM products through ops.matmul."""
    from cupy_transformer.runtime.kernels import sm_count

    check(rng, numpy.float16, 2, 8192, 512, transposed=False, with_bias=True, act=ActivationType.GELU, gpu=True)
    for dtype in [t for t in FLOAT_DTYPES if numpy.dtype(t).itemsize == 2]:
        for rows in (1, 8, 16):
            check(
                rng,
                dtype,
                rows,
                520,
                32 * (2 * sm_count() + 8) + 8,
                transposed=True,
                with_bias=True,
                act=ActivationType.GELU,
                gpu=True,
            )


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gpu_misaligned_input_view(rng, dtype):
    """A contiguous x that starts 2-4 bytes off alignment: cuBLASLt must pick an algorithm that allows it."""
    import cupy

    x = random(rng, (16, 1000), dtype)
    w = weight(rng, 1000, 520, dtype, transposed=False)
    b = random(rng, (520,), dtype)
    xd = cupy.empty(x.size + 1, dtype)[1:].reshape(x.shape)
    xd[...] = cupy.asarray(x)
    assert xd.data.ptr % 16 != 0
    y = mm.matmul(xd, cupy.asarray(w), transposed=False, bias=cupy.asarray(b), act=ActivationType.GELU)
    exact = exact_act(x.astype(numpy.float64) @ w.astype(numpy.float64) + b.astype(numpy.float64), ActivationType.GELU)
    assert rel_error(y, exact) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("eager_choice", ["gemv", "cublas", "untimed"])
def test_gpu_captured_decode_step_runs_the_gemv(rng, monkeypatch, fresh_choices, transposed, eager_choice):
    """Under stream capture ops.matmul runs the GEMV, whatever the shape's first eager call chose (or with nothing
    timed); that eager call leaves the stream ready for it (the GEMV's split workspace); the replayed graph computes
    the product of whatever the input buffer holds at replay time."""
    import cupy

    from cupy_transformer.runtime import timing

    timed = []
    monkeypatch.setattr(timing, "fastest", lambda runs: timed.append(len(runs)) or int(eager_choice == "cublas"))
    monkeypatch.setattr(timing, "TUNE", eager_choice != "untimed")
    host = {
        "x": random(rng, (2, 4096), numpy.float16),
        "w": weight(rng, 4096, 1024, numpy.float16, transposed),
        "bias": random(rng, (1024,), numpy.float16),
    }
    a = on_backend(host, gpu=True)
    stream = side_stream()
    with stream:
        mm.matmul(a["x"], a["w"], transposed, a["bias"], ActivationType.GELU)  # warm: kernels, pool, workspaces
        assert mm.last_path == {"untimed": "cublas"}.get(eager_choice, eager_choice)
        stream.begin_capture()
        y = mm.matmul(a["x"], a["w"], transposed, a["bias"], ActivationType.GELU)
        graph = stream.end_capture()
        a["x"][...] = cupy.asarray(random(rng, (2, 4096), numpy.float16))
        graph.launch()
    stream.synchronize()
    assert mm.last_path == "gemv" and timed == ([] if eager_choice == "untimed" else [2])
    exact = exact_act(f64(a["x"]) @ dense(f64(a["w"]), transposed) + f64(a["bias"]), ActivationType.GELU)
    assert rel_error(y, exact) < TOL_CHAINED[numpy.dtype(numpy.float16)]


@pytest.mark.gpu
def test_gpu_cublaslt_plan_cache_evicts(rng, monkeypatch):
    """Row counts vary call to call (prompt lengths): old cuBLASLt plans are destroyed, results stay right."""
    from cupy_transformer.runtime import cublaslt

    monkeypatch.setattr(cublaslt.PLANS, "size", 2)
    for _ in range(2):
        for rows in (3, 17, 64, 130):
            check(
                rng, numpy.float16, rows, 256, 96, transposed=False, with_bias=True, act=ActivationType.ReLU, gpu=True
            )
    assert len(cublaslt.PLANS) <= 2


@pytest.mark.gpu
@pytest.mark.parametrize("tune", [True, False], ids=["tuned", "first-pick"])
def test_gpu_cublaslt_tuning_keeps_one_algorithm(rng, monkeypatch, tune):
    """A prefill-size plan times the heuristic's candidates on its first call and keeps one; every call,
    tuning or not, returns the right product (tuning runs the product several times into the same output)."""
    from cupy_transformer.runtime import cublaslt, timing

    monkeypatch.setattr(timing, "TUNE", tune)
    from cupy_transformer.runtime.lru import DeviceLRU

    monkeypatch.setattr(cublaslt, "PLANS", DeviceLRU(256, drop=cublaslt.PLANS.drop))  # this test's plan alone
    for _ in range(2):
        check(
            rng,
            numpy.float16,
            cublaslt.TUNE_MIN_ROWS + 3,
            320,
            136,
            transposed=False,
            with_bias=True,
            act=ActivationType.GELU,
            gpu=True,
        )
    (plan,) = cublaslt.PLANS.values()
    assert len(plan.candidates) == 1
    plan.destroy()


@pytest.mark.gpu
@pytest.mark.parametrize("gemv_wins", [True, False], ids=["gemv", "cublas"])
def test_gpu_eager_decode_product_keeps_the_faster(rng, monkeypatch, fresh_choices, gemv_wins):
    """The first eager call of a decode shape times the GEMV against cuBLAS once, eagerly, and eager calls keep
    that choice; either is right. Under ``graph_choices`` the GEMV runs, as in a graph."""
    from cupy_transformer.runtime import timing

    timed = []
    monkeypatch.setattr(timing, "fastest", lambda runs: timed.append(len(runs)) or (0 if gemv_wins else 1))
    for _ in range(2):
        a = check(rng, numpy.float16, 3, 320, 136, transposed=True, with_bias=True, act=ActivationType.GELU, gpu=True)
        assert mm.last_path == ("gemv" if gemv_wins else "cublas")
    assert timed == [2]
    assert mm.gemv_choice(a["x"], a["w"], transposed=True, bias=a["bias"], act=ActivationType.GELU) == gemv_wins
    with mm.graph_choices():
        check(rng, numpy.float16, 3, 320, 136, transposed=True, with_bias=True, act=ActivationType.GELU, gpu=True)
    assert mm.last_path == "gemv" and len(timed) == 1


@pytest.mark.gpu
def test_gpu_no_tuning_keeps_cublas_for_eager_decode(rng, monkeypatch, fresh_choices):
    from cupy_transformer.runtime import timing

    monkeypatch.setattr(timing, "TUNE", False)
    a = check(rng, numpy.float16, 3, 320, 136, transposed=True, with_bias=True, act=ActivationType.GELU, gpu=True)
    assert mm.last_path == "cublas"
    assert mm.gemv_choice(a["x"], a["w"], transposed=True, bias=a["bias"], act=ActivationType.GELU) is None
