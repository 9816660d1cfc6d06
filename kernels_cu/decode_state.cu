// The end of a decode step (or of a prompt pass), after the sampler has written each sequence's next token: the
// tokens into row step % 2 of the host's ring, with `advance` each sequence's position and cache length plus one,
// then the step counter plus one. cupy_transformer/ops/decode_state.py states it; end_step_reference is its twin.
#include "argmax.cuh"
#include "common.cuh"

namespace ct {

// One block. ids, positions, lengths: [batch] int32; seed_step: {seed, step}; ring: [2, batch] int32, page-locked
// host memory where the host reads it (with unified addressing a kernel may write it). With `from_best`, the tokens
// are first taken from best [batch] (the LM head's greedy argmax_keys, gemv.cu's ARGMAX) into ids, and best zeroed
// for the next step's. Every thread reads the step before the barrier; one thread writes the next after it.
__global__ void end_step(int* __restrict__ ids, unsigned long long* __restrict__ best, int* __restrict__ positions,
                         int* __restrict__ lengths, unsigned long long* __restrict__ seed_step, int* __restrict__ ring,
                         int batch, int from_best, int advance) {
    follow_previous_kernel();
    const unsigned long long step = seed_step[1];
    int* __restrict__ row = ring + (step & 1) * static_cast<size_t>(batch);
    for (int i = threadIdx.x; i < batch; i += blockDim.x) {
        if (from_best) ids[i] = argmax_index(best[i]), best[i] = 0;
        row[i] = ids[i];
        if (advance) positions[i] += 1, lengths[i] += 1;
    }
    __syncthreads();
    if (threadIdx.x == 0) seed_step[1] = step + 1;
}

}  // namespace ct
