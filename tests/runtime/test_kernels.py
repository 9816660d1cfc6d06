"""The kernel runtime: source loading, offline NVRTC compile of every family (CI's compile check),
compile errors, and CuPy's on-disk cache across processes (GPU)."""

import json
import os
import subprocess
import sys
import textwrap

import pytest

from cupy_transformer.runtime import kernels
from cupy_transformer.runtime.kernels import KernelCompileError, KernelFamily


def test_sources_are_found_and_includes_inlined():
    root = kernels.kernel_source_dir()
    assert (root / "norm.cu").is_file()
    source = kernels.read_source("norm.cu")
    assert '#include "common.cuh"' not in source
    assert '#line 1 "common.cuh"' in source and "block_sum" in source
    assert source.count('#line 1 "common.cuh"') == 1


def test_an_arrays_dtype_names_a_kernel_its_family_lists():
    # The families' lists are built at import from dtype names (no bf16 dtype, so no ml_dtypes import); launchers
    # name a kernel from an array's dtype. Both must spell the same instantiation, for every dtype.
    import importlib

    import numpy

    ml_dtypes = pytest.importorskip("ml_dtypes")
    from cupy_transformer.runtime.arrays import FLOAT_NAMES

    ops = {m: importlib.import_module(f"cupy_transformer.ops.{m}") for m in ("bias_act", "residual_add", "softmax")}
    from cupy_transformer.ops import decode_attention, embedding, norm, sampling

    assert tuple(kernels.CTYPES) == tuple(kernels.ITEMSIZES) == FLOAT_NAMES
    listed = {f.filename: f.name_expressions for f in KernelFamily.registry.values()}
    for dtype in (numpy.dtype(numpy.float16), numpy.dtype(numpy.float32), numpy.dtype(ml_dtypes.bfloat16)):
        name = str(dtype)
        assert kernels.ctype_of(dtype) == kernels.ctype_of(dtype.type) == kernels.ctype_of(name) == kernels.CTYPES[name]
        vec = kernels.vector_width(dtype)
        assert vec == kernels.vector_width(name) == 16 // dtype.itemsize == 16 // kernels.ITEMSIZES[name]
        assert (kernels.ctype_of(dtype) in kernels.HALF_CTYPES) == (dtype.itemsize == 2)
        runs = kernels.run_variants(dtype)
        wanted = {
            "bias_act.cu": [ops["bias_act"]._name(dtype, a, v, w) for a in ops["bias_act"]._ACTS for v, w in runs],
            "residual_add.cu": [ops["residual_add"]._name(dtype, v, w) for v, w in runs],
            "embedding.cu": [embedding._name(dtype, v) for v in (vec, 1)],
            "norm.cu": [norm.kernel_name(dtype, v, 0, False, v == 1) for v in (vec, 1)],
            "softmax.cu": [ops["softmax"]._name(dtype, v, *var) for v in (vec, 1) for var in ops["softmax"]._VARIANTS],
            "sampling.cu": [sampling._select_name(dtype, m) for m in (False, True)]
            + [sampling._draw_name(dtype), sampling._greedy_name(dtype)],
            "decode_attention.cu": list(decode_attention._names(dtype, 80, 3).values()),  # 80: no tensor-core size
            "rotary_append.cu": [f"ct::rotary_append<{kernels.ctype_of(dtype)}>"],
        }
        for filename, names in wanted.items():
            assert set(names) <= set(listed[filename]), (filename, dtype)


def test_every_cu_file_belongs_to_a_family_the_package_import_registers():
    # compile_all and warmup cover the families registered once `import cupy_transformer` has run: a .cu file
    # whose launcher only another module imports would escape the compile check, the offline compile and the
    # warm-up. A fresh process, since this one has imported every op file through the tests.
    program = "import json, cupy_transformer as ct; print(json.dumps(sorted(ct.runtime.kernels.KernelFamily.registry)))"
    done = subprocess.run([sys.executable, "-c", program], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    registry = json.loads(done.stdout.strip().splitlines()[-1])
    assert set(registry) == set(KernelFamily.registry)
    registered = {key.split(" (")[0] for key in registry}  # "gemv.cu (9-16 rows)": a second part
    on_disk = {p.name for p in kernels.kernel_source_dir().iterdir() if p.name.endswith(".cu")}
    assert on_disk == registered
    assert {f.filename for key, f in KernelFamily.registry.items() if " (" in key} == {"gemv.cu"}


@pytest.mark.cupy
@pytest.mark.parametrize("arch", ["80", "90"])
def test_every_family_compiles_without_a_gpu(arch, tmp_path, monkeypatch):
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path))  # an empty cache: NVRTC compiles every family here
    seconds = kernels.compile_all(arch)
    assert set(seconds) == set(KernelFamily.registry)
    print({name: round(t, 2) for name, t in seconds.items()})


