"""Shared test helpers: relative error against a float64 reference, tolerances, random inputs."""

import numpy

from cupy_transformer.runtime.arrays import FLOAT_DTYPES

# Relative error ||out - ref|| / ||ref|| allowed for a result rounded once (or twice) to the dtype:
# about 2-4x the dtype's rounding error (fp16 2^-11, bf16 2^-8), and fp32 accumulation noise for fp32.
TOLERANCE = {numpy.dtype(numpy.float16): 1e-3, numpy.dtype(numpy.float32): 1e-5}
if len(FLOAT_DTYPES) == 3:
    TOLERANCE[FLOAT_DTYPES[2]] = 8e-3


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
