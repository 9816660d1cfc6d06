"""The array layer: kinds, checks and error messages (CPU), DLPack import (GPU)."""

import numpy
import pytest

from cupy_transformer.runtime import arrays


class FakeDLPack:
    """Any DLPack producer, reporting the given device (1 = CPU, 2 = CUDA)."""

    def __init__(self, device_type):
        self.device_type = device_type

    def __dlpack__(self, stream=None):
        raise AssertionError("must not be imported")

    def __dlpack_device__(self):
        return (self.device_type, 0)


def test_kinds():
    assert arrays.kind_of("x", numpy.ones(2)) == "numpy"
    assert arrays.kind_of("x", FakeDLPack(2)) == "dlpack"
    with pytest.raises(TypeError, match=r"w: expected a CuPy array, a NumPy array or a CUDA array.*got builtins.list"):
        arrays.kind_of("w", [1.0])


def test_numpy_and_gpu_arrays_do_not_mix():
    assert arrays.common_kind(x=numpy.ones(2), bias=None) == "numpy"
    with pytest.raises(TypeError, match=r"w: expected a NumPy array like x; got .*FakeDLPack"):
        arrays.common_kind(x=numpy.ones(2), w=FakeDLPack(2))
    with pytest.raises(TypeError, match=r"w: expected a GPU array like x; got numpy.ndarray"):
        arrays.common_kind(x=FakeDLPack(2), w=numpy.ones(2))


def test_cpu_dlpack_where_a_gpu_array_is_needed():
    with pytest.raises(ValueError, match=r"x: expected an array on a CUDA GPU .*FakeDLPack on CPU"):
        arrays.as_array("x", FakeDLPack(1), "dlpack")


def test_checks_name_the_argument():
    a = numpy.ones((2, 3), numpy.float32)
    assert arrays.as_array("a", a, "numpy", ndim=2, shape=(-1, 3)) is a
    with pytest.raises(ValueError, match=r"a: expected a 3-D array; got 2-D with shape \(2, 3\)"):
        arrays.as_array("a", a, "numpy", ndim=3)
    with pytest.raises(ValueError, match=r"a: expected shape \(\*, 4\); got \(2, 3\)"):
        arrays.as_array("a", a, "numpy", shape=(-1, 4))
    with pytest.raises(TypeError, match=r"a: expected dtype float16; got float32"):
        arrays.as_array("a", a, "numpy", dtypes=numpy.dtype(numpy.float16))
    with pytest.raises(ValueError, match=r"a: expected a C-contiguous array; got shape \(3, 2\)"):
        arrays.as_array("a", a.T, "numpy")


def test_backends():
    assert [arrays.backend_of(k) for k in ("numpy", "cupy", "torch", "dlpack")] == ["numpy", "cupy", "cupy", "cupy"]
    assert arrays.array_module("numpy") is numpy
    assert arrays.check_backend("backend", "numpy") == "numpy"
    with pytest.raises(ValueError, match=r"backend: expected 'cupy' or 'numpy'; got 'torch'"):
        arrays.check_backend("backend", "torch")


def test_shared_checks_name_the_argument():
    assert arrays.float_dtype("dtype", "float32") == numpy.float32
    with pytest.raises(TypeError, match=r"dtype: expected one of float16, float32.*; got int8"):
        arrays.float_dtype("dtype", numpy.int8)
    with pytest.raises(TypeError, match=r"dtype: expected one of float16, float32.*; got 'fp99'"):
        arrays.float_dtype("dtype", "fp99")
    assert arrays.positive_int("n", numpy.int64(3)) == 3 and type(arrays.positive_int("n", numpy.int64(3))) is int
    for bad in (0, -1, True, 2.0, "2"):
        with pytest.raises(ValueError, match=r"n: expected a positive integer; got "):
            arrays.positive_int("n", bad)
    with pytest.raises(ValueError, match=r"n: expected a positive integer or -1 for the default; got -2"):
        arrays.positive_int("n", -2, alternative="-1 for the default")


@pytest.mark.parametrize("shape", [(1, 1), (1, 200), (200, 1), (64, 64), (100, 130), (130, 257)])
@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32])
def test_transposed_copy_is_the_transpose(shape, dtype):
    # Tiles of 64: shapes on, under and across their edges; random values, so a misplaced tile shows.
    a = numpy.random.default_rng(3).standard_normal(shape).astype(dtype)
    t = arrays.transposed_copy(a)
    assert t.flags.c_contiguous and t.dtype == a.dtype and t.shape == shape[::-1]
    assert numpy.array_equal(t, a.T) and not numpy.shares_memory(t, a)


def test_bfloat16_is_a_float_dtype():
    ml_dtypes = pytest.importorskip("ml_dtypes")
    bf16 = numpy.dtype(ml_dtypes.bfloat16)
    assert bf16 in arrays.FLOAT_DTYPES and arrays.is_float_dtype(bf16)
    assert arrays.float_dtype("dtype", "bfloat16") == bf16
    # Known by name, but in native byte order only, like fp16 and fp32; another ml_dtypes type is refused.
    for bad in (bf16.newbyteorder(">"), numpy.dtype(">f2"), numpy.dtype(ml_dtypes.float8_e4m3fn)):
        assert not arrays.is_float_dtype(bad)
        with pytest.raises(TypeError, match=r"dtype: expected one of float16, float32, bfloat16; got "):
            arrays.float_dtype("dtype", bad)