@pytest.mark.cupy
def test_offline_compiles_are_cached(tmp_path, monkeypatch):
    """A second compile_all reads the cubin an earlier one (any process) left in the cache, without NVRTC; another
    architecture or a changed source compiles again."""
    from cupy.cuda import nvrtc

    (tmp_path / "src").mkdir()
    (tmp_path / "src" / "tiny.cu").write_text('#include "h.cuh"\n__global__ void k(float* x) { x[0] = VALUE; }\n')
    (tmp_path / "src" / "h.cuh").write_text("#define VALUE 1.f\n")
    monkeypatch.setattr(kernels, "kernel_source_dir", lambda: tmp_path / "src")
    monkeypatch.setattr(KernelFamily, "registry", {})
    monkeypatch.setenv("CUPY_CACHE_DIR", str(tmp_path / "cache"))
    family = KernelFamily("tiny.cu", ["k"])
    compiles = []
    real = nvrtc.compileProgram
    monkeypatch.setattr(nvrtc, "compileProgram", lambda *a: compiles.append(a) or real(*a))
    seen = []

    def progress(name, seconds, cached):
        seen.append((name, cached))

    kernels.compile_all("80", progress)
    first = family.compile_offline("80")  # from the cache
    kernels.compile_all("80", progress)
    assert seen == [("tiny.cu", False), ("tiny.cu", True)] and len(compiles) == 1
    assert [p.name for p in (tmp_path / "cache" / "offline").iterdir()] == [family.offline_cache_path("80").name]
    assert first == family.offline_cache_path("80").read_bytes() and len(first) > 0
    kernels.compile_all("90", progress)
    (tmp_path / "src" / "h.cuh").write_text("#define VALUE 2.f\n")  # a header is part of the key
    kernels.compile_all("80", progress)
    assert seen[2:] == [("tiny.cu", False), ("tiny.cu", False)] and len(compiles) == 3


@pytest.mark.cupy
def test_compile_error_names_the_file_and_carries_the_log(tmp_path, monkeypatch):
    (tmp_path / "broken.cu").write_text('#include "ok.cuh"\n__global__ void k(float* x) { x[0] = undefined_name; }\n')
    (tmp_path / "ok.cuh").write_text("#pragma once\n")
    monkeypatch.setattr(kernels, "kernel_source_dir", lambda: tmp_path)
    monkeypatch.setattr(KernelFamily, "registry", {})
    family = KernelFamily("broken.cu", ["k"])
    message = r"(?s)broken.cu \(sm_90\): NVRTC failed.*broken.cu\(2\).*undefined_name"
    with pytest.raises(KernelCompileError, match=message):
        family.compile_offline("90")


def test_missing_source_is_a_clear_error(tmp_path, monkeypatch):
    monkeypatch.setattr(kernels, "kernel_source_dir", lambda: tmp_path)
    with pytest.raises(FileNotFoundError, match=r"kernel source 'nope.cu' not found"):
        kernels.read_source("nope.cu")


def test_grid_stride_item_counts_are_range_checked():
    # Kernel scalars in general: test_scalar_arguments_are_converted_with_range_checks.
    assert kernels.vector_count(2**31 - 1) == 2**31 - 1
    with pytest.raises(ValueError, match=r"exceed one launch's 2\^31"):
        kernels.vector_count(2**31)


_COUNT_COMPILES = textwrap.dedent(
    """
    import json, time
    from cupy.cuda import compiler
    calls = []
    real = compiler._compile_using_nvrtc_no_warning
    def counting(*args, **kwargs):
        calls.append(1)
        return real(*args, **kwargs)
    compiler._compile_using_nvrtc_no_warning = counting
    start = time.perf_counter()
    import cupy_transformer
    cupy_transformer.warmup()
    print(json.dumps({"nvrtc_calls": len(calls), "seconds": time.perf_counter() - start}))
    """
)


@pytest.mark.gpu
def test_second_process_loads_from_the_disk_cache(tmp_path):
    env = dict(os.environ, CUPY_CACHE_DIR=str(tmp_path))
    runs = []
    for _ in range(2):
        done = subprocess.run([sys.executable, "-c", _COUNT_COMPILES], env=env, capture_output=True, text=True)
        assert done.returncode == 0, done.stderr
        runs.append(json.loads(done.stdout.strip().splitlines()[-1]))
    print(f"first process: {runs[0]}, second process: {runs[1]}")
    assert runs[0]["nvrtc_calls"] == sum(family.builds_here() for family in KernelFamily.registry.values())
    assert runs[1]["nvrtc_calls"] == 0


