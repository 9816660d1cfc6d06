"""Shared test helpers: relative error against a float64 reference, tolerances, random inputs, a side stream."""

import numpy

from cupy_transformer.runtime.arrays import FLOAT_DTYPES

# Relative error ||out - exact|| / ||exact|| allowed against float64 math, per dtype, in two columns:
# - TOL_ROUNDED: a result rounded once (or twice) to the dtype (norms, bias + activation, residual sums): about
#   2-4x the dtype's rounding error (fp16 2^-11, bf16 2^-8), and fp32 accumulation noise for fp32.
# - TOL_CHAINED: an op's result with roundings to the dtype inside (GEMM outputs, activations, softmax) against
#   math with none: a few units of the dtype's rounding error; fp32 sees accumulation-order noise only.
TOLERANCES = {
    # dtype:                   (TOL_ROUNDED, TOL_CHAINED)
    numpy.dtype(numpy.float16): (1e-3, 3e-3),
    numpy.dtype(numpy.float32): (1e-5, 5e-5),
}
if len(FLOAT_DTYPES) == 3:
    TOLERANCES[FLOAT_DTYPES[2]] = (8e-3, 2.5e-2)  # bf16
TOL_ROUNDED = {dtype: rounded for dtype, (rounded, _) in TOLERANCES.items()}
TOL_CHAINED = {dtype: chained for dtype, (_, chained) in TOLERANCES.items()}


def host(a) -> numpy.ndarray:
    """Any array (NumPy, CuPy, torch) as a float64 NumPy array."""
    if hasattr(a, "get"):
        a = a.get()
    elif type(a).__module__.startswith("torch"):
        a = a.detach().float().cpu().numpy()
    return numpy.asarray(a).astype(numpy.float64)


def rel_error(out, ref) -> float:
    out, ref = host(out), host(ref)
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert numpy.isfinite(out).all(), "non-finite values in the output (unwritten or overflow)"
    return float(numpy.linalg.norm(out - ref) / numpy.linalg.norm(ref))


def random(rng, shape, dtype, scale=1.0, offset=0.0) -> numpy.ndarray:
    return (rng.standard_normal(shape, dtype=numpy.float32) * scale + offset).astype(dtype)


def side_stream():
    """A non-blocking CuPy stream (as the Decoder's) that first waits for what the null stream has queued, where
    a test makes its inputs: a non-blocking stream waits for no other stream by itself, and its kernels could read
    an input the null stream is still writing (more likely with 16 test processes sharing one GPU)."""
    import cupy

    stream = cupy.cuda.Stream(non_blocking=True)
    stream.wait_event(cupy.cuda.Stream.null.record())
    return stream
