// Decode attention (one query token per sequence) over a KV cache, split along the keys (flash-decoding):
// attention_partial gives every block one chunk of one sequence's keys for one key/value head and the
// G query heads that share it (grouped-query attention: K and V are read once for the G heads); each warp
// runs an online softmax over its keys, the warps' (max, sum, weighted V) merge in shared memory, and the
// block writes its chunk's partial; the block of the (sequence, kv head) that finishes last merges the
// chunks in order (deterministic) into the context rows (merge_chunks: one launch, no second kernel); a
// sequence whose keys fit one chunk has each block write its context straight (store_heads).
//
// Per key j in [lo, hi) of sequence b (the slots up to its query's, start[b]; a window keeps the last ones):
// s = q . k_j * scale (+ mask[b, j] additive, or dropped where the boolean mask is false) (+ alibi[b, head, j]);
// context = sum_j softmax(s)_j v_j (fp32 throughout, one rounding).
//
// The query comes from the fused QKV projection (or a q array: then turned, its key and value already in the
// cache): with `append`, the kernel turns the token's query and key (rotary.cuh, what rotary_append does, to the
// bit) and writes its key and value into cache slot start[b], in place of a rotary_append launch a layer.
#include "common.cuh"
#include "mask.cuh"
#include "mma.cuh"
#include "rotary.cuh"

