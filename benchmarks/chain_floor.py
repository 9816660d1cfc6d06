"""How fast a decode step's chain of batch-1 products can run as a CUDA graph of kernels when each kernel copies its
weights into shared memory before it waits. Unlike ``staged_reads.py``'s reads, each product here depends on the one
before as in a step: it waits (programmatic launch, ``griddepcontrol.wait``), reads the vector that product wrote
(through L2), sums and writes its own. Beside it, in the same process and graph form, the GEMV (``ops.gemv``, the
launcher's geometry and early weights, programmatic) over the same products: whether the staged reads' gain survives
a real dependency, and how far the GEMV stands from a kernel that has it.

The chain kernel (fp16, W [N, K] as the step's [out, in] weights, y = W x, fp32 sums and one rounding; no bias,
norm or residual, and the GEMV runs plain too): a block takes a contiguous run of rows (its weight slice is one run
of bytes), a warp every 8th row (4 at a time), a lane every 32nd 16-byte vector of a row. ``staged K``: the block's
first rows, up to K KiB an SM, copied into shared memory before the wait (`cp.async`), each lane copying the vectors
it later reads itself, so its own wait orders them; the other rows read after the wait.

``--parts``: where a product's time beyond its weight stream goes. The same slices read with no math, plain and with
96 KiB an SM staged (264 blocks), adding a product's chain after the wait part by part: a dependent read of x, the
write of y, a block's sum (two barriers) before it. The first is ``staged_reads.py``'s read; the last has every
step of a GEMV's chain but its products.

``--step``: the whole decode step's floor as a graph of kernels, beside the step as it runs (``bench.time_generation``,
batch 1, a 128-token prompt and 128 new tokens, in the same process): every kernel of the fused step (``step_kernels``:
the embedding, a layer's QKV product, attention over the cached keys and values at the generation's middle, out, up
and down products, then the LM head, the sampler's read of the logits and the step's end) as ``chain_read`` of its
bytes with every part of the chain (264 blocks, plain and staged), then the GEMV for the products (the LM head too)
with the other kernels as those reads: how far the step stands from a graph of the same kernels computing nothing.

``--handoff`` (with ``--step``): the same reads (staged 96), each kernel ``chain_read_handoff``, whose blocks wait for
the kernel before by counters where ``handoffs`` says: the attention's blocks of kv head h for the QKV blocks of head
h only (so the kernel after a layer's QKV product need not wait for the whole of it: what fusing the QKV product
into the attention kernel by head, or a flag between them, could give), or every kernel for all of the one before
by one counter (against the kernel boundary's wait).

    python3 benchmarks/chain_floor.py [--models gpt2-small,gpt2-xl,llama-1b] [--stages 0,32,96] [--parts] [--step]
                                      [--handoff]
"""

from __future__ import annotations

import argparse
import functools
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.staged_reads import MAX_STAGE, step_shapes  # noqa: E402
from benchmarks.staged_reads import source as staged_source  # noqa: E402

