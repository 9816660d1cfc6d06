// SoftmaxOp: scaled, masked softmax over rows of attention scores s [B, h, Q, K]. Row (b, head, i), its
// query at absolute position K - Q + i:
//   z_j = s_j * layer_scale + alibi[b, head, j] + mask[b, head, i, j]   (additive; a false boolean drops j)
//   keys outside [lo, hi) dropped: hi = position + 1 when causal (else K), lo = position - window + 1 with a
//   window (else 0); p_j = exp(z_j - max z) / sum exp(z - max z), fp32, one rounding; a row with every key
//   dropped is zeros.
// Two passes over the row: each lane's running (max, sum) merged across the row's lanes, then the write
// (the second read mostly hits L2). Any K: nothing of the row is held in registers or shared memory.
// ROW_THREADS lanes share a row: a warp (many rows) or a block. Few long rows split further, over a grid
// (chunks, rows): PHASE 1 writes each chunk's (max, sum), PHASE 2 merges its row's and writes its chunk;
// PHASE 0 does a whole row in one block. Vectors wholly outside [lo, hi) are not read in either pass (a
// causal prompt's upper triangle), and written as 0.
#include "common.cuh"

namespace ct {

enum SoftmaxMask : int { SOFTMAX_NO_MASK = 0, SOFTMAX_ADDITIVE = 1, SOFTMAX_BOOL = 2 };

// exp with the hardware's approximation for 16-bit outputs (its error vanishes in their rounding).
template <bool FAST>
__device__ __forceinline__ float exp_of(float x) {
    return FAST ? __expf(x) : expf(x);
}

// (m, l) += (m2, l2): running maximum and sum of exp(z - m) of two sets of keys (an empty set has m = -inf).
template <bool FAST>
__device__ __forceinline__ void merge_running(float& m, float& l, float m2, float l2) {
    const float top = fmaxf(m, m2);
    if (top == neg_inf()) return;
    l = (m == neg_inf() ? 0.f : l * exp_of<FAST>(m - top)) + (m2 == neg_inf() ? 0.f : l2 * exp_of<FAST>(m2 - top));
    m = top;
}

// p may be s (in place): each lane reads its elements before writing them. K % VEC == 0, chunk % VEC == 0
// and s, p VEC-element aligned (the launcher checks); mask strides are in elements (0 for a broadcast
// dimension), as are alibi's (read if has_alibi). rows = B h Q; window 0: none. stats: [rows, chunks]
// (PHASE 1 and 2).
template <typename T, int VEC, int ROW_THREADS, int PHASE>
__global__ void __launch_bounds__(256) masked_softmax(
    const T* s, T* p, const void* __restrict__ mask, const T* __restrict__ alibi, float2* stats, long long rows,
    int h, int q, int k, int chunk, float layer_scale, int mask_kind, long long mask_b, long long mask_h,
    long long mask_q, long long alibi_b, long long alibi_h, int has_alibi, int causal, int window) {
    constexpr bool FAST = sizeof(T) == 2;
    constexpr int ROWS_PER_BLOCK = 256 / ROW_THREADS, U = 4;  // U vectors a lane in flight
    using V = Vec<T, VEC>;
    const long long row = PHASE == 0 ? static_cast<long long>(blockIdx.x) * ROWS_PER_BLOCK + threadIdx.x / ROW_THREADS
                                     : blockIdx.y;
    if (row >= rows) return;  // whole warps (a row a block: never, the grid has no spare block)
    const int lane = threadIdx.x % ROW_THREADS, i = row % q, head = (row / q) % h;
    const long long b = row / q / h;
    const int position = k - q + i, hi = causal ? position + 1 : k, lo = window > 0 ? max(0, position - window + 1) : 0;
    const int begin = PHASE == 0 ? 0 : blockIdx.x * chunk, end = PHASE == 0 ? k : min(k, begin + chunk);
    const T* srow = s + row * k;
    T* prow = p + row * k;
    const T* arow = has_alibi ? alibi + b * alibi_b + head * alibi_h : nullptr;
    const long long mrow = b * mask_b + head * mask_h + i * mask_q;
    auto score = [&](int j, float x) {
        if (j < lo || j >= hi) return neg_inf();
        x *= layer_scale;
        if (arow) x += to_float(arow[j]);
        if (mask_kind == SOFTMAX_ADDITIVE) x += to_float(static_cast<const T*>(mask)[mrow + j]);
        if (mask_kind == SOFTMAX_BOOL && !static_cast<const unsigned char*>(mask)[mrow + j]) return neg_inf();
        return x;
    };
    auto wanted = [&](int j) { return j < end && j + VEC > lo && j < hi; };  // a vector with a kept key

    float m = neg_inf(), l = 0.f;
    if (PHASE != 2) {
        for (int j0 = begin + lane * VEC; j0 < end; j0 += U * ROW_THREADS * VEC) {
            V v[U];
#pragma unroll
            for (int u = 0; u < U; ++u) {  // loads first: U in flight
                const int j = j0 + u * ROW_THREADS * VEC;
                if (wanted(j)) v[u] = *reinterpret_cast<const V*>(srow + j);
            }
#pragma unroll
            for (int u = 0; u < U; ++u) {
                const int j = j0 + u * ROW_THREADS * VEC;
                if (!wanted(j)) continue;
#pragma unroll
                for (int e = 0; e < VEC; ++e) {
                    const float z = score(j + e, to_float(v[u].v[e]));
                    if (z == neg_inf()) continue;
                    if (z > m) {  // a new maximum: rescale the sum once
                        l = l * exp_of<FAST>(m - z) + 1.f;
                        m = z;
                    } else {
                        l += exp_of<FAST>(z - m);
                    }
                }
            }
        }
#pragma unroll
        for (int off = 16; off > 0; off >>= 1) {
            const float m2 = __shfl_xor_sync(0xffffffffu, m, off), l2 = __shfl_xor_sync(0xffffffffu, l, off);
            merge_running<FAST>(m, l, m2, l2);
        }
        if constexpr (ROW_THREADS > 32) {
            constexpr int WARPS = ROW_THREADS / 32;
            __shared__ float warp_m[WARPS], warp_l[WARPS];
            if (lane % 32 == 0) warp_m[lane / 32] = m, warp_l[lane / 32] = l;
            __syncthreads();
            m = warp_m[0], l = warp_l[0];
#pragma unroll
            for (int w = 1; w < WARPS; ++w) merge_running<FAST>(m, l, warp_m[w], warp_l[w]);
        }
        if (PHASE == 1) {
            if (lane == 0) stats[row * gridDim.x + blockIdx.x] = make_float2(m, l);
            return;
        }
    } else {
        for (int c = 0; c < gridDim.x; ++c) {  // the row's chunks in order: every block merges alike
            const float2 st = stats[row * gridDim.x + c];
            merge_running<FAST>(m, l, st.x, st.y);
        }
    }
    const float inv = l > 0.f ? 1.f / l : 0.f;
    for (int j0 = begin + lane * VEC; j0 < end; j0 += U * ROW_THREADS * VEC) {
        V v[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = j0 + u * ROW_THREADS * VEC;
            if (wanted(j)) v[u] = *reinterpret_cast<const V*>(srow + j);
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = j0 + u * ROW_THREADS * VEC;
            if (j >= end) continue;
            V out;
#pragma unroll
            for (int e = 0; e < VEC; ++e) {
                const float z = wanted(j) ? score(j + e, to_float(v[u].v[e])) : neg_inf();
                out.v[e] = from_float<T>(z == neg_inf() ? 0.f : exp_of<FAST>(z - m) * inv);
            }
            *reinterpret_cast<V*>(prow + j) = out;
        }
    }
}

}  // namespace ct