namespace ct {

constexpr int DA_THREADS = 128;
constexpr int DA_WARPS = DA_THREADS / 32;
constexpr int DA_MAX_D = 256;

// Eight consecutive elements as floats (one 16-byte load for 16-bit types, two for fp32).
template <typename T>
__device__ __forceinline__ void load8(const T* p, float (&f)[8]) {
    const Vec<T, 8> v = *reinterpret_cast<const Vec<T, 8>*>(p);
#pragma unroll
    for (int e = 0; e < 8; ++e) f[e] = to_float(v.v[e]);
}

// Online-softmax state of one head over some keys: running max m, sum l of exp(s - m), and this lane's 8
// dims of sum exp(s - m) v. merge() folds in another state (a no-op for an empty one).
struct Running {
    float m, l, acc[8];
    __device__ Running() : m(neg_inf()), l(0.f) {
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = 0.f;
    }
    __device__ void add(float s, const float (&v)[8]) {
        if (s == neg_inf()) return;
        const float m_new = fmaxf(m, s), old = __expf(m - m_new), w = __expf(s - m_new);
        l = l * old + w;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = acc[e] * old + w * v[e];
        m = m_new;
    }
    __device__ void merge(float m2, float l2, const float (&acc2)[8]) {
        if (m2 == neg_inf()) return;
        const float m_new = fmaxf(m, m2), a = __expf(m - m_new), b = __expf(m2 - m_new);
        l = l * a + l2 * b;
#pragma unroll
        for (int e = 0; e < 8; ++e) acc[e] = acc[e] * a + acc2[e] * b;
        m = m_new;
    }
};

// A launch of one chunk a (sequence, kv head) pair (a batch that fills the GPU): the block's own context
// rows straight to out (n heads from `out` on, d each), without partial rows or a ticket: about 2.7 µs less
// a wave. Per head the DA_WARPS warps' states (max m, sum l, weighted V sums acc), with weights
// exp_of(m_w - max) in m's units; 0 for a head that saw no key. THREADS: the block's.
template <int THREADS, typename T, int H, int DM, typename Exp>
__device__ void store_heads(T* __restrict__ out, const float (&acc)[DA_WARPS][H][DM], const float (&m)[DA_WARPS][H],
                            const float (&l)[DA_WARPS][H], int n, int d, Exp exp_of) {
    for (int i = threadIdx.x; i < n * d; i += THREADS) {
        const int g = i / d, e = i % d;
        float mx = neg_inf();
#pragma unroll
        for (int w = 0; w < DA_WARPS; ++w) mx = fmaxf(mx, m[w][g]);
        float sum_v = 0.f, sum_l = 0.f;
#pragma unroll
        for (int w = 0; w < DA_WARPS; ++w) {
            if (m[w][g] == neg_inf()) continue;
            const float f = exp_of(m[w][g] - mx);
            sum_v += acc[w][g][e] * f, sum_l += l[w][g] * f;
        }
        out[g * d + e] = from_float<T>(sum_l > 0.f ? sum_v / sum_l : 0.f);
    }
}

// (m, l) merged with another (max, sum of exp(x - max)) pair, natural-log units; (-inf, 0): none.
__device__ __forceinline__ void merge_max_sum(float& m, float& l, float m2, float l2) {
    const float m_new = fmaxf(m, m2);
    if (m_new == neg_inf()) return;
    l = (m == neg_inf() ? 0.f : l * __expf(m - m_new)) + (m2 == neg_inf() ? 0.f : l2 * __expf(m2 - m_new));
    m = m_new;
}

// The keys of one block: sequence b's query sits in slot start[b] and sees slots [lo, hi), hi = start[b] + 1
// and, with a window, lo = hi - window. The grid's `chunks` chunks a pair are sized per sequence from its own hi
// (multiples of 64 keys, a 4-warp step; ragged chunks were 6% slower), so a launch sized for the cache's capacity
// (a CUDA graph replayed every step) gives a short sequence few chunks: blocks past `used` return at once and the
// merge waits for `used` blocks. Reading start on the device, not the host, is what lets one capture serve every
// step. A sequence of at most `one_block` keys takes one block, which writes its context straight (the partial
// rows, the ticket and the merge cost more than streaming a few hundred keys in one block).
struct KeyChunk {
    int first, last, used;
    __device__ KeyChunk(int start, int window, int one_block, int c, int chunks) {
        const int hi = start + 1, lo = window > 0 ? max(hi - window, 0) : 0;
        const int chunk = 64 * (hi <= one_block ? (hi + 63) / 64 : max(1, (hi + 64 * chunks - 1) / (64 * chunks)));
        used = (hi + chunk - 1) / chunk;
        first = max(lo, c * chunk), last = min(hi, (c + 1) * chunk);
    }
};

// A slot outside the cache (a start on the device, which the host cannot check without a read; the caller's
// reserve() checks its own): no key is read or written and no ticket taken (a slot of -1 gives a chunk size of 0,
// and a chunk count divided by it could leave the counter short, merging a later launch's chunks early); block 0
// of the pair writes its n context values (its heads') as NaN, which a finiteness check sees. THREADS: the block's.
template <int THREADS, typename T>
__device__ void refuse_slot(T* out, int n, int c) {
    if (c != 0) return;
    for (int i = threadIdx.x; i < n; i += THREADS) out[i] = from_float<T>(quiet_nan());
}

// The (cos, sin) of this thread's rotary pair in stage_token (pair threadIdx.x % (d / 2), turned where it is below
// rot / 2) at `position`; (1, 0) for a pair not turned. It reads inv_freq (a weight) and the position only, so a
// kernel may take it before it waits for the kernel before.
__device__ __forceinline__ float2 token_angle(int d, int rot, const float* __restrict__ inv_freq, int position) {
    const int p = threadIdx.x % (d / 2);
    return p < rot / 2 ? rotary_cos_sin(position, inv_freq[p]) : make_float2(1.f, 0.f);
}

// Sequence b's new token for a block of kv head kvh (src: its row of the projection, [q heads | kv key heads |
// kv value heads] of d each, or of a q array [h, d]): query heads kvh * group + i, i < n, into sq (row i at
// sq + i d), turned (pairs p < rot / 2 by cs_sn, token_angle's, rounded once to T as rotary_append rounds); where
// `own` the kv head's key (turned) and value into sk and sv and into their cache slot (k_slot, v_slot). A thread a
// pair p and every (THREADS / (d / 2))-th head. The caller syncs before reading.
template <int THREADS, typename T>
__device__ void stage_token(const T* __restrict__ src, int n, int h, int kv, int kvh, int group, int d, int rot,
                            bool half_style, float2 cs_sn, bool own, T* sq, T* sk, T* sv, T* k_slot, T* v_slot) {
    const int half = d / 2, per = THREADS / half, p = threadIdx.x % half;  // d <= 2 THREADS: per >= 1
    if (threadIdx.x >= per * half) return;
    const bool turn = p < rot / 2;
    for (int i = threadIdx.x / half; i < n + (own ? 2 : 0); i += per) {
        const bool value = i == n + 1, turned = turn && !value;
        const T* x = src + (i < n ? kvh * group + i : h + kvh + (value ? kv : 0)) * d;
        const int2 e = rotary_pair(p, rot, turned, half_style);
        float2 y = make_float2(to_float(x[e.x]), to_float(x[e.y]));
        if (turned) y = rotary_turn(y.x, y.y, cs_sn);
        const T y0 = from_float<T>(y.x), y1 = from_float<T>(y.y);
        T* to = i < n ? sq + i * d : value ? sv : sk;
        to[e.x] = y0, to[e.y] = y1;
        if (i >= n) {
            T* slot = value ? v_slot : k_slot;
            slot[e.x] = y0, slot[e.y] = y1;
        }
    }
}

// partial rows [B, h, chunks, d + 4]: a chunk's weighted V sum (d), then m (natural-log units) and l, and two
// unused slots (16-byte rows). Called by every thread of a partial block after its rows are written: the
// last block of this (sequence, kv head) to finish (counter: zero between launches, reset here) merges the
// `used` chunks (of `chunks` rows a head) of heads h0 .. h0 + n (n <= 16, chunks <= 256) in chunk order into out [B, h, d]: per head the
// largest m and the sum of the chunks' l exp(m_c - m), then per 4 dims sum_c exp(m_c - m) acc_c / that sum
// (0 for a head that saw no key). Each lane loads its chunks' m and l together (the merge is a chain of
// round trips to L2 after the last block's stream). THREADS: the block's.
template <int THREADS, typename T>
__device__ void merge_chunks(const float* __restrict__ partial, T* __restrict__ out, int* counter, int b, int h,
                             int h0, int n, int d, int chunks, int used) {
    if (!last_block_done(counter, used)) return;
    __shared__ float head_m[16], head_inv_l[16];
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, stride = d + 4;
    for (int g = warp; g < n; g += THREADS / 32) {
        const float* p = partial + (static_cast<size_t>(b) * h + h0 + g) * chunks * stride + d;
        float m = neg_inf(), l = 0.f;  // this lane's chunks (lane, lane + 32, ..), merged as they come
        for (int c = lane; c < used; c += 32) {
            const float2 x = __ldcg(reinterpret_cast<const float2*>(p + c * stride));
            merge_max_sum(m, l, x.x, x.y);
        }
        for (int off = 16; off > 0; off >>= 1)
            merge_max_sum(m, l, __shfl_xor_sync(0xffffffffu, m, off), __shfl_xor_sync(0xffffffffu, l, off));
        if (lane == 0) head_m[g] = m, head_inv_l[g] = l > 0.f ? 1.f / l : 0.f;
    }
    __syncthreads();
    for (int i = threadIdx.x; i < n * d / 4; i += THREADS) {
        const int g = i / (d / 4), e = 4 * (i % (d / 4));
        const float* p = partial + (static_cast<size_t>(b) * h + h0 + g) * chunks * stride;
        const float m = head_m[g];
        float acc[4] = {};
#pragma unroll 8
        for (int c = 0; c < used; ++c) {  // independent loads: the unroll keeps 8 chunks in flight
            const float mc = __ldcg(p + c * stride + d), w = mc == neg_inf() ? 0.f : __expf(mc - m);
            const float4 x = __ldcg(reinterpret_cast<const float4*>(p + c * stride + e));
            acc[0] += w * x.x, acc[1] += w * x.y, acc[2] += w * x.z, acc[3] += w * x.w;
        }
        Vec<T, 4> r;
#pragma unroll
        for (int j = 0; j < 4; ++j) r.v[j] = from_float<T>(acc[j] * head_inv_l[g]);
        *reinterpret_cast<Vec<T, 4>*>(out + (static_cast<size_t>(b) * h + h0 + g) * d + e) = r;
    }
    if (threadIdx.x == 0) *counter = 0;
}

// q: sequence b's token at q + b q_seq, query heads first (d each): the projection [B, (h + 2 kv) d] (append
// set: the query and key turned here where rot > 0, at positions[b] if has_positions, else start[b]; the key
// and value written to cache slot start[b]), or q [B, h, d] (turned, the slot written already; rot 0, append 0);
// inv_freq [rot / 2]; half_style: rotate-half pairs, else every-two.
// k, v: one layer's cache [B, kv, max_tokens, d], read; k_out, v_out: the same arrays, written at start[b] only,
// by the block whose chunk holds it (the sequence's last). That block feeds the new key and value from shared
// memory into its own scores and sums, and no block reads the slot from global memory: the cache loads are
// non-coherent (ld.global.nc through const __restrict__, load_stream) and would not be sure to see a write
// of this kernel, even after a barrier; the other blocks' keys all lie below the slot. mask [B, mask_len]
// (T, or bool as bytes; read if mask_kind says so) and alibi [B, h, alibi_len] (read if alibi_len > 0);
// start [B]: the query's cache slot (keys as KeyChunk says; window 0: none; one_block: the most keys one block takes whole);
// partial [B, h, chunks, d + 4] fp32 (merge_chunks' rows), out [B, h, d] the context, counters [B, kv] zero.
// G: query heads per kv head (the last group may have fewer: heads past h are skipped). d % 8 == 0,
// d <= 256, arrays 16-byte aligned. Grid (chunks, kv, B).
template <typename T, int G>
__global__ void __launch_bounds__(DA_THREADS) attention_partial(
    const T* __restrict__ q, const int* __restrict__ positions, const float* __restrict__ inv_freq,
    const T* __restrict__ k, const T* __restrict__ v, T* k_out, T* v_out, const void* __restrict__ mask,
    const T* __restrict__ alibi, const int* __restrict__ start, float* __restrict__ partial, T* __restrict__ out,
    int* counters, long long q_seq, int h, int kv, int d, int max_tokens, int window, int one_block, int mask_kind,
    int mask_len, int alibi_len, int rot, int half_style, int has_positions, int append, float scale) {
    follow_previous_kernel();
    const int c = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, chunks = gridDim.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32;
    const int lanes = d / 8, width = lanes <= 4 ? 4 : lanes <= 8 ? 8 : lanes <= 16 ? 16 : 32;  // lanes per key
    const int per_warp = 32 / width, sub = lane % width, slot = lane / width;
    const bool active = sub < lanes;
    const int group = h / kv;  // query heads of this kv head: kvh * group ..
    const int self = start[b];  // the new token's slot
    if (self < 0 || self >= max_tokens)
        return refuse_slot<DA_THREADS>(out + (static_cast<size_t>(b) * h + kvh * group) * d, group * d, c);
    const KeyChunk span(self, window, one_block, c, chunks);
    if (c >= span.used) return;
    const int first = span.first, last = span.last;
    const bool own = append && c == span.used - 1;  // this block writes the slot and feeds it from sk, sv

    const size_t row0 = (static_cast<size_t>(b) * kv + kvh) * max_tokens;
    __shared__ __align__(32) T sq[G * DA_MAX_D], sk[DA_MAX_D], sv[DA_MAX_D];
    stage_token<DA_THREADS>(q + b * q_seq, group, h, kv, kvh, group, d, rot, half_style,
                            token_angle(d, rot, inv_freq, has_positions ? positions[b] : self), own, sq, sk, sv,
                            k_out + (row0 + self) * d, v_out + (row0 + self) * d);
    __syncthreads();
    float qf[G][8];
#pragma unroll
    for (int g = 0; g < G; ++g) {
#pragma unroll
        for (int e = 0; e < 8; ++e) qf[g][e] = 0.f;
        if (active && g < group) {
            load8(sq + g * d + sub * 8, qf[g]);
#pragma unroll
            for (int e = 0; e < 8; ++e) qf[g][e] *= scale;
        }
    }
    Running run[G];
    // U keys per lane group per step, their K and V loads issued before any is used. Warp-uniform bounds
    // (the shuffles need every lane); a lane group past `last` contributes nothing.
    constexpr int U = 4;
    using V8 = Vec<T, 8>;
    for (int base = first + warp * per_warp * U; base < last; base += DA_WARPS * per_warp * U) {
        V8 kr[U], vr[U];
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = min(base + u * per_warp + slot, last - 1);  // clamped: counted out below
            if (active && own && j == self) {
                kr[u] = *reinterpret_cast<const V8*>(sk + sub * 8);
                vr[u] = *reinterpret_cast<const V8*>(sv + sub * 8);
            } else if (active) {
                kr[u] = *reinterpret_cast<const V8*>(k + (row0 + j) * d + sub * 8);
                vr[u] = *reinterpret_cast<const V8*>(v + (row0 + j) * d + sub * 8);
            }
        }
#pragma unroll
        for (int u = 0; u < U; ++u) {
            const int j = base + u * per_warp + slot;
            const bool valid = j < last;
            float kf[8] = {}, vf[8] = {};
            if (active) {
#pragma unroll
                for (int e = 0; e < 8; ++e) kf[e] = to_float(kr[u].v[e]), vf[e] = to_float(vr[u].v[e]);
            }
            float add = 0.f;
            bool keep = valid;
            if (valid && mask_kind == ADDITIVE_MASK)
                add = to_float(static_cast<const T*>(mask)[static_cast<size_t>(b) * mask_len + j]);
            if (valid && mask_kind == BOOL_MASK)
                keep = static_cast<const unsigned char*>(mask)[static_cast<size_t>(b) * mask_len + j] != 0;
#pragma unroll
            for (int g = 0; g < G; ++g) {
                float dot = 0.f;
#pragma unroll
                for (int e = 0; e < 8; ++e) dot += qf[g][e] * kf[e];
                for (int off = width / 2; off > 0; off >>= 1) dot += __shfl_xor_sync(0xffffffffu, dot, off);
                float s = dot + add;
                if (alibi_len > 0 && valid && g < group)
                    s += to_float(alibi[(static_cast<size_t>(b) * h + kvh * group + g) * alibi_len + j]);
                run[g].add(keep && g < group ? s : neg_inf(), vf);
            }
        }
    }
    // Merge the lane groups of the warp (lanes `width` apart hold the same dims), then the warps.
    __shared__ float red_acc[DA_WARPS][G][DA_MAX_D], red_m[DA_WARPS][G], red_l[DA_WARPS][G];
#pragma unroll
    for (int g = 0; g < G; ++g) {
        for (int off = width; off < 32; off <<= 1) {
            float acc2[8];
#pragma unroll
            for (int e = 0; e < 8; ++e) acc2[e] = __shfl_xor_sync(0xffffffffu, run[g].acc[e], off);
            const float m2 = __shfl_xor_sync(0xffffffffu, run[g].m, off);
            const float l2 = __shfl_xor_sync(0xffffffffu, run[g].l, off);
            run[g].merge(m2, l2, acc2);
        }
        if (lane < lanes) {
#pragma unroll
            for (int e = 0; e < 8; ++e) red_acc[warp][g][sub * 8 + e] = run[g].acc[e];
        }
        if (lane == 0) red_m[warp][g] = run[g].m, red_l[warp][g] = run[g].l;
    }
    __syncthreads();
    if (span.used == 1)
        return store_heads<DA_THREADS>(out + (static_cast<size_t>(b) * h + kvh * group) * d, red_acc, red_m, red_l,
                                       group, d, [](float x) { return __expf(x); });
    for (int o = threadIdx.x; o < G * (d + 2); o += DA_THREADS) {  // slots d + 2, d + 3 stay unwritten
        const int g = o / (d + 2), e = o % (d + 2);
        if (g >= group) continue;
        float m = neg_inf();
#pragma unroll
        for (int w = 0; w < DA_WARPS; ++w) m = fmaxf(m, red_m[w][g]);
        float value = 0.f;
#pragma unroll
        for (int w = 0; w < DA_WARPS; ++w) {
            if (red_m[w][g] == neg_inf()) continue;
            const float scale_w = __expf(red_m[w][g] - m);
            value += (e < d ? red_acc[w][g][e] : red_l[w][g]) * scale_w;
        }
        if (e == d) value = m;  // slot d holds the max, d + 1 the sum
        partial[((static_cast<size_t>(b) * h + kvh * group + g) * chunks + c) * (d + 4) + e] = value;
    }
    merge_chunks<DA_THREADS>(partial, out, counters + b * kv + kvh, b, h, kvh * group, group, d, chunks,
                             span.used);
}

