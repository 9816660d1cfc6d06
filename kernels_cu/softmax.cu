// SoftmaxOp: scaled, masked softmax over rows of attention scores s [B, h, Q, K]. Row (b, head, i), its
// query at absolute position K - Q + i:
//   z_j = s_j * layer_scale + alibi[b, head, j] + mask[b, head, i, j]   (additive; a false boolean drops j)
//   keys outside [lo, hi) dropped: hi = position + 1 when causal (else K), lo = position - window + 1 with a
//   window (else 0); p_j = exp(z_j - max z) / sum exp(z - max z), fp32, one rounding; a row with every key
//   dropped is zeros; a NaN or +inf z among the kept keys makes its row's sum NaN and so the whole row NaN
//   (torch.softmax's answer; fmaxf skips a NaN, the sum does not).
// ROW_THREADS lanes (8, 16, or 1 to 8 warps) hold a chunk of a row in registers, NV vectors of VEC keys a
// lane: one read, the maximum and the sum reduced over the lanes, one exp a key, one write. PHASE 0: the
// chunk is the whole row (a grid of at most one wave loops over the rows). A row longer than the block holds
// (or one of few rows, split to fill the GPU) is cut into chunks over blocks, grid = rows x chunks: PHASE 1
// writes each chunk's (max, sum of exp), PHASE 2 merges its row's and writes its chunk (reading the scores a
// second time). Vectors wholly outside [lo, hi) are not read (a causal prompt's upper triangle) and are
// written as 0.
#include "common.cuh"
#include "mask.cuh"

