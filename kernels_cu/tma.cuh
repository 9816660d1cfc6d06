// Hopper's tensor memory accelerator (sm_90): a tile copied from global to shared memory by one thread's
// instruction (cp.async.bulk.tensor), its arrival counted in bytes on a shared-memory mbarrier that the
// readers wait on. The tensor map (rank, sizes, strides, box, swizzle) is made on the host
// (cupy_transformer/runtime/tensor_map.py) and read from global memory.
#pragma once
#include "common.cuh"

namespace ct {

// One thread, then a barrier before any other thread uses it.
__device__ __forceinline__ void mbar_init(unsigned long long* bar, unsigned arrivals) {
    asm volatile("mbarrier.init.shared::cta.b64 [%0], %1;" ::"r"(shared_address(bar)), "r"(arrivals) : "memory");
}
// After a thread's mbar_inits, before copies it issues count on them (other threads: a block barrier).
__device__ __forceinline__ void mbar_init_fence() {
    asm volatile("fence.mbarrier_init.release.cluster;\n\tfence.proxy.async.shared::cta;" ::: "memory");
}
// Arrives, and the current phase also waits for `bytes` of copies to land.
__device__ __forceinline__ void mbar_expect_bytes(unsigned long long* bar, unsigned bytes) {
    asm volatile("mbarrier.arrive.expect_tx.shared::cta.b64 _, [%0], %1;" ::"r"(shared_address(bar)), "r"(bytes)
                 : "memory");
}
// Until the phase of this parity has completed (the copies it counted are then visible to the thread).
__device__ __forceinline__ void mbar_wait(unsigned long long* bar, unsigned parity) {
    unsigned done;
    do {
        asm volatile("{.reg .pred p; mbarrier.try_wait.parity.shared::cta.b64 p, [%1], %2; selp.u32 %0, 1, 0, p;}"
                     : "=r"(done) : "r"(shared_address(bar)), "r"(parity) : "memory");
    } while (!done);
}

// Before a tensor map written by a copy from the host is first used by the copy engine (one thread a block;
// system scope for a host's write, as the CUDA programming guide's TMA section has it).
__device__ __forceinline__ void tensor_map_acquire(const void* map) {
    asm volatile("fence.proxy.tensormap::generic.acquire.sys [%0], 128;" ::"l"(map) : "memory");
}

// The box at coordinates (x0 innermost .. x3) of a rank-4 tensor map to dst (1024-byte aligned for the
// 128-byte swizzle), counted on bar. Coordinates past the tensor's sizes read as zeros.
__device__ __forceinline__ void tma_load_4d(void* dst, const void* map, int x0, int x1, int x2, int x3,
                                            unsigned long long* bar) {
    asm volatile(
        "cp.async.bulk.tensor.4d.shared::cluster.global.tile.mbarrier::complete_tx::bytes"
        " [%0], [%1, {%2, %3, %4, %5}], [%6];"
        ::"r"(shared_address(dst)), "l"(map), "r"(x0), "r"(x1), "r"(x2), "r"(x3), "r"(shared_address(bar))
        : "memory");
}

}  // namespace ct