// ---- Tensor cores (fp16, bf16; sm_80 and later) ----
// The same partials, with the G query heads of the kv head as the M rows of mma.sync m16n8k16 (rows g and
// g + 8 of the fragment: up to 16 heads; rows past the group are zeros, never written). Each warp takes
// tiles of 16 keys (the block's 4 warps interleaved) and streams them straight into registers:
// - S^T = Q K^T (heads x keys): K is the B operand as loaded. Lane (g, t) loads dims 8t .. 8t + 7 of each
//   32-dim block of key rows g and g + 8 (16 bytes each) and takes Q's same dims: both operands' k are
//   permuted alike (mma step s takes each lane's pairs 2s, 2s + 1).
// - O += P V: P comes from S's accumulators as the A operand (FlashAttention-2's register reuse); V is the B
//   operand after movmatrix transposes each loaded 8x8 fragment (as the GEMV does for [in, out] weights),
//   which leaves lane (g, t) holding O's dims 8t .. 8t + 7 of each 32-dim block.
// Online softmax per head in log2 units (scores times scale log2 e; exp2). On CUDA cores each key cost a dot,
// shuffles and two exps per head: grouped-query heads reached 9-24% of copy bandwidth there, 24-88% here.
// W warps a block, 4 or 8 (one block an SM at D128): the launcher takes 8 where they leave fewer chunks to
// merge than one wave of 4-warp blocks would (two chunks a pair, or more than 16; decode_attention.py).
template <typename T, int D, int W>
__global__ void __launch_bounds__(32 * W) attention_partial_tc(
    const T* __restrict__ q, const int* __restrict__ positions, const float* __restrict__ inv_freq,
    const T* __restrict__ k, const T* __restrict__ v, T* k_out, T* v_out, const void* __restrict__ mask,
    const T* __restrict__ alibi, const int* __restrict__ start, float* __restrict__ partial, T* __restrict__ out,
    int* counters, long long q_seq, int h, int kv, int d, int max_tokens, int window, int one_block, int mask_kind,
    int mask_len, int alibi_len, int rot, int half_style, int has_positions, int append, float scale) {
    constexpr int DB = D / 32;  // 32-dim blocks
    const int c = blockIdx.x, kvh = blockIdx.y, b = blockIdx.z, chunks = gridDim.x;
    const int warp = threadIdx.x / 32, lane = threadIdx.x % 32, g = lane / 4, t = lane % 4;
    const int group = h / kv;
    // Before the wait: start and positions (the step's decode state, advanced after the last layer of the step
    // before), the token's rotary angle, and each warp's first tile of cached keys and values, all rows below the
    // new token's slot, written by earlier steps (the slot itself is this kernel's write or, without append, the
    // kernel's just before: loaded after the wait).
    // With programmatic launches the kernel before has passed its own wait when this one starts, so every kernel
    // before that one has finished.
    const int self = start[b];  // the new token's slot
    if (self < 0 || self >= max_tokens) {
        follow_previous_kernel();
        return refuse_slot<32 * W>(out + (static_cast<size_t>(b) * h + kvh * group) * D, group * D, c);
    }
    const KeyChunk span(self, window, one_block, c, chunks);
    if (c >= span.used) {
        follow_previous_kernel();
        return;
    }
    const int first = span.first, last = span.last;
    const bool own = append && c == span.used - 1;  // this block writes the slot and feeds it from sk, sv
    const float sl2 = scale * LOG2E;
    const size_t row0 = (static_cast<size_t>(b) * kv + kvh) * max_tokens;
    const T* kb = k + row0 * D + 8 * t;
    const T* vb = v + row0 * D + 8 * t;
    // keys j0 + g and j0 + 8 + g (past `last`: the last key, masked later), but the new token's slot (below)
    uint4 kr[2][DB], vr[2][DB];
    const auto load_tile = [&](int j0) {
#pragma unroll
        for (int n = 0; n < 2; ++n) {
            const int key = min(j0 + 8 * n + g, last - 1);
            if (key == self) continue;
            const size_t row = static_cast<size_t>(key) * D;
#pragma unroll
            for (int db = 0; db < DB; ++db) {
                kr[n][db] = load_stream(kb + row + 32 * db);
                vr[n][db] = load_stream(vb + row + 32 * db);
            }
        }
    };
    const int j_first = first + 16 * warp;
    if (j_first < last) load_tile(j_first);
    // A short span's later rounds (at most three more, below the slot) asked of L2 by one thread: after the wait a
    // round's loads then wait on L2, not DRAM (a short sequence's block runs two to four rounds, each a round trip
    // after the wait). Not for longer chunks: a wave of their blocks asked for half of L2 (26 MB at D128), which
    // slowed the step after 2048-token prompts at batch 16 by 1-3%.
    const int ahead = first + 16 * W, ahead_end = min(last, self);
    if (threadIdx.x == 0 && ahead < ahead_end && last - first <= 64 * W) {
        const unsigned bytes = static_cast<unsigned>(ahead_end - ahead) * D * sizeof(T);
        prefetch_l2(k + (row0 + ahead) * D, bytes);
        prefetch_l2(v + (row0 + ahead) * D, bytes);
    }
    // The token's rotary angle too: its position, like start, is the step's decode state, and inv_freq a weight.
    const float2 angle = token_angle(D, rot, inv_freq, has_positions ? positions[b] : self);
    follow_previous_kernel();

    __shared__ __align__(16) T sq[16 * D], sk[D], sv[D];
    stage_token<32 * W>(q + b * q_seq, group, h, kv, kvh, group, D, rot, half_style, angle, own, sq, sk, sv,
                        k_out + (row0 + self) * D, v_out + (row0 + self) * D);
    __syncthreads();
    uint4 qa[DB][2];  // heads g, g + 8 of the group: dims 8t .. 8t + 7 of each block
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        const int head = g + 8 * r;
#pragma unroll
        for (int db = 0; db < DB; ++db)
            qa[db][r] = head < group ? *reinterpret_cast<const uint4*>(sq + head * D + 32 * db + 8 * t)
                                     : make_uint4(0, 0, 0, 0);
    }
    float m[2] = {neg_inf(), neg_inf()}, l[2] = {0.f, 0.f};  // per fragment row (head g, g + 8); l this lane's
    float o[DB][4][4] = {};  // O: dims 32 db + 8t + 2r + {0, 1}; [2], [3] for head g + 8
    for (int j0 = j_first; j0 < last; j0 += 16 * W) {
        if (j0 != j_first) load_tile(j0);
#pragma unroll
        for (int n = 0; n < 2; ++n) {  // the slot's row: from shared memory (own) or now, after the wait
            if (min(j0 + 8 * n + g, last - 1) != self) continue;
#pragma unroll
            for (int db = 0; db < DB; ++db) {
                kr[n][db] = own ? *reinterpret_cast<const uint4*>(sk + 32 * db + 8 * t)
                                : load_stream(kb + static_cast<size_t>(self) * D + 32 * db);
                vr[n][db] = own ? *reinterpret_cast<const uint4*>(sv + 32 * db + 8 * t)
                                : load_stream(vb + static_cast<size_t>(self) * D + 32 * db);
            }
        }
        float s[2][4] = {};  // keys j0 + 8n + 2t + {0, 1}; heads g ([0], [1]) and g + 8 ([2], [3])
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int db = 0; db < DB; ++db) {
                mma_16816<T>(s[n], {qa[db][0].x, qa[db][1].x, qa[db][0].y, qa[db][1].y}, kr[n][db].x, kr[n][db].y);
                mma_16816<T>(s[n], {qa[db][0].z, qa[db][1].z, qa[db][0].w, qa[db][1].w}, kr[n][db].z, kr[n][db].w);
            }
        float mx[2] = {neg_inf(), neg_inf()};
