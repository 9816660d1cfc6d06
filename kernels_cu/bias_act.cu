// Bias + activation after the first MLP GEMM, one pass over its output.
//
// ACT (the values of ActivationType, 0 = identity): 1 GELU (tanh form), 2 ReLU, 3 gated GELU (erf form),
// 4 gated SiLU, 5 GELU (erf form). Plain: y = act(h + bias), fp32 math, one rounding. Gated: h holds
// [up | gate] halves of `width` columns each and y = up * act(gate), with act(gate) rounded to the
// element type before the product (as Hugging Face computes act_fn(gate) * up in that type).
#include "common.cuh"

namespace ct {

enum Act : int { IDENTITY = 0, GELU_TANH = 1, RELU = 2, GATED_GELU = 3, GATED_SILU = 4, GELU_ERF = 5 };

__device__ __forceinline__ float gelu_tanh(float x) {
    return 0.5f * x * (1.f + tanhf(0.7978845608028654f * (x + 0.044715f * x * x * x)));
}
__device__ __forceinline__ float gelu_erf(float x) { return 0.5f * x * (1.f + erff(x * 0.7071067811865476f)); }
__device__ __forceinline__ float silu(float x) { return x / (1.f + expf(-x)); }

template <int ACT>
__device__ __forceinline__ float activate(float x) {
    if constexpr (ACT == GELU_TANH) return gelu_tanh(x);
    else if constexpr (ACT == RELU) return fmaxf(x, 0.f);
    else if constexpr (ACT == GATED_GELU || ACT == GELU_ERF) return gelu_erf(x);
    else if constexpr (ACT == GATED_SILU) return silu(x);
    else return x;
}

// h: [rows, width] (gated: [rows, 2 * width]); bias: [width] (gated: [2 * width]) or unread if !has_bias;
// y: [rows, width]. width % VEC == 0 and every pointer VEC-element aligned (the launcher checks).
// y may be h (non-gated, in place): each thread reads its elements before writing them, so no __restrict__.
template <typename T, int ACT, int VEC>
__global__ void bias_act(const T* h, const T* __restrict__ bias, T* y, long long rows,
                         int width, int has_bias) {
    using V = Vec<T, VEC>;
    constexpr bool gated = ACT == GATED_GELU || ACT == GATED_SILU;
    const int per_row = width / VEC;
    const long long total = rows * per_row;
    for (long long i = blockIdx.x * static_cast<long long>(blockDim.x) + threadIdx.x; i < total;
         i += static_cast<long long>(gridDim.x) * blockDim.x) {
        const long long row = i / per_row;
        const int col = static_cast<int>(i - row * per_row) * VEC;
        const T* hr = h + row * (gated ? 2LL : 1LL) * width;
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
                const float g = to_float(from_float<T>(activate<ACT>(to_float(gate.v[j]) + (has_bias ? to_float(bg.v[j]) : 0.f))));
                out.v[j] = from_float<T>(u * g);
            }
        } else {
            const V x = *reinterpret_cast<const V*>(hr + col);
            V b;
            if (has_bias) b = *reinterpret_cast<const V*>(bias + col);
#pragma unroll
            for (int j = 0; j < VEC; ++j)
                out.v[j] = from_float<T>(activate<ACT>(to_float(x.v[j]) + (has_bias ? to_float(b.v[j]) : 0.f)));
        }
        *reinterpret_cast<V*>(y + row * width + col) = out;
    }
}

}  // namespace ct
