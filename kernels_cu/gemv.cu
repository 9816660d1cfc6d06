// Decode-shape matrix products: y[R, N] = act(x[R, K] @ W + bias) for R <= 8 rows, reading every weight
// once with 16-byte loads. cuBLAS pads such shapes to its tiles and reaches a fraction of the memory
// bandwidth; here the weight stream is the whole cost.
//
// The grid is (column tiles, K splits). Each block reduces its tile over its K range in registers,
// warp shuffles and shared memory. With one split it applies the epilogue and writes y; with several it
// writes fp32 partials, and the last block of the tile to finish (an atomic counter per tile) adds the
// splits in a fixed order (deterministic), applies the epilogue, writes y and resets the counter for the
// next launch. Rows beyond `rows` are zero and never written. R is rows rounded up to 1, 2, 4 or 8.
#include "common.cuh"

namespace ct {

constexpr int GEMV_THREADS = 256;
constexpr int GEMV_WARPS = GEMV_THREADS / 32;

// The values of ActivationType that a per-column epilogue can apply (gated forms need two columns).
enum GemvAct : int { G_NONE = 0, G_GELU_TANH = 1, G_RELU = 2, G_GELU_ERF = 5 };

__device__ __forceinline__ float gemv_act(float v, int act) {
    switch (act) {
        case G_GELU_TANH: return 0.5f * v * (1.f + tanhf(0.7978845608028654f * (v + 0.044715f * v * v * v)));
        case G_RELU: return fmaxf(v, 0.f);
        case G_GELU_ERF: return 0.5f * v * (1.f + erff(v * 0.7071067811865476f));
        default: return v;
    }
}

template <typename T>
struct GemvOut {
    T* y;
    const T* bias;    // unread unless has_bias
    float* partials;  // [splits, rows, N] fp32, used when gridDim.y > 1
    int* counters;    // [column tiles], zero between launches
    int rows, N, act, has_bias;

    __device__ void finish(int r, int n, float v) const {
        if (has_bias) v += to_float(bias[n]);
        y[static_cast<size_t>(r) * N + n] = from_float<T>(gemv_act(v, act));
    }
    // This block's sum for (r, n): final, or one split's partial.
    __device__ void put(int r, int n, float v) const {
        if (gridDim.y == 1) finish(r, n, v);
        else partials[(static_cast<size_t>(blockIdx.y) * rows + r) * N + n] = v;
    }
    // After every put of the block: the last block of the tile adds the splits and finishes the tile.
    __device__ void reduce_splits(int tile_first, int tile_width) const {
        if (gridDim.y == 1) return;
        __shared__ bool last;
        __threadfence();  // this block's partials are visible device-wide before it is counted
        __syncthreads();
        if (threadIdx.x == 0) last = atomicAdd(&counters[blockIdx.x], 1) == static_cast<int>(gridDim.y) - 1;
        __syncthreads();
        if (!last) return;
        __threadfence();
        for (int o = threadIdx.x; o < rows * tile_width; o += blockDim.x) {
            const int r = o / tile_width, n = tile_first + o % tile_width;
            if (n >= N) continue;
            float v = 0.f;
            for (int s = 0; s < static_cast<int>(gridDim.y); ++s)
                v += __ldcg(&partials[(static_cast<size_t>(s) * rows + r) * N + n]);
            finish(r, n, v);
        }
        if (threadIdx.x == 0) counters[blockIdx.x] = 0;
    }
};

// Both layouts take: x [rows, K], W, y [rows, N], bias [N], the split workspace, and the epilogue's act.
// W [K, N] (DeepSpeed's default [in, out]). A tile is 8 lanes x VEC columns; each of the block's 32 groups
// of 8 lanes takes chunks of VEC consecutive k (one 16-byte load of x per row covers a chunk).
// N % VEC == 0, K % VEC == 0, k_per_split % VEC == 0, W and x 16-byte aligned (the launcher checks).
#define GEMV_ARGS                                                                                              \
    const T *__restrict__ x, const T *__restrict__ w, T *__restrict__ y, const T *__restrict__ bias, float *partials, \
        int *counters, int rows, int K, int N, int k_per_split, int act, int has_bias
#define GEMV_OUT GemvOut<T> out{y, bias, partials, counters, rows, N, act, has_bias}

template <typename T, int R>
__global__ void __launch_bounds__(GEMV_THREADS) gemv_kn(GEMV_ARGS) {
    const GEMV_OUT;
    constexpr int VEC = 16 / sizeof(T), LANES_N = 8, TILE = LANES_N * VEC, KGROUPS = GEMV_THREADS / LANES_N;
    using V = Vec<T, VEC>;
    const int lane_n = threadIdx.x % LANES_N, kgroup = threadIdx.x / LANES_N;
    const int tile_first = blockIdx.x * TILE, n0 = tile_first + lane_n * VEC;
    const int k_begin = blockIdx.y * k_per_split, k_end = min(K, k_begin + k_per_split);
    float acc[R][VEC] = {};
    if (n0 < out.N) {
#pragma unroll 2
        for (int k0 = k_begin + kgroup * VEC; k0 < k_end; k0 += KGROUPS * VEC) {
            V xv[R];  // padding rows (r >= rows) re-read the last row; their sums are never written
#pragma unroll
            for (int r = 0; r < R; ++r)
                xv[r] = *reinterpret_cast<const V*>(x + static_cast<size_t>(min(r, out.rows - 1)) * K + k0);
#pragma unroll
            for (int i = 0; i < VEC; ++i) {
                const V wv = *reinterpret_cast<const V*>(w + static_cast<size_t>(k0 + i) * out.N + n0);
#pragma unroll
                for (int r = 0; r < R; ++r) {
                    const float xf = to_float(xv[r].v[i]);
#pragma unroll
                    for (int j = 0; j < VEC; ++j) acc[r][j] += xf * to_float(wv.v[j]);
                }
            }
        }
    }
    // Lanes 8 and 16 apart share columns: fold the warp's 4 k-groups, then the 8 warps in shared memory.
    __shared__ float red[GEMV_WARPS][R][TILE];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int j = 0; j < VEC; ++j) {
            float v = acc[r][j];
            v += __shfl_xor_sync(0xffffffffu, v, 8);
            v += __shfl_xor_sync(0xffffffffu, v, 16);
            if (lane < LANES_N) red[warp][r][lane * VEC + j] = v;
        }
    __syncthreads();
    for (int o = threadIdx.x; o < R * TILE; o += GEMV_THREADS) {
        const int r = o / TILE, c = o % TILE, n = tile_first + c;
        if (r >= out.rows || n >= out.N) continue;
        float v = 0.f;
#pragma unroll
        for (int wi = 0; wi < GEMV_WARPS; ++wi) v += red[wi][r][c];
        out.put(r, n, v);
    }
    out.reduce_splits(tile_first, TILE);
}

