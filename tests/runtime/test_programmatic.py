"""Programmatic dependent launch: arguments packed for the driver's launch as CuPy packs them, and on the GPU the
same bits from a captured chain of programmatic launches (each kernel waiting for the one before) as eagerly."""

import ctypes

import numpy
import pytest

from cupy_transformer.runtime import programmatic
from tests.helpers import side_stream


def test_arguments_are_packed_as_their_c_types():
    packed = [
        programmatic._argument(v) for v in (numpy.int32(-3), numpy.uint32(7), numpy.int64(-(2**40)), numpy.float32(0.5))
    ]
    assert [type(a) for a in packed] == [ctypes.c_int32, ctypes.c_uint32, ctypes.c_int64, ctypes.c_float]
    assert [a.value for a in packed] == [-3, 7, -(2**40), 0.5]
    assert programmatic._argument(None).value is None and programmatic._argument(4096).value == 4096
    with pytest.raises(TypeError, match="str"):
        programmatic._argument("x")


def test_nothing_is_programmatic_outside_the_context():
    assert not programmatic.active()


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [numpy.float16, numpy.float32], ids=str)
def test_gpu_captured_programmatic_chain_gives_the_eager_bits(rng, dtype):
    """norm -> product (K split over blocks: partials and the last block's pass) -> norm with a pre-add ->
    product -> greedy, a graph of programmatic launches replayed 3 times on fresh inputs, against eager calls."""
    import cupy

    from cupy_transformer import ops
    from cupy_transformer.ops.matmul import matmul
    from cupy_transformer.ops.norm import normalize
    from cupy_transformer.runtime.kernels import compute_capability

    h, inner, vocab = 1000, 3000, 5003
    g1, b1, g2 = (cupy.asarray(rng.standard_normal(h).astype(dtype)) for _ in range(3))
    w1 = cupy.asarray((rng.standard_normal((h, inner)) / h**0.5).astype(dtype))  # [in, out]
    w2 = cupy.asarray((rng.standard_normal((vocab, inner)) / inner**0.5).astype(dtype))  # [out, in]
    x = cupy.empty((1, h), dtype)
    tokens, seed_step = cupy.empty(1, numpy.int32), cupy.zeros(2, numpy.uint64)

    def chain():
        xn = ops.layer_norm(x, g1, b1)
        u = matmul(xn, w1, False)
        un, _ = normalize("rms_norm", u[:, :h], g2, None, 1e-6, residual=x, want_sum=True)
        logits = matmul(cupy.concatenate([un, un, un[:, : inner - 2 * h]], axis=1), w2, True)
        ops.sample_tokens(logits, tokens, seed_step)  # greedy
        return logits

    stream = side_stream()
    with stream, ops.graph_choices():  # eager products choose as captured ones do (GEMV or cuBLASLt)
        x[...] = cupy.asarray(rng.standard_normal((1, h)).astype(dtype))
        chain()  # first calls make the choices and the workspaces, which a capture cannot
        with programmatic.programmatic_launches():
            assert programmatic.active() == (compute_capability() >= 90)
            stream.begin_capture()
            out = chain()
            graph = stream.end_capture()
        for _ in range(3):
            x[...] = cupy.asarray(rng.standard_normal((1, h)).astype(dtype))
            want = chain().get(), tokens.get()
            graph.launch(stream)
            got = out.get(), tokens.get()
            assert numpy.array_equal(got[0], want[0]) and numpy.array_equal(got[1], want[1])
