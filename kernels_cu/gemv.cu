// Decode-shape matrix products: y[R, N] = act(x[R, K] @ W + bias) for R <= 8 rows, reading every weight
// once with 16-byte loads. The weight stream is the whole cost.
//
// fp16 and bf16 run on the tensor cores (gemv_mma_*, further down): the weights are mma.sync's A operand
// (16 outputs x 16 k) and x its B operand (16 k x 8 input rows, padded), so one instruction does what 256
// FMAs per lane would and every row count up to 8 costs about the same; the work is dealt stream-K style.
// fp32 (gemv_kn / gemv_nk, first) uses FMAs with R = rows rounded up to 1, 2, 4 or 8, on a grid of
// (column tiles, K splits): each block reduces its tile over its K range; with one split it applies the
// epilogue and writes y, with several it writes fp32 partials, and the last block of the tile to finish (an
// atomic counter per tile) adds the splits in a fixed order (deterministic), applies the epilogue, writes y
// and resets the counter for the next launch. Rows beyond `rows` are never written.
#include "common.cuh"
#include "mma.cuh"

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
            // Loads in groups of 8 (independent, in flight together), added in split order.
            const float* p = partials + static_cast<size_t>(r) * N + n;
            const size_t stride = static_cast<size_t>(rows) * N;
            const int splits = gridDim.y;
            float v = 0.f;
            for (int s = 0; s < splits; s += 8) {
                float q[8];
#pragma unroll
                for (int j = 0; j < 8; ++j) q[j] = s + j < splits ? __ldcg(p + (s + j) * stride) : 0.f;
#pragma unroll
                for (int j = 0; j < 8; ++j) v += q[j];
            }
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

// ---- Tensor-core GEMV (fp16, bf16; sm_80 and later) ----
// The weights stream through shared memory: cp.async copies each stage (8 KB of contiguous row runs)
// STAGES - 1 stages ahead of the math, so a block keeps tens of KB in flight without holding it in registers,
// and the reads are long runs whatever the fragment layout. ldmatrix then hands the warps mma.sync's A
// fragments (16 outputs x 16 k); x is the B operand (16 k x 8 input rows, zero past `rows`), staged with
// the weights so that no global load sits between a stage's arrival and its math.
constexpr int MMA_THREADS = 256;
constexpr int MMA_WARPS = MMA_THREADS / 32;

// Rows [r0, r0 + rows) x columns [c0, c0 + COLS) of a row-major [total_rows, total_cols] matrix into a
// stage (rows padded: dst's row length ROW), zero past the matrix. Consecutive threads take consecutive 16
// bytes of a row: a warp copies runs of min(COLS, 256) elements.
template <int COLS, typename T, int ROW>
__device__ __forceinline__ void copy_tile(T (*dst)[ROW], const T* src, int rows, int total_rows, int total_cols,
                                          int r0, int c0) {
#pragma unroll
    for (int chunk = threadIdx.x; chunk < rows * (COLS / 8); chunk += MMA_THREADS) {
        const int r = chunk / (COLS / 8), cc = chunk % (COLS / 8) * 8;
        const bool valid = r0 + r < total_rows && c0 + cc < total_cols;
        copy16(&dst[r][cc], valid ? src + static_cast<size_t>(r0 + r) * total_cols + c0 + cc : src, valid);
    }
}

// Stream-K: each tile's K range is cut into stages ("units"), and the units of all tiles, tile after tile,
// are dealt to the blocks as equal contiguous ranges, so every SM streams the same bytes whatever the
// shape (no last wave of a few blocks). A block finishes the tiles it covers whole; a tile shared between
// blocks is finished by the last of them to arrive (an atomic counter per tile), which adds the others'
// fp32 partial sums in block order (deterministic) and resets the counter for the next launch.
#define MMA_ARGS                                                                                                   \
    const T *__restrict__ x, const T *__restrict__ w, T *__restrict__ y, const T *__restrict__ bias, float *partials, \
        int *counters, int rows, int K, int N, int act, int has_bias

