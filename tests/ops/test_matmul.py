"""ops.matmul: the GEMV kernel for up to 8 rows (both layouts, split-K or not, epilogue), cuBLAS beyond."""


import numpy
import pytest

from cupy_transformer.ops import ActivationType
import cupy_transformer.ops.matmul as mm
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import random, rel_error
from tests.ops.common import TOL, act as exact_act, dense, f64, on_backend, weight

EPILOGUES = [None, ActivationType.GELU, ActivationType.ReLU, ActivationType.GELU_EXACT]


def check(rng, dtype, rows, k, n, transposed, with_bias, act, gpu):
    """ops.matmul (NumPy: the reference; GPU: cuBLAS + bias_act) and, where it applies, the GEMV kernel."""
    host = {"x": random(rng, (rows, k), dtype), "w": weight(rng, k, n, dtype, transposed),
            "bias": random(rng, (n,), dtype) if with_bias else None}
    a = on_backend(host, gpu)
    z = f64(a["x"]) @ dense(f64(a["w"]), transposed) + (f64(a["bias"]) if with_bias else 0)
    exact = z if act is None else exact_act(z, act)
    results = [mm.matmul(a["x"], a["w"], transposed, a["bias"], act)]
    if gpu and rows <= mm.GEMV_MAX_ROWS and mm.gemv_fits(a["x"], a["w"], transposed, a["bias"], act):
        results.append(mm.gemv(a["x"], a["w"], transposed, a["bias"], act))
    for y in results:
        assert y.shape == (rows, n) and y.dtype == dtype
        assert rel_error(y, exact) < TOL[numpy.dtype(dtype)]
    return a, results[-1]


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("act", EPILOGUES, ids=lambda a: getattr(a, "name", "none"))
def test_numpy_path(rng, dtype, transposed, act):
    check(rng, dtype, 3, 40, 24, transposed, True, act, gpu=False)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("rows", [1, 2, 3, 5, 8, 9])
