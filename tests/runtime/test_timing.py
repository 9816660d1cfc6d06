"""runtime.timing: picking the fastest of several launches (GPU)."""

import pytest


@pytest.mark.gpu
@pytest.mark.parametrize("fast", [0, 1, 2])
def test_gpu_fastest_picks_the_least_work(fast):
    import cupy

    from cupy_transformer.runtime import timing

    buf = cupy.empty(256 << 20, cupy.uint8)
    sizes = [256 << 20] * 3
    sizes[fast] = 1 << 20  # a 1 MB memset among 256 MB ones: far apart, whatever the card

    def memset(n):
        return lambda: cupy.cuda.runtime.memsetAsync(buf.data.ptr, 1, n, cupy.cuda.get_current_stream().ptr)

    assert timing.fastest([memset(n) for n in sizes], rounds=3) == fast