@pytest.mark.cupy
def test_a_family_for_one_architecture_runs_there_alone(tmp_path, monkeypatch):
    """A family built for sm_90a: skipped by warmup on another GPU, and a clear error if asked for there."""
    (tmp_path / "hopper.cu").write_text("__global__ void k(float* x) { x[0] = 1.f; }\n")
    monkeypatch.setattr(kernels, "kernel_source_dir", lambda: tmp_path)
    monkeypatch.setattr(KernelFamily, "registry", {})
    monkeypatch.setattr(kernels, "compute_capability", lambda: 80)
    family = KernelFamily("hopper.cu", ["k"], arch="90a")
    assert not family.builds_here()
    assert kernels.warmup() == {}
    monkeypatch.setattr(kernels.import_cupy().cuda.runtime, "getDevice", lambda: 0)  # no GPU needed to refuse
    with pytest.raises(RuntimeError, match=r"hopper.cu is built for sm_90a alone; this GPU is sm_80"):
        family.kernel("k")
    monkeypatch.setattr(kernels, "compute_capability", lambda: 90)
    assert family.builds_here()
    assert len(family.compile_offline("80")) > 0  # its own architecture whatever is asked


@pytest.mark.gpu
def test_compile_error_on_the_gpu_path(tmp_path, monkeypatch):
    (tmp_path / "broken.cu").write_text("__global__ void k(float* x) { x[0] = undefined_name; }\n")
    monkeypatch.setattr(kernels, "kernel_source_dir", lambda: tmp_path)
    monkeypatch.setattr(KernelFamily, "registry", {})
    with pytest.raises(KernelCompileError, match=r"(?s)broken.cu: NVRTC failed.*undefined_name"):
        KernelFamily("broken.cu", ["k"]).kernel("k")


@pytest.mark.parametrize(
    "regs, shared, dynamic, threads, blocks",
    [
        (208, 33280, 0, 128, 2),  # registers bound: 2 warps of 6656 registers per sub-partition
        (166, 25088, 0, 128, 3),  # 166 -> 168 a thread: 3 warps per sub-partition
        (32, 100 << 10, 0, 128, 2),  # shared memory bound (1 KB reserved per block)
        (32, 1024, 99 << 10, 128, 2),  # static and dynamic shared memory together
        (16, 0, 0, 1024, 2),  # thread bound
    ],
)
def test_resident_blocks_follows_the_occupancy_rules(monkeypatch, regs, shared, dynamic, threads, blocks):
    from types import SimpleNamespace

    attributes = {
        "MaxRegistersPerMultiprocessor": 65536,
        "MaxSharedMemoryPerMultiprocessor": 228 << 10,
        "MaxThreadsPerMultiProcessor": 2048,
    }
    fake = SimpleNamespace(cuda=SimpleNamespace(Device=lambda: SimpleNamespace(attributes=attributes)))
    monkeypatch.setattr(kernels, "import_cupy", lambda: fake)
    kernel = SimpleNamespace(num_regs=regs, shared_size_bytes=shared)
    assert kernels.resident_blocks(kernel, threads, dynamic) == blocks


def test_wave_blocks_is_resident_blocks_on_every_sm_read_once(monkeypatch):
    from types import SimpleNamespace

    reads = []
    attributes = {
        "MaxRegistersPerMultiprocessor": 65536,
        "MaxSharedMemoryPerMultiprocessor": 228 << 10,
        "MaxThreadsPerMultiProcessor": 2048,
        "MultiProcessorCount": 132,
    }
    fake = SimpleNamespace(
        cuda=SimpleNamespace(
            Device=lambda *device: reads.append(device) or SimpleNamespace(attributes=attributes),
            runtime=SimpleNamespace(getDevice=lambda: 0),
        )
    )
    monkeypatch.setattr(kernels, "import_cupy", lambda: fake)
    monkeypatch.setattr(kernels, "_WAVES", {})
    monkeypatch.setattr(kernels, "_SM_COUNTS", {})
    kernel = SimpleNamespace(num_regs=105, shared_size_bytes=64)  # 2 blocks of 256 threads an SM
    assert kernels.wave_blocks(kernel, 256) == 264
    count = len(reads)
    assert kernels.wave_blocks(kernel, 256) == 264 and len(reads) == count  # the second call reads nothing


