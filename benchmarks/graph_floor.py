"""The floor of a decode step built as a CUDA graph of kernels: what a chain of dependent kernels costs a node
when each does nothing, and when each reads S bytes with the whole GPU (a product's weight stream without the
math), so that a step of N kernels reading B bytes cannot take less than about N * t0 + B / rate.

    python3 benchmarks/graph_floor.py
"""

from __future__ import annotations

import os
import sys

import cupy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import card_name, graph_node_us  # noqa: E402

SOURCE = r"""
extern "C" __global__ void empty(int* out) {
    if (out != nullptr && threadIdx.x == 1024) out[0] = 0;  // never true: the compiler keeps the kernel
}
// Reads n uint4 from src (grid-stride), writes one word per block so the reads are not dead.
extern "C" __global__ void read(const uint4* __restrict__ src, long long n, unsigned* out) {
    unsigned acc = 0;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += step) {
        uint4 v = __ldg(src + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) out[blockIdx.x] = acc;
}
"""


def main() -> None:
    module = cupy.RawModule(code=SOURCE)
    empty, read = module.get_function("empty"), module.get_function("read")
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    print(f"{card_name()}, {sms} SMs")
    t0 = graph_node_us(lambda i: empty((1,), (32,), (0,)), 1000)
    t0_wide = graph_node_us(lambda i: empty((2 * sms,), (256,), (0,)), 1000)
    print(f"empty kernel, graph node: {t0:.2f} µs (1 block), {t0_wide:.2f} µs ({2 * sms} blocks)")
    pool = cupy.random.default_rng(0).integers(0, 2**31, size=(1 << 30) // 4, dtype=cupy.int32)  # 1 GiB
    out = cupy.zeros(1 << 16, cupy.uint32)
    print("| bytes a kernel | µs a node | GB/s | of 1 GiB rate |\n|---|---|---|---|")
    rates = {}
    for size in (1 << 30, 64 << 20, 16 << 20, 4 << 20, 1 << 20, 256 << 10):
        n = size // 16
        slices = (1 << 30) // size  # consecutive nodes read different bytes: no L2 reuse
        nodes = min(500, max(20, slices))

        def launch(i, n=n, slices=slices):
            offset = (i % slices) * n * 16
            read((4 * sms,), (512,), (pool.data.ptr + offset, cupy.int64(n), out))

        t = graph_node_us(launch, nodes)
        rates[size] = size / t  # bytes a µs
        print(f"| {size} | {t:.2f} | {size / t / 1e3:.0f} | {rates[size] / rates[1 << 30]:.0%} |")


if __name__ == "__main__":
    main()