def test_importing_the_package_leaves_ml_dtypes_unimported():
    # Importing ml_dtypes 0.7 takes over a second on a small CPU; only bf16 needs it. A fresh process imports
    # every module of the package, checks an fp32 array, then asks for bf16 by name (which imports it).
    import subprocess
    import sys

    code = """
import importlib, pkgutil, sys
import numpy
import cupy_transformer
from cupy_transformer.runtime import arrays
for m in pkgutil.walk_packages(cupy_transformer.__path__, "cupy_transformer."):
    if ".interop." not in m.name:  # those import PyTorch, which imports ml_dtypes itself
        importlib.import_module(m.name)
arrays.as_array("x", numpy.ones(3, numpy.float32), "numpy")
print("ml_dtypes" in sys.modules, arrays.float_dtype("dtype", "bfloat16"), "ml_dtypes" in sys.modules)
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    assert done.stdout.split() == ["False", "bfloat16", "True"]


@pytest.mark.gpu
def test_torch_cuda_tensor_is_imported_without_a_copy():
    torch = pytest.importorskip("torch")
    t = torch.arange(12, dtype=torch.float32, device="cuda").reshape(3, 4)
    kind = arrays.common_kind(t=t)
    a = arrays.as_array("t", t, kind, ndim=2)
    assert kind == "torch" and a.data.ptr == t.data_ptr()
    back = arrays.to_caller(a, kind)
    assert isinstance(back, torch.Tensor) and back.data_ptr() == t.data_ptr()


def test_backend_defaults_to_the_numpy_path_without_a_gpu(monkeypatch):
    """None picks the GPU where one is usable, else NumPy with one warning a process; "cupy" without a GPU says
    so in a RuntimeError (not CuPy's driver error, later, from deep inside)."""
    monkeypatch.setattr(arrays, "gpu_problem", lambda: "cudaErrorInsufficientDriver: too old")
    monkeypatch.setattr(arrays, "_SAID_NUMPY", False)
    with pytest.warns(UserWarning, match=r"no usable CUDA GPU \(cudaErrorInsufficientDriver: too old\)"):
        assert arrays.resolve_backend("backend", None) == "numpy"
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # said once: the second call is silent
        assert arrays.resolve_backend("backend", None) == "numpy"
    assert arrays.resolve_backend("backend", "numpy") == "numpy"
    with pytest.raises(RuntimeError, match=r"backend='cupy': no usable CUDA GPU \(CuPy reports: cudaError"):
        arrays.resolve_backend("backend", "cupy")
    with pytest.raises(ValueError, match=r"backend: expected 'cupy' or 'numpy'; got 'gpu'"):
        arrays.resolve_backend("backend", "gpu")
    monkeypatch.setattr(arrays, "gpu_problem", lambda: None)
    assert arrays.resolve_backend("backend", None) == "cupy"


def test_models_and_caches_default_to_the_numpy_path_without_a_gpu(monkeypatch, tmp_path, rng):
    import warnings

    import cupy_transformer
    from cupy_transformer.models import load_model
    from tests.models import test_gpt2

    monkeypatch.setattr(arrays, "gpu_problem", lambda: "no CUDA device")
    test_gpt2.checkpoint(tmp_path, rng)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = load_model(tmp_path)
        cache = cupy_transformer.KVCache(1, 1, 2, 4, 8)
    assert model.backend == "numpy" and model.config.dtype == numpy.float32
    assert cache.backend == "numpy" and isinstance(cache.keys, numpy.ndarray)
    with pytest.raises(RuntimeError, match=r"backend='cupy': no usable CUDA GPU \(CuPy reports: no CUDA device\)"):
        cupy_transformer.KVCache(1, 1, 2, 4, 8, backend="cupy")
    with pytest.raises(RuntimeError, match=r"no usable CUDA GPU"):
        load_model(tmp_path, backend="cupy")


def test_references_compute_in_float64_on_numpy_but_float32_arrays_inside_cpu_float32():
    from cupy_transformer.runtime.arrays import cpu_float32, reference_compute

    assert reference_compute(numpy, numpy.float32) is numpy.float64
    with cpu_float32():
        assert reference_compute(numpy, numpy.float32) is numpy.float32
        assert reference_compute(numpy, numpy.float16) is numpy.float64  # float16 keeps the float64 reference
        with cpu_float32(False):
            assert reference_compute(numpy, numpy.float32) is numpy.float64
        assert reference_compute(numpy, numpy.float32) is numpy.float32
    assert reference_compute(numpy, numpy.float32) is numpy.float64


def test_cpu_float32_holds_for_the_thread_that_enters_it():
    # Two threads (simulated tensor-parallel ranks run a decoder each) enter and leave it crosswise: A in, B in,
    # A out, B out. Each sees float32 until it leaves, and nothing stays on after them, there or here.
    import threading

    from cupy_transformer.runtime.arrays import cpu_float32, reference_compute

    a_in, b_in, a_out = (threading.Event() for _ in range(3))
    seen = {}

    def rank(name, wait_before, set_inside, wait_inside, set_after):
        if wait_before is not None:
            wait_before.wait(10)
        with cpu_float32():
            set_inside.set()
            if wait_inside is not None:
                wait_inside.wait(10)
            seen[name, "inside"] = reference_compute(numpy, numpy.float32)
        if set_after is not None:
            set_after.set()
        seen[name, "after"] = reference_compute(numpy, numpy.float32)

    threads = [
        threading.Thread(target=rank, args=("a", None, a_in, b_in, a_out)),  # leaves once B is in
        threading.Thread(target=rank, args=("b", a_in, b_in, a_out, None)),  # enters after A, leaves after A
    ]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    want = {(n, w): numpy.float32 if w == "inside" else numpy.float64 for n in "ab" for w in ("inside", "after")}
    assert seen == want
    assert reference_compute(numpy, numpy.float32) is numpy.float64
