// Prefill attention (FlashAttention-2 style, fp16/bf16 on tensor cores, sm_80+): a block takes PA_BM query
// rows of one (sequence, head), 16 per warp, and streams that sequence's keys and values through shared
// memory in tiles of PA_BN (cp.async, two buffers: the next tile loads while this one is used). Per tile,
// S = Q K^T by mma.sync (Q's fragments stay in registers), the mask, an online softmax per row in fp32,
// and O += P V by mma.sync, with P taken from S's accumulators without a trip through memory. No S x S
// matrix exists anywhere; K and V are read once per block.
//
// Query row i of sequence b sits in cache slot start[b] + i; it sees key j when j < keys_len[b], and
// j <= start[b] + i if causal, and j > start[b] + i - window if window > 0, and mask[b, j] allows it
// (boolean: dropped where false; additive: added). s = q . k_j * scale (+ mask) (+ alibi[b, head, j]);
// out = sum_j softmax(s)_j v_j, or 0 for a row that sees no key.
#include "common.cuh"
#include "mma.cuh"

namespace ct {

constexpr int PA_WARPS = 4;
constexpr int PA_THREADS = 32 * PA_WARPS;
constexpr int PA_BM = 16 * PA_WARPS;  // query rows per block
constexpr int PA_BN = 64;             // keys per tile
constexpr float PA_LOG2E = 1.4426950408889634f;

// Dynamic shared memory of one block: Q [PA_BM][D + 8], then K and V [2][PA_BN][D + 8], so
// (PA_BM + 4 PA_BN)(D + 8) elements. The 16-byte pad per row puts the 8 rows an ldmatrix reads in 8
// different bank groups.

// q, k, v: element strides per sequence, head and token (the last dimension contiguous, 16-byte aligned
// rows); k and v share theirs. out [B, S, h, D]. group: query heads per key/value head. mask [B, mask_len]
// (T additive, or bool as bytes) read when mask_kind says so; alibi [B, h, alibi_len] when alibi_len > 0.
// Grid (ceil(S / PA_BM), h, B).
template <typename T, int D>
__global__ void __launch_bounds__(PA_THREADS)
attention_prefill(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                  const void* __restrict__ mask, const T* __restrict__ alibi, const int* __restrict__ start,
                  const int* __restrict__ keys_len, long long q_seq, long long q_head, long long q_tok,
                  long long kv_seq, long long kv_head, long long kv_tok, int S, int h, int group, int causal,
                  int window, int mask_kind, int mask_len, int alibi_len, float scale) {
    static_assert(D % 16 == 0 && D <= 128, "head size");
    constexpr int ROW = D + 8, VECS = D / 8;
    extern __shared__ __align__(16) unsigned char pa_smem[];
    T(*sq)[ROW] = reinterpret_cast<T(*)[ROW]>(pa_smem);
    T(*sk)[PA_BN][ROW] = reinterpret_cast<T(*)[PA_BN][ROW]>(pa_smem + PA_BM * ROW * sizeof(T));
    T(*sv)[PA_BN][ROW] = reinterpret_cast<T(*)[PA_BN][ROW]>(pa_smem + (PA_BM + 2 * PA_BN) * ROW * sizeof(T));

    const int b = blockIdx.z, head = blockIdx.y;
    const int q0 = (gridDim.x - 1 - blockIdx.x) * PA_BM;  // the longest causal rows first
    const int first = start[b], len = keys_len[b];
    // Keys any row of this block may see: [k_begin, k_end).
    const int k_end = causal ? min(len, first + min(q0 + PA_BM, S)) : len;
    const int k_begin = window > 0 ? max(0, first + q0 - window + 1) : 0;
    const T* qp = q + b * q_seq + head * q_head;
    const T* kp = k + b * kv_seq + (head / group) * kv_head;
    const T* vp = v + b * kv_seq + (head / group) * kv_head;

    for (int c = threadIdx.x; c < PA_BM * VECS; c += PA_THREADS) {
        const int r = c / VECS, col = c % VECS * 8;
        const bool valid = q0 + r < S;
        copy16(&sq[r][col], valid ? qp + (q0 + r) * q_tok + col : qp, valid);
    }
    // Keys outside [k_begin, k_end) load as zeros: a cache slot past a sequence's length may hold anything
    // (NaN too), and P (0 there) times V must stay 0.
    auto load_tile = [&](int tile, int buf) {
        for (int c = threadIdx.x; c < PA_BN * VECS; c += PA_THREADS) {
            const int r = c / VECS, col = c % VECS * 8, key = tile * PA_BN + r;
            const bool valid = key >= k_begin && key < k_end;
            copy16(&sk[buf][r][col], valid ? kp + key * kv_tok + col : kp, valid);
            copy16(&sv[buf][r][col], valid ? vp + key * kv_tok + col : vp, valid);
        }
    };
    const int t_first = k_begin / PA_BN, tiles = k_end > k_begin ? (k_end - 1) / PA_BN - t_first + 1 : 0;
    if (tiles > 0) load_tile(t_first, 0);
    copy_commit();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
    const float sl2 = scale * PA_LOG2E;  // exp(x) = exp2(x log2 e)
    // This thread's two rows (g and g + 8 of the warp's 16) as cache slots.
    const int slot[2] = {first + q0 + warp * 16 + g, first + q0 + warp * 16 + g + 8};
    unsigned qf[D / 16][4];
    float o[D / 8][4], m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};
#pragma unroll
    for (int j = 0; j < D / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

    for (int it = 0; it < tiles; ++it) {
        const int tile = t_first + it, buf = it & 1, j0 = tile * PA_BN;
        if (it + 1 < tiles) load_tile(tile + 1, buf ^ 1);
        copy_commit();
        copy_wait<1>();
        __syncthreads();
        if (it == 0) {
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)
                ldmatrix_x4<false>(qf[kk], &sq[warp * 16 + lane % 8 + 8 * (lane / 8 % 2)][16 * kk + 8 * (lane / 16)]);
        }
        float s[PA_BN / 8][4];
#pragma unroll
        for (int j = 0; j < PA_BN / 8; ++j) s[j][0] = s[j][1] = s[j][2] = s[j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
#pragma unroll
            for (int n = 0; n < PA_BN / 16; ++n) {
                unsigned kf[4];  // keys 16n.. x dims 16kk..: B fragments of two 8-key column tiles
                ldmatrix_x4<false>(kf, &sk[buf][16 * n + lane % 8 + 8 * (lane / 16)][16 * kk + 8 * (lane / 8 % 2)]);
                mma_16816<T>(s[2 * n], qf[kk], kf[0], kf[1]);
                mma_16816<T>(s[2 * n + 1], qf[kk], kf[2], kf[3]);
            }
        }
        // Element (row r of this thread, e): key j0 + 8j + 2tq + e%2, row slot[e/2].
        const bool whole = j0 + PA_BN <= len && j0 >= k_begin && (!causal || j0 + PA_BN - 1 <= first + q0) &&
                           (window <= 0 || j0 > first + q0 + PA_BM - 1 - window) && mask_kind == 0 && alibi_len == 0;
#pragma unroll
        for (int j = 0; j < PA_BN / 8; ++j) {
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                float x = s[j][e] * sl2;
                if (!whole) {
                    const int key = j0 + 8 * j + 2 * tq + (e & 1), p = slot[e >> 1];
                    bool keep = key < len && (!causal || key <= p) && (window <= 0 || key > p - window);
                    if (keep && mask_kind == 2)
                        keep = reinterpret_cast<const unsigned char*>(mask)[static_cast<long long>(b) * mask_len + key];
                    else if (keep && mask_kind == 1)
                        x += to_float(reinterpret_cast<const T*>(mask)[static_cast<long long>(b) * mask_len + key]) * PA_LOG2E;
                    if (keep && alibi_len > 0)
                        x += to_float(alibi[(static_cast<long long>(b) * h + head) * alibi_len + key]) * PA_LOG2E;
                    x = keep ? x : neg_inf();
                }
                s[j][e] = x;
            }
        }
        // Online softmax, rows g (e = 0, 1) and g + 8 (e = 2, 3); a row's 64 scores span the 4 lanes of a quad.
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            float mx = m[r];
#pragma unroll
            for (int j = 0; j < PA_BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][2 * r], s[j][2 * r + 1]));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
            mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
            const float base = mx == neg_inf() ? 0.f : mx;  // a row with no key yet: exp2(-inf) = 0
            const float corr = fast_exp2(m[r] - base);
            m[r] = mx;
            float sum = 0.f;
