// Rotary + KV-cache append in one pass over the fused QKV projection: per token, the query heads are turned
// and written to q_out [B, h, S, d]; the key heads are turned and written to k_out at slot start[b] + s of
// sequence b (a cache layer, or [B, kv, S, d] with start 0); the value heads are copied to v_out likewise
// when copy_v is set (with no cache they stay views of the projection).
//
// Pair p < rot / 2 of a query or key head turns by position * inv_freq[p], the position being
// positions[b, s] if has_positions, else the slot start[b] + s: elements (p, p + rot / 2)
// (rotate-half) or (2p, 2p + 1) (every-two); y0 = x0 cos - x1 sin, y1 = x1 cos + x0 sin, in fp32, rounded
// once. Elements from rot on (and all of a value head) are copied: pair p >= rot / 2 is (2p, 2p + 1) in
// both pairings. One thread per pair (a grid-stride loop over B S (h + kv [+ kv]) d / 2 pairs, < 2^31).
#include "common.cuh"

namespace ct {

template <typename T>
__global__ void rotary_append(const T* __restrict__ qkv, const int* __restrict__ positions,
                              const float* __restrict__ inv_freq, const int* __restrict__ start, T* __restrict__ q_out,
                              T* __restrict__ k_out, T* __restrict__ v_out, long long kv_seq, long long kv_head,
                              long long kv_tok, int S, int h, int kv, int d, int rot, int half_style, int copy_v,
                              int has_positions, unsigned pairs) {
    follow_previous_kernel();
    const int heads = h + kv + (copy_v ? kv : 0), width = (h + 2 * kv) * d, per_head = d / 2;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += gridDim.x * blockDim.x) {
        const int p = i % per_head, head = i / per_head % heads, token = i / per_head / heads;
        const int b = token / S, s = token % S;
        const T* src = qkv + static_cast<long long>(token) * width + head * d;
        const bool turn = head < h + kv && p < rot / 2;
        const int e0 = turn && half_style ? p : 2 * p, e1 = turn && half_style ? p + rot / 2 : 2 * p + 1;
        float x0 = to_float(src[e0]), x1 = to_float(src[e1]);
        if (turn) {
            float sn, cs;
            const int position = has_positions ? positions[token] : start[b] + s;
            sincosf(static_cast<float>(position) * inv_freq[p], &sn, &cs);
            const float y0 = x0 * cs - x1 * sn, y1 = x1 * cs + x0 * sn;
            x0 = y0, x1 = y1;
        }
        T* dst;
        if (head < h) {
            dst = q_out + ((static_cast<long long>(b) * h + head) * S + s) * d;
        } else {
            const bool key = head < h + kv;
            dst = (key ? k_out : v_out) + b * kv_seq + (head - h - (key ? 0 : kv)) * kv_head + (start[b] + s) * kv_tok;
        }
        dst[e0] = from_float<T>(x0);
        dst[e1] = from_float<T>(x1);
    }
}

}  // namespace ct
