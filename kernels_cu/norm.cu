// Row normalisation: LayerNorm (with or without beta) and RMSNorm over the last dimension.
//
// One block normalises one row. With VPT > 0 each thread keeps VPT vectors of VEC elements in
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
__device__ __forceinline__ void load_floats(const Vec<T, VEC>* __restrict__ x, int slot, float (&v)[VEC]) {
    const Vec<T, VEC> t = x[slot];
#pragma unroll
    for (int j = 0; j < VEC; ++j) v[j] = to_float(t.v[j]);
}

// x, y: [rows, width] contiguous, one block per row; gamma, beta: [width]; width % VEC == 0.
template <typename T, int VEC, int VPT>
__global__ void norm_rows(const T* __restrict__ x, const T* __restrict__ gamma, const T* __restrict__ beta,
                          T* __restrict__ y, int width, float eps, int mode) {
    using V = Vec<T, VEC>;
    __shared__ float scratch[32];
    const size_t row = static_cast<size_t>(blockIdx.x) * width;
    const V* xr = reinterpret_cast<const V*>(x + row);
    V* yr = reinterpret_cast<V*>(y + row);
    const V* g = reinterpret_cast<const V*>(gamma);
    const V* b = reinterpret_cast<const V*>(beta);
    const int slots = width / VEC;
    const bool rms = mode == RMS_NORM;
    const float inv_width = 1.f / width;

    if constexpr (VPT > 0) {
        float v[VPT][VEC];
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const int s = threadIdx.x + k * blockDim.x;
            if (s < slots) {
                load_floats(xr, s, v[k]);
            } else {
#pragma unroll
                for (int j = 0; j < VEC; ++j) v[k][j] = 0.f;
            }
        }
        float mean = 0.f;
        if (!rms) {
            float sum = 0.f;
#pragma unroll
            for (int k = 0; k < VPT; ++k)
#pragma unroll
                for (int j = 0; j < VEC; ++j) sum += v[k][j];
            mean = block_sum(sum, scratch) * inv_width;
        }
        float sq = 0.f;
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            if (threadIdx.x + k * blockDim.x < slots) {
#pragma unroll
                for (int j = 0; j < VEC; ++j) sq += (v[k][j] - mean) * (v[k][j] - mean);
            }
        }
        const float rstd = rsqrtf(block_sum(sq, scratch) * inv_width + eps);
#pragma unroll
        for (int k = 0; k < VPT; ++k) {
            const int s = threadIdx.x + k * blockDim.x;
            if (s < slots) store_normalized<T, VEC>(yr, g, b, s, v[k], mean, rstd, mode);
        }
    } else {
        float v[VEC];
        float mean = 0.f;
        if (!rms) {
            float sum = 0.f;
            for (int s = threadIdx.x; s < slots; s += blockDim.x) {
                load_floats(xr, s, v);
#pragma unroll
                for (int j = 0; j < VEC; ++j) sum += v[j];
            }
            mean = block_sum(sum, scratch) * inv_width;
        }
        float sq = 0.f;
        for (int s = threadIdx.x; s < slots; s += blockDim.x) {
            load_floats(xr, s, v);
#pragma unroll
            for (int j = 0; j < VEC; ++j) sq += (v[j] - mean) * (v[j] - mean);
        }
        const float rstd = rsqrtf(block_sum(sq, scratch) * inv_width + eps);
        for (int s = threadIdx.x; s < slots; s += blockDim.x) {
            load_floats(xr, s, v);
            store_normalized<T, VEC>(yr, g, b, s, v, mean, rstd, mode);
        }
    }
}

}  // namespace ct
