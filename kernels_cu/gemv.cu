// Decode-shape matrix products: y[R, N] = act(x[R, K] @ W + bias) for R <= 16 rows (fp32: 8), reading every
// weight once with 16-byte loads. The weight stream is the whole cost.
//
// fp16 and bf16 run on the tensor cores (gemv_tc_*, further down): the weights are mma.sync's A operand
// (16 outputs x 16 k) and x its B operand (16 k x 8 input rows, padded), so one instruction does what 256
// FMAs per lane would and every row count up to 8 costs about the same; X8 = 2 kernels take 9-16 rows as two B
// operands (two mma an A fragment). fp32 (gemv_kn / gemv_nk, first) uses FMAs with R = rows rounded up to 1, 2,
// 4 or 8. Both run on a grid of (column tiles, K splits): each
// block reduces its tile over its K range; with one split it applies the epilogue and writes y, with several
// it writes fp32 partials, and the last block of the tile to finish (an atomic counter per tile) adds the
// splits in a fixed order (deterministic), applies the epilogue, writes y and resets the counter for the next
// launch. Rows beyond `rows` are never written.
//
// Launched programmatically (common.cuh), a block waits for the kernel before (which wrote x). With
// `early` (the launcher's choice: short K ranges) each warp's first batch of weights is loaded into registers before
// the wait and the norm prologue, and the bias, gamma and beta are asked of L2 there too. So W, bias, gamma and beta
// must not be written by a kernel of the same step (they are a model's weights).
//
// The fused tensor-core kernels (gemv_tc_*_fused, FUSE below) take the norm before the product as a prologue or
// the residual add after it as the epilogue, so that a decode layer needs no norm kernel of its own.
#include "activation.cuh"
#include "argmax.cuh"
#include "common.cuh"
#include "mma.cuh"
#include "norm_row.cuh"

namespace ct {

constexpr int GEMV_THREADS = 256;
constexpr int GEMV_WARPS = GEMV_THREADS / 32;
// The norm prologue takes up to 8 rows, a warp a row's statistics: at 16 rows its per-block statistics cost more
// than a norm kernel before the product saves (the launcher's prologue_fits).
constexpr int NORM_MAX_ROWS = GEMV_WARPS;

// What a fused kernel adds: the norm of x as its prologue (y = act(NORM(x) @ W + bias)), or the residual add as
// its epilogue (y = round(residual + (x @ W + bias)), no activation), or the gated activation as its epilogue
// (GemvOut's GATED; [out, in] only, alone or with the norm), or greedy's argmax (GemvOut's ARGMAX; [out, in], up to
// 8 rows, one K split, alone or with the norm). Flags.
enum GemvFuse : int { FUSE_NONE = 0, FUSE_NORM = 1, FUSE_RESIDUAL = 2, FUSE_GATED = 4, FUSE_ARGMAX = 8 };

// RESIDUAL: y = round(residual + v) for the product-plus-bias v, summed in fp32 (act is the identity).
//
// GATED (FUSE_GATED: act GATED_GELU or GATED_SILU; [out, in] tensor-core kernels only, the launcher checks): W's N
// rows are [up | gate] halves and y [rows, N / 2] = up * act(gate) as bias_act.cu computes it from the product
// rounded to T, so the same bits as the product followed by bias_act, one kernel and no [rows, N] round trip fewer.
// A tile's 16-row pieces take 8 outputs' up rows, then the same outputs' gate rows (N / 2 % 8 == 0): the tile's
// column n holds output gated_output_index(n)'s up row where n % 16 < 8, else its gate row; the up column of the
// tile's c-th output is gated_up_column(c). A template flag, not a run-time act, so the other kernels keep their
// machine code (a run-time branch cost GPT-2 small's step 4%).
__device__ __forceinline__ int gated_output_index(int n) { return n / 16 * 8 + n % 8; }
__device__ __forceinline__ int gated_up_column(int c) { return c / 8 * 16 + c % 8; }

// ARGMAX (FUSE_ARGMAX: an LM head at greedy decoding): y is a [rows] array of uint64 argmax_keys instead, and no
// product is written: each block offers each row's largest argmax_key of its tile's values (each rounded to T as
// the written product would be, act the identity) by atomicMax, so y[r] ends as argmax_key(max, first index of it)
// of the row's N values, the same as greedy_tokens over the written product, whatever order the blocks finish in.
// y[r] must hold 0 (or a key of a smaller value) before the launch: the step's end (decode_state.cu) reads and zeroes
// it.
template <typename T, bool RESIDUAL = false, bool GATED = false, bool ARGMAX = false>
struct GemvOut {
    T* y;
    const T* bias;    // unread unless has_bias
    float* partials;  // [splits, rows, N] fp32, used when gridDim.y > 1
    int* counters;    // [column tiles], zero between launches
    int rows, N, act, has_bias;
    const T* residual;  // [rows, N], read when RESIDUAL

