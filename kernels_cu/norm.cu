// Row normalisation: LayerNorm (with or without beta) and RMSNorm over the last dimension.
//
// One block (or, for short rows, one warp) normalises one row. A row is cut into *slots*: the 16-byte
// aligned vectors of memory it touches. Whole slots move as one 16-byte access; the partial slots at
// either end (a row of 4095 fp16 values starts at a different alignment each row) move element by
// element. With VPT > 0 each thread keeps VPT slots in registers, so the row is read from memory once
// and the variance is an exact second pass over registers. VPT == 0 is the path for rows too long for
// registers: three passes over the row, the second and third served mostly from L2. Statistics and the
// affine transform are in fp32.
#include "norm_row.cuh"

namespace ct {

// Optional pre-add (MLPGemmOp's "x + residual + bias, then normalise"): z = round(x + residual [+ bias]),
// optionally written out, and the row normalised is z.
enum PreAdd : int { PRE_ADD = 1, PRE_ADD_BIAS = 2, WRITE_SUM = 4 };

// Everything one launch reads and writes; row pointers already offset to the block's row.
template <typename T>
struct NormArgs {
    const T* x;
    const T* residual;
    const T* add_bias;
    const T* gamma;
    const T* beta;
    T* y;
    T* sum;
    int mode, pre_add;
};

// The row's input slot: x, or round(x + residual [+ bias]) with the pre-add.
template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ Vec<T, VEC> input_slot(const Row<T, VEC, ALIGNED>& row, const NormArgs<T>& a, int s) {
    Vec<T, VEC> t = row.load(a.x, s);
    if (a.pre_add & PRE_ADD) {
        const Vec<T, VEC> r = row.load(a.residual, s);
        float b[VEC];
        if (a.pre_add & PRE_ADD_BIAS) row.params(a.add_bias, s, b);
#pragma unroll
        for (int j = 0; j < VEC; ++j)
            t.v[j] = from_float<T>(to_float(t.v[j]) + to_float(r.v[j]) + ((a.pre_add & PRE_ADD_BIAS) ? b[j] : 0.f));
    }
    return t;
}

template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ void normalize_slot(const Row<T, VEC, ALIGNED>& row, const NormArgs<T>& a, int s,
                                               const Vec<T, VEC>& in, float mean, float rstd) {
    if (a.pre_add & WRITE_SUM) row.store(a.sum, s, in);
    row.store(a.y, s, normalized_slot(row, a.gamma, a.beta, a.mode, s, in, mean, rstd));
}

// x, residual, y, sum: [rows, width] contiguous; add_bias, gamma, beta: [width]. Pointers a mode or
// pre_add flag leaves unused are placeholders, never read.
// WARP_PER_ROW: blockDim = (32, rows per block), one warp per row and warp-only reductions (short rows);
// otherwise one block of blockDim.x threads per row.
// The register path keeps the row in its storage type (8 fp16 values in 4 registers) so that
// 1024 threads x 8 slots fit the 64 registers per thread that __launch_bounds__(1024) allows.
template <typename T, int VEC, int VPT, bool WARP_PER_ROW, bool ALIGNED>
__global__ void __launch_bounds__(1024)
    norm_rows(const T* __restrict__ x, const T* __restrict__ residual, const T* __restrict__ add_bias,
              const T* __restrict__ gamma, const T* __restrict__ beta, T* __restrict__ y, T* __restrict__ sum,
              int rows, int width, float eps, int mode, int pre_add, int params_aligned) {
    follow_previous_kernel();
    __shared__ float scratch[32];
    const int row_index = WARP_PER_ROW ? blockIdx.x * blockDim.y + threadIdx.y : blockIdx.x;
    if (WARP_PER_ROW && row_index >= rows) return;  // whole warps leave; their reductions need no barrier
    const auto reduce = [&](float v) { return WARP_PER_ROW ? warp_sum(v) : block_sum(v, scratch); };
    const size_t offset = static_cast<size_t>(row_index) * width;
    const NormArgs<T> a{x + offset, residual + offset, add_bias, gamma, beta, y + offset, sum + offset, mode, pre_add};
    const Row<T, VEC, ALIGNED> row(a.x, width, params_aligned);
    const int slots = row.slots();
    const bool rms = mode == RMS_NORM;
    const float inv_width = 1.f / width;

    if constexpr (VPT > 0) {
        Vec<T, VEC> raw[VPT];
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const int s = threadIdx.x + k * blockDim.x;
            if (s < slots) raw[k] = input_slot(row, a, s);
        }
        float mean = 0.f;
        if (!rms) {
            float total = 0.f;
#pragma unroll
            for (int k = 0; k < VPT; ++k)
                if (threadIdx.x + k * blockDim.x < slots) total += slot_sum(raw[k]);
            mean = reduce(total) * inv_width;
        }
        float sq = 0.f;
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const int s = threadIdx.x + k * blockDim.x;
            if (s < slots) sq += slot_sq(row, s, raw[k], mean);
        }
        const float rstd = norm_rstd(reduce(sq), inv_width, eps);
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const int s = threadIdx.x + k * blockDim.x;
            if (s < slots) normalize_slot(row, a, s, raw[k], mean, rstd);
        }
    } else {
        float mean = 0.f;
        if (!rms) {
            float total = 0.f;
            for (int s = threadIdx.x; s < slots; s += blockDim.x) total += slot_sum(input_slot(row, a, s));
            mean = reduce(total) * inv_width;
        }
        float sq = 0.f;
        for (int s = threadIdx.x; s < slots; s += blockDim.x) sq += slot_sq(row, s, input_slot(row, a, s), mean);
        const float rstd = norm_rstd(reduce(sq), inv_width, eps);
        for (int s = threadIdx.x; s < slots; s += blockDim.x)
            normalize_slot(row, a, s, input_slot(row, a, s), mean, rstd);
    }
}

}  // namespace ct
