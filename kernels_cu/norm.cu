// Row normalisation: LayerNorm (with or without beta) and RMSNorm over the last dimension.
//
// One block (or, for short rows, one warp) normalises one row. With VPT > 0 each thread keeps VPT vectors of VEC elements in
// registers, so the row is read from memory once and the variance is an exact second pass over
// registers. VPT == 0 is the path for rows too long for registers: three passes over the row,
// the second and third served mostly from L2. Statistics and the affine transform are in fp32.
#include "common.cuh"

namespace ct {

enum NormMode : int { LAYER_NORM = 0, LAYER_NORM_NO_BETA = 1, RMS_NORM = 2 };

template <typename T, int VEC>
__device__ __forceinline__ void store_normalized(Vec<T, VEC>* __restrict__ y, const Vec<T, VEC>* __restrict__ gamma,
                                                 const Vec<T, VEC>* __restrict__ beta, int slot,
                                                 const float (&v)[VEC], float mean, float rstd, int mode) {
    const Vec<T, VEC> g = gamma[slot];
    Vec<T, VEC> out;
    if (mode == RMS_NORM) {
        // As Hugging Face's RMSNorm: normalise in fp32, round to T, then multiply by gamma in T.
#pragma unroll
        for (int j = 0; j < VEC; ++j)
            out.v[j] = from_float<T>(to_float(from_float<T>(v[j] * rstd)) * to_float(g.v[j]));
    } else {
        Vec<T, VEC> b;
        if (mode == LAYER_NORM) b = beta[slot];
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            const float shift = mode == LAYER_NORM ? to_float(b.v[j]) : 0.f;
            out.v[j] = from_float<T>((v[j] - mean) * rstd * to_float(g.v[j]) + shift);
        }
    }
    y[slot] = out;
}

template <typename T, int VEC>
__device__ __forceinline__ void to_floats(const Vec<T, VEC>& t, float (&v)[VEC]) {
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = to_float(t.v[j]);
}

// x, y: [rows, width] contiguous; gamma, beta: [width]; width % VEC == 0.
// WARP_PER_ROW: blockDim = (32, rows per block), one warp per row and warp-only reductions (short rows);
// otherwise one block of blockDim.x threads per row.
// The register path keeps the row in its storage type (8 fp16 values in 4 registers) so that
// 1024 threads x 8 vectors fit the 64 registers per thread that __launch_bounds__(1024) allows.
template <typename T, int VEC, int VPT, bool WARP_PER_ROW>
__global__ void __launch_bounds__(1024) norm_rows(const T* __restrict__ x, const T* __restrict__ gamma,
                                                  const T* __restrict__ beta, T* __restrict__ y, int rows,
                                                  int width, float eps, int mode) {
    using V = Vec<T, VEC>;
    __shared__ float scratch[32];
    const int row_index = WARP_PER_ROW ? blockIdx.x * blockDim.y + threadIdx.y : blockIdx.x;
    if (WARP_PER_ROW && row_index >= rows) return;  // whole warps leave; their reductions need no barrier
    const auto reduce = [&](float v) { return WARP_PER_ROW ? warp_sum(v) : block_sum(v, scratch); };
    const size_t row = static_cast<size_t>(row_index) * width;
    const V* xr = reinterpret_cast<const V*>(x + row);
    V* yr = reinterpret_cast<V*>(y + row);
    const V* g = reinterpret_cast<const V*>(gamma);
    const V* b = reinterpret_cast<const V*>(beta);
    const int slots = width / VEC;
    const bool rms = mode == RMS_NORM;
    const float inv_width = 1.f / width;
    float v[VEC];

    if constexpr (VPT > 0) {
        V raw[VPT];
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const int s = threadIdx.x + k * blockDim.x;
            if (s < slots) raw[k] = xr[s];
        }
        float mean = 0.f;
        if (!rms) {
            float sum = 0.f;
#pragma unroll
            for (int k = 0; k < VPT; ++k) {
                if (threadIdx.x + k * blockDim.x < slots) {
                    to_floats(raw[k], v);
#pragma unroll
                    for (int j = 0; j < VEC; ++j) sum += v[j];
                }
            }
            mean = reduce(sum) * inv_width;
        }
        float sq = 0.f;
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            if (threadIdx.x + k * blockDim.x < slots) {
                to_floats(raw[k], v);
#pragma unroll
                for (int j = 0; j < VEC; ++j) sq += (v[j] - mean) * (v[j] - mean);
            }
        }
        const float rstd = rsqrtf(reduce(sq) * inv_width + eps);
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const int s = threadIdx.x + k * blockDim.x;
            if (s < slots) {
                to_floats(raw[k], v);
                store_normalized<T, VEC>(yr, g, b, s, v, mean, rstd, mode);
            }
        }
    } else {
        float mean = 0.f;
        if (!rms) {
            float sum = 0.f;
            for (int s = threadIdx.x; s < slots; s += blockDim.x) {
                to_floats(xr[s], v);
#pragma unroll
                for (int j = 0; j < VEC; ++j) sum += v[j];
            }
            mean = reduce(sum) * inv_width;
        }
        float sq = 0.f;
        for (int s = threadIdx.x; s < slots; s += blockDim.x) {
            to_floats(xr[s], v);
#pragma unroll
            for (int j = 0; j < VEC; ++j) sq += (v[j] - mean) * (v[j] - mean);
        }
        const float rstd = rsqrtf(reduce(sq) * inv_width + eps);
        for (int s = threadIdx.x; s < slots; s += blockDim.x) {
            to_floats(xr[s], v);
            store_normalized<T, VEC>(yr, g, b, s, v, mean, rstd, mode);
        }
    }
}

}  // namespace ct
