"""Call an op NumPy style: on the GPU when one is there, on the NumPy reference path otherwise."""

import numpy

from cupy_transformer import ops
from cupy_transformer.runtime.arrays import gpu_available


def main():
    rng = numpy.random.default_rng(0)
    x = rng.standard_normal((4, 1600)).astype(numpy.float16)
    gamma = (1 + 0.1 * rng.standard_normal(1600)).astype(numpy.float16)
    beta = (0.1 * rng.standard_normal(1600)).astype(numpy.float16)

    reference = ops.layer_norm(x, gamma, beta)  # NumPy in, NumPy out: the float64 reference
    print("reference row 0:", reference[0, :6])
    if not gpu_available():
        print("no GPU (or no CuPy) here; the NumPy path above is what runs")
        return
    import cupy

    y = ops.layer_norm(cupy.asarray(x), cupy.asarray(gamma), cupy.asarray(beta)).get()
    diff = numpy.abs(y.astype(numpy.float32) - reference.astype(numpy.float32)).max()
    print("GPU row 0:      ", y[0, :6], f"(max difference from the reference: {diff:.1e})")


if __name__ == "__main__":
    main()
