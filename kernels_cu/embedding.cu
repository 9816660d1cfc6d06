// Token embeddings in one pass: out[t] = table[ids[t]] (+ position_table[positions[t]]), t over the B * S tokens.
// With positions, the two rows are summed in fp32 and rounded once to T; without, the row is copied as it is.
// cupy_transformer/ops/embedding.py states the math; its embedding_reference is this kernel's NumPy twin.
#include "common.cuh"

namespace ct {

// Index t of an int32 (bytes 4) or int64 (bytes 8) index array.
__device__ __forceinline__ size_t index_at(const void* __restrict__ indices, unsigned t, int bytes) {
    return bytes == 8 ? static_cast<size_t>(static_cast<const long long*>(indices)[t])
                      : static_cast<size_t>(static_cast<const int*>(indices)[t]);
}

// A grid-stride walk over the output's `vectors` runs of VEC elements, `width` runs a row (H = width * VEC: 16-byte
// runs where H allows and every row is aligned, the launcher checks; else VEC 1). ids and positions: [B * S] of
// id_bytes / position_bytes each (4 or 8); position_bytes 0: no positions (positions and position_table unread).
// table [V, H], position_table [P, H], out [B * S, H].
template <typename T, int VEC>
__global__ void embed_tokens(const void* __restrict__ ids, int id_bytes, const T* __restrict__ table,
                             const void* __restrict__ positions, int position_bytes,
                             const T* __restrict__ position_table, T* __restrict__ out, int width, unsigned vectors) {
    follow_previous_kernel();
    using V = Vec<T, VEC>;
    const unsigned w = width;
    for (unsigned i = blockIdx.x * blockDim.x + threadIdx.x; i < vectors; i += gridDim.x * blockDim.x) {
        const unsigned t = i / w, c = i % w;
        V r = reinterpret_cast<const V*>(table)[index_at(ids, t, id_bytes) * w + c];
        if (position_bytes) {
            const V p = reinterpret_cast<const V*>(position_table)[index_at(positions, t, position_bytes) * w + c];
#pragma unroll
            for (int j = 0; j < VEC; ++j) r.v[j] = from_float<T>(to_float(r.v[j]) + to_float(p.v[j]));
        }
        reinterpret_cast<V*>(out)[i] = r;
    }
}

}  // namespace ct