@pytest.mark.parametrize(
    "k, n", [(64, 40), (1600, 6400), (4096, 4096 + 8), (11008, 1000), (2072, 520), (768, 1001)], ids=str
)
def test_gpu_shapes(rng, poisoned_allocations, dtype, transposed, rows, k, n):
    # (64, 40): one split, a partial tile; (11008, 1000): many splits; (2072, 520): splits that are not whole
    # block steps and a last split ending in half a chunk (with 132 SMs, [in, out]: splits of 144 k, the last
    # of 56: 16 and 24 k into a chunk pair); n = 1001 with [in, out] weights is not a whole
    # number of 16-byte vectors, and 9 rows are too many: cuBLAS only.
    check(rng, dtype, rows, k, n, transposed, True, None, gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("act", EPILOGUES, ids=lambda a: getattr(a, "name", "none"))
def test_gpu_epilogue(rng, poisoned_allocations, dtype, transposed, act):
    check(rng, dtype, 4, 1000, 1600, transposed, True, act, gpu=True)
    check(rng, dtype, 1, 1000, 1600, transposed, False, act, gpu=True)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_gpu_misaligned_input_view(rng, dtype):
    """A contiguous x that starts 2-4 bytes off alignment: cuBLASLt must pick an algorithm that allows it."""
    import cupy

    x = random(rng, (16, 1000), dtype)
    w = weight(rng, 1000, 520, dtype, False)
    b = random(rng, (520,), dtype)
    xd = cupy.empty(x.size + 1, dtype)[1:].reshape(x.shape)
    xd[...] = cupy.asarray(x)
    assert xd.data.ptr % 16 != 0
    y = mm.matmul(xd, cupy.asarray(w), False, cupy.asarray(b), ActivationType.GELU)
    exact = exact_act(x.astype(numpy.float64) @ w.astype(numpy.float64) + b.astype(numpy.float64), ActivationType.GELU)
    assert rel_error(y, exact) < TOL[numpy.dtype(dtype)]


@pytest.mark.gpu
def test_gpu_split_k_is_deterministic_and_resets(rng):
    """The split sum is added in a fixed order, and the tile counters are left at zero for the next call."""
    a, y = check(rng, numpy.float16, 2, 8192, 512, False, True, ActivationType.GELU, gpu=True)
    for _ in range(3):
        again = mm.gemv(a["x"], a["w"], False, a["bias"], ActivationType.GELU)
        assert (again == y).all()


@pytest.mark.gpu
@pytest.mark.parametrize("transposed", [False, True], ids=["[in,out]", "[out,in]"])
@pytest.mark.parametrize("choices", ["gemv gemv", "cublas gemv", "gemv cublas", "cublas cublas", "untimed"])
def test_gpu_captured_decode_step_takes_the_graph_choice(rng, monkeypatch, transposed, choices):
    """Under stream capture ops.matmul records what the shape's first eager call found faster in a graph (the
    GEMV where nothing was timed); the eager call before the capture, whatever it ran, leaves the stream ready
    for it; the replayed graph computes the product of whatever the input buffer holds at replay time,
    through cuBLASLt's epilogue as through the GEMV's."""
    import cupy
    from cupy_transformer.runtime import timing

    eager_choice, graph_choice = ("cublas", "gemv") if choices == "untimed" else choices.split()
    monkeypatch.setattr(mm, "_GEMV_FASTER", {})
    monkeypatch.setattr(mm, "_CAPTURE_READY", set())
    monkeypatch.setattr(timing, "fastest", lambda runs, graph=False: int((graph_choice if graph else eager_choice)
                                                                         == "cublas"))
    monkeypatch.setattr(timing, "TUNE", choices != "untimed")
    ran = []
    for name in ("gemv", "_cublas"):
        monkeypatch.setattr(mm, name, lambda *a, f=getattr(mm, name), n=name, **k: ran.append(n) or f(*a, **k))
    host = {"x": random(rng, (2, 4096), numpy.float16), "w": weight(rng, 4096, 1024, numpy.float16, transposed),
            "bias": random(rng, (1024,), numpy.float16)}
    a = on_backend(host, gpu=True)
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        mm.matmul(a["x"], a["w"], transposed, a["bias"], ActivationType.GELU)  # warm: kernels, pool, workspaces
        assert ran == ["_cublas" if eager_choice == "cublas" else "gemv"]
        ran.clear()
        stream.begin_capture()
        y = mm.matmul(a["x"], a["w"], transposed, a["bias"], ActivationType.GELU)
        graph = stream.end_capture()
        a["x"][...] = cupy.asarray(random(rng, (2, 4096), numpy.float16))
        graph.launch()
    stream.synchronize()
    assert ran == ["_cublas" if graph_choice == "cublas" else "gemv"]
    exact = exact_act(f64(a["x"]) @ dense(f64(a["w"]), transposed) + f64(a["bias"]), ActivationType.GELU)
    assert rel_error(y, exact) < TOL[numpy.dtype(numpy.float16)]


@pytest.mark.gpu
def test_gpu_captured_graph_outlives_a_larger_workspace(rng):
    """A larger split launch on a stream grows the split workspace; a graph captured there before still
    writes the old one when replayed, so it is kept, not freed (freed, the pool would hand it to the next
    arrays of its size, and the replay would write over them)."""
    import cupy
    from cupy_transformer.runtime.kernels import split_workspace

    host = {"x": random(rng, (2, 4096), numpy.float16), "w": weight(rng, 4096, 1024, numpy.float16, False)}
    a = on_backend(host, gpu=True)
    assert mm.gemv_k_per_split(4096, 1024 // 32, 16, 2) < 4096  # the launch splits K: it uses the workspace
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        mm.gemv(a["x"], a["w"], False)  # warm: kernels, pool, workspace
        stream.begin_capture()
        y = mm.gemv(a["x"], a["w"], False)
        graph = stream.end_capture()
        sizes = [w.size for w in split_workspace(0, 0)]
        grown = split_workspace(4 * sizes[0], 4 * sizes[1])  # as a larger launch would
        assert all(w.size >= 4 * n for w, n in zip(grown, sizes))
        fillers = [cupy.full(n, 7, dtype) for n, dtype in zip(sizes, (cupy.float32, cupy.int32))]
        a["x"][...] = cupy.asarray(random(rng, (2, 4096), numpy.float16))
        graph.launch()
    stream.synchronize()
    assert all(bool((f == 7).all()) for f in fillers)
    assert rel_error(y, f64(a["x"]) @ f64(a["w"])) < TOL[numpy.dtype(numpy.float16)]


@pytest.mark.gpu
def test_gpu_split_workspace_does_not_grow_during_capture(rng):
    """The first split launch on a stream, made while capturing: the workspace cannot be made and zeroed
    there (a captured memset runs only at replay), so it raises, naming what to do."""
    import cupy

    a = on_backend({"x": random(rng, (2, 4096), numpy.float16),
                    "w": weight(rng, 4096, 1024, numpy.float16, False)}, gpu=True)
    mm.gemv(a["x"], a["w"], False)  # compiled: only the new stream's workspace is missing below
    stream = cupy.cuda.Stream(non_blocking=True)
    with stream:
        stream.begin_capture()
        try:
            with pytest.raises(RuntimeError, match="run the step once on this stream before capturing"):
                mm.gemv(a["x"], a["w"], False)
        finally:
            stream.end_capture()


@pytest.mark.gpu
def test_gpu_cublaslt_plan_cache_evicts(rng, monkeypatch):
    """Row counts vary call to call (prompt lengths): old cuBLASLt plans are destroyed, results stay right."""
    from cupy_transformer.runtime import cublaslt

    monkeypatch.setattr(cublaslt.PLANS, "size", 2)
    for _ in range(2):
        for rows in (3, 17, 64, 130):
            check(rng, numpy.float16, rows, 256, 96, False, True, ActivationType.ReLU, gpu=True)
    assert len(cublaslt.PLANS) <= 2


@pytest.mark.gpu
@pytest.mark.parametrize("tune", [True, False], ids=["tuned", "first-pick"])
def test_gpu_cublaslt_tuning_keeps_one_algorithm(rng, monkeypatch, tune):
    """A prefill-size plan times the heuristic's candidates on its first call and keeps one; every call,
    tuning or not, returns the right product (tuning runs the product several times into the same output)."""
    from cupy_transformer.runtime import cublaslt, timing

    monkeypatch.setattr(timing, "TUNE", tune)
    cublaslt.PLANS.clear()
    for _ in range(2):
        check(rng, numpy.float16, cublaslt.TUNE_MIN_ROWS + 3, 320, 136, False, True, ActivationType.GELU, gpu=True)
    (plan,) = cublaslt.PLANS.values()
    assert len(plan.candidates) == 1
    plan.destroy()


@pytest.mark.gpu
@pytest.mark.parametrize("gemv_wins", [True, False], ids=["gemv", "cublas"])
def test_gpu_eager_decode_product_keeps_the_faster(rng, monkeypatch, gemv_wins):
    """The first eager call of a decode shape times the GEMV against cuBLAS once eagerly and once as CUDA
    graphs, and eager calls keep the eager choice; either is right."""
    from cupy_transformer.runtime import timing

    timed = []
    monkeypatch.setattr(mm, "_GEMV_FASTER", {})
    monkeypatch.setattr(timing, "fastest", lambda runs, graph=False: timed.append((len(runs), graph))
                        or (0 if gemv_wins != graph else 1))
    for _ in range(2):
        check(rng, numpy.float16, 3, 320, 136, True, True, ActivationType.GELU, gpu=True)
    assert timed == [(2, False), (2, True)] and list(mm._GEMV_FASTER.values()) == [(gemv_wins, not gemv_wins)]


@pytest.mark.gpu
def test_gpu_no_tuning_keeps_cublas_for_eager_decode(rng, monkeypatch):
    from cupy_transformer.runtime import timing

    monkeypatch.setattr(timing, "TUNE", False)
    monkeypatch.setattr(mm, "_GEMV_FASTER", {})
    check(rng, numpy.float16, 3, 320, 136, True, True, ActivationType.GELU, gpu=True)
    assert mm._GEMV_FASTER == {}


def test_nk_geometry_holds_the_tiles_in_one_wave(monkeypatch):
    """[out, in]: fine tiles while coarse ones would leave SMs idle (at 1 block a SM for rows of K <= 3072),
    coarse at 3 blocks a SM where 2 would leave a second, partial wave, else coarse at 2 (132 SMs)."""
    monkeypatch.setattr(mm, "sm_count", lambda: 132)
    geometry = {n: mm._nk_geometry(n, 4096) for n in (4096, 4232, 6400, 8448, 8480, 11008, 12672, 12704, 16384)}
    assert geometry == {4096: (1, 1, 2), 4232: (2, 1, 2), 6400: (2, 1, 2), 8448: (2, 1, 2), 8480: (2, 1, 3),
                        11008: (2, 1, 3), 12672: (2, 1, 3), 12704: (2, 1, 2), 16384: (2, 1, 2)}
    short = {(n, k): mm._nk_geometry(n, k) for n in (256, 2048, 4232, 11008) for k in (768, 3072, 3080)}
    assert short == {(256, 768): (1, 4, 1), (256, 3072): (1, 4, 1), (256, 3080): (1, 1, 2),
                     (2048, 768): (1, 4, 1), (2048, 3072): (1, 4, 1), (2048, 3080): (1, 1, 2),
                     (4232, 768): (2, 1, 2), (4232, 3072): (2, 1, 2), (4232, 3080): (2, 1, 2),
                     (11008, 768): (2, 1, 3), (11008, 3072): (2, 1, 3), (11008, 3080): (2, 1, 3)}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [t for t in FLOAT_DTYPES if numpy.dtype(t).itemsize == 2], ids=str)
@pytest.mark.parametrize("rows", [1, 8])
def test_gpu_nk_at_three_blocks_a_sm(rng, poisoned_allocations, dtype, rows):
    """[out, in] with a width whose coarse tiles take 3 blocks a SM for one wave, the last tile partial."""
    from cupy_transformer.runtime.kernels import sm_count

    n = 32 * (2 * sm_count() + 8) + 8
    assert mm._nk_geometry(n, 520)[2] == 3
    check(rng, dtype, rows, 520, n, True, True, ActivationType.GELU, gpu=True)


def test_kn_chunks_a_batch_shares_chunks_evenly():
    # A split's 16-k chunks go in batches to 8 warps in turn: 4 a batch unless 2 leave the busiest warp less.
    assert mm._kn_chunks_a_batch(1600) == 2  # 100 chunks: 14 chunk-times at 2, 16 at 4
    assert mm._kn_chunks_a_batch(1280) == 2  # 80: 10 against 12
    assert mm._kn_chunks_a_batch(64) == 2  # 4 chunks: two warps with 2 each rather than one with 4
    assert [mm._kn_chunks_a_batch(k) for k in (320, 2048, 5504)] == [4, 4, 4]  # ties take 4
