// The residual combine that ends a transformer layer (ResidualAddOp), one pass:
//   y = p0 [+ p1] + ([r0] [+ r1] [+ b0] [+ b1]) * inv_p
// p*: terms that are partial sums over tensor-parallel ranks (the caller all-reduces y afterwards);
// r*: rows replicated on every rank and b*: per-column biases, both pre-divided by the rank count so
// the all-reduce counts them once. fp32 math, one rounding.
#include "elementwise.cuh"

namespace ct {

enum Present : int { P1 = 1, R0 = 2, R1 = 4, B0 = 8, B1 = 16 };

// Row tensors [rows, width], biases [width]; absent ones are placeholders, never read. y may be one of
// the inputs (an in-place update): each thread reads its elements before writing them, so no __restrict__.
template <typename T, bool WHOLE>
struct ResidualCombine {
    const T *p0, *p1, *r0, *r1, *b0, *b1;
    T* y;
    unsigned width;
    float inv_p;
    int present;

    template <int N>
    __device__ __forceinline__ void operator()(size_t at, unsigned, unsigned col, Run<N>) const {
        using V = Vec<T, N>;
        float partial[N], shared[N] = {}, t[N];
        const V a = *reinterpret_cast<const V*>(p0 + at);
#pragma unroll
        for (int j = 0; j < N; ++j) partial[j] = to_float(a.v[j]);
        const auto add = [&](float (&acc)[N], const T* p) {
            const V v = *reinterpret_cast<const V*>(p);
#pragma unroll
            for (int j = 0; j < N; ++j) acc[j] += to_float(v.v[j]);
        };
        const auto add_column = [&](const T* b) {
            column_values<WHOLE>(t, b, col, width);
#pragma unroll
            for (int j = 0; j < N; ++j) shared[j] += t[j];
        };
        if (present & P1) add(partial, p1 + at);
        if (present & R0) add(shared, r0 + at);
        if (present & R1) add(shared, r1 + at);
        if (present & B0) add_column(b0);
        if (present & B1) add_column(b1);
        V out;
#pragma unroll
        for (int j = 0; j < N; ++j) out.v[j] = from_float<T>(partial[j] + shared[j] * inv_p);
        *reinterpret_cast<V*>(y + at) = out;
    }
};

// VEC-element runs over the flat tensor, any width (every pointer VEC-element aligned: the launcher checks);
// WHOLE: width % VEC == 0.
template <typename T, int VEC, bool WHOLE>
__global__ void residual_combine(const T* p0, const T* p1, const T* r0, const T* r1, const T* b0, const T* b1, T* y,
                                 unsigned vectors, int tail, int width, float inv_p, int present) {
    const unsigned w = width;
    for_each_run<VEC>(vectors, tail, w, ResidualCombine<T, WHOLE>{p0, p1, r0, r1, b0, b1, y, w, inv_p, present});
}

}  // namespace ct
