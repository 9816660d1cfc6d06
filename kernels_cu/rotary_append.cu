// Rotary + KV-cache append in one pass over the fused QKV projection: per token, the query heads are turned
// and written to q_out [B, h, S, d]; the key heads are turned and written to k_out at slot start[b] + s of
// sequence b (a cache layer, or [B, kv, S, d] with start 0); the value heads are copied to v_out likewise
// when copy_v is set (with no cache they stay views of the projection).
//
// Pair p < rot / 2 of a query or key head turns as rotary.cuh says (rounded once to T), the position being
// positions[b, s] if has_positions, else the slot start[b] + s. Elements from rot on (and all of a value head)
// are copied. One thread per pair (a grid-stride loop over B S (h + kv [+ kv]) d / 2 pairs, < 2^31). A decode
// step (one token, a cache) does not run this kernel: decode_attention.cu turns and appends its token itself.
//
// A token whose slot start[b] + s falls outside [0, slots) (a start on the device, which the host cannot check
// without a read) writes nothing to the cache, which would otherwise take another sequence's or layer's rows or
// memory past the cache, and gets a NaN query, which attention carries to its context and a finiteness check sees.
#include "common.cuh"
#include "rotary.cuh"

namespace ct {

template <typename T>
__global__ void rotary_append(const T* __restrict__ qkv, const int* __restrict__ positions,
                              const float* __restrict__ inv_freq, const int* __restrict__ start, T* __restrict__ q_out,
                              T* __restrict__ k_out, T* __restrict__ v_out, long long kv_seq, long long kv_head,
                              long long kv_tok, int S, int h, int kv, int d, int rot, int half_style, int copy_v,
                              int has_positions, int slots, unsigned pairs) {
    follow_previous_kernel();
    const int heads = h + kv + (copy_v ? kv : 0), width = (h + 2 * kv) * d, per_head = d / 2;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < pairs; i += gridDim.x * blockDim.x) {
        const int p = i % per_head, head = i / per_head % heads, token = i / per_head / heads;
        const int b = token / S, s = token % S;
        const T* src = qkv + static_cast<long long>(token) * width + head * d;
        const bool turn = head < h + kv && p < rot / 2;
        const int2 e = rotary_pair(p, rot, turn, half_style);
        const int e0 = e.x, e1 = e.y;
        T* const q = head < h ? q_out + ((static_cast<long long>(b) * h + head) * S + s) * d : nullptr;  // a query
        const int slot = start[b] + s;
        if (slot < 0 || slot >= slots) {
            if (q) q[e0] = q[e1] = from_float<T>(quiet_nan());
            continue;
        }
        float x0 = to_float(src[e0]), x1 = to_float(src[e1]);
        if (turn) {
            const int position = has_positions ? positions[token] : slot;
            const float2 y = rotary_turn(x0, x1, rotary_cos_sin(position, inv_freq[p]));
            x0 = y.x, x1 = y.y;
        }
        const bool key = head < h + kv;
        T* const dst =
            q ? q : (key ? k_out : v_out) + b * kv_seq + (head - h - (key ? 0 : kv)) * kv_head + slot * kv_tok;
        dst[e0] = from_float<T>(x0);
        dst[e1] = from_float<T>(x1);
    }
}

}  // namespace ct
