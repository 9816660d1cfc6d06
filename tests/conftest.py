import pytest

from cupy_transformer.runtime.arrays import gpu_available

HAVE_GPU = gpu_available()
try:
    import cupy  # noqa: F401

    HAVE_CUPY = True
except ImportError:
    HAVE_CUPY = False


def pytest_collection_modifyitems(config, items):
    for marker, present, reason in (
        ("gpu", HAVE_GPU, "needs a CUDA GPU"),
        ("cupy", HAVE_CUPY, "needs CuPy (the cuda13 or cuda12 extra) for NVRTC"),
    ):
        if not present:
            for item in items:
                if marker in item.keywords:
                    item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture
def rng(request):
    # Fresh inputs per test, reproducible from the test's name.
    import zlib

    import numpy

    return numpy.random.default_rng(zlib.crc32(request.node.nodeid.encode()))


@pytest.fixture
def poisoned_allocations():
    """Every CuPy allocation made during the test starts as 0xFF bytes (NaN in fp16, bf16 and fp32), so an
    output element an op forgets to write fails the finiteness check of ``rel_error``."""
    import cupy

    pool = cupy.get_default_memory_pool()

    def allocate(size):
        memory = pool.malloc(size)
        if size:
            cupy.cuda.runtime.memsetAsync(memory.ptr, 0xFF, size, cupy.cuda.get_current_stream().ptr)
        return memory

    cupy.cuda.set_allocator(allocate)
    try:
        yield
    finally:
        cupy.cuda.set_allocator(pool.malloc)