#pragma unroll
        for (int n = 0; n < 2; ++n)
#pragma unroll
            for (int e = 0; e < 4; ++e) {
                const int key = j0 + 8 * n + 2 * t + e % 2, r = e / 2, head = g + 8 * r;
                float x = s[n][e] * sl2;
                bool keep = key < last;
                if (keep && mask_kind == ADDITIVE_MASK)
                    x += to_float(static_cast<const T*>(mask)[static_cast<size_t>(b) * mask_len + key]) * LOG2E;
                if (keep && mask_kind == BOOL_MASK)
                    keep = static_cast<const unsigned char*>(mask)[static_cast<size_t>(b) * mask_len + key] != 0;
                if (keep && alibi_len > 0 && head < group)
                    x += to_float(alibi[(static_cast<size_t>(b) * h + kvh * group + head) * alibi_len + key]) * LOG2E;
                s[n][e] = keep ? x : neg_inf();
                mx[r] = fmaxf(mx[r], s[n][e]);
            }
        float alpha[2];
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 1));
            mx[r] = fmaxf(mx[r], __shfl_xor_sync(0xffffffffu, mx[r], 2));
            const float m_new = fmaxf(m[r], mx[r]), base = m_new == neg_inf() ? 0.f : m_new;  // no key yet: 0
            alpha[r] = fast_exp2(m[r] - base);
            m[r] = m_new;
            l[r] *= alpha[r];
