// Bias + activation after the first MLP GEMM, one pass over its output.
//
// ACT: activation.cuh's Act (ActivationType's values, 0 = identity). Plain: y = act(h + bias), fp32 math, one rounding. Gated: h holds
// [up | gate] halves of `width` columns each and y = up * act(gate), with act(gate) rounded to the
// element type before the product (as Hugging Face computes act_fn(gate) * up in that type).
#include "activation.cuh"
#include "common.cuh"

namespace ct {

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
