// Shared device helpers: element-type conversion, vector access, reductions.
#pragma once
#include <cuda_fp16.h>
#include <cuda_bf16.h>

namespace ct {

__device__ __forceinline__ float to_float(float v) { return v; }
__device__ __forceinline__ float to_float(__half v) { return __half2float(v); }
__device__ __forceinline__ float to_float(__nv_bfloat16 v) { return __bfloat162float(v); }

template <typename T> __device__ __forceinline__ T from_float(float v);
template <> __device__ __forceinline__ float from_float<float>(float v) { return v; }
template <> __device__ __forceinline__ __half from_float<__half>(float v) { return __float2half_rn(v); }
template <> __device__ __forceinline__ __nv_bfloat16 from_float<__nv_bfloat16>(float v) {
    return __float2bfloat16_rn(v);
}

// N elements moved as one access: N * sizeof(T) == 16 gives 128-bit loads and stores.
template <typename T, int N>
struct alignas(sizeof(T) * N) Vec {
    T v[N];
};

// The shared-memory address of p (a generic pointer into shared memory), as PTX's shared-space operands take it.
__device__ __forceinline__ unsigned shared_address(const void* p) {
    return static_cast<unsigned>(__cvta_generic_to_shared(p));
}

__device__ __forceinline__ float neg_inf() { return __int_as_float(0xff800000); }
// A quiet NaN: what a kernel writes for a result it refuses to compute (a slot outside the cache).
__device__ __forceinline__ float quiet_nan() { return __int_as_float(0x7fc00000); }

// exp(x) = 2^(x log2 e): the kernels take their exps as fast_exp2 in log2 units.
constexpr float LOG2E = 1.4426950408889634f;

// 2^x by the hardware's approximation (ex2.approx: 2 ulp, -inf -> 0), without exp2f's range handling.
__device__ __forceinline__ float fast_exp2(float x) {
    float y;
    asm("ex2.approx.ftz.f32 %0, %1;" : "=f"(y) : "f"(x));
    return y;
}

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v += __shfl_xor_sync(0xffffffffu, v, offset);
    return v;
}

__device__ __forceinline__ float warp_max(float v) {
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = fmaxf(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}

// Sum over the whole block, returned to every thread. blockDim.x must be a multiple of 32;
// `scratch` holds 32 floats and may be reused by the next call (the first barrier protects it).
__device__ __forceinline__ float block_sum(float v, float* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5, warps = blockDim.x >> 5;
    v = warp_sum(v);
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    return warp_sum(lane < warps ? scratch[lane] : 0.f);
}

// Programmatic dependent launch (sm_90 and later; `runtime.programmatic`): a kernel launched so may start while
// the kernel before it in the stream is still running. follow_previous_kernel() waits until that kernel has
// finished and its writes are visible (griddepcontrol.wait), then lets the next kernel start once every block of
// this one has called it or exited (launch_dependents). Without such a launch, and before sm_90, it does nothing.
// A kernel of a family launched so calls it before its first read of anything an earlier kernel writes and
// before its first global write (which an earlier kernel may still be reading). Waiting first keeps only the next
// kernel's blocks waiting beside a running one (letting the next start before the wait, a chain of kernels came
// to wait on the SMs, and a GPT-2-small step took 1.06x longer).
__device__ __forceinline__ void follow_previous_kernel() {
#if __CUDA_ARCH__ >= 900
    asm volatile("griddepcontrol.wait;" ::: "memory");
    asm volatile("griddepcontrol.launch_dependents;" ::: "memory");
#endif
}

// Asks L2 for `bytes` (a multiple of 16) from p (16-byte aligned) without waiting for them: data the kernel before
// does not write (weights, cached keys of earlier steps), fetched before follow_previous_kernel() so that the fetch
// overlaps the kernel before.
__device__ __forceinline__ void prefetch_l2(const void* p, unsigned bytes) {
#if __CUDA_ARCH__ >= 900
    asm volatile("cp.async.bulk.prefetch.L2.global [%0], %1;" ::"l"(p), "r"(bytes) : "memory");
#endif
}

// Work split across blocks: called by every thread of a block once it has written its share, true (in all of
// them) in the last of `blocks` blocks to get there (a ticket from *counter, zero before the launch; that
// block resets it to zero for the next launch). The last block may then read every share, through L2
// (__ldcg: L1 is not coherent). One thread's acquire-release ticket after the barrier orders the block's
// shares before it and the last block's reads after it; every thread's __threadfence (a sequentially
// consistent fence, twice) costs 0.2-0.3 µs more a launch (H200).
__device__ __forceinline__ bool last_block_done(int* counter, int blocks) {
    __shared__ bool last;
    __syncthreads();
    if (threadIdx.x == 0) {
        int before;
        asm volatile("atom.acq_rel.gpu.global.add.s32 %0, [%1], 1;" : "=r"(before) : "l"(counter) : "memory");
        last = before == blocks - 1;
    }
    __syncthreads();
    return last;
}

}  // namespace ct