// A unit's place: its tile and its stage along the tile's K.
struct Unit {
    int tile, k;
    __device__ void advance(int units_per_tile) {
        if (++k == units_per_tile) k = 0, ++tile;
    }
};

template <typename T, int TILE, int KPARTS>
struct StreamK {
    const T* bias;
    T* y;
    float* partials;  // [2 x blocks][rows][TILE]: a block's first and last tile, where shared
    int* counters;    // [tiles], zero between launches
    int rows, N, act, has_bias, units_per_tile, total;

    __device__ int first_unit(int b) const { return static_cast<long long>(b) * total / gridDim.x; }
    __device__ int block_of(int u) const { return (static_cast<long long>(u + 1) * gridDim.x - 1) / total; }
    // Where block b keeps its partial of `tile`: 2b for its first tile, 2b + 1 for its last.
    __device__ float* slot(int b, int tile) const {
        return partials + static_cast<size_t>(2 * b + (first_unit(b) / units_per_tile != tile)) * rows * TILE;
    }
    __device__ void finish(int r, int n, float v) const {
        if (has_bias) v += to_float(bias[n]);
        y[static_cast<size_t>(r) * N + n] = from_float<T>(gemv_act(v, act));
    }

    // After the block's last unit of `tile` ([begin, end) of its units): red[part][x row][column] holds the
    // warps' sums. Every thread of the block calls this.
    __device__ void flush(const float (*red)[8][TILE], int tile, int begin, int end) const {
        __shared__ bool last;
        const int first_col = tile * TILE;
        __syncthreads();
        if (begin == tile * units_per_tile && end == (tile + 1) * units_per_tile) {
            for (int o = threadIdx.x; o < rows * TILE; o += blockDim.x) {
                const int r = o / TILE, col = o % TILE;
                if (first_col + col >= N) continue;
                float v = 0.f;
#pragma unroll
                for (int p = 0; p < KPARTS; ++p) v += red[p][r][col];
                finish(r, first_col + col, v);
            }
            return;
        }
        float* mine = slot(blockIdx.x, tile);
        for (int o = threadIdx.x; o < rows * TILE; o += blockDim.x) {
            float v = 0.f;
#pragma unroll
            for (int p = 0; p < KPARTS; ++p) v += red[p][o / TILE][o % TILE];
            mine[o] = v;
        }
        const int b_first = block_of(tile * units_per_tile), b_last = block_of((tile + 1) * units_per_tile - 1);
        __threadfence();  // this block's partial is visible device-wide before it is counted
        __syncthreads();
        if (threadIdx.x == 0) last = atomicAdd(&counters[tile], 1) == b_last - b_first;
        __syncthreads();
        if (!last) return;
        __threadfence();
        for (int o = threadIdx.x; o < rows * TILE; o += blockDim.x) {
            const int r = o / TILE, col = o % TILE;
            if (first_col + col >= N) continue;
            float v = 0.f;
            for (int b = b_first; b <= b_last; ++b) v += __ldcg(slot(b, tile) + o);
            finish(r, first_col + col, v);
        }
        if (threadIdx.x == 0) counters[tile] = 0;
    }

