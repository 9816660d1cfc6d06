// The per-tile steps both prefill kernels share (prefill_attention.cu on mma.sync, prefill_attention_sm90.cu
// on wgmma): a 16-row tile's scores against BN keys sit in s[BN / 8][4], m16n8 accumulator layout: s[j][e]
// holds key j0 + 8j + 2 (lane % 4) + e % 2 against the tile's row lane / 4 + 8 (e / 2); its output rows
// in o[D / 8][4], the same layout over the dimensions.
#pragma once
#include "mask.cuh"
#include "mma.cuh"

namespace ct {

// The rules of one sequence for the prefill kernels: query row i sits in slot first + i and sees key j when
// j < len, j <= slot if causal, j > slot - window if window > 0, and mask[j] allows it (boolean: dropped where
// false; additive: added); alibi[j] is added too.
template <typename T>
struct PrefillRules {
    int first, len, causal, window, mask_kind, alibi_len;
    const void* mask;  // this sequence's row of mask [B, mask_len >= len]: T (additive) or bool as bytes
    const T* alibi;    // this (sequence, head)'s row of alibi [B, h, alibi_len]

    // Every key of [j0, j0 + bn) visible to every row of [row0, row0 + rows) and nothing to add: the scale can
    // ride in the exp (it must be positive to take the row maximum before scaling).
    __device__ __forceinline__ bool whole(int j0, int bn, int row0, int rows, int k_begin, float sl2) const {
        return j0 + bn <= len && j0 >= k_begin && (!causal || j0 + bn - 1 <= first + row0) &&
               (window <= 0 || j0 > first + row0 + rows - 1 - window) && mask_kind == NO_MASK && alibi_len == 0 &&
               sl2 > 0.f;
    }

    // Whether the rules alone (the length, causal, the window) let the query in slot p see key j.
    __device__ __forceinline__ bool sees(int j, int p) const {
        return j < len && (!causal || j <= p) && (window <= 0 || j > p - window);
    }

    // The boolean mask's bits of the keys j0..: bit i of word c keeps key j0 + 32c + i (all ones without
    // one); each warp reads the tile's keys once (lane i: keys j0 + 32c + i).
    template <int BN>
    __device__ __forceinline__ void mask_bits(unsigned (&bits)[BN / 32], int j0) const {
        const int lane = threadIdx.x % 32;
#pragma unroll
        for (int c = 0; c < BN / 32; ++c) {
            const int at = min(j0 + 32 * c + lane, len - 1);  // keys past the sequence's are dropped by apply
            bits[c] = mask_kind == BOOL_MASK
                          ? __ballot_sync(0xffffffffu, static_cast<const unsigned char*>(mask)[at])
                          : ~0u;
        }
    }