    // The weight row of a tile's column n (gated: its output's up or gate row; past the outputs, the last one's).
    __device__ int weight_row(int n) const {
        if constexpr (!GATED) return min(n, N - 1);
        else return (n % 16 >= 8 ? N / 2 : 0) + min(gated_output_index(n), N / 2 - 1);
    }
    __device__ void finish(int r, int n, float v) const {
        if (has_bias) v += to_float(bias[n]);
        if constexpr (RESIDUAL)
            y[static_cast<size_t>(r) * N + n] = from_float<T>(to_float(residual[static_cast<size_t>(r) * N + n]) + v);
        else
            y[static_cast<size_t>(r) * N + n] = from_float<T>(activate<sizeof(T) == 2>(v, act));
    }
    // Gated: the output of up column n from the up and gate sums, as bias_act.cu's gated form.
    __device__ void finish_gated(int r, int n, float up, float gate) const {
        const int half = N / 2, o = gated_output_index(n);
        const float u = to_float(from_float<T>(up)), g = to_float(from_float<T>(gate));  // the product's, in T
        const float bu = has_bias ? to_float(bias[o]) : 0.f, bg = has_bias ? to_float(bias[half + o]) : 0.f;
        constexpr bool FAST = sizeof(T) == 2;
        y[static_cast<size_t>(r) * half + o] = act == GATED_GELU
                                                   ? gated_output<T, GATED_GELU, FAST>(u, g, bu, bg, has_bias)
                                                   : gated_output<T, GATED_SILU, FAST>(u, g, bu, bg, has_bias);
    }
    // ARGMAX: the key of output (r, n) whose sum is v.
    __device__ unsigned long long argmax_of(int n, float v) const {
        return argmax_key(from_float<T>(has_bias ? v + to_float(bias[n]) : v), static_cast<unsigned>(n));
    }
    // ARGMAX: this block's largest key of row r, offered where it beats the row's (a read first: once the row's
    // largest keys are in, most blocks skip the atomic).
    __device__ void offer(int r, unsigned long long key) const {
        unsigned long long* best = reinterpret_cast<unsigned long long*>(y) + r;
        if (key > __ldcg(best)) atomicMax(best, key);
    }
    // This block's sum for (r, n): final, or one split's partial.
    __device__ void put(int r, int n, float v) const {
        if (gridDim.y == 1) finish(r, n, v);
        else partials[(static_cast<size_t>(blockIdx.y) * rows + r) * N + n] = v;
    }
    __device__ void put_gated(int r, int n, float up, float gate) const {
        if (gridDim.y == 1) return finish_gated(r, n, up, gate);
        float* p = partials + (static_cast<size_t>(blockIdx.y) * rows + r) * N + n;
        p[0] = up, p[8] = gate;
    }
    // (r, n)'s sum of the splits' partials: loads in groups of 8 (independent, in flight together), added in split
    // order.
    __device__ float split_sum(int r, int n) const {
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
        return v;
    }
    // After every put of the block: the last block of the tile adds the splits and finishes the tile.
    __device__ void reduce_splits(int tile_first, int tile_width) const {
        if (gridDim.y == 1 || !last_block_done(&counters[blockIdx.x], gridDim.y)) return;
        const int width = GATED ? tile_width / 2 : tile_width;
        for (int o = threadIdx.x; o < rows * width; o += blockDim.x) {
            const int r = o / width, c = o % width;
            const int n = tile_first + (GATED ? gated_up_column(c) : c);  // gated: up columns only
            if (n >= N) continue;
            if constexpr (GATED) finish_gated(r, n, split_sum(r, n), split_sum(r, n + 8));
            else finish(r, n, split_sum(r, n));
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
        int *counters, int rows, int K, int N, int k_per_split, int act, int has_bias, int early
#define GEMV_OUT GemvOut<T> out{y, bias, partials, counters, rows, N, act, has_bias}

template <typename T, int R>
__global__ void __launch_bounds__(GEMV_THREADS) gemv_kn(GEMV_ARGS) {
    const GEMV_OUT;
    follow_previous_kernel();
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
    follow_previous_kernel();
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
// Every lane loads its weights with 16-byte loads straight into registers, a batch of U chunks at a time
// (all the batch's loads issue before its first mma), and hands them to mma.sync as A operands (16
// outputs x 16 k); x is the B operand (16 k x 8 input rows, zero past `rows`), read through L1 (every
// warp reads it). No shared-memory staging and no barriers while streaming: each warp keeps its own bytes
// in flight. The 8 warps of a block split the block's K range in interleaved chunks (a batch of the block
// covers 8 U contiguous chunks); their sums meet in shared memory, and splits of K across blocks in
// GemvOut's partials. (A cp.async shared-memory pipeline with stream-K scheduling was 10-40% slower:
// benchmarks/notes/gemv.md.) BLOCKS resident a SM (launch bounds): at 2 ptxas keeps each batch's
// loads ahead of its mma instead of interleaving them to save registers; 3 (85 registers) is for launches
// whose tiles would otherwise leave a second, partial wave.

__device__ __forceinline__ uint4 select(bool keep, uint4 v) { return keep ? v : make_uint4(0, 0, 0, 0); }

// After the streaming loop: c[m][j][i] is this warp's sum for tile output out_of(m, i), x row 8j + 2t + i % 2.
// The 8 warps' sums meet in shared memory; then GemvOut finishes (one split) or keeps a partial.
template <typename T, int TILE, bool RESIDUAL, bool GATED, bool ARGMAX, int NC, int X8, typename OutOf>
__device__ __forceinline__ void gemv_tc_reduce(const GemvOut<T, RESIDUAL, GATED, ARGMAX>& out,
                                               const float (&c)[NC][X8][4], int tile_first, OutOf out_of) {
    __shared__ float red[GEMV_WARPS][8 * X8][TILE];
    const int warp = threadIdx.x / 32, t = threadIdx.x % 4;
#pragma unroll
    for (int m = 0; m < NC; ++m)
#pragma unroll
        for (int j = 0; j < X8; ++j)
#pragma unroll
            for (int i = 0; i < 4; ++i) red[warp][8 * j + 2 * t + i % 2][out_of(m, i)] = c[m][j][i];
    __syncthreads();
    if constexpr (ARGMAX) {  // a thread an output (rows x TILE <= 8 x 32); one K split, so no partials
        static_assert(X8 == 1 && TILE <= 32 && 8 * TILE <= GEMV_THREADS, "a thread an output of up to 8 rows");
        const int r = threadIdx.x / TILE, col = threadIdx.x % TILE, n = tile_first + col;
        unsigned long long key = 0;  // argmax_key's identity
        if (r < out.rows && n < out.N) {
            float v = 0.f;
#pragma unroll
            for (int wi = 0; wi < GEMV_WARPS; ++wi) v += red[wi][r][col];  // as the plain epilogue sums
            key = out.argmax_of(n, v);
        }
        for (int off = TILE / 2; off > 0; off >>= 1) key = max(key, __shfl_xor_sync(0xffffffffu, key, off));
        if (col == 0 && r < out.rows) out.offer(r, key);
        return;
    } else if constexpr (GATED) {  // an up column and its gate column (8 further) a thread
        for (int o = threadIdx.x; o < out.rows * TILE / 2; o += GEMV_THREADS) {
            // col: gated_up_column(o % (TILE / 2)), its % 8 taken of o (the same value; the measured machine code)
            const int r = o / (TILE / 2), col = o % (TILE / 2) / 8 * 16 + o % 8, n = tile_first + col;
            if (n >= out.N) continue;
            float up = 0.f, gate = 0.f;
#pragma unroll
            for (int wi = 0; wi < GEMV_WARPS; ++wi) up += red[wi][r][col], gate += red[wi][r][col + 8];
            out.put_gated(r, n, up, gate);
        }
    } else {
        for (int o = threadIdx.x; o < out.rows * TILE; o += GEMV_THREADS) {
            const int r = o / TILE, col = o % TILE, n = tile_first + col;
            if (n >= out.N) continue;
            float v = 0.f;
#pragma unroll
            for (int wi = 0; wi < GEMV_WARPS; ++wi) v += red[wi][r][col];
            out.put(r, n, v);
        }
    }
    out.reduce_splits(tile_first, TILE);
}

// The norm prologue's parameters: gamma, beta ([K]; beta read in LAYER_NORM mode only), eps, the NormMode, and
// the row stride of the normalised rows in shared memory (elements; 64 bytes past a multiple of 128, so the 8
// rows a quarter-warp's B loads touch fall in distinct banks).
template <typename T>
struct GemvNorm {
    const T* gamma;
    const T* beta;
    float eps;
    int mode, stride;
};

extern __shared__ uint4 gemv_dynamic_shared[];  // the norm prologue's normalised rows, [rows][stride]

// The gamma and beta of a thread's first slot of the block's K range (slot k_begin / VEC + threadIdx.x), read
// before the wait (weights, never written inside a step): the prologue's last step then needs no L2 round trip.
template <typename T>
struct GemvNormSlot {
    static constexpr int VEC = 16 / sizeof(T);
    Vec<T, VEC> g, b;  // as loaded: half the registers of floats, live through the wait beside early weights

    __device__ GemvNormSlot(const GemvNorm<T>& nm, int k_begin, int k_end) {
        load(nm, k_begin / VEC + threadIdx.x, k_end);
    }
    // slot s of gamma and beta (aligned, whole slots: the launcher checks)
    __device__ void load(const GemvNorm<T>& nm, int s, int k_end) {
        if (s * VEC >= k_end) return;
        g = reinterpret_cast<const Vec<T, VEC>*>(nm.gamma)[s];
        if (nm.mode == LAYER_NORM) b = reinterpret_cast<const Vec<T, VEC>*>(nm.beta)[s];
    }
};

// The norm prologue: each row's statistics over the whole row (every block computes them itself: no ordering
// between blocks, deterministic), then the block's K range [k_begin, k_end) of each normalised row into xs. One pass
// sums each row's values and squares, shifted by its first value (var = E[(x - x0)^2] - E[x - x0]^2 keeps the
// cancellation of a large mean away; RMSNorm sums squares, unshifted): the same norm as norm.cu's two passes within
// a rounding of its output, a barrier pair and a warp reduction shorter. The statistics are summed by slot (a lane
// a 16-byte slot, warp_sum a warp's 32, then warp_sum over the row's warps); the values come from norm_row.cuh's
// code. Reads x, which the kernel before wrote: after follow_previous_kernel().
template <typename T>
__device__ __forceinline__ void normalize_rows_into(T* xs, const T* x, const GemvNorm<T>& nm,
                                                    const GemvNormSlot<T>& mine, int rows, int K, int k_begin,
                                                    int k_end) {
    constexpr int VEC = 16 / sizeof(T);
    __shared__ float part[2][NORM_MAX_ROWS][32];  // (shifted sum, sum of squares; row, warp of the row) sums
    __shared__ float stat[2][NORM_MAX_ROWS];      // mean, rstd
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int slots = K / VEC, warps = (slots + 31) / 32;
    const float inv_width = 1.f / K;
    const bool rms = nm.mode == RMS_NORM;
    for (int task = warp; task < rows * warps; task += GEMV_WARPS) {
        const int r = task / warps, s = task % warps * 32 + lane;
        const T* xrow = x + static_cast<size_t>(r) * K;
        const float shift = rms ? 0.f : to_float(xrow[0]);
        float sum = 0.f, sq = 0.f;
        if (s < slots) {
            const Vec<T, VEC> in = *reinterpret_cast<const Vec<T, VEC>*>(xrow + s * VEC);
#pragma unroll
            for (int j = 0; j < VEC; ++j) {
                const float d = to_float(in.v[j]) - shift;
                sum += d;
                sq += d * d;
            }
        }
        sum = warp_sum(sum);
        sq = warp_sum(sq);
        if (lane == 0) part[0][r][task % warps] = sum, part[1][r][task % warps] = sq;
    }
    __syncthreads();
    if (warp < rows) {
        const float sum = warp_sum(lane < warps ? part[0][warp][lane] : 0.f) * inv_width;
        const float sq = warp_sum(lane < warps ? part[1][warp][lane] : 0.f);
        if (lane == 0) {
            const float shift = rms ? 0.f : to_float(x[static_cast<size_t>(warp) * K]);
            stat[0][warp] = shift + sum;
            stat[1][warp] = norm_rstd(rms ? sq : fmaxf(sq - sum * sum * K, 0.f), inv_width, nm.eps);
        }
    }
    __syncthreads();
    const int first = k_begin / VEC, count = (k_end - k_begin) / VEC;
    for (int i = threadIdx.x; i < count; i += GEMV_THREADS) {  // a slot a thread, every row
        GemvNormSlot<T> p = mine;
        if (i != threadIdx.x) p.load(nm, first + i, k_end);
        float g[VEC], b[VEC];
#pragma unroll
        for (int j = 0; j < VEC; ++j) g[j] = to_float(p.g.v[j]), b[j] = to_float(p.b.v[j]);
        for (int r = 0; r < rows; ++r)
            *reinterpret_cast<Vec<T, VEC>*>(xs + r * nm.stride + i * VEC) = normalized_slot<T, VEC>(
                g, b, nm.mode,
                *reinterpret_cast<const Vec<T, VEC>*>(x + static_cast<size_t>(r) * K + (first + i) * VEC),
                stat[0][r], stat[1][r]);
    }
    __syncthreads();
}

// Before the wait, L2 is asked for the small per-column vectors the kernel reads after it: the norm's gamma and beta
// over the block's K range, the bias over its tile (read by the tile's last block). They are weights, never written
// inside a step; each would otherwise be a DRAM round trip on the kernel's path.
template <typename T, int FUSE, bool RESIDUAL, bool GATED, bool ARGMAX>
__device__ __forceinline__ void prefetch_vectors(const GemvOut<T, RESIDUAL, GATED, ARGMAX>& out, const GemvNorm<T>& nm,
                                                 int k_begin, int k_end, int tile_first, int tile) {
    const auto ask = [](const T* p, int count) {
        const unsigned bytes = count * static_cast<int>(sizeof(T)) & ~15;
        if (bytes > 0 && reinterpret_cast<size_t>(p) % 16 == 0) prefetch_l2(p, bytes);
    };
    if (threadIdx.x == 0 && out.has_bias) ask(out.bias + tile_first, min(tile, out.N - tile_first));
    if constexpr ((FUSE & FUSE_NORM) != 0) {
        if (threadIdx.x == 32) ask(nm.gamma + k_begin, k_end - k_begin);
        if (threadIdx.x == 64 && nm.mode == LAYER_NORM) ask(nm.beta + k_begin, k_end - k_begin);
    }
}

// The K loop of both layouts: a warp's batches from `first`, `step` apart, each loaded (load_weights) then multiplied
// (multiply); with `early` the first batch's loads go before the wait and the prologue (weights are never written
// inside a step), and the bias, gamma and beta are asked of L2 there in any case.
template <typename T, int FUSE, bool RESIDUAL, bool GATED, bool ARGMAX, typename Load, typename Multiply>
__device__ __forceinline__ void gemv_stream(const GemvOut<T, RESIDUAL, GATED, ARGMAX>& out, const GemvNorm<T>& nm,
                                            T* xs, const T* x, int K, int k_begin, int k_end, int tile_first,
                                            int tile, int first, int step, int early, const Load& load_weights,
                                            const Multiply& multiply) {
    if (early && first < k_end) load_weights(first);  // in flight through the wait and the prologue
    prefetch_vectors<T, FUSE>(out, nm, k_begin, k_end, tile_first, tile);
    if constexpr ((FUSE & FUSE_NORM) != 0) {
        const GemvNormSlot<T> mine(nm, k_begin, k_end);
        follow_previous_kernel();
        normalize_rows_into(xs, x, nm, mine, out.rows, K, k_begin, k_end);
    } else {
        follow_previous_kernel();
    }
    if (!early && first < k_end) load_weights(first);
    if (first < k_end) multiply(first);
    for (int kb = first + step; kb < k_end; kb += step) {
        load_weights(kb);
        multiply(kb);
    }
}

// A FUSE's output (its epilogue).
template <typename T, int FUSE>
using GemvFusedOut = GemvOut<T, FUSE == FUSE_RESIDUAL, (FUSE & FUSE_GATED) != 0, (FUSE & FUSE_ARGMAX) != 0>;

// The fused kernels' parameters: the plain ones, then residual ([rows, N], FUSE_RESIDUAL), and the norm's (gamma,
// beta, eps, norm_mode, x_stride: FUSE_NORM); what the FUSE leaves unused is a placeholder, never read.
#define GEMV_FUSED_ARGS                                                                                             \
    const T *__restrict__ x, const T *__restrict__ w, T *__restrict__ y, const T *__restrict__ bias, float *partials, \
        int *counters, int rows, int K, int N, int k_per_split, int act, int has_bias, int early,                   \
        const T *__restrict__ residual, const T *__restrict__ gamma, const T *__restrict__ beta, float eps,         \
        int norm_mode, int x_stride
#define GEMV_BODY_ARGS                                                                                          \
    const T *__restrict__ x, const T *__restrict__ w, const GemvFusedOut<T, FUSE>&out, int K, int k_per_split, \
        int early, const GemvNorm<T>&nm
#define GEMV_FUSED_OUT \
    GemvFusedOut<T, FUSE> { y, bias, partials, counters, rows, N, act, has_bias, residual }
#define GEMV_FUSED_NORM \
    GemvNorm<T> { gamma, beta, eps, norm_mode, x_stride }

// W [N, K] (nn.Linear's [out, in], transposed_mode). A block's tile is 16 M weight rows; a chunk is 32 k.
// Lane (g, t) loads k 8t .. 8t + 7 of the chunk from rows g and g + 8 of each 16-row piece, and x row g's
// same 8 k: the chunk's k are permuted alike in both operands (mma step s takes each lane's pairs 2s, 2s +
// 1). K % 8 == 0, k_per_split % 32 == 0, W and x 16-byte aligned (the launcher checks).
// FUSE_NORM: x's rows normalised into shared memory by the prologue, which the B operands then read. X8 = 2: lane
// (g, t) loads x rows g and g + 8, the B operands of two mma an A fragment.
template <typename T, int M, int U, int FUSE, int X8>
__device__ __forceinline__ void gemv_tc_nk_body(GEMV_BODY_ARGS) {
    const int rows = out.rows, N = out.N;
    constexpr int TILE = 16 * M, CK = 32;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int tile_first = blockIdx.x * TILE;
    const int k_begin = blockIdx.y * k_per_split, k_end = min(K, k_begin + k_per_split);
    const T* wr[M][2];  // rows past N (gated: past the outputs) re-read the last; their sums are never written
#pragma unroll
    for (int m = 0; m < M; ++m)
#pragma unroll
        for (int h = 0; h < 2; ++h)
            wr[m][h] = w + static_cast<size_t>(out.weight_row(tile_first + 16 * m + g + 8 * h)) * K + 8 * t;
    T* const xs = reinterpret_cast<T*>(gemv_dynamic_shared);
    const T* xr[X8];
#pragma unroll
    for (int j = 0; j < X8; ++j) {
        const int r = min(g + 8 * j, rows - 1);
        xr[j] = (FUSE & FUSE_NORM) ? xs + r * nm.stride + 8 * t : x + static_cast<size_t>(r) * K + 8 * t;
    }
    uint4 a[U][M][2];
    const auto load_weights = [&](int kb) {  // past k_end: a valid address, zeroed before the mma
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = kb + u * CK, kc = k + 8 * t < k_end ? k : k_end - 8 - 8 * t;
#pragma unroll
            for (int m = 0; m < M; ++m)
#pragma unroll
                for (int h = 0; h < 2; ++h) a[u][m][h] = load_stream(wr[m][h] + kc);
        }
    };
    float c[M][X8][4] = {};
    const auto multiply = [&](int kb) {
        uint4 b[U][X8];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int k = kb + u * CK;
            const bool in = k + 8 * t < k_end;
            // x's k (as the weights', clamped), or in shared memory, where the block's K range starts at 0
            const int xk = !(FUSE & FUSE_NORM) ? (in ? k : k_end - 8 - 8 * t) : in ? k - k_begin : 0;
#pragma unroll
            for (int j = 0; j < X8; ++j)
                b[u][j] = select(in && g + 8 * j < rows, *reinterpret_cast<const uint4*>(xr[j] + xk));
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const bool in = kb + u * CK + 8 * t < k_end;
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const uint4 lo = select(in, a[u][m][0]), hi = select(in, a[u][m][1]);
#pragma unroll
                for (int j = 0; j < X8; ++j) {
                    mma_16816<T>(c[m][j], {lo.x, hi.x, lo.y, hi.y}, b[u][j].x, b[u][j].y);
                    mma_16816<T>(c[m][j], {lo.z, hi.z, lo.w, hi.w}, b[u][j].z, b[u][j].w);
                }
            }
        }
    };
    gemv_stream<T, FUSE>(out, nm, xs, x, K, k_begin, k_end, tile_first, TILE, k_begin + warp * U * CK,
                         GEMV_WARPS * U * CK, early, load_weights, multiply);
    gemv_tc_reduce<T, TILE>(out, c, tile_first, [](int m, int i) { return 16 * m + threadIdx.x % 32 / 4 + 8 * (i / 2); });
}

template <typename T, int M, int U, int BLOCKS, int X8>
__global__ void __launch_bounds__(GEMV_THREADS, BLOCKS) gemv_tc_nk(GEMV_ARGS) {
    gemv_tc_nk_body<T, M, U, FUSE_NONE, X8>(x, w, GemvOut<T>{y, bias, partials, counters, rows, N, act, has_bias},
                                            K, k_per_split, early, GemvNorm<T>{});
}

template <typename T, int M, int U, int BLOCKS, int FUSE, int X8>
__global__ void __launch_bounds__(GEMV_THREADS, BLOCKS) gemv_tc_nk_fused(GEMV_FUSED_ARGS) {
    gemv_tc_nk_body<T, M, U, FUSE, X8>(x, w, GEMV_FUSED_OUT, K, k_per_split, early, GEMV_FUSED_NORM);
}

// W [K, N] (DeepSpeed's default [in, out]). A block's tile is 32 M columns; a chunk is 16 k, and chunks go
// in pairs (32 k). Lane (g, t) loads columns 8t .. 8t + 7 of each 32-column piece from chunk rows rho(g) and
// rho(g) + 2, rho(g) = 2g - g % 2 (0, 1, 4, 5, .. 12, 13): each of its four registers is a fragment of an 8
// (k) x 8 (columns 8t' + 2j + {0, 1} over t') matrix, which movmatrix transposes into mma's A layout (rows =
// those columns, pairs along k). So lane (g, t) ends up holding column n(g, j) = 8 (g / 2) + 2j + g % 2 of the
// piece, and its k pairs (2t, 2t + 1) and (8 + 2t, 9 + 2t) of the mma are chunk rows 4t .. 4t + 3. Chunk row
// q of the pair's first (second) chunk is k 8 (q / 4) + q % 4 (+ 4) of the pair, so lane (g, t)'s B operands
// for both chunks are x row g's k 8t .. 8t + 7: one 16-byte load a pair (x loads were a third of the
// instructions at one piece a tile). N % 8 == 0, K % 8 == 0, k_per_split % 16 == 0, W and x 16-byte aligned
// (the launcher checks).
template <typename T, int M, int U, int FUSE, int X8>
__device__ __forceinline__ void gemv_tc_kn_body(GEMV_BODY_ARGS) {
    static_assert(U % 2 == 0, "a batch is whole chunk pairs");
    static_assert(!(FUSE & FUSE_GATED), "the gated epilogue pairs [out, in] rows");
    const int rows = out.rows, N = out.N;
    constexpr int TILE = 32 * M, CK = 16;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int tile_first = blockIdx.x * TILE;
    const int k_begin = blockIdx.y * k_per_split, k_end = min(K, k_begin + k_per_split);
    int col[M];  // columns past N re-read the last 8; their sums are never written
#pragma unroll
    for (int m = 0; m < M; ++m) col[m] = min(tile_first + 32 * m + 8 * t, N - 8);
    const int rho = 2 * g - g % 2;
    T* const xs = reinterpret_cast<T*>(gemv_dynamic_shared);
    const T* xr[X8];  // x rows g (and g + 8: X8 = 2, two B operands an A fragment)
#pragma unroll
    for (int j = 0; j < X8; ++j) {
        const int r = min(g + 8 * j, rows - 1);
        xr[j] = (FUSE & FUSE_NORM) ? xs + r * nm.stride + 8 * t : x + static_cast<size_t>(r) * K + 8 * t;
    }
    const int x_origin = (FUSE & FUSE_NORM) ? k_begin : 0;  // shared memory holds the block's K range
    uint4 a[U][M][2];
    bool in[U][2];
    const auto load_weights = [&](int kb) {
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int pair = kb + (u / 2) * 2 * CK;
#pragma unroll
            for (int h = 0; h < 2; ++h) {  // rows past k_end: a valid address, zeroed before the mma
                const int q = rho + 2 * h, k = pair + 8 * (q / 4) + 4 * (u % 2) + q % 4;
                in[u][h] = k < k_end;
                const size_t row = in[u][h] ? k : k_end - 1;
#pragma unroll
                for (int m = 0; m < M; ++m) a[u][m][h] = load_stream(w + row * N + col[m]);
            }
        }
    };
    float c[2 * M][X8][4] = {};
    const auto multiply = [&](int kb) {
        uint2 b[U][X8];
#pragma unroll
        for (int u = 0; u < U; u += 2) {  // k_end - pair is a multiple of 8, so the eight k are in range together
            const int pair = kb + (u / 2) * 2 * CK;
#pragma unroll
            for (int j = 0; j < X8; ++j) {
                const uint4 v = pair + 8 * t < k_end && g + 8 * j < rows
                                    ? *reinterpret_cast<const uint4*>(xr[j] + (pair - x_origin))
                                    : make_uint4(0, 0, 0, 0);
                b[u][j] = make_uint2(v.x, v.y);
                b[u + 1][j] = make_uint2(v.z, v.w);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u)
#pragma unroll
            for (int m = 0; m < M; ++m) {
                const uint4 lo = select(in[u][0], a[u][m][0]), hi = select(in[u][1], a[u][m][1]);
                const unsigned l0 = transpose8x8(lo.x), l1 = transpose8x8(lo.y), l2 = transpose8x8(lo.z),
                               l3 = transpose8x8(lo.w), h0 = transpose8x8(hi.x), h1 = transpose8x8(hi.y),
                               h2 = transpose8x8(hi.z), h3 = transpose8x8(hi.w);
#pragma unroll
                for (int j = 0; j < X8; ++j) {
                    mma_16816<T>(c[2 * m][j], {l0, l1, h0, h1}, b[u][j].x, b[u][j].y);      // columns 0, 1 (n(g, .))
                    mma_16816<T>(c[2 * m + 1][j], {l2, l3, h2, h3}, b[u][j].x, b[u][j].y);  // columns 2, 3
                }
            }
    };
    gemv_stream<T, FUSE>(out, nm, xs, x, K, k_begin, k_end, tile_first, TILE, k_begin + warp * U * CK,
                         GEMV_WARPS * U * CK, early, load_weights, multiply);
    // c[2m + p][j][i]: piece m, column n(g, 2p + i / 2), x row 8j + 2t + i % 2.
    gemv_tc_reduce<T, TILE>(out, c, tile_first, [](int mp, int i) {
        const int g = threadIdx.x % 32 / 4;
        return 32 * (mp / 2) + 8 * (g / 2) + 2 * (2 * (mp % 2) + i / 2) + g % 2;
    });
}

template <typename T, int M, int U, int BLOCKS, int X8>
__global__ void __launch_bounds__(GEMV_THREADS, BLOCKS) gemv_tc_kn(GEMV_ARGS) {
    gemv_tc_kn_body<T, M, U, FUSE_NONE, X8>(x, w, GemvOut<T>{y, bias, partials, counters, rows, N, act, has_bias},
                                            K, k_per_split, early, GemvNorm<T>{});
}

template <typename T, int M, int U, int BLOCKS, int FUSE, int X8>
__global__ void __launch_bounds__(GEMV_THREADS, BLOCKS) gemv_tc_kn_fused(GEMV_FUSED_ARGS) {
    gemv_tc_kn_body<T, M, U, FUSE, X8>(x, w, GEMV_FUSED_OUT, K, k_per_split, early, GEMV_FUSED_NORM);
}

}  // namespace ct