KERNEL = r"""
namespace ct {
__device__ __forceinline__ float dot8(uint4 a, uint4 b) {
    const __half2* ha = reinterpret_cast<const __half2*>(&a);
    const __half2* hb = reinterpret_cast<const __half2*>(&b);
    float s = 0.f;
#pragma unroll
    for (int i = 0; i < 4; ++i) {
        const float2 fa = __half22float2(ha[i]), fb = __half22float2(hb[i]);
        s += fa.x * fb.x + fa.y * fb.y;
    }
    return s;
}

// y[N] = W[N, K] x[K], K % 8 == 0; the block's first `staged_rows` rows copied to shared memory before the wait.
extern "C" __global__ void __launch_bounds__(256) chain_product(const uint4* __restrict__ w, const uint4* x,
                                                               __half* y, int N, int K, int staged_rows) {
    extern __shared__ uint4 stage[];
    const int kv = K / 8, per = (N + gridDim.x - 1) / gridDim.x;
    const int r0 = min(N, static_cast<int>(blockIdx.x) * per), rows = min(N, r0 + per) - r0;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, staged = min(rows, staged_rows);
    for (int r = warp; r < staged; r += 8)
        for (int v = lane; v < kv; v += 32)
            asm volatile("cp.async.cg.shared.global [%0], [%1], 16;" ::"r"(shared_address(stage + r * kv + v)),
                         "l"(w + static_cast<long long>(r0 + r) * kv + v) : "memory");
    asm volatile("cp.async.commit_group;" ::: "memory");
    follow_previous_kernel();  // x is the kernel before's output: read only after this (a coherent load)
    asm volatile("cp.async.wait_all;" ::: "memory");
    for (int r = warp; r < rows; r += 32) {  // rows r, r + 8, r + 16, r + 24: their loads in flight together
        float acc[4] = {0.f, 0.f, 0.f, 0.f};
#pragma unroll 2
        for (int v = lane; v < kv; v += 32) {
            const uint4 b = x[v];
#pragma unroll
            for (int j = 0; j < 4; ++j) {
                const int q = r + 8 * j;
                if (q < rows) acc[j] += dot8(q < staged ? stage[q * kv + v] : __ldg(w + (r0 + q) * 1ll * kv + v), b);
            }
        }
#pragma unroll
        for (int j = 0; j < 4; ++j) {
            const float s = warp_sum(acc[j]);
            if (lane == 0 && r + 8 * j < rows) y[r0 + r + 8 * j] = __float2half(s);
        }
    }
}


// chain_product's slice read with no math (XOR-folded), with parts of a product's chain after the wait by `parts`:
// READ_X each thread loads a vector of x (written by the kernel before), SUM a block_sum (two barriers), WRITE a
// thread a row writes y (else nothing is written but a never-taken magic case, so the reads are not dead).
constexpr int READ_X = 1, WRITE = 2, SUM = 4;
extern "C" __global__ void __launch_bounds__(256) chain_read(const uint4* __restrict__ w, const uint4* x, __half* y,
                                                            int N, int K, int staged_rows, int parts) {
    extern __shared__ uint4 stage[];
    __shared__ float scratch[32];
    const int kv = K / 8, per = (N + gridDim.x - 1) / gridDim.x;
    const int r0 = min(N, static_cast<int>(blockIdx.x) * per), rows = min(N, r0 + per) - r0;
    const long long n = static_cast<long long>(rows) * kv, mid = static_cast<long long>(min(rows, staged_rows)) * kv;
    const uint4* src = w + static_cast<long long>(r0) * kv;
    stage_copy(stage, src, 0, mid);  // staged_reads.py's copy: a thread copies what it later reads itself
    follow_previous_kernel();
    unsigned acc = (parts & READ_X) ? fold(x[threadIdx.x % kv]) : 0u;
    for (long long i = mid + threadIdx.x; i < n; i += blockDim.x) acc ^= fold(__ldg(src + i));
    asm volatile("cp.async.wait_all;" ::: "memory");
    for (long long i = threadIdx.x; i < mid; i += blockDim.x) acc ^= fold(stage[i]);
    float v = __uint_as_float(acc & 0x3f7fffffu);  // a finite float from the bits
    if (parts & SUM) v = block_sum(v, scratch);
    const int t = threadIdx.x;
    if ((parts & WRITE) ? t < rows : acc == 0x12345678u && rows > 0) y[r0 + min(t, rows - 1)] = __float2half(v);
}

// A block's rows [r0, r0 + rows) of W [N, K] (kv uint4 a row, N split evenly over the grid): n uint4 from src, the
// first `mid` of them staged (chain_read's slice, which it computes inline: its machine code as measured).
struct ReadSlice {
    int kv, r0, rows;
    long long n, mid;
    const uint4* src;
    __device__ ReadSlice(const uint4* w, int N, int K, int staged_rows) {
        const int per = (N + gridDim.x - 1) / gridDim.x;
        kv = K / 8, r0 = min(N, static_cast<int>(blockIdx.x) * per), rows = min(N, r0 + per) - r0;
        n = static_cast<long long>(rows) * kv, mid = static_cast<long long>(min(rows, staged_rows)) * kv;
        src = w + static_cast<long long>(r0) * kv;
    }
};

// Blocks of a grid of `blocks` in group g of `groups` (block b is in group b * groups / blocks).
__device__ __forceinline__ int group_size(int g, int groups, int blocks) {
    return ((g + 1) * blocks + groups - 1) / groups - (g * blocks + groups - 1) / groups;
}

// chain_read with every part of the chain (READ_X | SUM | WRITE), handed on by counters instead of the wait on the
// whole kernel before where asked. With `wait_on` (else follow_previous_kernel()): block b waits until
// wait_on[g] (g = b * wait_groups / gridDim.x < HANDOFF_GROUPS) counts every block of its group in the kernel
// before (a grid of `producers` blocks of `producer_rows` rows, grouped alike), one thread spinning on a relaxed load
// and then fencing (an acquire without an L1 invalidation each pass); then takes a ticket on wait_on[HANDOFF_GROUPS
// + g] (another 128-byte line), and the group's last block zeroes both for the next launch. It reads x from its
// group's first rows (rounded up to a vector), which those blocks wrote. With `raise`, each block adds one to
// raise[b * raise_groups / gridDim.x] (release) once its y is written. So a block of group g waits only for the
// blocks of the kernel before in group g: with a group a kv head, what a kv head's attention waiting only for the
// QKV blocks of its head would gain (optimistic: a head's rows are three ranges of the QKV product, a group one
// contiguous range of its blocks), or every kernel waiting for all of the one before by one counter, against the
// kernel boundary's wait for the whole grid to finish and its memory to flush. A spin that outlasts about a second
// traps (a miscounted plan fails the run, not hangs it).
constexpr int HANDOFF_GROUPS = 32;
extern "C" __global__ void __launch_bounds__(256) chain_read_handoff(const uint4* __restrict__ w, const uint4* x,
                                                                    __half* y, int N, int K, int staged_rows,
                                                                    int* wait_on, int wait_groups, int producers,
                                                                    int producer_rows, int* raise, int raise_groups) {
    extern __shared__ uint4 stage[];
    __shared__ float scratch[32];
    const ReadSlice slice(w, N, K, staged_rows);
    stage_copy(stage, slice.src, 0, slice.mid);
    int x_first = 0;  // the first of x's K values this block reads
    if (wait_on == nullptr) {
        follow_previous_kernel();
    } else {
        const int g = blockIdx.x * wait_groups / gridDim.x, want = group_size(g, wait_groups, producers);
        x_first = (g * producers + wait_groups - 1) / wait_groups * producer_rows + 7 & ~7;
        if (threadIdx.x == 0) {
            int seen;
            for (int spins = 0;; ++spins) {
                asm volatile("ld.relaxed.gpu.global.s32 %0, [%1];" : "=r"(seen) : "l"(wait_on + g) : "memory");
                if (seen >= want) break;
                if (spins > (1 << 22)) __trap();  // an L2 round trip a pass: about a second
            }
            asm volatile("fence.acq_rel.gpu;" ::: "memory");
            int before;
            asm volatile("atom.relaxed.gpu.global.add.s32 %0, [%1], 1;"
                         : "=r"(before) : "l"(wait_on + HANDOFF_GROUPS + g) : "memory");
            if (before == group_size(g, wait_groups, gridDim.x) - 1) {
                asm volatile("st.relaxed.gpu.global.s32 [%0], 0;" ::"l"(wait_on + g) : "memory");
                asm volatile("st.relaxed.gpu.global.s32 [%0], 0;" ::"l"(wait_on + HANDOFF_GROUPS + g) : "memory");
            }
        }
        __syncthreads();
#if __CUDA_ARCH__ >= 900
        asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
    }
    // through L2: a counter, not a kernel boundary, ordered it
    unsigned acc = fold(__ldcg(x + x_first / 8 + threadIdx.x % slice.kv));
    for (long long i = slice.mid + threadIdx.x; i < slice.n; i += blockDim.x) acc ^= fold(__ldg(slice.src + i));
    asm volatile("cp.async.wait_all;" ::: "memory");
    for (long long i = threadIdx.x; i < slice.mid; i += blockDim.x) acc ^= fold(stage[i]);
    const float v = block_sum(__uint_as_float(acc & 0x3f7fffffu), scratch);
    if (threadIdx.x < slice.rows) y[slice.r0 + threadIdx.x] = __float2half(v);
    if (raise != nullptr) {
        __syncthreads();
        if (threadIdx.x == 0)
            asm volatile("red.release.gpu.global.add.s32 [%0], 1;" ::"l"(raise + blockIdx.x * raise_groups / gridDim.x)
                         : "memory");
    }
}
}  // namespace ct
"""