    // Scores to log2 units with the rules, the mask and alibi per element; row: the tile's first row. A load
    // under each element's rule makes a divergent branch an element (a quarter of the time at S 512 causal,
    // half to two thirds at BERT's padding masks): with neither, nothing is read, and with BITS a boolean
    // mask comes as mask_bits' bits. (BITS false: the sm90 kernel at BN 128, where the bits spilled registers
    // in its loop. The rules-only loop is the bits loop with all bits set, kept apart: merging the two, or
    // setting the bits at run time, changed the kernels' code and register allocation, unmeasured or worse.)
    template <int BN, bool BITS>
    __device__ __forceinline__ void apply(float (&s)[BN / 8][4], int j0, int row, float sl2,
                                          const unsigned (&bits)[BN / 32]) const {
        const int lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
        if (mask_kind == NO_MASK && alibi_len == 0) {
#pragma unroll
            for (int j = 0; j < BN / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int key = j0 + 8 * j + 2 * tq + (e & 1), p = first + row + g + 8 * (e >> 1);
                    s[j][e] = sees(key, p) ? s[j][e] * sl2 : neg_inf();
                }
            return;
        }
        if (BITS && mask_kind == BOOL_MASK && alibi_len == 0) {
#pragma unroll
            for (int j = 0; j < BN / 8; ++j)
#pragma unroll
                for (int e = 0; e < 4; ++e) {
                    const int bit = 8 * (j % 4) + 2 * tq + (e & 1), key = j0 + 32 * (j / 4) + bit;
                    const int p = first + row + g + 8 * (e >> 1);
                    s[j][e] = sees(key, p) && (bits[j / 4] >> bit & 1) ? s[j][e] * sl2 : neg_inf();
                }
            return;
        }
#pragma unroll
        for (int j = 0; j < BN / 8; ++j)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = j0 + 8 * j + 2 * tq + (e & 1), p = first + row + g + 8 * (e >> 1);
                bool keep = sees(key, p);
                float x = s[j][e] * sl2;
                if (keep && mask_kind == BOOL_MASK)
                    keep = static_cast<const unsigned char*>(mask)[key];
                else if (keep && mask_kind == ADDITIVE_MASK)
                    x += to_float(static_cast<const T*>(mask)[key]) * LOG2E;
                if (keep && alibi_len > 0) x += to_float(alibi[key]) * LOG2E;
                s[j][e] = keep ? x : neg_inf();
            }
    }
};

// A prefill work item: query rows q0..q0 + BM of one (sequence b, head) pair, whose key/value head is kvh.
struct PrefillItem {
    int head, b, q0, kvh;
};

// Work item `item` of `items` = (row blocks of BM) x h x B. The items walk the (sequence, head) pairs (b h +
// head) in groups of `span`, one group after the other, and a group's row blocks from the last (the longest
// causal rows) to the first, its pairs varying fastest: the items in flight at once share the keys and values
// of a few heads in L2, and the long causal rows start early. (With all pairs in one group, B4 H32 S4096 D128
// read K and V from DRAM again for every row block: 27% L2 hits, H200; with one pair a group, the long causal
// rows came last.)
__device__ __forceinline__ PrefillItem prefill_item(int item, int items, int BM, int S, int span, int h, int group) {
    const int rows = (S + BM - 1) / BM, pairs = items / rows;
    const int g0 = item / (rows * span) * span, n = min(span, pairs - g0), i = item - g0 * rows;
    const int pair = g0 + i % n, head = pair % h;
    return {head, pair / h, (rows - 1 - i / n) * BM, head / group};
}

// The first key that query rows q0.. of a sequence whose rows sit from slot `first` on may see (a window's).
__device__ __forceinline__ int prefill_first_key(int first, int q0, int window) {
    return window > 0 ? max(0, first + q0 - window + 1) : 0;
}

// One prefill work item's state: its item, the keys [k_begin, k_end) any of its rows may see (at least one:
// row q0 sees its own slot), its rows of q, and its rules.
template <typename T>
struct PrefillBlock {
    int head, b, q0, k_begin, k_end, kvh;
    const T* q;
    PrefillRules<T> rules;

    __device__ __forceinline__ PrefillBlock(const PrefillItem& it, int BM, const T* q_all, const void* mask,
                                            const T* alibi, const int* start, long long q_seq, long long q_head,
                                            int S, int h, int causal, int window, int mask_kind, int mask_len,
                                            int alibi_len)
        : head(it.head), b(it.b), q0(it.q0), kvh(it.kvh) {
        const int first = start[b], len = first + S;  // keys per sequence: its past and these S
        k_end = causal ? min(len, first + min(q0 + BM, S)) : len;
        k_begin = prefill_first_key(first, q0, window);
        q = q_all + b * q_seq + head * q_head;
        const long long row = static_cast<long long>(b) * mask_len * (mask_kind == ADDITIVE_MASK ? sizeof(T) : 1);
        rules = {first, len, causal, window, mask_kind, alibi_len, static_cast<const char*>(mask) + row,
                 alibi + (static_cast<long long>(b) * h + head) * alibi_len};
    }
};

