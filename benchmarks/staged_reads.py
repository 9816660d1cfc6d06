"""Whether a chain of kernels can read a decode step's weights faster than one plain read a product: each kernel
copies (part of) its block's weight slice into shared memory *before* it waits on the kernel before it
(programmatic launch, `griddepcontrol.wait`), so that DRAM stays busy across the kernel boundary instead of
ramping down and up again at every product.

Each model's products (bytes a product as the decode step's [out, in] weights are, one layer after another) become
a CUDA graph of read kernels, consecutive nodes reading different bytes. A node reads its bytes in contiguous
slices, one a block, and XORs them into a word (no math: the weight stream alone). Ways:

- ``plain``: programmatic launches, every read after the wait (the graph-of-kernels reads floor);
- ``staged K``: up to K KiB an SM of the slice copied into shared memory (`cp.async`) before the wait, the rest
  read after it; the next kernel's blocks fit beside the running one's only while two stages fit an SM's
  shared memory (K <= about 112 with a block an SM, 108 with two).
- ``persistent, staged K`` (``--persistent``): one kernel reads every product in turn, its blocks meeting at a grid
  barrier after each (where a persistent decode step's next product would need this one's output); up to K KiB an
  SM of the next product's slice copied into shared memory before the barrier (two buffers: K <= 112). Its grid is
  one or two blocks an SM, all resident (or the barrier would wait forever).

Against the bytes floor: the same bytes read by one kernel at the rate of a 1 GiB read. The read kernel needs few
registers, so the next kernel's blocks fit beside the running ones; the GEMV's registers (54-126 a thread, 256
threads) leave room for 1-2 more blocks an SM at most: `--threads 256 --resident 3` gives each block a third of
an SM's shared memory, so that no more than three blocks of any kernel share an SM, as 72 registers allow.

    python3 benchmarks/staged_reads.py [--models gpt2-small,gpt2-xl,llama-1b] [--stages 0,32,64,96,108]
                                       [--threads 512] [--resident 0] [--persistent]
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.sweep_gemv_decode import products  # noqa: E402

# What this file's kernels and chain_floor.py's share: a read's fold and the staging copy.
HELPERS = r"""
namespace ct {
__device__ __forceinline__ unsigned fold(uint4 v) { return v.x ^ v.y ^ v.z ^ v.w; }

// src[begin, end) (uint4) into shared memory from buf on by cp.async, one commit group: each thread copies the
// elements it later reads itself (begin + threadIdx.x + j blockDim.x), so its own cp.async wait orders them (no
// block barrier). Its own cp.async calls: mma.cuh's copy16 asks L2 for 256 bytes, and its group calls have no memory
// clobber (its users reach the copies through a barrier; here a thread reads its own copies, so the wait must order
// them).
__device__ __forceinline__ void stage_copy(uint4* buf, const uint4* src, long long begin, long long end) {
    for (long long i = begin + threadIdx.x; i < end; i += blockDim.x)
        asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_address(buf + (i - begin))),
                     "l"(src + i) : "memory");
    asm volatile("cp.async.commit_group;" ::: "memory");
}
}  // namespace ct
"""

KERNEL = r"""
namespace ct {
// Block blockIdx.x's slice [begin, end) of n uint4, its first `staged` into shared memory (buf).
struct Slice {
    long long begin, mid, end;
};
__device__ Slice stage_slice(uint4* buf, const uint4* src, long long n, long long staged) {
    const long long per = (n + gridDim.x - 1) / gridDim.x, begin = min(n, blockIdx.x * per);
    const Slice s{begin, min(min(n, begin + per), begin + staged), min(n, begin + per)};
    stage_copy(buf, src, s.begin, s.mid);
    return s;
}

// Reads n uint4 from w, a contiguous slice a block; the first `staged` of a block's slice into shared memory
// before the wait (follow_previous_kernel). Writes a word only when the XOR is a magic value, so the reads are not
// dead.
extern "C" __global__ void __launch_bounds__(512) read_staged(const uint4* __restrict__ w, long long n,
                                                              long long staged, unsigned* out) {
    extern __shared__ uint4 stage[];
    const Slice s = stage_slice(stage, w, n, staged);
    follow_previous_kernel();
    unsigned acc = 0;
    for (long long i = s.mid + threadIdx.x; i < s.end; i += blockDim.x) acc ^= fold(__ldg(w + i));
    asm volatile("cp.async.wait_all;" ::: "memory");
    for (long long i = threadIdx.x; i < s.mid - s.begin; i += blockDim.x) acc ^= fold(stage[i]);
    if (acc == 0x12345678u) out[blockIdx.x] = acc;
}

// Every product (offsets and sizes in uint4) in one launch: block b reads its slice of product p, then the grid
// meets (count: a counter only ever added to, a multiple of gridDim.x between launches); the next product's
// staged part was asked for before, into the other of two buffers of `staged` uint4.
extern "C" __global__ void __launch_bounds__(512) read_persistent(const uint4* __restrict__ w,
                                                                  const long long* __restrict__ offsets,
                                                                  const long long* __restrict__ sizes,
                                                                  int products, long long staged, unsigned* out,
                                                                  unsigned* count) {
    extern __shared__ uint4 stage[];
    unsigned acc = 0;
    Slice s = stage_slice(stage, w + offsets[0], sizes[0], staged);
    for (int p = 0; p < products; ++p) {
        const uint4* src = w + offsets[p];
        const uint4* buf = stage + (p & 1) * staged;
        Slice next = s;
        if (p + 1 < products)
            next = stage_slice(stage + ((p + 1) & 1) * staged, w + offsets[p + 1], sizes[p + 1], staged);
        else
            asm volatile("cp.async.commit_group;" ::: "memory");  // an empty group: the wait below stays right
        for (long long i = s.mid + threadIdx.x; i < s.end; i += blockDim.x) acc ^= fold(__ldg(src + i));
        asm volatile("cp.async.wait_group 1;" ::: "memory");  // this product's copies (all but the newest group)
        for (long long i = threadIdx.x; i < s.mid - s.begin; i += blockDim.x) acc ^= fold(buf[i]);
        __syncthreads();
        if (threadIdx.x == 0) {
            unsigned old, now;
            asm volatile("atom.add.release.gpu.u32 %0, [%1], 1;" : "=r"(old) : "l"(count) : "memory");
            const unsigned target = (old / gridDim.x + 1) * gridDim.x;
            do {
                asm volatile("ld.acquire.gpu.u32 %0, [%1];" : "=r"(now) : "l"(count) : "memory");
            } while (static_cast<int>(now - target) < 0);
        }
        __syncthreads();
        s = next;
    }
    if (acc == 0x12345678u) out[blockIdx.x] = acc;
}
}  // namespace ct
"""


def source(kernel: str = KERNEL) -> str:
    """``kernel`` (this file's) with the helpers it calls: kernels_cu/common.cuh's (the programmatic wait,
    ``shared_address``, ``warp_sum``, ``block_sum``) and ``HELPERS``."""
    from cupy_transformer.runtime.kernels import read_source

    return read_source("common.cuh") + HELPERS + kernel


SM_SHARED = 228 * 1024  # an H100 SM's shared memory
MAX_STAGE = 113 * 1024  # a block's, so that two blocks fit an SM


def step_shapes(shape: str) -> list[tuple[int, int]]:
    """(K, N) of each weight product a decode step of ``bench.SHAPES[shape]`` runs in its layers, in order
    (``sweep_gemv_decode.products``; the LM head, one long read, left out)."""
    from cupy_transformer import bench

    rows, _, _ = products(shape)
    family, config, _ = bench.SHAPES[shape]
    layers = config["n_layer" if family == "gpt2" else "num_hidden_layers"]
    return [(k, n) for _, k, n, *_ in rows[:-1]] * layers


def step_products(shape: str) -> list[int]:
    """The bytes of each of ``step_shapes``' products (16-bit)."""
    return [2 * k * n for k, n in step_shapes(shape)]


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="gpt2-small,gpt2-xl,llama-1b")
    parser.add_argument("--stages", default="0,32,64,96,108", help="KiB an SM staged before the wait")
    parser.add_argument("--threads", type=int, default=512, help="a block's (the GEMV's: 256)")
    parser.add_argument(
        "--resident",
        type=int,
        default=0,
        help="blocks of any kernel an SM holds at once, as the GEMV's registers allow (72 a thread: 3), by giving "
        "each block that share of the SM's shared memory (0: as many as fit)",
    )
    parser.add_argument("--persistent", action="store_true", help="also one kernel for all products (grid barriers)")
    args = parser.parse_args()
    if args.resident == 1 or args.resident < 0:
        parser.error(f"--resident: expected 0 or at least 2 (two blocks of a kernel an SM), got {args.resident}")
    import cupy
    import numpy

    from benchmarks.common import card_name, graph_node_us
    from cupy_transformer.runtime import programmatic
    from cupy_transformer.runtime.kernels import compile_options, compute_capability, resident_blocks

    if compute_capability() < 90:
        sys.exit("staged_reads.py: programmatic launches need compute capability 9.0 or later")
    module = cupy.RawModule(code=source(), options=compile_options())
    kernel, persistent = module.get_function("read_staged"), module.get_function("read_persistent")
    kernel.max_dynamic_shared_size_bytes = MAX_STAGE
    persistent.max_dynamic_shared_size_bytes = 2 * MAX_STAGE - 1024
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    pool = cupy.random.default_rng(0).integers(0, 2**31, size=(1 << 30) // 4, dtype=cupy.int32)  # 1 GiB
    out = cupy.zeros(1 << 16, cupy.uint32)

    pad = (SM_SHARED // args.resident - 1024) // 16 * 16 if args.resident else 0  # 1 KiB a block is reserved

    def node(offset: int, nbytes: int, staged_kib: int, blocks: int) -> None:
        staged = staged_kib * 1024 // 16 * sms // blocks  # uint4 a block
        launch_args = (pool.data.ptr + offset, cupy.int64(nbytes // 16), cupy.int64(staged), out)
        programmatic.launch(kernel, (blocks,), (args.threads,), max(staged * 16, pad), launch_args)

    whole = graph_node_us(lambda i: node(0, 1 << 30, 0, 4 * sms), 3)
    rate = (1 << 30) / whole  # bytes a µs
    print(
        f"{card_name()}, {sms} SMs; one kernel reading 1 GiB: {rate / 1e3:.0f} GB/s; blocks of {args.threads} "
        f"threads, {f'{args.resident} an SM at most' if args.resident else 'as many an SM as fit'}"
    )
    for name in args.models.split(","):
        sizes = step_products(name)
        total = sum(sizes)
        offsets, at = [], 0
        for size in sizes:  # consecutive nodes read different bytes, wrapping within the pool
            at = 0 if at + size > (1 << 30) else at
            offsets.append(at)
            at += (size + 255) // 256 * 256
        print(f"\n{name}: {len(sizes)} products, {total / 1e6:.1f} MB a step; bytes floor {total / rate:.1f} µs")
        print("| way | blocks | µs a step | of bytes floor |")
        print("|---|---|---|---|")
        for blocks in (sms, 2 * sms):
            for kib in map(int, args.stages.split(",")):
                if kib * 1024 // (blocks // sms) > (pad or MAX_STAGE):
                    continue

                def step(i, kib=kib, blocks=blocks):
                    for offset, size in zip(offsets, sizes):
                        node(offset, size, kib, blocks)

                t = graph_node_us(step, 1)
                way = "plain" if kib == 0 else f"staged {kib} KiB an SM"
                print(f"| {way} | {blocks} | {t:.1f} | {total / rate / t:.0%} |", flush=True)
        if args.persistent:
            starts = cupy.asarray([o // 16 for o in offsets], cupy.int64)
            counts = cupy.asarray([n // 16 for n in sizes], cupy.int64)
            for per_sm in (1, 2):
                for kib in map(int, args.stages.split(",")):
                    staged = kib * 1024 // 16 // per_sm  # uint4 a block of a product, as "staged K" above
                    dynamic = max(2 * staged * 16, pad)  # two buffers
                    if 2 * kib > 224 or resident_blocks(persistent, args.threads, dynamic) < per_sm:
                        continue  # the barrier needs every block resident
                    count = cupy.zeros(1, cupy.uint32)  # one a grid: it stays a multiple of the grid's blocks
                    launch_args = (pool, starts, counts, numpy.int32(len(sizes)), numpy.int64(staged), out, count)

                    def step(i, per_sm=per_sm, dynamic=dynamic, launch_args=launch_args):
                        persistent((per_sm * sms,), (args.threads,), launch_args, shared_mem=dynamic)

                    t = graph_node_us(step, 1)
                    way = f"persistent, staged {kib} KiB an SM" if kib else "persistent"
                    print(f"| {way} | {per_sm * sms} | {t:.1f} | {total / rate / t:.0%} |", flush=True)


if __name__ == "__main__":
    main()
