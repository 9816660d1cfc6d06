// Prefill attention on Hopper's warpgroup tensor-core instructions (wgmma, sm_90a; the launcher takes it on
// compute capability 9.0, prefill_attention.cu elsewhere): the math, the arguments and the grid's meaning
// are prefill_attention.cu's, except that K and V come as tensor maps. A block of one or two warpgroups takes
// 64 or 128 query rows of one (sequence, head), 64 per warpgroup, 16 per warp, and streams the keys and values
// through shared memory in tiles of BN keys, two buffers, each tile fetched by one thread's bulk tensor
// copies (TMA: measured 1.2-1.4x faster than every thread's cp.async, which kept the load units busy).
// S = Q K^T reads Q and K from shared memory; O += P V takes P from S's accumulators in registers and V from
// shared memory, so that a warpgroup's four warps share each K and V read. Every tile sits in the 128-byte
// swizzle (wgmma.cuh), which the copies write. Head sizes 80 and 96 are padded to DP = 128 dimensions: the
// copies fill dimensions past D with zeros, S's products stop at D, O's run over DP (zeros past D).
#include "attention_tile.cuh"
#include "tma.cuh"
#include "wgmma.cuh"

namespace ct {

// kmap, vmap: rank-4 tensor maps of k and v [B, kv, T, D] (sizes D, T, kv, B innermost first), box 64 x BN,
// 128-byte swizzle (runtime/tensor_map.py), which hold their strides.
// WG: warpgroups a block, each taking 64 query rows (BM = 64 WG). Dynamic shared memory: 1 KB of alignment
// slack, Q [BM][DP], then K and V [2][BN][DP], so (BM + 4 BN) DP elements + 1 KB. A tile of R rows is stored
// as DP / 64 column blocks of R rows of 128 bytes. 128 registers: two blocks of two warpgroups an SM (one
// block's softmax overlaps the other's products), or up to four of one (short sequences, where a block's
// first loads are a larger share). Without the bound, the grid order's index math took head sizes 64 and 80
// past 128 registers, to one block an SM: 1.4-1.5x slower.
// Block i takes work item i (attention_tile.cuh's prefill_item: items = row blocks x h x B). PERSIST (short
// prompts: many small items, where each block's first loads cost most): the grid is at most one wave of
// blocks, and a block then takes the next item unclaimed (counter[0], zero at launch; counter[1] counts the
// blocks done, and the last one leaves both at zero). It claims it as its item's last tile starts (earlier
// claims took items a block could start only later: 0.92x at long causal prompts), loads its first K/V tile
// then, and its Q rows and second tile while it stores the context, so that only its first item waits for
// its loads. Not PERSIST: a block an item (the loop below runs once).
template <typename T, int D, int BN, int WG, bool PERSIST>
__global__ void __launch_bounds__(128 * WG, 4 / WG)
attention_prefill_sm90(const T* __restrict__ q, const void* __restrict__ kmap, const void* __restrict__ vmap,
                       T* __restrict__ out, const void* __restrict__ mask, const T* __restrict__ alibi,
                       const int* __restrict__ start, long long q_seq, long long q_head, long long q_tok, int S,
                       int h, int group, int causal, int window, int mask_kind, int mask_len, int alibi_len,
                       float scale, int span, int items, int* counter) {
    constexpr int DP = (D + 63) / 64 * 64, VECS = D / 8, BM = 64 * WG, THREADS = 128 * WG;  // DP: O's N
    static_assert(D % 16 == 0 && D >= 64 && DP <= 128 && (BN == 64 || BN == 128), "geometry (wgmma.cuh's N)");
    extern __shared__ __align__(1024) unsigned char ph_raw[];
    __shared__ unsigned long long landed[2];  // per buffer: its tile's copies
    __shared__ int claimed;                   // the item after this one (items: none), thread 0's claim,
    __shared__ PrefillItem claimed_item;      // and what it is
    unsigned char* smem = ph_raw + (1024 - shared_address(ph_raw) % 1024) % 1024;
    T* sq = reinterpret_cast<T*>(smem);
    T* sk = sq + BM * DP;      // [2][BN DP]
    T* sv = sk + 2 * BN * DP;  // [2][BN DP]
    // Element offset of 16-byte chunk c of row r in a tile of R rows.
    auto at = [](int r, int c, int R) { return (c / 8) * R * 64 + r * 64 + ((c % 8) ^ (r % 8)) * 8; };

    auto item_block = [&](const PrefillItem& it) {
        return PrefillBlock<T>(it, BM, q, mask, alibi, start, q_seq, q_head, S, h, causal, window, mask_kind,
                               mask_len, alibi_len);
    };
    auto load_tile = [&](int tile, int buf, int kvh, int b) {  // thread 0
        mbar_expect_bytes(&landed[buf], 2 * BN * DP * sizeof(T));  // whole boxes, zero-filled parts included
#pragma unroll
        for (int cb = 0; cb < DP / 64; ++cb) {
            tma_load_4d(sk + buf * BN * DP + cb * BN * 64, kmap, cb * 64, tile * BN, kvh, b, &landed[buf]);
            tma_load_4d(sv + buf * BN * DP + cb * BN * 64, vmap, cb * 64, tile * BN, kvh, b, &landed[buf]);
        }
    };
    auto load_second = [&](const PrefillBlock<T>& blk, int buf) {  // thread 0: an item's second tile, if any
        if ((blk.k_end - 1) / BN > blk.k_begin / BN) load_tile(blk.k_begin / BN + 1, buf, blk.kvh, blk.b);
    };
    auto load_q = [&](const PrefillBlock<T>& blk) {  // every thread; copy_wait for them
        for (int i = threadIdx.x; i < BM * VECS; i += THREADS) {
            const int r = i / VECS, c = i % VECS;
            const bool valid = blk.q0 + r < S;
            copy16(sq + at(r, c, BM), valid ? blk.q + (blk.q0 + r) * q_tok + 8 * c : blk.q, valid);
        }
        copy_commit();
    };

    PrefillBlock<T> blk = item_block(prefill_item(blockIdx.x, items, BM, S, span, h, group));
    if (threadIdx.x == 0) {  // the first two tiles in flight before Q's copies (1.02-1.04x at S 512)
        mbar_init(&landed[0], 1), mbar_init(&landed[1], 1);
        mbar_init_fence();
        tensor_map_acquire(kmap), tensor_map_acquire(vmap);
        load_tile(blk.k_begin / BN, 0, blk.kvh, blk.b);
        load_second(blk, 1);
    }
    load_q(blk);

    const int warp = threadIdx.x / 32, w0 = warp * 16, group_row = warp / 4 * 64;
    const float sl2 = scale * LOG2E;  // exp(x) = exp2(x log2 e)
    // Descriptors advance by an operand's byte offset / 16 (wg_desc's address field, which no offset within
    // shared memory carries out of): the bases once, then additions, not a descriptor built per product.
    const unsigned long long q_desc = wg_desc(sq + group_row * 64, 0), k_desc = wg_desc(sk, 0);
    const unsigned long long v_desc = wg_desc(sv, BN * 128);
    auto step = [](int elements) { return static_cast<unsigned long long>(elements * sizeof(T) / 16); };
    // Tile x of the block's stream (over its items) sits in buffer x % 2, whose barrier is then in phase x / 2;
    // an item's tiles are x = first .. end - 1.
    for (int first = 0;;) {
        copy_wait<0>();
        fence_async_shared();
        __syncthreads();  // Q has landed; (the first item) the barriers are ready
        const int head = blk.head, b = blk.b, q0 = blk.q0, k_begin = blk.k_begin, k_end = blk.k_end;
        const PrefillRules<T>& rules = blk.rules;
        const int end = first + (k_end - 1) / BN - k_begin / BN + 1, to_tile = k_begin / BN - first;
        float o[DP / 8][4], m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};
#pragma unroll
        for (int j = 0; j < DP / 8; ++j) o[j][0] = o[j][1] = o[j][2] = o[j][3] = 0.f;

        for (int x = first; x < end; ++x) {
            const int tile = x + to_tile, buf = x & 1, j0 = tile * BN;
            if (threadIdx.x == 0) {  // into the buffer the last barrier freed
                if (x > first && x + 1 < end) load_tile(tile + 1, buf ^ 1, blk.kvh, b);
                if (PERSIST && x + 1 == end) {  // the next item's first tile (start[] read only with a window)
                    const int next = gridDim.x + atomicAdd(counter, 1);
                    claimed = next;
                    if (next < items) {  // decoded once for the block
                        const PrefillItem it = prefill_item(next, items, BM, S, span, h, group);
                        claimed_item = it;
                        const int first_key = prefill_first_key(window > 0 ? start[it.b] : 0, it.q0, window);
                        load_tile(first_key / BN, buf ^ 1, it.kvh, it.b);
                    }
                }
            }
            mbar_wait(&landed[buf], (x >> 1) & 1);
            T* vt = sv + buf * BN * DP;
            if (j0 < k_begin || j0 + BN > k_end) {  // V rows outside [k_begin, k_end) to zeros: a cache slot may hold
                for (int i = threadIdx.x; i < BN * VECS; i += THREADS) {  // NaN, and 0 * NaN is NaN (K's are masked)
                    const int r = i / VECS, key = j0 + r;
                    if (key < k_begin || key >= k_end) *reinterpret_cast<uint4*>(vt + at(r, i % VECS, BN)) = uint4{};
                }
                fence_async_shared();
                __syncthreads();
            }
            float s[BN / 8][4];
            wg_fence();
#pragma unroll
            for (int kk = 0; kk < D / 16; ++kk)  // dims 16 kk..: column block kk / 4, 32 bytes a step within it
                Wgmma<T, BN>::ss(s, q_desc + step((kk / 4) * BM * 64 + (kk % 4) * 16),
                                 k_desc + step(buf * BN * DP + (kk / 4) * BN * 64 + (kk % 4) * 16), kk);
            wg_commit();
            wg_wait(s);
            const bool whole = rules.whole(j0, BN, q0, BM, k_begin, sl2);
            if (!whole) {
                constexpr bool BITS = BN <= 64;  // attention_tile.cuh's apply
                unsigned bits[BN / 32];
                if (BITS) rules.template mask_bits<BN>(bits, j0);
                rules.template apply<BN, BITS>(s, j0, q0 + w0, sl2, bits);
            }
            online_softmax<BN, DP, true>(s, o, m, l, whole ? sl2 : 1.f);  // lazy: 1.01-1.09x
            unsigned pa[BN / 16][4];  // all written before the fence: the products read them
#pragma unroll
            for (int u = 0; u < BN / 16; ++u) p_fragment<T, BN>(pa[u], s, u);
            wg_fence();
#pragma unroll
            for (int u = 0; u < BN / 16; ++u)  // keys 16u..: two 8-row groups (2048 bytes) a step
                Wgmma<T, DP>::rs(o, pa[u], v_desc + step(buf * BN * DP + u * 1024), 1);
            wg_commit();
            wg_wait(o);
            __syncthreads();  // the next copies overwrite this buffer (and Q, after the last tile)
        }
        if (!PERSIST) {
            store_context<T, D, DP>(out, o, l, b, head, q0 + w0, S, h);
            return;
        }
        first = end;
        const int item = claimed;
        if (item < items) {  // its Q rows and second tile (the buffer of this item's last) while this one stores
            blk = item_block(claimed_item);
            load_q(blk);
        }
        store_context<T, D, DP>(out, o, l, b, head, q0 + w0, S, h);
        if (item >= items) break;
        if (threadIdx.x == 0) load_second(blk, (first + 1) & 1);
    }
    if (threadIdx.x == 0) {  // the last block done resets the counter for the next launch on the stream
        __threadfence();
        if (atomicAdd(counter + 1, 1) == gridDim.x - 1) counter[0] = 0, counter[1] = 0;
    }
}

}  // namespace ct
