// The activations of ActivationType (its values; 0 = identity), in fp32, for the elementwise pass
// (bias_act.cu) and the GEMV epilogue (gemv.cu).
#pragma once
#include "common.cuh"

namespace ct {

enum Act : int { IDENTITY = 0, GELU_TANH = 1, RELU = 2, GATED_GELU = 3, GATED_SILU = 4, GELU_ERF = 5 };

// 0.5 (1 + tanh(u)) = sigmoid(2u): FAST takes that form with the hardware exp and divide (float error far
// below a 16-bit rounding) instead of tanhf, which makes the pass compute-bound (H200).
template <bool FAST>
__device__ __forceinline__ float gelu_tanh(float x) {
    const float u = 0.7978845608028654f * (x + 0.044715f * x * x * x);
    return FAST ? __fdividef(x, 1.f + __expf(-2.f * u)) : 0.5f * x * (1.f + tanhf(u));
}
// erf by Abramowitz & Stegun 7.1.26 (absolute error <= 1.5e-7, far below a 16-bit rounding): a hardware
// reciprocal, an exp and five FMAs instead of erff's longer polynomial. (__frcp_rn, the IEEE-rounded
// reciprocal, compiles to a branch and a slow-path call on every element.)
__device__ __forceinline__ float erf_fast(float x) {
    const float a = fabsf(x), t = __fdividef(1.f, 1.f + 0.3275911f * a);
    const float p =
        t * (0.254829592f + t * (-0.284496736f + t * (1.421413741f + t * (-1.453152027f + t * 1.061405429f))));
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

// A gated activation's output from its up and gate values as T holds them (u, g) and their biases: up + bias and
// act(gate + bias) each rounded to T, then their product, as Hugging Face computes act_fn(gate) * up in T.
template <typename T, int ACT, bool FAST>
__device__ __forceinline__ T gated_output(float u, float g, float up_bias, float gate_bias, bool has_bias) {
    const float up = has_bias ? to_float(from_float<T>(u + up_bias)) : u;
    return from_float<T>(up * to_float(from_float<T>(activate<ACT, FAST>(g + gate_bias))));
}

// The per-column activations at run time (the GEMV epilogue: the gated forms need two columns).
template <bool FAST>
__device__ __forceinline__ float activate(float x, int act) {
    switch (act) {
        case GELU_TANH: return activate<GELU_TANH, FAST>(x);
        case RELU: return activate<RELU, FAST>(x);
        case GELU_ERF: return activate<GELU_ERF, FAST>(x);
        default: return x;
    }
}

}  // namespace ct