// W [N, K] (nn.Linear's [out, in], transposed_mode). Each warp takes NPW rows of W; lanes stride k by
// 32 x VEC. K % VEC == 0, k_per_split % (32 x VEC) == 0 and W, x 16-byte aligned (the launcher checks).
template <typename T, int R>
__global__ void __launch_bounds__(GEMV_THREADS) gemv_nk(GEMV_ARGS) {
    const GEMV_OUT;
    constexpr int VEC = 16 / sizeof(T), NPW = 4, TILE = GEMV_WARPS * NPW;
    using V = Vec<T, VEC>;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int tile_first = blockIdx.x * TILE, n_first = tile_first + warp * NPW;
    const int k_begin = blockIdx.y * k_per_split, k_end = min(K, k_begin + k_per_split);
    float acc[R][NPW] = {};
    // Straight-line loop body (clamped indices instead of branches) so that the unrolled iterations'
    // loads can all be issued before the first is used.
#pragma unroll 4
    for (int k = k_begin + lane * VEC; k < k_end; k += 32 * VEC) {
        float xf[R][VEC];
#pragma unroll
        for (int r = 0; r < R; ++r) {  // padding rows re-read the last row; their sums are never written
            const V xv = *reinterpret_cast<const V*>(x + static_cast<size_t>(min(r, out.rows - 1)) * K + k);
#pragma unroll
            for (int j = 0; j < VEC; ++j) xf[r][j] = to_float(xv.v[j]);
        }
#pragma unroll
        for (int i = 0; i < NPW; ++i) {  // columns past N re-read the last weight row, never written
            const V wv = *reinterpret_cast<const V*>(w + static_cast<size_t>(min(n_first + i, out.N - 1)) * K + k);
#pragma unroll
            for (int r = 0; r < R; ++r)
#pragma unroll
                for (int j = 0; j < VEC; ++j) acc[r][i] += xf[r][j] * to_float(wv.v[j]);
        }
    }
#pragma unroll
    for (int r = 0; r < R; ++r)
#pragma unroll
        for (int i = 0; i < NPW; ++i) {
            float v = warp_sum(acc[r][i]);
            if (lane == r * NPW + i && r < out.rows && n_first + i < out.N) out.put(r, n_first + i, v);
        }
    out.reduce_splits(tile_first, TILE);
}

}  // namespace ct