    // The block's units through a STAGES-deep cp.async pipeline: copy(at, buffer) issues a stage,
    // math(at, buffer) consumes it, spill(red) moves the warps' sums to shared memory and clears them.
    // Every thread commits a group per step (empty past the end) so that the group counts agree.
    template <int STAGES, typename Copy, typename Math, typename Spill>
    __device__ void run(float (*red)[8][TILE], Copy copy, Math math, Spill spill) const {
        const int u0 = first_unit(blockIdx.x), n = first_unit(blockIdx.x + 1) - u0;
        Unit next{u0 / units_per_tile, u0 % units_per_tile}, at = next;  // next to copy, next to use
#pragma unroll
        for (int s = 0; s < STAGES - 1; ++s) {
            if (s < n) copy(next, s), next.advance(units_per_tile);
            copy_commit();
        }
        int begin = u0;  // first unit of the current tile
        for (int i = 0; i < n; ++i) {
            copy_wait<STAGES - 2>();
            __syncthreads();  // unit i is in for every thread, and every warp is done with unit i - 1's buffer
            if (i + STAGES - 1 < n) copy(next, (i + STAGES - 1) % STAGES), next.advance(units_per_tile);
            copy_commit();
            math(at, i % STAGES);
            if (at.k == units_per_tile - 1 || i == n - 1) {
                spill(red);
                flush(red, at.tile, begin, u0 + i + 1);
                begin = u0 + i + 1;
            }
            at.advance(units_per_tile);
        }
        copy_wait<0>();
    }
};

// W [N, K] (nn.Linear's [out, in], transposed_mode). A tile is TILE weight rows (TILE / 16 of mma's A
// operands); a unit is their next KC k (TILE runs of 2 KC bytes) and x's KC k. Warp w takes the k range
// w KC / 8 .. of each unit, and the 8 warps' sums meet in shared memory. K % 8 == 0, W and x 16-byte
// aligned (the launcher checks).
template <typename T, int STAGES, int TILE, int KC>
__global__ void __launch_bounds__(MMA_THREADS) gemv_mma_nk(MMA_ARGS) {
    // Rows padded by 16 bytes: ldmatrix's 8 rows and the lanes' x pairs fall in distinct banks.
    constexpr int ROW = KC + 8, MT = TILE / 16, KW = KC / MMA_WARPS;
    static_assert(TILE % 16 == 0 && KW % 16 == 0 && TILE * KC % (8 * MMA_THREADS) == 0, "nk geometry");
    extern __shared__ __align__(16) unsigned char smem[];  // weight stages, x stages, sums (matmul.py sizes it)
    auto ws = reinterpret_cast<T(*)[TILE][ROW]>(smem);
    auto xs = reinterpret_cast<T(*)[8][ROW]>(smem + STAGES * sizeof(T[TILE][ROW]));
    auto red = reinterpret_cast<float(*)[8][TILE]>(smem + STAGES * sizeof(T[TILE + 8][ROW]));
    const int units = (K + KC - 1) / KC;
    const StreamK<T, TILE, MMA_WARPS> sk{bias, y, partials, counters, rows, N, act, has_bias, units,
                                         (N + TILE - 1) / TILE * units};
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    float c[MT][4] = {};
    auto copy = [&](Unit at, int buf) {
        copy_tile<KC>(ws[buf], w, TILE, N, K, at.tile * TILE, at.k * KC);
        // x rows past `rows` stay unwritten: mma keeps its 8 columns apart and those sums are never stored.
        copy_tile<KC>(xs[buf], x, rows, rows, K, 0, at.k * KC);
    };
    auto math = [&](Unit, int buf) {
#pragma unroll
        for (int k0 = KW * warp; k0 < KW * warp + KW; k0 += 16) {
            const unsigned* xp = reinterpret_cast<const unsigned*>(&xs[buf][g][k0 + 2 * t]);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                unsigned a[4];  // matrices: rows 0-7 / 8-15 x k 0-7 / 8-15 of this 16 x 16 piece
                ldmatrix_x4<false>(a, &ws[buf][16 * m + lane % 8 + 8 * (lane / 8 % 2)][k0 + 8 * (lane / 16)]);
                mma_16816<T>(c[m], a, xp[0], xp[4]);  // x[g][k 2t, 2t + 1] and [2t + 8, 2t + 9]
            }
        }
    };
    auto spill = [&](float (*r)[8][TILE]) {  // c[m] = (tile row 16m + g / + 8, x rows 2t, 2t + 1)
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                r[warp][2 * t + i % 2][16 * m + g + 8 * (i / 2)] = c[m][i];
                c[m][i] = 0.f;
            }
    };
    sk.template run<STAGES>(red, copy, math, spill);
}