#pragma unroll
            for (int j = 0; j < PA_BN / 8; ++j) {
                s[j][2 * r] = fast_exp2(s[j][2 * r] - base);
                s[j][2 * r + 1] = fast_exp2(s[j][2 * r + 1] - base);
                sum += s[j][2 * r] + s[j][2 * r + 1];
            }
            l[r] = l[r] * corr + sum;
#pragma unroll
            for (int j = 0; j < D / 8; ++j) o[j][2 * r] *= corr, o[j][2 * r + 1] *= corr;
        }
        // O += P V: P's A fragment for keys 16u.. is S's accumulators of column tiles 2u and 2u + 1.
#pragma unroll
        for (int u = 0; u < PA_BN / 16; ++u) {
            const unsigned pa[4] = {pack2<T>(s[2 * u][0], s[2 * u][1]), pack2<T>(s[2 * u][2], s[2 * u][3]),
                                    pack2<T>(s[2 * u + 1][0], s[2 * u + 1][1]),
                                    pack2<T>(s[2 * u + 1][2], s[2 * u + 1][3])};
#pragma unroll
            for (int n = 0; n < D / 16; ++n) {
                unsigned vf[4];  // keys 16u.. x dims 16n..: B fragments of two 8-dim column tiles
                ldmatrix_x4<true>(vf, &sv[buf][16 * u + lane % 8 + 8 * (lane / 8 % 2)][16 * n + 8 * (lane / 16)]);
                mma_16816<T>(o[2 * n], pa, vf[0], vf[1]);
                mma_16816<T>(o[2 * n + 1], pa, vf[2], vf[3]);
            }
        }
        __syncthreads();  // the next iteration's copies overwrite this buffer
    }
    copy_wait<0>();

#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        const int row = q0 + warp * 16 + g + 8 * r;
        if (row >= S) continue;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        T* dst = out + ((static_cast<long long>(b) * S + row) * h + head) * D + 2 * tq;
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
            *reinterpret_cast<unsigned*>(dst + 8 * j) = pack2<T>(o[j][2 * r] * inv, o[j][2 * r + 1] * inv);
    }
}

}  // namespace ct