// Online softmax of one tile: per row (a row's BN scores span the 4 lanes of a quad) the tile's maximum, the
// running maximum m and sum l (this lane's part), and s becomes exp2(s mul - m). mul: 1 for scores already
// in log2 units, else the scale to them. LAZY (FlashAttention-4's rule): m moves only when the tile's maximum
// passes it by more than 8 (log2 units), and o and l are rescaled only then; a stale m leaves the result
// exact (o and l share it), with exp2 values up to 256, which fp32 sums and 16-bit P hold as well as smaller
// ones. Otherwise m is the exact maximum and o and l are rescaled every tile (branch-free).
template <int BN, int D, bool LAZY>
__device__ __forceinline__ void online_softmax(float (&s)[BN / 8][4], float (&o)[D / 8][4], float (&m)[2],
                                               float (&l)[2], float mul) {
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int e0 = 2 * r;
        float mx = neg_inf();
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) mx = fmaxf(mx, fmaxf(s[j][e0], s[j][e0 + 1]));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 1));
        mx = fmaxf(mx, __shfl_xor_sync(0xffffffffu, mx, 2));
        mx = fmaxf(m[r], mx * mul);
        if (!LAZY || mx > m[r] + 8.f) {  // lazy: the first tile with a key too (m = -inf)
            const float corr = fast_exp2(m[r] - (mx == neg_inf() ? 0.f : mx));  // no key yet: exp2(-inf) = 0
            m[r] = mx;
            l[r] *= corr;
#pragma unroll
            for (int j = 0; j < D / 8; ++j) o[j][e0] *= corr, o[j][e0 + 1] *= corr;
        }
        const float base = m[r] == neg_inf() ? 0.f : m[r];
        float sum = 0.f;
#pragma unroll
        for (int j = 0; j < BN / 8; ++j) {
            s[j][e0] = fast_exp2(fmaf(s[j][e0], mul, -base));
            s[j][e0 + 1] = fast_exp2(fmaf(s[j][e0 + 1], mul, -base));
            sum += s[j][e0] + s[j][e0 + 1];
        }
        l[r] += sum;
    }
}

// P's A fragment (m16n8k16) for keys 16u.. of the tile: S's accumulators of column tiles 2u and 2u + 1.
template <typename T, int BN>
__device__ __forceinline__ void p_fragment(unsigned (&pa)[4], const float (&s)[BN / 8][4], int u) {
    pa[0] = pack2<T>(s[2 * u][0], s[2 * u][1]);
    pa[1] = pack2<T>(s[2 * u][2], s[2 * u][3]);
    pa[2] = pack2<T>(s[2 * u + 1][0], s[2 * u + 1][1]);
    pa[3] = pack2<T>(s[2 * u + 1][2], s[2 * u + 1][3]);
}

// Rows row.. of a tile to out [B, S, h, D] (b, head given): o / l (0 for a row that saw no key). o may hold
// DO >= D dimensions (a kernel's padding); the first D are stored.
template <typename T, int D, int DO = D>
__device__ __forceinline__ void store_context(T* out, const float (&o)[DO / 8][4], float (&l)[2], int b, int head,
                                              int row, int S, int h) {
    const int lane = threadIdx.x % 32, g = lane / 4, tq = lane % 4;
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int e0 = 2 * r, at = row + g + 8 * r;
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
        if (at >= S) continue;
        const float inv = l[r] > 0.f ? 1.f / l[r] : 0.f;
        T* dst = out + ((static_cast<long long>(b) * S + at) * h + head) * D + 2 * tq;
#pragma unroll
        for (int j = 0; j < D / 8; ++j)
            *reinterpret_cast<unsigned*>(dst + 8 * j) = pack2<T>(o[j][e0] * inv, o[j][e0 + 1] * inv);
    }
}

}  // namespace ct
