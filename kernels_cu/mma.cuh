// Tensor-core and asynchronous-copy building blocks (sm_80+): mma.sync m16n8k16 with fp32 accumulation,
// ldmatrix fragment loads from shared memory, cp.async 16-byte copies global -> shared, streaming loads
// straight into registers and the in-register 8x8 transpose.
#pragma once
#include "common.cuh"

namespace ct {

template <typename T> constexpr bool IS_HALF = false;
template <> constexpr bool IS_HALF<__half> = true;

// c += A (16 x 16: four registers of packed pairs) x B (16 x 8: two registers), fp32 accumulation.
template <typename T>
__device__ __forceinline__ void mma_16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
#if __CUDA_ARCH__ >= 800
    if constexpr (IS_HALF<T>)
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
    else
        asm volatile("mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0,%1,%2,%3}, {%4,%5,%6,%7}, {%8,%9}, "
                     "{%0,%1,%2,%3};"
                     : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
                     : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
#else
    __trap();  // the launcher needs compute capability 8.0
#endif
}

// Four 8x8 matrices of 16-bit elements from shared memory; lane l gives the address of row l % 8 of matrix
// l / 8. TRANS: each lane receives pairs along the stored columns instead of along the stored rows.
template <bool TRANS>
__device__ __forceinline__ void ldmatrix_x4(unsigned (&a)[4], const void* row) {
#if __CUDA_ARCH__ >= 800
    const unsigned addr = shared_address(row);
    if constexpr (TRANS)
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.trans.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(addr));
    else
        asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0,%1,%2,%3}, [%4];"
                     : "=r"(a[0]), "=r"(a[1]), "=r"(a[2]), "=r"(a[3]) : "r"(addr));
#endif
}

// 16 bytes global -> shared without registers; `valid` false writes zeros (and reads nothing).
__device__ __forceinline__ void copy16(void* dst, const void* src, bool valid) {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.cg.shared.global.L2::256B [%0], [%1], 16, %2;"
                 :: "r"(shared_address(dst)), "l"(src), "r"(valid ? 16 : 0));
#endif
}
__device__ __forceinline__ void copy_commit() {
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.commit_group;");
#endif
}
template <int PENDING>
__device__ __forceinline__ void copy_wait() {  // all but the last PENDING committed groups have landed
#if __CUDA_ARCH__ >= 800
    asm volatile("cp.async.wait_group %0;" ::"n"(PENDING));
#endif
}

// 16 bytes of a stream read once: past L1. volatile keeps the batch's loads ahead of its math.
__device__ __forceinline__ uint4 load_stream(const void* p) {
    uint4 v;
    asm volatile("ld.global.nc.L1::no_allocate.L2::128B.v4.u32 {%0,%1,%2,%3}, [%4];"
                 : "=r"(v.x), "=r"(v.y), "=r"(v.z), "=r"(v.w) : "l"(p));
    return v;
}

// The 8x8 matrix of 16-bit elements whose row lane / 4, columns 2 (lane % 4) + {0, 1}, this lane holds,
// transposed (the same fragment layout).
__device__ __forceinline__ unsigned transpose8x8(unsigned v) {
    unsigned r;
    asm volatile("movmatrix.sync.aligned.m8n8.trans.b16 %0, %1;" : "=r"(r) : "r"(v));
    return r;
}

// Two floats as one register of two 16-bit elements (the first in the low half), an mma operand.
template <typename T>
__device__ __forceinline__ unsigned pack2(float lo, float hi) {
    if constexpr (IS_HALF<T>) {
        const __half2 v = __floats2half2_rn(lo, hi);
        return *reinterpret_cast<const unsigned*>(&v);
    } else {
        const __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
        return *reinterpret_cast<const unsigned*>(&v);
    }
}

}  // namespace ct