// W [K, N] (DeepSpeed's default [in, out]). A tile is TILE columns; a unit is their next KR k (KR runs of
// 2 TILE bytes) and x's KR k. The warps split a unit into CG column groups x KP k ranges; ldmatrix.trans
// turns the k-major rows into A fragments (16 columns x 16 k), and the KP k ranges' sums meet in shared
// memory. N % 8 == 0, K % 8 == 0, W and x 16-byte aligned (the launcher checks).
template <typename T, int STAGES, int TILE, int KR>
__global__ void __launch_bounds__(MMA_THREADS) gemv_mma_kn(MMA_ARGS) {
    // Rows padded by 16 bytes: ldmatrix's 8 rows and the lanes' x pairs fall in distinct banks.
    constexpr int ROW = TILE + 8, XROW = KR + 8;
    constexpr int CG = TILE / 16 < MMA_WARPS ? TILE / 16 : MMA_WARPS, KP = MMA_WARPS / CG;
    constexpr int MT = TILE / 16 / CG, KW = KR / KP;  // per warp: 16-column A operands, k
    static_assert(TILE % (16 * CG) == 0 && KW % 16 == 0 && KR * TILE % (8 * MMA_THREADS) == 0, "kn geometry");
    extern __shared__ __align__(16) unsigned char smem[];  // weight stages, x stages, sums (matmul.py sizes it)
    auto ws = reinterpret_cast<T(*)[KR][ROW]>(smem);
    auto xs = reinterpret_cast<T(*)[8][XROW]>(smem + STAGES * sizeof(T[KR][ROW]));
    auto red = reinterpret_cast<float(*)[8][TILE]>(smem + STAGES * (sizeof(T[KR][ROW]) + sizeof(T[8][XROW])));
    const int units = (K + KR - 1) / KR;
    const StreamK<T, TILE, KP> sk{bias, y, partials, counters, rows, N, act, has_bias, units,
                                  (N + TILE - 1) / TILE * units};
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int col0 = TILE / CG * (warp % CG), kp = warp / CG;
    float c[MT][4] = {};
    auto copy = [&](Unit at, int buf) {
        copy_tile<TILE>(ws[buf], w, KR, K, N, at.k * KR, at.tile * TILE);
        copy_tile<KR>(xs[buf], x, rows, rows, K, 0, at.k * KR);  // as in gemv_mma_nk
    };
    auto math = [&](Unit, int buf) {
#pragma unroll
        for (int k0 = KW * kp; k0 < KW * kp + KW; k0 += 16) {
            const unsigned* xp = reinterpret_cast<const unsigned*>(&xs[buf][g][k0 + 2 * t]);
#pragma unroll
            for (int m = 0; m < MT; ++m) {
                unsigned a[4];  // matrices: columns 0-7 / 8-15 x k 0-7 / 8-15, transposed into k pairs
                ldmatrix_x4<true>(a, &ws[buf][k0 + lane % 8 + 8 * (lane / 16)][col0 + 16 * m + 8 * (lane / 8 % 2)]);
                mma_16816<T>(c[m], a, xp[0], xp[4]);  // x[g][k 2t, 2t + 1] and [2t + 8, 2t + 9]
            }
        }
    };
    auto spill = [&](float (*r)[8][TILE]) {  // c[m] = (column col0 + 16m + g / + 8, x rows 2t, 2t + 1)
#pragma unroll
        for (int m = 0; m < MT; ++m)
#pragma unroll
            for (int i = 0; i < 4; ++i) {
                r[kp][2 * t + i % 2][col0 + 16 * m + g + 8 * (i / 2)] = c[m][i];
                c[m][i] = 0.f;
            }
    };
    sk.template run<STAGES>(red, copy, math, spill);
}

}  // namespace ct
