// Prefill attention (FlashAttention-2 style, fp16/bf16 on tensor cores, sm_80+): a block takes 64 MT query
// rows of one (sequence, head), 16 MT per warp, and streams that sequence's keys and values through shared
// memory in tiles of BN keys (cp.async, two buffers: the next tile loads while this one is used). Per tile,
// S = Q K^T by mma.sync (Q's fragments stay in registers), the mask, an online softmax per row in fp32,
// and O += P V by mma.sync, with P taken from S's accumulators without a trip through memory. No S x S
// matrix exists anywhere; K and V are read once per block.
//
// Query row i of sequence b sits in cache slot start[b] + i; it sees key j when j < start[b] + S, and
// j <= start[b] + i if causal, and j > start[b] + i - window if window > 0, and mask[b, j] allows it
// (boolean: dropped where false; additive: added). s = q . k_j * scale (+ mask) (+ alibi[b, head, j]);
// out = sum_j softmax(s)_j v_j, or 0 for a row that sees no key.
#include "attention_tile.cuh"
#include "mma.cuh"

namespace ct {

constexpr int PA_WARPS = 4;
constexpr int PA_THREADS = 32 * PA_WARPS;

// Geometry: MT 16-row tiles per warp (each K/V fragment then feeds MT mmas), so 64 MT query rows per block,
// and BN keys per tile; the launcher picks them per head size (benchmarks/sweep_prefill.py). The
// accumulators, MT (BN + D) / 2 floats a thread, must fit in 255 registers with the rest.
// Dynamic shared memory of one block: Q [64 MT][D + 8], then K and V [2][BN][D + 8], so
// (64 MT + 4 BN)(D + 8) elements. The 16-byte pad per row puts the 8 rows an ldmatrix reads in 8
// different bank groups. Q's fragments are read from shared memory per tile (as FlashAttention-2 does), so
// that registers hold the accumulators of MT row tiles.

// q, k, v: element strides per sequence, head and token (the last dimension contiguous, 16-byte aligned
// rows), each its own (rotary turns K into an array of its own while V stays a view of the projection).
// out [B, S, h, D]. group: query heads per key/value head. mask [B, mask_len] (T additive, or bool as bytes)
// read when mask_kind says so; alibi [B, h, alibi_len] when alibi_len > 0.
// Grid: ceil(S / (64 MT)) h B blocks, in the order of attention_tile.cuh's prefill_item (span: its group size).
template <typename T, int D, int MT, int BN>
__global__ void __launch_bounds__(PA_THREADS)
attention_prefill(const T* __restrict__ q, const T* __restrict__ k, const T* __restrict__ v, T* __restrict__ out,
                  const void* __restrict__ mask, const T* __restrict__ alibi, const int* __restrict__ start,
                  long long q_seq, long long q_head, long long q_tok,
                  long long k_seq, long long k_head, long long k_tok, long long v_seq, long long v_head,
                  long long v_tok, int S, int h, int group, int causal, int window, int mask_kind, int mask_len,
                  int alibi_len, float scale, int span) {
    static_assert(D % 16 == 0 && D <= 128 && BN % 16 == 0, "geometry");
    constexpr int ROW = D + 8, VECS = D / 8, BM = 16 * MT * PA_WARPS;
    extern __shared__ __align__(16) unsigned char pa_smem[];
    T(*sq)[ROW] = reinterpret_cast<T(*)[ROW]>(pa_smem);
    T(*sk)[BN][ROW] = reinterpret_cast<T(*)[BN][ROW]>(pa_smem + BM * ROW * sizeof(T));
    T(*sv)[BN][ROW] = reinterpret_cast<T(*)[BN][ROW]>(pa_smem + (BM + 2 * BN) * ROW * sizeof(T));

    const PrefillBlock<T> blk(prefill_item(blockIdx.x, gridDim.x, BM, S, span, h, group), BM, q, mask, alibi,
                              start, q_seq, q_head, S, h, causal, window, mask_kind, mask_len, alibi_len);
    const int head = blk.head, b = blk.b, q0 = blk.q0, k_begin = blk.k_begin, k_end = blk.k_end;
    const PrefillRules<T>& rules = blk.rules;
    const T *qp = blk.q, *kp = k + b * k_seq + blk.kvh * k_head, *vp = v + b * v_seq + blk.kvh * v_head;

    for (int c = threadIdx.x; c < BM * VECS; c += PA_THREADS) {
        const int r = c / VECS, col = c % VECS * 8;
        const bool valid = q0 + r < S;
        copy16(&sq[r][col], valid ? qp + (q0 + r) * q_tok + col : qp, valid);
    }
    // Keys outside [k_begin, k_end) load as zeros: a cache slot past a sequence's length may hold anything
    // (NaN too), and P (0 there) times V must stay 0.
    auto load_tile = [&](int tile, int buf) {
        for (int c = threadIdx.x; c < BN * VECS; c += PA_THREADS) {
            const int r = c / VECS, col = c % VECS * 8, key = tile * BN + r;
            const bool valid = key >= k_begin && key < k_end;
            copy16(&sk[buf][r][col], valid ? kp + key * k_tok + col : kp, valid);
            copy16(&sv[buf][r][col], valid ? vp + key * v_tok + col : vp, valid);
        }
    };
    const int t_first = k_begin / BN, tiles = k_end > k_begin ? (k_end - 1) / BN - t_first + 1 : 0;
    if (tiles > 0) load_tile(t_first, 0);
    copy_commit();

    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int w0 = warp * 16 * MT;   // the warp's first row in the block
    const float sl2 = scale * LOG2E;  // exp(x) = exp2(x log2 e)
    // Rows g and g + 8 of the warp's row tile t: m[t], l[t].
    float o[MT][D / 8][4], m[MT][2], l[MT][2];
#pragma unroll
    for (int t = 0; t < MT; ++t) {
        m[t][0] = m[t][1] = neg_inf();
        l[t][0] = l[t][1] = 0.f;
#pragma unroll
        for (int j = 0; j < D / 8; ++j) o[t][j][0] = o[t][j][1] = o[t][j][2] = o[t][j][3] = 0.f;
    }

    for (int it = 0; it < tiles; ++it) {
        const int tile = t_first + it, buf = it & 1, j0 = tile * BN;
        if (it + 1 < tiles) load_tile(tile + 1, buf ^ 1);
        copy_commit();
        copy_wait<1>();
        __syncthreads();
        float s[MT][BN / 8][4];
#pragma unroll
        for (int t = 0; t < MT; ++t)
#pragma unroll
            for (int j = 0; j < BN / 8; ++j) s[t][j][0] = s[t][j][1] = s[t][j][2] = s[t][j][3] = 0.f;
#pragma unroll
        for (int kk = 0; kk < D / 16; ++kk) {
            unsigned qf[MT][4];
#pragma unroll
            for (int t = 0; t < MT; ++t)
                ldmatrix_x4<false>(qf[t], &sq[w0 + 16 * t + lane % 8 + 8 * (lane / 8 % 2)][16 * kk + 8 * (lane / 16)]);
#pragma unroll
            for (int n = 0; n < BN / 16; ++n) {
                unsigned kf[4];  // keys 16n.. x dims 16kk..: B fragments of two 8-key column tiles
                ldmatrix_x4<false>(kf, &sk[buf][16 * n + lane % 8 + 8 * (lane / 16)][16 * kk + 8 * (lane / 8 % 2)]);
#pragma unroll
                for (int t = 0; t < MT; ++t) {
                    mma_16816<T>(s[t][2 * n], qf[t], kf[0], kf[1]);
                    mma_16816<T>(s[t][2 * n + 1], qf[t], kf[2], kf[3]);
                }
            }
        }
        // Scale, rules, mask and alibi per element only where the tile needs them.
        const bool whole = rules.whole(j0, BN, q0, BM, k_begin, sl2);
        if (!whole) {
            unsigned bits[BN / 32];
            rules.template mask_bits<BN>(bits, j0);
#pragma unroll
            for (int t = 0; t < MT; ++t) rules.template apply<BN, true>(s[t], j0, q0 + w0 + 16 * t, sl2, bits);
        }
#pragma unroll
        // Exact maxima: the lazy rule (attention_tile.cuh) made this kernel 3-10% slower at head sizes 64 and 80.
        for (int t = 0; t < MT; ++t) online_softmax<BN, D, false>(s[t], o[t], m[t], l[t], whole ? sl2 : 1.f);
        // O += P V: P's A fragment for keys 16u.. is S's accumulators of column tiles 2u and 2u + 1.
#pragma unroll
        for (int u = 0; u < BN / 16; ++u) {
            unsigned pa[MT][4];
#pragma unroll
            for (int t = 0; t < MT; ++t) p_fragment<T, BN>(pa[t], s[t], u);
#pragma unroll
            for (int n = 0; n < D / 16; ++n) {
                unsigned vf[4];  // keys 16u.. x dims 16n..: B fragments of two 8-dim column tiles
                ldmatrix_x4<true>(vf, &sv[buf][16 * u + lane % 8 + 8 * (lane / 8 % 2)][16 * n + 8 * (lane / 16)]);
#pragma unroll
                for (int t = 0; t < MT; ++t) {
                    mma_16816<T>(o[t][2 * n], pa[t], vf[0], vf[1]);
                    mma_16816<T>(o[t][2 * n + 1], pa[t], vf[2], vf[3]);
                }
            }
        }
        __syncthreads();  // the next iteration's copies overwrite this buffer
    }
    copy_wait<0>();

#pragma unroll
    for (int t = 0; t < MT; ++t) store_context<T, D>(out, o[t], l[t], b, head, q0 + w0 + 16 * t, S, h);
}

}  // namespace ct
