// The residual combine that ends a transformer layer (ResidualAddOp), one pass:
//   y = p0 [+ p1] + ([r0] [+ r1] [+ b0] [+ b1]) * inv_p
// p*: terms that are partial sums over tensor-parallel ranks (the caller all-reduces y afterwards);
// r*: rows replicated on every rank and b*: per-column biases, both pre-divided by the rank count so
// the all-reduce counts them once. fp32 math, one rounding.
#include "common.cuh"

namespace ct {

enum Present : int { P1 = 1, R0 = 2, R1 = 4, B0 = 8, B1 = 16 };

// Row tensors [rows, width], biases [width]; absent ones are placeholders, never read. y may be one of
// the inputs (an in-place update): each thread reads its elements before writing them, so no __restrict__.
template <typename T, int VEC>
__global__ void residual_combine(const T* p0, const T* p1, const T* r0, const T* r1, const T* b0, const T* b1, T* y,
                                 unsigned vectors, int width, float inv_p, int present) {
    using V = Vec<T, VEC>;
    const unsigned per_row = width / VEC;
    // 32-bit indices (vectors < 2^31, the launcher checks): a 64-bit division costs more than the bytes.
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < vectors; i += gridDim.x * blockDim.x) {
        const size_t at = static_cast<size_t>(i) * VEC;
        const int col = (i % per_row) * VEC;
        float partial[VEC], shared[VEC];
        const V a = *reinterpret_cast<const V*>(p0 + at);
#pragma unroll
        for (int j = 0; j < VEC; ++j) partial[j] = to_float(a.v[j]), shared[j] = 0.f;
        const auto add = [&](float (&acc)[VEC], const T* p) {
            const V t = *reinterpret_cast<const V*>(p);
#pragma unroll
            for (int j = 0; j < VEC; ++j) acc[j] += to_float(t.v[j]);
        };
        if (present & P1) add(partial, p1 + at);
        if (present & R0) add(shared, r0 + at);
        if (present & R1) add(shared, r1 + at);
        if (present & B0) add(shared, b0 + col);
        if (present & B1) add(shared, b1 + col);
        V out;
#pragma unroll
        for (int j = 0; j < VEC; ++j) out.v[j] = from_float<T>(partial[j] + shared[j] * inv_p);
        *reinterpret_cast<V*>(y + at) = out;
    }
}

}  // namespace ct