#pragma unroll
            for (int n = 0; n < 2; ++n)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    s[n][2 * r + e] = fast_exp2(s[n][2 * r + e] - base);
                    l[r] += s[n][2 * r + e];
                }
        }
        const unsigned pa[4] = {pack2<T>(s[0][0], s[0][1]), pack2<T>(s[0][2], s[0][3]), pack2<T>(s[1][0], s[1][1]),
                                pack2<T>(s[1][2], s[1][3])};
#pragma unroll
        for (int db = 0; db < DB; ++db) {
            const unsigned v0[4] = {vr[0][db].x, vr[0][db].y, vr[0][db].z, vr[0][db].w};
            const unsigned v1[4] = {vr[1][db].x, vr[1][db].y, vr[1][db].z, vr[1][db].w};
#pragma unroll
            for (int r = 0; r < 4; ++r) {
#pragma unroll
                for (int e = 0; e < 4; ++e) o[db][r][e] *= alpha[e / 2];
                mma_16816<T>(o[db][r], pa, transpose8x8(v0[r]), transpose8x8(v1[r]));
            }
        }
    }
    // The warp's state: l summed over the row's 4 lanes; then the warps merge in shared memory, which holds 4
    // warps' states (8 warps: the last 4 hand theirs to the first 4 first).
    static_assert(W == DA_WARPS || W == 2 * DA_WARPS, "4 or 8 warps");
    __shared__ float red_acc[DA_WARPS][16][D], red_m[DA_WARPS][16], red_l[DA_WARPS][16];
    const int slot = warp % DA_WARPS;
    // Fragment row r of this lane's O: into slot `slot` (fold false), or o a + that slot's row w (fold true).
    auto move_o = [&](int r, bool fold, float a, float w) {
#pragma unroll
        for (int db = 0; db < DB; ++db)
#pragma unroll
            for (int j = 0; j < 4; ++j)
#pragma unroll
                for (int e = 0; e < 2; ++e) {
                    float &x = o[db][j][2 * r + e], &shared = red_acc[slot][g + 8 * r][32 * db + 8 * t + 2 * j + e];
                    if (fold) x = x * a + shared * w;
                    else shared = x;
                }
    };
    auto share = [&] {  // this warp's state into slot `slot`
#pragma unroll
        for (int r = 0; r < 2; ++r) {
            if (t == 0) red_m[slot][g + 8 * r] = m[r], red_l[slot][g + 8 * r] = l[r];
            move_o(r, false, 0.f, 0.f);
        }
    };
