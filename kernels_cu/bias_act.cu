// Bias + activation after the first MLP GEMM, one pass over its output.
//
// ACT: activation.cuh's Act (ActivationType's values, 0 = identity). Plain: y = act(h + bias), fp32 math, one
// rounding. Gated: h holds [up | gate] halves of `width` columns each and y = up * act(gate), with act(gate)
// rounded to the element type before the product (as Hugging Face computes act_fn(gate) * up in that type).
#include "activation.cuh"
#include "elementwise.cuh"

namespace ct {

// h: [rows, width] (gated: [rows, 2 * width]); bias: [width] (gated: [2 * width]) or unread if !has_bias;
// y: [rows, width]. y may be h (non-gated, in place): each thread reads its elements before writing them.
template <typename T, int ACT, bool WHOLE>
struct BiasAct {
    const T* h;
    const T* bias;
    T* y;
    unsigned width;
    int has_bias;

    template <int N>
    __device__ __forceinline__ void operator()(size_t at, unsigned row, unsigned col, Run<N>) const {
        constexpr bool gated = ACT == GATED_GELU || ACT == GATED_SILU, FAST = sizeof(T) == 2;
        using V = Vec<T, N>;
        float b[N] = {};
        V out;
        if constexpr (gated) {
            const T* up_at = h + static_cast<size_t>(row) * 2 * width + col;
            const V up = *reinterpret_cast<const V*>(up_at);
            const V gate = *reinterpret_cast<const V*>(up_at + width);
            float bg[N] = {};
            if (has_bias) column_values<WHOLE>(b, bias, col, width), column_values<WHOLE>(bg, bias + width, col, width);
#pragma unroll
            for (int j = 0; j < N; ++j)
                out.v[j] = gated_output<T, ACT, FAST>(to_float(up.v[j]), to_float(gate.v[j]), b[j], bg[j], has_bias);
        } else {
            const V x = *reinterpret_cast<const V*>(h + at);
            if (has_bias) column_values<WHOLE>(b, bias, col, width);
#pragma unroll
            for (int j = 0; j < N; ++j) out.v[j] = from_float<T>(activate<ACT, FAST>(to_float(x.v[j]) + b[j]));
        }
        *reinterpret_cast<V*>(y + at) = out;
    }
};

// VEC-element runs over y's flat elements, every pointer VEC-element aligned (the launcher checks); WHOLE:
// width % VEC == 0, which gated activations need (a run's up and gate elements then lie in one row, aligned).
template <typename T, int ACT, int VEC, bool WHOLE>
__global__ void bias_act(const T* h, const T* __restrict__ bias, T* y, unsigned vectors, int tail, int width,
                         int has_bias) {
    const unsigned w = width;
    for_each_run<VEC>(vectors, tail, w, BiasAct<T, ACT, WHOLE>{h, bias, y, w, has_bias});
}

}  // namespace ct
