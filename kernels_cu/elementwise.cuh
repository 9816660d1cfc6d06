// A grid-stride walk over a row-major [rows, width] tensor of any width in 16-byte runs, then a short tail,
// for the elementwise passes (bias_act.cu, residual_add.cu).
#pragma once
#include "common.cuh"

namespace ct {

template <int N> struct Run { static constexpr int size = N; };

// f(at, row, col, Run<N>{}) for every run of N elements of the tensor's rows * width: runs of VEC from flat
// element 0 while whole ones remain (`vectors` of them), then the last `tail` elements one at a time (block
// 0). `at` is a run's first flat index, row and col that element's; a run may cross into the next row (any
// width). Rows and columns advance by addition, not a division a step. vectors < 2^31, width < 2^28.
template <int VEC, typename F>
__device__ __forceinline__ void for_each_run(unsigned vectors, int tail, unsigned width, F&& f) {
    const unsigned stride = gridDim.x * blockDim.x;
    unsigned i = blockIdx.x * blockDim.x + threadIdx.x;
    if (i < vectors) {
        const unsigned q = i / width, r = i % width * VEC;  // element i VEC = (q width + r / VEC) VEC
        unsigned row = q * VEC + r / width, col = r % width;
        const unsigned step = stride * VEC, row_step = step / width, col_step = step % width;
        for (; i < vectors; i += stride) {
            f(static_cast<size_t>(i) * VEC, row, col, Run<VEC>{});
            row += row_step, col += col_step;
            if (col >= width) col -= width, ++row;
        }
    }
    if (blockIdx.x == 0 && static_cast<int>(threadIdx.x) < tail) {
        const size_t at = static_cast<size_t>(vectors) * VEC + threadIdx.x;
        f(at, static_cast<unsigned>(at / width), static_cast<unsigned>(at % width), Run<1>{});
    }
}

// A run's N values of a per-column vector c ([width]: a bias) from column col on, wrapping into the next
// row: one N-wide load where the run is aligned and inside the row, always so when WHOLE (width % N == 0;
// known at compile time, the loads need no branch and issue with the run's others).
template <bool WHOLE, int N, typename T>
__device__ __forceinline__ void column_values(float (&out)[N], const T* c, unsigned col, unsigned width) {
    if (WHOLE || (col % N == 0 && col + N <= width)) {
        const Vec<T, N> v = *reinterpret_cast<const Vec<T, N>*>(c + col);
#pragma unroll
        for (int j = 0; j < N; ++j) out[j] = to_float(v.v[j]);
    } else {
#pragma unroll
        for (int j = 0; j < N; ++j) out[j] = to_float(c[col]), col = col + 1 == width ? 0 : col + 1;
    }
}

}  // namespace ct
