// Rotary position embedding of one pair of a query or key head, shared by rotary_append.cu (prefill) and
// decode_attention.cu (which turns the new token's query and key itself): the formula exists once, so a decode
// step's turned q and k are bit-identical to what rotary_append writes.
//
// Pair p < rot / 2 turns by the angle position * inv_freq[p]: elements (p, p + rot / 2) (rotate-half) or
// (2p, 2p + 1) (every-two); y0 = x0 cos - x1 sin, y1 = x1 cos + x0 sin in fp32. The products are rounded
// explicitly (__fmul_rn is never contracted into an fma) so that no kernel's compile fuses them differently.
// Pairs from rot / 2 on (and any pair not turned) are (2p, 2p + 1), copied.
#pragma once
#include "common.cuh"

namespace ct {

// The elements of pair p of a head: (p, p + rot / 2) where it turns rotate-half, else (2p, 2p + 1).
__device__ __forceinline__ int2 rotary_pair(int p, int rot, bool turn, bool half_style) {
    return turn && half_style ? make_int2(p, p + rot / 2) : make_int2(2 * p, 2 * p + 1);
}

// (cos, sin) of pair p's angle at `position`.
__device__ __forceinline__ float2 rotary_cos_sin(int position, float inv_freq) {
    float sn, cs;
    sincosf(__fmul_rn(static_cast<float>(position), inv_freq), &sn, &cs);
    return make_float2(cs, sn);
}

// (x0, x1) turned by the angle whose (cos, sin) is cs_sn.
__device__ __forceinline__ float2 rotary_turn(float x0, float x1, float2 cs_sn) {
    return make_float2(__fmaf_rn(x0, cs_sn.x, -__fmul_rn(x1, cs_sn.y)), __fmaf_rn(x1, cs_sn.x, __fmul_rn(x0, cs_sn.y)));
}

}  // namespace ct
