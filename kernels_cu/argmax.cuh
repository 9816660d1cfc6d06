// The first index of a row's largest value as the max of 64-bit keys (sampling.cu's greedy_tokens, and the GEMV's
// greedy epilogue in gemv.cu): a max is order-free, so blocks may combine theirs in any order, even by atomicMax.
#pragma once
#include "common.cuh"

namespace ct {

// Order keys: unsigned integers ordered as the values are (-0 and +0 share one key; NaN is not ordered).
__device__ __forceinline__ unsigned order_key(float v) {
    unsigned bits = __float_as_uint(v);
    if (bits == 0x80000000u) bits = 0;
    return bits & 0x80000000u ? ~bits : bits | 0x80000000u;
}
__device__ __forceinline__ unsigned order_key16(unsigned bits) {
    if (bits == 0x8000u) bits = 0;
    return bits & 0x8000u ? ~bits & 0xFFFFu : bits | 0x8000u;
}
__device__ __forceinline__ unsigned order_key(__half v) { return order_key16(__half_as_ushort(v)); }
__device__ __forceinline__ unsigned order_key(__nv_bfloat16 v) { return order_key16(__bfloat16_as_ushort(v)); }

// A logit and its index packed in 64 bits so that the largest packed value is the first index of the largest logit:
// the order key above ~index. index < 2^31, so every element packs above 2^31 and 0 is the identity of the max.
template <typename T>
__device__ __forceinline__ unsigned long long argmax_key(T v, unsigned index) {
    return static_cast<unsigned long long>(order_key(v)) << 32 | ~index;
}

// The index an argmax_key packs.
__device__ __forceinline__ int argmax_index(unsigned long long key) {
    return static_cast<int>(~static_cast<unsigned>(key));
}

}  // namespace ct
