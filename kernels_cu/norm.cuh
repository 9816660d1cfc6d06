// The per-element normalisation shared by norm.cu and the GEMV's norm prologue (statistics in fp32).
#pragma once
#include "common.cuh"

namespace ct {

enum NormMode : int { LAYER_NORM = 0, LAYER_NORM_NO_BETA = 1, RMS_NORM = 2 };

// One normalised element of a row with these statistics (mean 0 for RMSNorm): RMSNorm as Hugging Face's
// (normalise in fp32, round to T, times gamma in T), LayerNorm with one rounding at the end.
template <typename T>
__device__ __forceinline__ T norm_value(float v, float mean, float rstd, float gamma, float beta, int mode) {
    if (mode == RMS_NORM) return from_float<T>(to_float(from_float<T>(v * rstd)) * gamma);
    return from_float<T>((v - mean) * rstd * gamma + (mode == LAYER_NORM ? beta : 0.f));
}

}  // namespace ct
