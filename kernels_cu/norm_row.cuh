// One row of a norm (LayerNorm with or without beta, RMSNorm): its 16-byte slots, the per-thread sums of its
// statistics and the normalised values. norm.cu's kernel and gemv.cu's norm prologue share the values' code, so the
// fused product normalises as the norm kernel does (within a rounding: the prologue sums its statistics otherwise).
#pragma once
#include "common.cuh"

namespace ct {

enum NormMode : int { LAYER_NORM = 0, LAYER_NORM_NO_BETA = 1, RMS_NORM = 2 };

// Slot geometry of one row. Every row-shaped tensor (x, residual, y, sum) shares x's alignment modulo 16
// bytes (the launcher checks), so a slot is aligned in all of them; `lead` is how many elements of the
// first slot lie before the row's start. ALIGNED (the launcher's promise: rows and the per-column
// vectors 16-byte aligned, width % VEC == 0) makes every slot whole at compile time, which keeps the
// common case free of per-element checks.
template <typename T, int VEC, bool ALIGNED>
struct Row {
    using V = Vec<T, VEC>;
    int width, lead;
    bool params_by_slot;  // the per-column vectors (gamma, beta, bias) line up with the slots

    __device__ Row(const T* x, int width_, bool params_aligned) : width(width_) {
        lead = ALIGNED ? 0 : static_cast<int>((reinterpret_cast<size_t>(x) % sizeof(V)) / sizeof(T));
        params_by_slot = ALIGNED || (lead == 0 && width % VEC == 0 && params_aligned);
    }
    __device__ int slots() const { return (lead + width + VEC - 1) / VEC; }
    __device__ int first(int s) const { return s * VEC - lead; }  // row index of the slot's first element
    __device__ bool whole(int s) const { return ALIGNED || (first(s) >= 0 && first(s) + VEC <= width); }
    __device__ bool valid(int s, int j) const { return ALIGNED || (first(s) + j >= 0 && first(s) + j < width); }

    // A slot of a row-shaped tensor (p points at the row's first element); outside the row reads as 0.
    __device__ V load(const T* p, int s) const {
        if (whole(s)) return *reinterpret_cast<const V*>(p + first(s));
        V t;
#pragma unroll
        for (int j = 0; j < VEC; ++j) t.v[j] = valid(s, j) ? p[first(s) + j] : from_float<T>(0.f);
        return t;
    }
    __device__ void store(T* p, int s, const V& t) const {
        if (whole(s)) {
            *reinterpret_cast<V*>(p + first(s)) = t;
            return;
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j)
            if (valid(s, j)) p[first(s) + j] = t.v[j];
    }
    // A per-column vector (gamma, beta, bias) for the slot's elements (0 outside the row).
    __device__ void params(const T* __restrict__ p, int s, float (&out)[VEC]) const {
        if (params_by_slot) {
            const V t = reinterpret_cast<const V*>(p)[s];
#pragma unroll
            for (int j = 0; j < VEC; ++j) out[j] = to_float(t.v[j]);
            return;
        }
#pragma unroll
        for (int j = 0; j < VEC; ++j) out[j] = valid(s, j) ? to_float(p[first(s) + j]) : 0.f;
    }
};

template <typename T, int VEC>
__device__ __forceinline__ float slot_sum(const Vec<T, VEC>& t) {
    float sum = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) sum += to_float(t.v[j]);  // outside-row elements are 0
    return sum;
}

template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ float slot_sq(const Row<T, VEC, ALIGNED>& row, int s, const Vec<T, VEC>& t, float mean) {
    float sq = 0.f;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const float d = to_float(t.v[j]) - mean;
        sq += row.valid(s, j) ? d * d : 0.f;
    }
    return sq;
}

// The normalised slot (rounded to T) of a row slot `in` with the row's statistics and the slot's gamma and beta:
// LayerNorm (v - mean) * rstd * g [+ b] rounded once; RMSNorm round(round(v * rstd) * g), as Hugging Face's RMSNorm
// (normalise in fp32, round to T, times gamma in T). b is read in LAYER_NORM mode only.
template <typename T, int VEC>
__device__ __forceinline__ Vec<T, VEC> normalized_slot(const float (&g)[VEC], const float (&b)[VEC], int mode,
                                                       const Vec<T, VEC>& in, float mean, float rstd) {
    Vec<T, VEC> out;
#pragma unroll
    for (int j = 0; j < VEC; ++j) {
        const float v = to_float(in.v[j]);
        if (mode == RMS_NORM)
            out.v[j] = from_float<T>(to_float(from_float<T>(v * rstd)) * g[j]);
        else
            out.v[j] = from_float<T>((v - mean) * rstd * g[j] + (mode == LAYER_NORM ? b[j] : 0.f));
    }
    return out;
}

// The same with gamma and beta read here from the per-column vectors ([width]; beta in LAYER_NORM mode only).
template <typename T, int VEC, bool ALIGNED>
__device__ __forceinline__ Vec<T, VEC> normalized_slot(const Row<T, VEC, ALIGNED>& row, const T* __restrict__ gamma,
                                                       const T* __restrict__ beta, int mode, int s,
                                                       const Vec<T, VEC>& in, float mean, float rstd) {
    float g[VEC], b[VEC];
    row.params(gamma, s, g);
    if (mode == LAYER_NORM) row.params(beta, s, b);
    return normalized_slot<T, VEC>(g, b, mode, in, mean, rstd);
}

// 1 / sqrt(variance + eps) from the row's sum of squared deviations (of squares, for RMSNorm) and 1 / width.
__device__ __forceinline__ float norm_rstd(float sq_sum, float inv_width, float eps) {
    return rsqrtf(sq_sum * inv_width + eps);
}

}  // namespace ct