def test_dynamic_shared_opts_in_every_kernel_once(monkeypatch):
    # A kernel dropped by its owner (a sweep's own module) must not pass its memo entry to a new kernel that
    # Python happens to give the same id: the new one would launch without the opt-in.
    monkeypatch.setattr(kernels, "_SHARED_OPT_IN", {})

    class Kernel:
        sets = 0
        max_dynamic_shared_size_bytes = 48 * 1024  # CUDA's default limit for a kernel without static shared memory

        def __setattr__(self, name, value):
            assert name == "max_dynamic_shared_size_bytes"
            type(self).sets += 1
            object.__setattr__(self, name, value)

    for _ in range(50):  # freed objects' ids are reused at once in CPython
        k = Kernel()
        assert kernels.dynamic_shared(k, 70000) == 70000 and k.max_dynamic_shared_size_bytes == 70000
        kernels.dynamic_shared(k, 70000)
        del k
    assert Kernel.sets == 50
    # The limit only rises: a smaller launch of the same kernel (the GEMV's prologue at another K split) leaves it,
    # as lowering it made the larger launches fail; sizes within the default set nothing.
    k = Kernel()
    kernels.dynamic_shared(k, 70000)
    assert kernels.dynamic_shared(k, 20000) == 20000 and k.max_dynamic_shared_size_bytes == 70000
    kernels.dynamic_shared(Kernel(), 30000)
    assert Kernel.sets == 51


def test_every_kernel_signature_is_read_from_its_source():
    """Each instantiation's parameter list parses into distinct names of types a launch converts: what
    ``KernelFamily.launch`` checks every launch's arguments against."""
    for filename, family in KernelFamily.registry.items():
        for name in family.name_expressions:
            params = family.parameters(name)
            names = [p for _, p in params]
            assert params and len(set(names)) == len(names), (filename, name, params)


def test_kernel_parameters_reads_types_names_and_macros():
    source = textwrap.dedent("""
        #define ARGS const T *__restrict__ x, int n, \\
            unsigned count
        template <typename T, int R>
        __global__ void __launch_bounds__(128 * R, 2) first(const T* __restrict__ a, /* b */ float s,
                                                            long long stride) {}
        template <typename T>
        __global__ void second(ARGS) {}
    """)
    assert kernels.kernel_parameters(source, "ct::first<float, 2>") == (
        ("pointer", "a"),
        ("float", "s"),
        ("long long", "stride"),
    )
    assert kernels.kernel_parameters(source, "ct::second<__half>") == (
        ("pointer", "x"),
        ("int", "n"),
        ("unsigned", "count"),
    )
    with pytest.raises(kernels.KernelArgumentError, match=r"no __global__ function 'third'"):
        kernels.kernel_parameters(source, "ct::third<float>")


def test_a_launch_must_name_the_arguments_in_signature_order(tmp_path, monkeypatch):
    (tmp_path / "k.cu").write_text("__global__ void k(float* x, int n, float s) { x[0] = n * s; }\n")
    monkeypatch.setattr(kernels, "kernel_source_dir", lambda: tmp_path)
    monkeypatch.setattr(KernelFamily, "registry", {})
    family = KernelFamily("k.cu", ["k"])
    # Checked before any kernel is loaded, so this needs no GPU.
    with pytest.raises(kernels.KernelArgumentError, match=r"k takes \(x, n, s\); the launch gave \(x, s, n\)"):
        family.launch("k", (1,), (1,), x=None, s=1.0, n=2)
    with pytest.raises(kernels.KernelArgumentError, match=r"the launch gave \(x, n\)"):
        family.launch("k", (1,), (1,), x=None, n=2)


def test_scalar_arguments_are_converted_with_range_checks(tmp_path, monkeypatch):
    (tmp_path / "k.cu").write_text(
        "__global__ void k(float* x, int n, unsigned u, long long s, float f) { x[0] = n * f; }\n"
    )
    monkeypatch.setattr(kernels, "kernel_source_dir", lambda: tmp_path)
    monkeypatch.setattr(KernelFamily, "registry", {})
    family = KernelFamily("k.cu", ["k"])
    values = family.pack("k", dict(x=None, n=-5, u=2**32 - 1, s=2**40, f=0.5))
    assert values == (None, -5, 2**32 - 1, 2**40, 0.5)
    assert [type(v).__name__ for v in values[1:]] == ["int32", "uint32", "int64", "float32"]
    assert family.pack("k", dict(x=None, n=-5, u=7, s=1, f=0.5))[1] is values[1]  # made once, then found
    for name, value, kind in [("n", 2**31, "int32"), ("u", -1, "uint32"), ("s", 2**63, "int64")]:
        with pytest.raises(ValueError, match=rf"{name}: {value} does not fit the kernel's {kind} argument"):
            family.pack("k", dict(dict(x=None, n=0, u=0, s=0, f=0.0), **{name: value}))