#pragma unroll
    for (int r = 0; r < 2; ++r) {
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 1);
        l[r] += __shfl_xor_sync(0xffffffffu, l[r], 2);
    }
    if (W > DA_WARPS) {
        if (warp >= DA_WARPS) share();
        __syncthreads();
        if (warp < DA_WARPS) {
#pragma unroll
            for (int r = 0; r < 2; ++r) {  // the other warp's state folded into this one's (none: weight 0)
                const float m2 = red_m[slot][g + 8 * r], m_new = fmaxf(m[r], m2);
                const float a = m[r] == neg_inf() ? 0.f : fast_exp2(m[r] - m_new);
                const float w = m2 == neg_inf() ? 0.f : fast_exp2(m2 - m_new);
                m[r] = m_new, l[r] = l[r] * a + red_l[slot][g + 8 * r] * w;
                move_o(r, true, a, w);
            }
        }
        __syncthreads();
    }
    if (W == DA_WARPS || warp < DA_WARPS) share();
    __syncthreads();
    if (span.used == 1)
        return store_heads<32 * W>(out + (static_cast<size_t>(b) * h + kvh * group) * D, red_acc, red_m, red_l,
                                   group, D, [](float x) { return fast_exp2(x); });
    // As attention_partial's merge, but m is in log2 units: the partial keeps natural-log units for the combine.
    for (int idx = threadIdx.x; idx < group * (D + 2); idx += 32 * W) {
        const int head = idx / (D + 2), e = idx % (D + 2);
        float mw = neg_inf();
#pragma unroll
        for (int w = 0; w < DA_WARPS; ++w) mw = fmaxf(mw, red_m[w][head]);
        float value = 0.f;
#pragma unroll
        for (int w = 0; w < DA_WARPS; ++w) {
            if (red_m[w][head] == neg_inf()) continue;
            const float f = fast_exp2(red_m[w][head] - mw);
            value += (e < D ? red_acc[w][head][e] : red_l[w][head]) * f;
        }
        if (e == D) value = mw == neg_inf() ? mw : mw / LOG2E;  // slot d: the max (natural log), d + 1: the sum
        partial[((static_cast<size_t>(b) * h + kvh * group + head) * chunks + c) * (D + 4) + e] = value;
    }
    merge_chunks<32 * W>(partial, out, counters + b * kv + kvh, b, h, kvh * group, group, D, chunks, span.used);
}

}  // namespace ct
