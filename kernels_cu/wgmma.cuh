// Hopper warpgroup matrix multiply (wgmma, sm_90a): a warpgroup (4 consecutive warps, the first at a warp
// index divisible by 4) computes D[64 x N] += A[64 x 16] B[16 x N] with fp32 accumulators in registers,
// d[N / 8][4] a thread: warp w of the group holds rows 16w + lane / 4 (d[j][0..1]) and 16w + lane / 4 + 8
// (d[j][2..3]), columns 8j + 2 (lane % 4) + {0, 1}: mma.sync's m16n8 accumulators, N / 8 of them. B comes
// from shared memory through a descriptor, A from shared memory (ss) or from registers in mma.sync's
// m16n8k16 A fragment layout (rs).
#pragma once
#include "mma.cuh"

namespace ct {

// A shared-memory operand in the 128-byte swizzle: rows of 64 elements (128 bytes) whose 16-byte chunks are
// permuted, chunk c of row r at c ^ r % 8, in 1024-byte aligned groups of 8 rows (the layout wgmma reads
// without bank conflicts; unswizzled 8 x 8 core matrices measured 1.3-1.5x slower here). Consecutive
// 8-row groups 1024 bytes apart; lbo: bytes between 64-element column blocks (read where an operand's
// N-major rows span more than one). p may step 32 bytes into a row (the next 16 K of a K-major operand).
__device__ __forceinline__ unsigned long long wg_desc(const void* p, unsigned lbo) {
    const unsigned addr = shared_address(p);
    return static_cast<unsigned long long>((addr & 0x3FFFF) >> 4) | static_cast<unsigned long long>(lbo >> 4) << 16 |
           static_cast<unsigned long long>(1024 >> 4) << 32 | 1ull << 62;
}

// In each thread that wrote shared memory with ordinary stores or cp.async, before the barrier after which
// wgmma reads it.
__device__ __forceinline__ void fence_async_shared() { asm volatile("fence.proxy.async.shared::cta;" ::: "memory"); }
// Orders this warpgroup's earlier register writes before its next wgmma reads them.
__device__ __forceinline__ void wg_fence() { asm volatile("wgmma.fence.sync.aligned;" ::: "memory"); }
__device__ __forceinline__ void wg_commit() { asm volatile("wgmma.commit_group.sync.aligned;" ::: "memory"); }
// Waits for every committed group; then pins the accumulators, so that no read of them is scheduled before
// the wait (the asm that issued the product claimed to write them already).
template <int R>
__device__ __forceinline__ void wg_wait(float (&d)[R][4]) {
    asm volatile("wgmma.wait_group.sync.aligned 0;" ::: "memory");
#pragma unroll
    for (int i = 0; i < R; ++i)
#pragma unroll
        for (int e = 0; e < 4; ++e) asm volatile("" : "+f"(d[i][e])::"memory");
}

// Operand lists: accumulators %0.. first, then the inputs.
#define CT_WG_F8(i) "+f"(d[i][0]), "+f"(d[i][1]), "+f"(d[i][2]), "+f"(d[i][3]), "+f"(d[i + 1][0]), \
                    "+f"(d[i + 1][1]), "+f"(d[i + 1][2]), "+f"(d[i + 1][3])
#define CT_WG_32 "%0, %1, %2, %3, %4, %5, %6, %7, %8, %9, %10, %11, %12, %13, %14, %15, %16, %17, %18, %19, %20, " \
                 "%21, %22, %23, %24, %25, %26, %27, %28, %29, %30, %31"
#define CT_WG_64 CT_WG_32 ", %32, %33, %34, %35, %36, %37, %38, %39, %40, %41, %42, %43, %44, %45, %46, %47, %48, " \
                 "%49, %50, %51, %52, %53, %54, %55, %56, %57, %58, %59, %60, %61, %62, %63"

// One specialisation per N: ACC the accumulator list, I0.. the numbers of the inputs that follow them, then
// the accumulator operands.
template <typename T, int N> struct Wgmma;
#define CT_WGMMA_ONE(N, TY, ACC, A_OPERAND, B, FLAG, TRANS)                                                    \
    "{.reg .pred p; setp.ne.b32 p, %" FLAG ", 0; wgmma.mma_async.sync.aligned.m64n" #N "k16.f32." TY "." TY  \
    " {" ACC "}, " A_OPERAND ", %" B ", p, 1, 1, " TRANS ";}"
#define CT_WGMMA(N, ACC, I0, I1, I2, I3, I4, I5, ...)                                                        \
    template <typename T> struct Wgmma<T, N> {                                                                  \
        /* d (+)= A B, both from shared memory, K-major (B's rows are its N); accumulate 0: d = A B */         \
        static __device__ __forceinline__ void ss(float (&d)[N / 8][4], unsigned long long a, unsigned long long b, \
                                                  int accumulate) {                                             \
            if constexpr (IS_HALF<T>)                                                                           \
                asm volatile(CT_WGMMA_ONE(N, "f16", ACC, "%" I0, I1, I2, "0, 0")                                \
                             : __VA_ARGS__ : "l"(a), "l"(b), "r"(accumulate));                                  \
            else                                                                                                \
                asm volatile(CT_WGMMA_ONE(N, "bf16", ACC, "%" I0, I1, I2, "0, 0")                               \
                             : __VA_ARGS__ : "l"(a), "l"(b), "r"(accumulate));                                  \
        }                                                                                                       \
        /* d (+)= A B, A from registers (mma.sync's A fragment), B from shared memory N-major (its rows are K) */ \
        static __device__ __forceinline__ void rs(float (&d)[N / 8][4], const unsigned (&a)[4],                 \
                                                  unsigned long long b, int accumulate) {                       \
            if constexpr (IS_HALF<T>)                                                                           \
                asm volatile(CT_WGMMA_ONE(N, "f16", ACC, "{%" I0 ", %" I1 ", %" I2 ", %" I3 "}", I4, I5, "1")   \
                             : __VA_ARGS__ : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate)); \
            else                                                                                                \
                asm volatile(CT_WGMMA_ONE(N, "bf16", ACC, "{%" I0 ", %" I1 ", %" I2 ", %" I3 "}", I4, I5, "1")  \
                             : __VA_ARGS__ : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "l"(b), "r"(accumulate)); \
        }                                                                                                       \
    };
CT_WGMMA(64, CT_WG_32, "32", "33", "34", "35", "36", "37", CT_WG_F8(0), CT_WG_F8(2), CT_WG_F8(4), CT_WG_F8(6))
CT_WGMMA(128, CT_WG_64, "64", "65", "66", "67", "68", "69", CT_WG_F8(0), CT_WG_F8(2), CT_WG_F8(4), CT_WG_F8(6),
         CT_WG_F8(8), CT_WG_F8(10), CT_WG_F8(12), CT_WG_F8(14))
#undef CT_WGMMA

}  // namespace ct
