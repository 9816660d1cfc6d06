// Bias + activation after the first MLP GEMM, one pass over its output.
//
// ACT (the values of ActivationType, 0 = identity): 1 GELU (tanh form), 2 ReLU, 3 gated GELU (erf form),
// 4 gated SiLU, 5 GELU (erf form). Plain: y = act(h + bias), fp32 math, one rounding. Gated: h holds
// [up | gate] halves of `width` columns each and y = up * act(gate), with act(gate) rounded to the
// element type before the product (as Hugging Face computes act_fn(gate) * up in that type).
#include "common.cuh"

namespace ct {

enum Act : int { IDENTITY = 0, GELU_TANH = 1, RELU = 2, GATED_GELU = 3, GATED_SILU = 4, GELU_ERF = 5 };

// 0.5 (1 + tanh(u)) = sigmoid(2u): FAST takes that form with the hardware exp and divide (float error far
// below a 16-bit rounding) instead of tanhf, which made the pass compute-bound on an H200.
template <bool FAST>
__device__ __forceinline__ float gelu_tanh(float x) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return FAST ? __fdividef(x, 1.f + __expf(-2.f * u)) : 0.5f * x * (1.f + tanhf(u));
}
// erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, far below a 16-bit rounding): a reciprocal,
// an exp and five FMAs instead of erff's longer polynomial.
__device__ __forceinline__ float erf_fast(float x) {
    const float a = fabsf(x), t = __frcp_rn(1.f + 0.3275911f * a);
    const float p = t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
    return copysignf(1.f - p * __expf(-a * a), x);
}
template <bool FAST>
__device__ __forceinline__ float gelu_erf(float x) {
    const float z = x * 0.7071067811865476f;
    return 0.5f * x * (1.f + (FAST ? erf_fast(z) : erff(z)));
}
// FAST (16-bit outputs) here and above: the hardware exp and divide and a short erf, whose float error
// vanishes in the rounding to fp16/bf16; the accurate forms cost more instructions than the pass has memory
// time for.
template <bool FAST>
__device__ __forceinline__ float silu(float x) {
    return FAST ? __fdividef(x, 1.f + __expf(-x)) : x / (1.f + expf(-x));
}

template <int ACT, bool FAST>
__device__ __forceinline__ float activate(float x) {
    if constexpr (ACT == GELU_TANH) return gelu_tanh<FAST>(x);
    else if constexpr (ACT == RELU) return fmaxf(x, 0.f);
    else if constexpr (ACT == GATED_GELU || ACT == GELU_ERF) return gelu_erf<FAST>(x);
    else if constexpr (ACT == GATED_SILU) return silu<FAST>(x);
    else return x;
}

// h: [rows, width] (gated: [rows, 2 * width]); bias: [width] (gated: [2 * width]) or unread if !has_bias;
// y: [rows, width]. width % VEC == 0 and every pointer VEC-element aligned (the launcher checks).
// y may be h (non-gated, in place): each thread reads its elements before writing them, so no __restrict__.
template <typename T, int ACT, int VEC>
__global__ void bias_act(const T* h, const T* __restrict__ bias, T* y, unsigned vectors, int width, int has_bias) {
    using V = Vec<T, VEC>;
    constexpr bool gated = ACT == GATED_GELU || ACT == GATED_SILU, FAST = sizeof(T) == 2;
    const unsigned per_row = width / VEC;
    // 32-bit indices (vectors < 2^31, the launcher checks): a 64-bit division costs more than the bytes.
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < vectors; i += gridDim.x * blockDim.x) {
        const unsigned row = i / per_row;
        const int col = (i - row * per_row) * VEC;
        const T* hr = h + static_cast<size_t>(row) * (gated ? 2 : 1) * width;
        V out;
        if constexpr (gated) {
            const V up = *reinterpret_cast<const V*>(hr + col);
            const V gate = *reinterpret_cast<const V*>(hr + width + col);
            V bu, bg;
            if (has_bias) {
                bu = *reinterpret_cast<const V*>(bias + col);
                bg = *reinterpret_cast<const V*>(bias + width + col);
            }
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const float u = has_bias ? to_float(from_float<T>(to_float(up.v[j]) + to_float(bu.v[j]))) : to_float(up.v[j]);
                const float g = to_float(from_float<T>(activate<ACT, FAST>(to_float(gate.v[j]) + (has_bias ? to_float(bg.v[j]) : 0.f))));
                out.v[j] = from_float<T>(u * g);
            }
        } else {
            const V x = *reinterpret_cast<const V*>(hr + col);
            V b;
            if (has_bias) b = *reinterpret_cast<const V*>(bias + col);
#pragma unroll
            for (int j = 0; j < VEC; ++j)
                out.v[j] = from_float<T>(activate<ACT, FAST>(to_float(x.v[j]) + (has_bias ? to_float(b.v[j]) : 0.f)));
        }
        *reinterpret_cast<V*>(y + static_cast<size_t>(row) * width + col) = out;
    }
}

}  // namespace ct