HANDOFF_GROUPS = 32  # chain_read_handoff's: the most groups a kernel waits on; its tickets 128 bytes past the counts

# chain_read's parts (READ_X, WRITE, SUM): each added to the one before.
PARTS = ((0, "no chain"), (1, "+ x read"), (3, "+ x read, y written"), (7, "+ x read, block sum, y written"))


def source() -> str:
    """The kernels with the helpers they call (kernels_cu/common.cuh's and ``staged_reads.HELPERS``)."""
    return staged_source(KERNEL)


def step_kernels(shape: str, context: int = 192) -> list[tuple[str, int, int]]:
    """A fused decode step's kernels at batch 1 in order, each as (what, K, N): a read of N x K 16-bit values (K % 8
    == 0). Products are their weights ([out, in]); attention its cached keys and values at ``context`` tokens, [2 kv
    heads x context, head size]; the embedding a token's row and position row; the sampler the logits in 64-wide
    rows; the step's end a row of ids."""
    from benchmarks.sweep_gemv_decode import products
    from cupy_transformer import bench

    rows, _, _ = products(shape)
    family, c, _ = bench.SHAPES[shape]
    if family == "gpt2":
        layers, hidden, heads, kv, vocab = c["n_layer"], c["n_embd"], c["n_head"], c["n_head"], c["vocab_size"]
    else:
        layers, hidden, heads = c["num_hidden_layers"], c["hidden_size"], c["num_attention_heads"]
        kv, vocab = c["num_key_value_heads"], c["vocab_size"]
    head = c.get("head_dim", hidden // heads)
    (qkv, *rest), lm_head = [(what, k, n) for what, k, n, *_ in rows[:-1]], rows[-1][:3]
    layer = [qkv, ("attention", head, 2 * kv * context), *rest]
    return [("embedding", hidden, 2), *layer * layers, lm_head, ("sampler", 64, -(-vocab // 64)), ("end", 8, 1)]


def handoffs(kernels: list[tuple[str, int, int]], heads: int, way: str) -> list[tuple[int, int]]:
    """Per kernel of ``step_kernels``, (groups it waits on, groups it raises) for ``chain_read_handoff``; 0 waits
    for the kernel before as a kernel does, 0 raises nothing. ``way`` "head": each attention kernel waits on the
    QKV product before it by ``heads`` groups (its kv heads); "all": every kernel after the first waits on the one
    before by one counter."""
    if way not in ("head", "all"):
        raise ValueError(f"way: expected 'head' or 'all'; got {way!r}")
    if not 1 <= heads <= HANDOFF_GROUPS:
        raise ValueError(f"heads: expected 1 to {HANDOFF_GROUPS} groups (the kernel's counters); got {heads}")
    waits = [0] + [1 if way == "all" else heads if what == "attention" else 0 for what, *_ in kernels[1:]]
    return list(zip(waits, waits[1:] + [0]))


def chained_us(products, weights, x0) -> float:
    """µs of one CUDA graph of programmatic launches (best of 3): ``products[i](v, weights[i])`` in turn from x0, each
    on the first K values (``weights[i]``'s [N, K]) of the vector the one before wrote."""
    from benchmarks.common import graph_node_us
    from cupy_transformer.runtime import programmatic

    def step(i):
        v = x0
        for product, w in zip(products, weights):
            v = product(v[:, : w.shape[1]], w)

    with programmatic.programmatic_launches():
        return graph_node_us(step, 1)


def staged_rows(k: int, n: int, kib_an_sm: int, blocks: int, sms: int) -> int:
    """Rows a block stages: as many of its rows as fit its share of ``kib_an_sm`` KiB an SM (and ``MAX_STAGE``)."""
    per = -(-n // blocks)
    return min(per, min(MAX_STAGE, kib_an_sm * 1024 * sms // blocks) // (2 * k))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2-small,gpt2-xl,llama-1b")
    parser.add_argument("--stages", default="0,32,96", help="KiB an SM staged before the wait")
    parser.add_argument(
        "--parts", action="store_true", help="also the slices read with no math, adding a product's chain part by part"
    )
    parser.add_argument("--step", action="store_true", help="also the whole step's kernels as reads, beside the step")
    parser.add_argument(
        "--handoff", action="store_true", help="with --step: kernels that wait for the one before by counters"
    )
    args = parser.parse_args()
    import cupy
    import numpy

    from benchmarks.common import card_name
    from cupy_transformer.ops.gemv import gemv
    from cupy_transformer.runtime import programmatic
    from cupy_transformer.runtime.kernels import compile_options, compute_capability

    if compute_capability() < 90:
        sys.exit("chain_floor.py: programmatic launches need compute capability 9.0 or later")
    module = cupy.RawModule(code=source(), options=compile_options())
    kernel, read = module.get_function("chain_product"), module.get_function("chain_read")
    handing = module.get_function("chain_read_handoff")
    kernel.max_dynamic_shared_size_bytes = read.max_dynamic_shared_size_bytes = MAX_STAGE
    handing.max_dynamic_shared_size_bytes = MAX_STAGE
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    rng = cupy.random.default_rng(0)

    def chain(x, w, staged, blocks):
        n, k = w.shape
        y = cupy.empty((1, n), cupy.float16)
        launch_args = (w, x, y, numpy.int32(n), numpy.int32(k), numpy.int32(staged))
        programmatic.launch(kernel, (blocks,), (256,), staged * 2 * k, launch_args)
        return y

    def read_kernel(v, w, kib, parts=7, width=0):
        """``chain_read`` of w at 264 blocks (as the GEMV's launches mostly are), up to ``kib`` KiB an SM staged; its
        y at least ``width`` wide, so that a next kernel's x (its K values) lies inside it."""
        n, k = w.shape
        y = cupy.empty((1, max(n, width)), cupy.float16)
        staged = staged_rows(k, n, kib, 2 * sms, sms)
        launch_args = (w, v, y, numpy.int32(n), numpy.int32(k), numpy.int32(staged), numpy.int32(parts))
        programmatic.launch(read, (2 * sms,), (256,), staged * 2 * k, launch_args)
        return y

    def handoff_kernel(v, w, y, wait_on, wait_groups, producer_rows, raise_to, raise_groups):
        """``chain_read_handoff`` of w into y as ``read_kernel`` reads it (264 blocks, 96 KiB an SM staged), waiting
        on ``wait_on`` (counters of the kernel before, a grid of 264 blocks of ``producer_rows`` rows, or None) and
        raising ``raise_to`` (or None)."""
        n, k = w.shape
        staged = staged_rows(k, n, 96, 2 * sms, sms)
        i32 = numpy.int32
        launch_args = (w, v, y, i32(n), i32(k), i32(staged), wait_on, i32(wait_groups), i32(2 * sms),
                       i32(producer_rows), raise_to, i32(raise_groups))  # fmt: skip
        programmatic.launch(handing, (2 * sms,), (256,), staged * 2 * k, launch_args)
        return y

    print(f"{card_name()}, {sms} SMs; µs a step of the layers' products (no LM head), a CUDA graph, best of 3")
    for name in args.models.split(","):
        shapes = step_shapes(name)
        total = sum(2 * k * n for k, n in shapes)
        weights = [(rng.standard_normal((n, k), dtype=cupy.float32) / k**0.5).astype(cupy.float16) for k, n in shapes]
        x0 = rng.standard_normal((1, shapes[0][0]), dtype=cupy.float32).astype(cupy.float16)
        w = weights[2]  # an up product: more rows than 264 blocks take, some staged and some not at 96 KiB
        x = rng.standard_normal((1, w.shape[1]), dtype=cupy.float32).astype(cupy.float16)
        with programmatic.programmatic_launches():  # the kernel against float32 sums of the same fp16 values
            want = x.astype(cupy.float32) @ w.astype(cupy.float32).T
            for blocks in (sms, 2 * sms):
                got = chain(x, w, staged_rows(w.shape[1], w.shape[0], 96, blocks, sms), blocks).astype(cupy.float32)
                err = float(cupy.abs(got - want).max() / cupy.abs(want).max())
                assert err < 2e-3, f"chain_product at {blocks} blocks: relative error {err:.2e}"
        print(f"\n{name}: {len(shapes)} products, {total / 1e6:.1f} MB a step")
        print("| way | blocks | µs a step | µs a product |")
        print("|---|---|---|---|")

        def run(product, weights=weights, x0=x0) -> float:
            return chained_us([product] * len(weights), weights, x0)

        t = run(lambda v, w: gemv(v, w, True))
        print(f"| GEMV (ops.gemv, plain) | launcher's | {t:.1f} | {t / len(shapes):.2f} |", flush=True)
        for blocks in (sms, 2 * sms):
            for kib in map(int, args.stages.split(",")):

                def product(v, w, kib=kib, blocks=blocks):
                    return chain(v, w, staged_rows(w.shape[1], w.shape[0], kib, blocks, sms), blocks)

                t = run(product)
                way = "chain, plain" if kib == 0 else f"chain, staged {kib} KiB an SM"
                print(f"| {way} | {blocks} | {t:.1f} | {t / len(shapes):.2f} |", flush=True)
        if args.parts:  # 264 blocks, as the GEMV's launches mostly are; staged 0 and 96 KiB an SM
            for kib in (0, 96):
                for parts, way in PARTS:
                    t = run(lambda v, w, kib=kib, parts=parts: read_kernel(v, w, kib, parts))
                    staging = f"staged {kib} KiB an SM" if kib else "plain"
                    print(f"| read, {staging}, {way} | {2 * sms} | {t:.1f} | {t / len(shapes):.2f} |", flush=True)
        del weights
        cupy.get_default_memory_pool().free_all_blocks()
        if args.step:
            whole_step(name, read_kernel, rng, handoff_kernel if args.handoff else None)


def whole_step(name: str, read_kernel, rng, handoff_kernel=None) -> None:
    """``--step``: the step as it runs against ``step_kernels`` as reads, and as the GEMV for the products with the
    others read, one CUDA graph each (best of 3)."""
    import cupy

    from cupy_transformer import bench
    from cupy_transformer.ops.gemv import gemv

    model = bench.random_model(name)
    step_ms = min(bench.time_generation(model, 1, 128, 128, repeats=1)["decode_ms"] for _ in range(3))
    del model
    cupy.get_default_memory_pool().free_all_blocks()
    kernels = step_kernels(name)
    arrays = [rng.standard_normal((n, k), dtype=cupy.float32).astype(cupy.float16) for _, k, n in kernels]
    width = max(k for _, k, _ in kernels)
    x0 = rng.standard_normal((1, width), dtype=cupy.float32).astype(cupy.float16)
    products = {what for what, *_ in kernels if what not in ("embedding", "attention", "sampler", "end")}

    total = sum(2 * k * n for _, k, n in kernels)
    print(f"\n{name}, the whole step: {len(kernels)} kernels, {total / 1e6:.1f} MB")
    print("| way | µs a step | the step as it runs / this |\n|---|---|---|")
    print(f"| the step as it runs (batch 1, prompt 128, 128 new tokens) | {step_ms * 1e3:.1f} | 1.00 |")
    ways = [
        ("every kernel a read, plain", lambda what, v, w: read_kernel(v, w, 0, width=width)),
        ("every kernel a read, staged 96 KiB an SM", lambda what, v, w: read_kernel(v, w, 96, width=width)),
        (
            "GEMV products (ops.gemv, plain), the others reads staged 96",
            lambda what, v, w: gemv(v, w, True) if what in products else read_kernel(v, w, 96, width=width),
        ),
    ]
    for way, kernel in ways:
        t = chained_us([functools.partial(kernel, what) for what, *_ in kernels], arrays, x0)
        print(f"| {way} | {t:.1f} | {step_ms * 1e3 / t:.2f} |", flush=True)
    if handoff_kernel is None:
        return
    family, config, _ = bench.SHAPES[name]
    heads = config["n_head"] if family == "gpt2" else config["num_key_value_heads"]
    blocks = 2 * cupy.cuda.Device().attributes["MultiProcessorCount"]  # handoff_kernel's grid
    for way, label in (("head", f"attention waits on its {heads} heads' QKV blocks"), ("all", "one counter a kernel")):
        plan = handoffs(kernels, heads, way)
        # A kernel's counters: a count a group, then (128 bytes on) a ticket a group. Each kernel's y lives through
        # the step: a kernel that waited for part of the one before must not write where that one's x was.
        counters = [cupy.zeros(2 * HANDOFF_GROUPS, cupy.int32) if waits else None for waits, _ in plan]
        outs = [cupy.empty((1, max(n, width)), cupy.float16) for _, _, n in kernels]
        handed = [
            functools.partial(
                handoff_kernel,
                y=outs[i],
                wait_on=counters[i],
                wait_groups=waits,
                producer_rows=-(-kernels[i - 1][2] // blocks) if i else 0,
                raise_to=raised,
                raise_groups=raises,
            )
            for i, ((waits, raises), raised) in enumerate(zip(plan, counters[1:] + [None]))
        ]
        t = chained_us(handed, arrays, x0)
        print(f"| every kernel a read, staged 96, handed on by counters: {label} | {t:.1f} | {step_ms * 1e3 / t:.2f} |")


if __name__ == "__main__":
    main()