namespace ct {

// exp(x - top) for x = -inf or below top; 16-bit outputs: one FFMA and the hardware's 2^x (its error vanishes
// in their rounding), top_log2 = top * log2(e).
template <bool FAST>
__device__ __forceinline__ float exp_minus(float x, float top, float top_log2) {
    return FAST ? fast_exp2(fmaf(x, LOG2E, -top_log2)) : expf(x - top);
}

// The maximum (MAX) or the sum of v over a row's ROW_THREADS lanes, returned to each: shuffles within a warp;
// past a warp, each warp's value through slots[its warp in the block] and a barrier of the row's warps only
// (named barrier 1 + the row's place in the block), so a block's rows go at their own pace. The max and the
// sum take separate slots: each one's barrier then orders the other's reuse by the next row.
template <int ROW_THREADS, bool MAX>
__device__ __forceinline__ float row_reduce(float v, float* slots) {
#pragma unroll
    for (int off = (ROW_THREADS < 32 ? ROW_THREADS : 32) / 2; off > 0; off >>= 1) {
        const float other = __shfl_xor_sync(0xffffffffu, v, off);
        v = MAX ? fmaxf(v, other) : v + other;
    }
    if constexpr (ROW_THREADS > 32) {
        constexpr int WARPS = ROW_THREADS / 32;
        const int warp = threadIdx.x / 32, first = warp / WARPS * WARPS;
        if (threadIdx.x % 32 == 0) slots[warp] = v;
        asm volatile("bar.sync %0, %1;" ::"r"(1 + warp / WARPS), "n"(ROW_THREADS) : "memory");
        v = slots[first];
#pragma unroll
        for (int w = 1; w < WARPS; ++w) v = MAX ? fmaxf(v, slots[first + w]) : v + slots[first + w];
    }
    return v;
}

// p may be s (in place): a lane reads all its elements before writing them, and PHASE 2 writes only its own
// chunk. K % VEC == 0, chunk % VEC == 0, chunk <= ROW_THREADS * VEC * NV; s, p, mask and alibi rows aligned
// to VEC elements at every offset read (the launcher copies a mask or alibi that is not). Mask strides are in
// elements (0 for a broadcast dimension), as are alibi's (read if has_alibi). rows = B h Q; window 0: none;
// stats: [rows, chunks] (PHASE 1 and 2).
template <typename T, int VEC, int ROW_THREADS, int NV, int PHASE>
__global__ void __launch_bounds__(256, 2) masked_softmax(
    const T* s, T* p, const void* __restrict__ mask, const T* __restrict__ alibi, float2* stats, int rows,
    int chunks, int h, int q, int k, int chunk, float layer_scale, int mask_kind, long long mask_b,
    long long mask_h, long long mask_q, int has_alibi, long long alibi_b, long long alibi_h, int causal,
    int window) {
    static_assert(PHASE == 0 || ROW_THREADS == 256, "chunks of a row are whole blocks");
    static_assert(ROW_THREADS == 8 || ROW_THREADS == 16 || (ROW_THREADS % 32 == 0 && ROW_THREADS <= 256),
                  "a part of a warp, or warps");
    constexpr bool FAST = sizeof(T) == 2;
    using V = Vec<T, VEC>;
    __shared__ float slots_m[8], slots_l[8];  // a warp's maximum and sum, for rows past a warp
    constexpr int ROWS_PER_BLOCK = 256 / ROW_THREADS;
    const int lane = threadIdx.x % ROW_THREADS;
    auto kept = [&](int r, int& lo, int& hi) {  // the keys [lo, hi) row r's causal and window rules keep
        const int position = k - q + r % q;
        hi = causal ? position + 1 : k;
        lo = window > 0 ? max(0, position - window + 1) : 0;
    };
    // Phase 0: the lanes loop over rows (the grid may be smaller than the rows); phases 1 and 2: a block does
    // a chunk. Rows of 8 or 16 lanes: the warp's rows go round together (its shuffles need every lane), a row
    // past the last is all dropped keys and is not written. Wider rows go round alone.
    const int first = PHASE == 0 ? blockIdx.x * ROWS_PER_BLOCK + threadIdx.x / ROW_THREADS : blockIdx.x / chunks;
    const int stride = PHASE == 0 ? gridDim.x * ROWS_PER_BLOCK : rows;
    const int group = ROW_THREADS < 32 ? threadIdx.x % 32 / ROW_THREADS : 0;  // the row's place in its warp
    for (int row = first; row - group < rows; row += stride) {  // uniform over a warp; 32-bit: no division calls
        const bool valid = row < rows;
        int lo, hi;
        kept(row, lo, hi);
        if (!valid) lo = hi = 0;
        const int i = row % q, head = (row / q) % h, b = row / q / h;
        const int begin = PHASE == 0 ? 0 : static_cast<int>(blockIdx.x % chunks) * chunk;
        const int end = min(k, begin + chunk), stop = min(hi, end);  // this chunk's kept keys: [lo, stop)
        const T* srow = s + static_cast<long long>(row) * k;
        T* prow = p + static_cast<long long>(row) * k;
        const T* arow = alibi + b * alibi_b + head * alibi_h;
        const long long mrow = b * mask_b + head * mask_h + i * mask_q;
        auto key = [&](int n) { return begin + (n * ROW_THREADS + lane) * VEC; };
        auto wanted = [&](int j) { return j < stop && j + VEC > lo; };  // a vector with a kept key

        // The scores' loads first (NV vectors a lane in flight). Zeros: left uninitialised, the vectors cost
        // ptxas registers (spills) across the row loop.
        V sv[NV] = {};
#pragma unroll
        for (int n = 0; n < NV; ++n)
            if (wanted(key(n))) sv[n] = *reinterpret_cast<const V*>(srow + key(n));
        // z = s * layer_scale + bias, the bias (alibi + additive mask; -inf for a dropped key) built a vector
        // at a time under uniform branches, so a key without mask or alibi costs one FFMA.
        float z[NV][VEC], m = neg_inf();
#pragma unroll
        for (int n = 0; n < NV; ++n) {
            const int j = key(n);
            float bias[VEC] = {};
            if (has_alibi && wanted(j)) {
                const V a = *reinterpret_cast<const V*>(arow + j);
#pragma unroll
                for (int e = 0; e < VEC; ++e) bias[e] = to_float(a.v[e]);
            }
            if (mask_kind == ADDITIVE_MASK && wanted(j)) {
                const V add = *reinterpret_cast<const V*>(static_cast<const T*>(mask) + mrow + j);
#pragma unroll
                for (int e = 0; e < VEC; ++e) bias[e] += to_float(add.v[e]);
            }
            if (mask_kind == BOOL_MASK && wanted(j)) {
                using B = Vec<unsigned char, VEC>;
                const B keep = *reinterpret_cast<const B*>(static_cast<const unsigned char*>(mask) + mrow + j);
#pragma unroll
                for (int e = 0; e < VEC; ++e) bias[e] = keep.v[e] ? bias[e] : neg_inf();
            }
            if (j < lo || j + VEC > stop) {  // a vector across the edges (or wholly outside): key by key
#pragma unroll
                for (int e = 0; e < VEC; ++e) bias[e] = j + e >= lo && j + e < stop ? bias[e] : neg_inf();
            }
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                z[n][e] = fmaf(to_float(sv[n].v[e]), layer_scale, bias[e]);
                m = fmaxf(m, z[n][e]);
            }
        }

        float top, inv;  // the row's maximum and 1 / its sum of exp(z - top)
        if (PHASE == 2) {  // the chunks' (max, sum) pairs, merged by the block's threads in parallel
            const float2* row_stats = stats + static_cast<long long>(row) * chunks;
            float mc = neg_inf();
            for (int c = threadIdx.x; c < chunks; c += 256) mc = fmaxf(mc, row_stats[c].x);
            top = row_reduce<256, true>(mc, slots_m);
            top = top == neg_inf() ? 0.f : top;  // every key dropped: l stays 0
            const float top_log2 = top * LOG2E;
            float l = 0.f;
            for (int c = threadIdx.x; c < chunks; c += 256) {
                const float2 st = row_stats[c];
                if (st.y != 0.f) l += st.y * exp_minus<FAST>(st.x, top, top_log2);  // 0: all dropped; NaN kept
            }
            l = row_reduce<256, false>(l, slots_l);
            inv = l == 0.f ? 0.f : 1.f / l;  // a NaN sum: the row is NaN
        } else {
            m = row_reduce<ROW_THREADS, true>(m, slots_m);
            top = m == neg_inf() ? 0.f : m;  // every key dropped: exp(-inf - 0) = 0, not NaN
            const float top_log2 = top * LOG2E;
            float l = 0.f;
#pragma unroll
            for (int n = 0; n < NV; ++n)
#pragma unroll
                for (int e = 0; e < VEC; ++e) l += z[n][e] = exp_minus<FAST>(z[n][e], top, top_log2);
            l = row_reduce<ROW_THREADS, false>(l, slots_l);
            if (PHASE == 1) {
                if (threadIdx.x == 0) stats[blockIdx.x] = make_float2(m, l);
                continue;
            }
            inv = l == 0.f ? 0.f : 1.f / l;  // a NaN sum: the row is NaN
        }
        const float top_log2 = top * LOG2E;
#pragma unroll
        for (int n = 0; n < NV; ++n) {
            const int j = key(n);
            if (j >= end || !valid) continue;
            V out;
#pragma unroll
            for (int e = 0; e < VEC; ++e)  // PHASE 0 holds the exps already
                out.v[e] = from_float<T>((PHASE == 2 ? exp_minus<FAST>(z[n][e], top, top_log2) : z[n][e]) * inv);
            *reinterpret_cast<V*>(prow + j) = out;
        }
    }
}

}  // namespace ct
