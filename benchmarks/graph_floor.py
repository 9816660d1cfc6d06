"""The floor of a decode step built as a CUDA graph of kernels: what a chain of dependent kernels costs a node
when each does nothing, and when each reads S bytes with the whole GPU (a product's weight stream without the
math), so that a step of N kernels reading B bytes cannot take less than about N * t0 + B / rate. Each twice: launched
plainly, and (compute capability 9.0 and later) programmatically as the decode step's kernels are
(``runtime/programmatic.py``: each kernel waits for the one before, then lets the next start).

    python3 benchmarks/graph_floor.py
"""

from __future__ import annotations

import os
import sys

import cupy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.common import card_name, graph_node_us  # noqa: E402
from cupy_transformer.runtime import programmatic  # noqa: E402
from cupy_transformer.runtime.kernels import compute_capability  # noqa: E402

SOURCE = r"""
// Programmatic launches: wait for the kernel before, then let the next start (runtime/programmatic.py).
template <bool CHAINED> __device__ __forceinline__ void chain() {
#if __CUDA_ARCH__ >= 900
    if (CHAINED) {
        asm volatile("griddepcontrol.wait;" ::: "memory");
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
    }
#endif
}
template <bool CHAINED> __device__ void empty_body(int* out) {
    chain<CHAINED>();
    if (out != nullptr && threadIdx.x == 1024) out[0] = 0;  // never true: the compiler keeps the kernel
}
// Reads n uint4 from src (grid-stride), writes one word per block so the reads are not dead.
template <bool CHAINED> __device__ void read_body(const uint4* __restrict__ src, long long n, unsigned* out) {
    chain<CHAINED>();
    unsigned acc = 0;
    const long long step = (long long)gridDim.x * blockDim.x;
    for (long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x; i < n; i += step) {
        uint4 v = __ldg(src + i);
        acc ^= v.x ^ v.y ^ v.z ^ v.w;
    }
    if (acc == 0x12345678u) out[blockIdx.x] = acc;
}
extern "C" __global__ void empty(int* out) { empty_body<false>(out); }
extern "C" __global__ void empty_chained(int* out) { empty_body<true>(out); }
extern "C" __global__ void read(const uint4* src, long long n, unsigned* out) { read_body<false>(src, n, out); }
extern "C" __global__ void read_chained(const uint4* src, long long n, unsigned* out) { read_body<true>(src, n, out); }
"""


def main() -> None:
    module = cupy.RawModule(code=SOURCE)
    kernels = {name: module.get_function(name) for name in ("empty", "read", "empty_chained", "read_chained")}
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    ways = ["plain"] + (["programmatic"] if compute_capability() >= 90 else [])
    print(f"{card_name()}, {sms} SMs")

    def launcher(name: str, way: str):
        if way == "plain":
            return lambda grid, block, args: kernels[name](grid, block, args)
        chained = kernels[name + "_chained"]
        return lambda grid, block, args: programmatic.launch(chained, grid, block, 0, args)

    for way in ways:
        empty = launcher("empty", way)
        t0 = graph_node_us(lambda i: empty((1,), (32,), (0,)), 1000)
        t0_wide = graph_node_us(lambda i: empty((2 * sms,), (256,), (0,)), 1000)
        print(f"empty kernel, graph node, {way}: {t0:.2f} µs (1 block), {t0_wide:.2f} µs ({2 * sms} blocks)")
    pool = cupy.random.default_rng(0).integers(0, 2**31, size=(1 << 30) // 4, dtype=cupy.int32)  # 1 GiB
    out = cupy.zeros(1 << 16, cupy.uint32)
    print(f"| bytes a kernel | {' | '.join(f'µs a node, {w} | GB/s' for w in ways)} | of 1 GiB rate |")
    print("|---" * (2 + 2 * len(ways)) + "|")
    rates = {}
    for size in (1 << 30, 64 << 20, 16 << 20, 4 << 20, 1 << 20, 256 << 10):
        n = size // 16
        slices = (1 << 30) // size  # consecutive nodes read different bytes: no L2 reuse
        nodes = min(500, max(20, slices))
        cells = []
        for way in ways:
            read = launcher("read", way)

            def launch(i, n=n, slices=slices, read=read):
                offset = (i % slices) * n * 16
                read((4 * sms,), (512,), (pool.data.ptr + offset, cupy.int64(n), out))

            t = graph_node_us(launch, nodes)
            rates.setdefault(size, size / t)  # bytes a µs, plain
            cells.append(f"{t:.2f} | {size / t / 1e3:.0f}")
        print(f"| {size} | {' | '.join(cells)} | {rates[size] / rates[1 << 30]:.0%} |")


if __name__ == "__main__":
    main()
