// Next-token sampling from logits [B, V] (rows `row_stride` elements apart), the token written to tokens[row].
// cupy_transformer/ops/sampling.py states the math; its sample_reference is these kernels' NumPy twin, draw for draw.
//
// Every kernel splits each row over several blocks (grid (B, splits): one block would read a 50k-128k row on one
// multiprocessor while the others idle), block s taking the s-th contiguous slice, and the last block of a row to
// finish (last_block_done) merging the blocks' results.
//
// Greedy (temperature 0), greedy_tokens: the first index of the largest logit.
//
// Otherwise a few launches in stream order, their state between them in the stream's split workspace (SampleRow a
// row, SamplePart a block). The seed and the step are read from device memory (seed_step = {seed, step}), so that one
// captured CUDA graph serves every step and every seed. The allowed set is every index whose order key (an unsigned
// integer that sorts as the logits do) reaches a threshold found by radix selection, 8 bits a launch of
// sample_select, most significant first: each block counts its slice's keys into a 256-bucket histogram, the last
// block adds the blocks' histograms in block order and chooses the digit; two launches for the 16-bit keys of fp16 /
// bf16, four for fp32. top_k counts keys (the k-th largest value); top_p weighs them with exp((l - max) / T) in
// double, within what top_k kept (the first launch, before the row's max is known, weighs a slice against its own max
// and the merge rescales). Then sample_draw, by Gumbel-max: the allowed index with the largest
// l / T - log(-log(u)), u from Philox4x64-10 keyed by the seed, at counter (j + 1, step, row, 0) for the four draws
// of indices 4j .. 4j + 3 (numpy.random.Philox increments its counter before each block of four outputs, so
// Philox(key=(seed, 0), counter=(0, step, row, 0)).random_raw(V) yields the same u's in order).
// Scores are in double: the kernels and NumPy then differ only where two scores are within an ulp or so.
#include "argmax.cuh"
#include "common.cuh"

namespace ct {

constexpr int SAMPLE_THREADS = 256;
constexpr int SAMPLE_WARPS = SAMPLE_THREADS / 32;

// The value exactly, as a double. The conversion is written out: under -ftz=true, `(double)f` compiles to
// cvt.ftz.f64.f32, which flushes fp32 / bf16 subnormals to zero.
__device__ __forceinline__ double exact_double(float v) {
    double d;
    asm("cvt.f64.f32 %0, %1;" : "=d"(d) : "f"(v));
    return d;
}
__device__ __forceinline__ double exact_double(__half v) { return exact_double(__half2float(v)); }
__device__ __forceinline__ double exact_double(__nv_bfloat16 v) {
    return exact_double(__uint_as_float(static_cast<unsigned>(__bfloat16_as_ushort(v)) << 16));
}

// Philox4x64-10 (Salmon et al. 2011; Random123's and NumPy's constants) on counter c with key (k0, k1): ten rounds
// of two 64 x 64 -> 128-bit products, the key bumped by the Weyl constants between rounds.
__device__ __forceinline__ void philox4x64_10(unsigned long long (&c)[4], unsigned long long k0,
                                              unsigned long long k1) {
    constexpr unsigned long long M0 = 0xD2E7470EE14C6C93ull, M1 = 0xCA5A826395121157ull;
    constexpr unsigned long long W0 = 0x9E3779B97F4A7C15ull, W1 = 0xBB67AE8584CAA73Bull;
#pragma unroll
    for (int round = 0; round < 10; ++round) {
        const unsigned long long hi0 = __umul64hi(M0, c[0]), lo0 = M0 * c[0];
        const unsigned long long hi1 = __umul64hi(M1, c[2]), lo1 = M1 * c[2];
        c[0] = hi1 ^ c[1] ^ k0;
        c[1] = lo1;
        c[2] = hi0 ^ c[3] ^ k1;
        c[3] = lo0;
        k0 += W0;
        k1 += W1;
    }
}

// A uniform draw in (0, 1) from 64 random bits: the top 52 bits plus a half, times 2^-52, exact in double
// (with 53 bits the half would round the largest values up to 1, and log(-log 1) is -inf).
__device__ __forceinline__ double open_uniform(unsigned long long bits) {
    return (static_cast<double>(bits >> 12) + 0.5) * 0x1p-52;
}

__device__ __forceinline__ double neg_inf64() { return -__longlong_as_double(0x7ff0000000000000ll); }

// The largest `v` over a block of THREADS threads, returned to every thread. `scratch` (THREADS / 32 values) may be
// reused by the next call (the first barrier protects it).
template <int THREADS>
__device__ __forceinline__ unsigned long long block_max(unsigned long long v, unsigned long long* scratch) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
    __syncthreads();
    if (lane == 0) scratch[warp] = v;
    __syncthreads();
    v = lane < THREADS / 32 ? scratch[lane] : 0ull;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) v = max(v, __shfl_xor_sync(0xffffffffu, v, offset));
    return v;
}


// Whether (score, index) goes before (best, best_index): the larger score, ties to the smaller index.
__device__ __forceinline__ bool ahead(double score, unsigned index, double best, unsigned best_index) {
    return score > best || (score == best && index < best_index);
}

// The block's first (score, index) in the order of `ahead`: the index returned and its score left in `score`, in
// every thread; scratch as block_max's.
__device__ __forceinline__ unsigned block_argmax(double& score, unsigned index, double* scores, unsigned* indices) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const double s = __shfl_xor_sync(0xffffffffu, score, offset);
        const unsigned i = __shfl_xor_sync(0xffffffffu, index, offset);
        if (ahead(s, i, score, index)) score = s, index = i;
    }
    __syncthreads();
    if (lane == 0) scores[warp] = score, indices[warp] = index;
    __syncthreads();
    score = lane < SAMPLE_WARPS ? scores[lane] : neg_inf64();
    index = lane < SAMPLE_WARPS ? indices[lane] : 0xFFFFFFFFu;
#pragma unroll
    for (int offset = 16; offset > 0; offset >>= 1) {
        const double s = __shfl_xor_sync(0xffffffffu, score, offset);
        const unsigned i = __shfl_xor_sync(0xffffffffu, index, offset);
        if (ahead(s, i, score, index)) score = s, index = i;
    }
    return index;
}

// Block s's slice of a row of `vocab`: [begin, end), `per` elements a slice, a multiple of 64 (so that the draw's
// groups of four never straddle two blocks).
struct Slice {
    unsigned begin, end;
};
__device__ __forceinline__ Slice row_slice(unsigned vocab) {
    const unsigned per = ((vocab + gridDim.y - 1) / gridDim.y + 63) / 64 * 64;
    return {min(vocab, blockIdx.y * per), min(vocab, (blockIdx.y + 1) * per)};
}

// A pass over the block's slice: f(values, first) for each group of G consecutive values this thread takes (groups
// threadIdx.x, + SAMPLE_THREADS, ... from the slice's first; first = the group's first index; values past the slice's
// end are unset, f checks first + g < end). The values of AHEAD groups are loaded before any is used.
template <int G, int AHEAD, typename T, typename F>
__device__ __forceinline__ void for_each_group(const T* __restrict__ row, Slice slice, F&& f) {
    const unsigned groups = (slice.end - slice.begin + G - 1) / G;
    for (unsigned base = threadIdx.x; base < groups; base += AHEAD * SAMPLE_THREADS) {
        T values[AHEAD][G];
#pragma unroll
        for (int a = 0; a < AHEAD; ++a)
#pragma unroll
            for (int g = 0; g < G; ++g) {
                const unsigned i = slice.begin + (base + a * SAMPLE_THREADS) * G + g;
                if (i < slice.end) values[a][g] = row[i];
            }
#pragma unroll
        for (int a = 0; a < AHEAD; ++a)
            if (base + a * SAMPLE_THREADS < groups) f(values[a], slice.begin + (base + a * SAMPLE_THREADS) * G);
    }
}

// The value of an order key, exactly, as a double (order_key's inverse, -0 coming back as +0); the row pointer
// picks the type.
__device__ __forceinline__ unsigned key_bits16(unsigned key) { return key & 0x8000u ? key & 0x7FFFu : ~key & 0xFFFFu; }
__device__ __forceinline__ double key_value(unsigned key, const float*) {
    return exact_double(__uint_as_float(key & 0x80000000u ? key & 0x7FFFFFFFu : ~key));
}
__device__ __forceinline__ double key_value(unsigned key, const __half*) {
    return exact_double(__ushort_as_half(static_cast<unsigned short>(key_bits16(key))));
}
__device__ __forceinline__ double key_value(unsigned key, const __nv_bfloat16*) {
    return exact_double(__ushort_as_bfloat16(static_cast<unsigned short>(key_bits16(key))));
}

// The merging block's radix-selection state: the row's histogram over 8 bits of the key, and what the launch chose.
struct Selection {
    unsigned counts[256];
    double masses[256];  // top_p's weights
    unsigned prefix;     // the key bits chosen so far
    double remaining;    // the weight still wanted below them
};

// Warp 0, after a histogram pass at `shift`: the highest digit d at which the weight of the digits above d and of d
// reaches `remaining` (of all, where `of_total`: top_p's first pass), skipping empty digits (where rounding leaves
// too little weight, the lowest non-empty one); written to s.prefix with the weight still wanted within it. Lane L
// holds digits 255 - 8L down to 248 - 8L. Weights: the masses, or (MASS false) the counts.
template <bool MASS>
__device__ void choose_digit(Selection& s, int shift, bool of_total) {
    const int lane = threadIdx.x;
    double w[8], local = 0.0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        const int d = 255 - 8 * lane - j;
        w[j] = MASS ? s.masses[d] : static_cast<double>(s.counts[d]);
        local += w[j];
    }
    double above = local;  // the weight of lanes 0 .. L: inclusive scan
#pragma unroll
    for (int offset = 1; offset < 32; offset <<= 1) {
        const double t = __shfl_up_sync(0xffffffffu, above, offset);
        if (lane >= offset) above += t;
    }
    const double total = __shfl_sync(0xffffffffu, above, 31);
    above = __shfl_up_sync(0xffffffffu, above, 1);  // lanes 0 .. L - 1: exclusive
    if (lane == 0) above = 0.0;
    const double remaining = of_total ? s.remaining * total : s.remaining;
    int found = -1, lowest = -1;
    double found_above = 0.0, lowest_above = 0.0;
#pragma unroll
    for (int j = 0; j < 8; ++j) {
        if (s.counts[255 - 8 * lane - j]) {
            if (found < 0 && above + w[j] >= remaining) found = j, found_above = above;
            lowest = j, lowest_above = above;
        }
        above += w[j];
    }
    const unsigned reached = __ballot_sync(0xffffffffu, found >= 0);
    const unsigned nonempty = __ballot_sync(0xffffffffu, lowest >= 0);
    const int winner = reached ? __ffs(reached) - 1 : 31 - __clz(nonempty);
    __syncwarp();  // every lane has read s.remaining before the winner writes it
    if (lane == winner) {
        const int j = reached ? found : lowest;
        s.prefix |= static_cast<unsigned>(255 - 8 * lane - j) << shift;
        s.remaining = remaining - (reached ? found_above : lowest_above);
    }
}

// A row's state between launches, in the split workspace.
struct alignas(16) SampleRow {
    double top;          // top_p: the largest logit the selection counts (set by its first launch)
    double remaining;    // the weight still wanted below `prefix`
    unsigned prefix;     // the key bits the running selection has chosen
    unsigned threshold;  // the finished selections' allowed set: the keys >= threshold
};

// A block's results, for the merging block.
struct alignas(16) SamplePart {
    double masses[256];
    unsigned counts[256];
    unsigned top_key;     // top_p's first launch: the slice's largest counted key (0: none)
    unsigned best_index;  // sample_draw: the slice's draw
    double best_score;
};
static_assert(sizeof(SampleRow) == 32 && sizeof(SamplePart) == 3088, "ops/sampling.py sizes the workspace so");

constexpr int MAX_SPLITS = 256;  // ops/sampling.py's MAX_SPLITS

// One histogram entry a lane (digit d > 255: none). A warp's lanes with the same digit add once, their leader the
// group's count and mass (summed in lane order): a launch's entries fall on a few digits (the logits' leading key
// bits), where the threads would contend for the same shared-memory words, and a double's atomic add there is a
// compare-and-swap loop.
__device__ __forceinline__ void add_to_histogram(Selection& s, unsigned d, double mass) {
    const unsigned peers = __match_any_sync(__activemask(), d);
    if (d > 255u) return;
    double total = 0.0;
    for (unsigned m = peers; m; m &= m - 1) total += __shfl_sync(peers, mass, __ffs(m) - 1);
    if (static_cast<int>(threadIdx.x % 32) == __ffs(peers) - 1) {
        atomicAdd(&s.counts[d], static_cast<unsigned>(__popc(peers)));
        atomicAdd(&s.masses[d], total);
    }
}

// top_p's first launch: the value a slice's weights are taken against, its largest counted value (the order key
// `key`), into `base`; false where there is none (nothing counted, or only -inf), the slice's weights then being 0
// whatever the base. The blocks and the merge both ask it, so that each block's rescaling matches its weights.
template <typename T>
__device__ __forceinline__ bool slice_base(unsigned key, const T* row, double& base) {
    if (!key) return false;
    const double value = key_value(key, row);
    if (isinf(value)) return false;
    base = value;
    return true;
}

// One launch of a radix selection, the 8 bits of the key at `shift` (the first launch: the key's top 8): towards the
// largest key lambda such that the weight of {i : key_i >= floor, key_i >= lambda} reaches the wanted weight (top_k:
// weight 1, want top_k; MASS, top_p: weight exp((l_i - top) / t), want the fraction top_p of their total), floor
// being the top_k selection's threshold where `after_top_k`, else 0. The merging block leaves the prefix chosen and
// the weight still wanted in rows[b], after the last launch (shift 0) the threshold. lambda is a key of the row, so
// the set it keeps is never empty.
template <typename T, bool MASS>
__global__ void __launch_bounds__(SAMPLE_THREADS) sample_select(
    const T* __restrict__ logits, long long row_stride, int vocab, int shift, int top_k, float top_p,
    float temperature, int after_top_k, SampleRow* rows, SamplePart* parts, int* counters) {
    constexpr int BITS = 8 * sizeof(T);
    static_assert(SAMPLE_THREADS == 256, "a thread a digit");
    follow_previous_kernel();
    __shared__ Selection s;
    __shared__ double scales[MAX_SPLITS];
    __shared__ unsigned long long max_scratch[SAMPLE_WARPS];
    const unsigned b = blockIdx.x, splits = gridDim.y, d = threadIdx.x;
    const T* __restrict__ row = logits + b * row_stride;
    SampleRow& state = rows[b];
    SamplePart* row_parts = parts + static_cast<size_t>(b) * splits;
    const bool first = shift == BITS - 8;
    const unsigned floor = after_top_k ? state.threshold : 0u;
    const unsigned prefix = first ? 0u : state.prefix;
    const unsigned chosen = first ? 0u : ~0u << (shift + 8);  // the bits of the digits chosen before
    const auto counted = [&](unsigned key) { return key >= floor && (key & chosen) == prefix; };
    const double t = exact_double(temperature);
    const Slice slice = row_slice(static_cast<unsigned>(vocab));

    // Weights exp((l - base) / t). Before the row's max is known (top_p's first launch) a block weighs its slice
    // against the slice's own largest counted value (slice_base), and the merge rescales.
    double base = MASS && !first ? state.top : 0.0;
    unsigned top_key = 0;
    if (MASS && first) {
        unsigned long long largest = 0;
        for_each_group<1, 8>(row, slice, [&](const T* v, unsigned) {
            const unsigned key = order_key(v[0]);
            if (counted(key)) largest = max(largest, static_cast<unsigned long long>(key));
        });
        top_key = static_cast<unsigned>(block_max<SAMPLE_THREADS>(largest, max_scratch));
        slice_base(top_key, row, base);
    }
    s.counts[d] = 0;
    if (MASS) s.masses[d] = 0.0;
    __syncthreads();
    for_each_group<1, 8>(row, slice, [&](const T* v, unsigned) {
        const unsigned key = order_key(v[0]);
        const bool in = counted(key);
        if (!MASS) {  // a shared unsigned atomic is one instruction: no warp aggregation
            if (in) atomicAdd(&s.counts[(key >> shift) & 255u], 1u);
            return;
        }
        add_to_histogram(s, in ? (key >> shift) & 255u : 256u, in ? exp((exact_double(v[0]) - base) / t) : 0.0);
    });
    __syncthreads();
    SamplePart& part = row_parts[blockIdx.y];
    part.counts[d] = s.counts[d];
    if (MASS) part.masses[d] = s.masses[d];
    if (d == 0) part.top_key = top_key;
    if (!last_block_done(counters + b, splits)) return;  // its ticket publishes the block's part

    // The merge, in block order: a launch's sums do not depend on which block finished first.
    double top = base;
    if (MASS && first) {
        unsigned long long largest = 0;
        for (unsigned p = d; p < splits; p += SAMPLE_THREADS)
            largest = max(largest, static_cast<unsigned long long>(__ldcg(&row_parts[p].top_key)));
        top = key_value(static_cast<unsigned>(block_max<SAMPLE_THREADS>(largest, max_scratch)), row);
        for (unsigned p = d; p < splits; p += SAMPLE_THREADS) {
            double value;
            scales[p] = slice_base(__ldcg(&row_parts[p].top_key), row, value) ? exp((value - top) / t) : 0.0;
        }
        __syncthreads();
    }
    unsigned count = 0;
    double mass = 0.0;
#pragma unroll 8
    for (unsigned p = 0; p < splits; ++p) {
        count += __ldcg(&row_parts[p].counts[d]);
        if (MASS) mass += (first ? scales[p] : 1.0) * __ldcg(&row_parts[p].masses[d]);
    }
    s.counts[d] = count;
    if (MASS) s.masses[d] = mass;
    if (d == 0) s.prefix = prefix, s.remaining = first ? (MASS ? exact_double(top_p) : top_k) : state.remaining;
    __syncthreads();
    if (d < 32) choose_digit<MASS>(s, shift, MASS && first);
    __syncthreads();
    if (d == 0) {
        state.prefix = s.prefix;
        state.remaining = s.remaining;
        if (MASS && first) state.top = top;
        if (shift == 0) state.threshold = s.prefix;
        counters[b] = 0;
    }
}

// The draw, one token per row: Gumbel-max over the allowed set (the keys >= rows[b].threshold where `selected`,
// else every index). Indices 4j .. 4j + 3 go together, the four outputs of the Philox block at counter j + 1, which is
// skipped where none of them is allowed. `seed_step`: {seed, step}; `temperature` > 0.
template <typename T>
__global__ void __launch_bounds__(SAMPLE_THREADS) sample_draw(
    const T* __restrict__ logits, long long row_stride, int vocab, const unsigned long long* __restrict__ seed_step,
    float temperature, int selected, const SampleRow* rows, SamplePart* parts, int* counters,
    int* __restrict__ tokens) {
    follow_previous_kernel();
    __shared__ double score_scratch[SAMPLE_WARPS];
    __shared__ unsigned index_scratch[SAMPLE_WARPS];
    const unsigned b = blockIdx.x, splits = gridDim.y;
    const T* __restrict__ row = logits + b * row_stride;
    const unsigned threshold = selected ? rows[b].threshold : 0u;
    const double t = exact_double(temperature);
    const unsigned long long seed = seed_step[0], step = seed_step[1];
    const Slice slice = row_slice(static_cast<unsigned>(vocab));
    double best = neg_inf64();
    unsigned best_index = 0xFFFFFFFFu;
    for_each_group<4, 2>(row, slice, [&](const T* v, unsigned first) {
        double scaled[4];  // l / T, before Philox's registers are live
        bool allowed[4], any = false;
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            allowed[w] = first + w < slice.end && order_key(v[w]) >= threshold;
            if (allowed[w]) scaled[w] = exact_double(v[w]) / t;
            any |= allowed[w];
        }
        if (!any) return;
        unsigned long long c[4] = {first / 4 + 1ull, step, b, 0ull};
        philox4x64_10(c, seed, 0ull);
#pragma unroll
        for (int w = 0; w < 4; ++w) {
            if (!allowed[w]) continue;
            const double score = scaled[w] + -log(-log(open_uniform(c[w])));
            if (ahead(score, first + w, best, best_index)) best = score, best_index = first + w;
        }
    });
    unsigned token = block_argmax(best, best_index, score_scratch, index_scratch);
    if (splits > 1) {
        SamplePart* row_parts = parts + static_cast<size_t>(b) * splits;
        if (threadIdx.x == 0) row_parts[blockIdx.y].best_score = best, row_parts[blockIdx.y].best_index = token;
        if (!last_block_done(counters + b, splits)) return;
        best = neg_inf64(), best_index = 0xFFFFFFFFu;
        for (unsigned p = threadIdx.x; p < splits; p += SAMPLE_THREADS) {
            const double score = __ldcg(&row_parts[p].best_score);
            const unsigned index = __ldcg(&row_parts[p].best_index);
            if (ahead(score, index, best, best_index)) best = score, best_index = index;
        }
        token = block_argmax(best, best_index, score_scratch, index_scratch);
    }
    if (threadIdx.x == 0) {
        tokens[b] = static_cast<int>(token);
        if (splits > 1) counters[b] = 0;
    }
}

constexpr int GREEDY_THREADS = 256;

// Greedy: the first index of each row's largest logit, into tokens[b]. Grid (B, splits): block s of row b takes the
// s-th of `splits` contiguous slices of the row's whole 16-byte vectors, counted from the row's first 16-byte boundary
// (a slice ends on a multiple of 8 elements; the few elements before that boundary and after the last whole vector go
// to the last block), each thread 16 elements a pass, all loaded before any is compared. With one block a row it
// writes the token; else each block writes its largest argmax_key to partials [B, splits] and the last block of row b
// to finish (counters [B]: zero between launches, reset by it) takes the largest of the row's partials, read in split
// order, and writes the token. The max of argmax_keys keeps the first index of the maximum whatever the order.
template <typename T>
__global__ void __launch_bounds__(GREEDY_THREADS) greedy_tokens(
    const T* __restrict__ logits, long long row_stride, int vocab, unsigned long long* partials, int* counters,
    int* __restrict__ tokens) {
    follow_previous_kernel();
    // A thread's 16 elements a pass are AHEAD vectors; a slice is a whole number of GRAIN vectors (8 elements).
    constexpr unsigned VEC = 16 / sizeof(T), AHEAD = 16 / VEC, GRAIN = 8 / VEC;
    using V = Vec<T, VEC>;
    __shared__ unsigned long long scratch[GREEDY_THREADS / 32];
    const unsigned b = blockIdx.x, s = blockIdx.y, splits = gridDim.y, n = static_cast<unsigned>(vocab);
    const T* __restrict__ row = logits + b * row_stride;
    // [0, head): before the row's first 16-byte boundary; then `vectors` whole vectors; [rest, n): after them.
    const unsigned head = min(n, static_cast<unsigned>((16 - reinterpret_cast<size_t>(row) % 16) % 16 / sizeof(T)));
    const unsigned vectors = (n - head) / VEC, rest = head + vectors * VEC;
    const unsigned per = ((vectors + splits - 1) / splits + GRAIN - 1) / GRAIN * GRAIN;  // vectors a slice
    const unsigned end = min(vectors, (s + 1) * per);
    const V* __restrict__ body = reinterpret_cast<const V*>(row + head);
    unsigned long long best = 0;
    for (unsigned v = s * per + threadIdx.x; v < end; v += AHEAD * GREEDY_THREADS) {
        V x[AHEAD];
#pragma unroll
        for (unsigned a = 0; a < AHEAD; ++a)
            if (v + a * GREEDY_THREADS < end) x[a] = body[v + a * GREEDY_THREADS];
#pragma unroll
        for (unsigned a = 0; a < AHEAD; ++a) {
            if (v + a * GREEDY_THREADS >= end) continue;
            const unsigned first = head + (v + a * GREEDY_THREADS) * VEC;
#pragma unroll
            for (unsigned g = 0; g < VEC; ++g) best = max(best, argmax_key(x[a].v[g], first + g));
        }
    }
    if (s == splits - 1 && threadIdx.x < head + (n - rest)) {  // fewer than 2 VEC elements
        const unsigned i = threadIdx.x < head ? threadIdx.x : rest + (threadIdx.x - head);
        best = max(best, argmax_key(row[i], i));
    }
    best = block_max<GREEDY_THREADS>(best, scratch);
    if (splits == 1) {
        if (threadIdx.x == 0) tokens[b] = static_cast<int>(~static_cast<unsigned>(best));
        return;
    }
    unsigned long long* row_partials = partials + static_cast<size_t>(b) * splits;
    if (threadIdx.x == 0) row_partials[s] = best;
    if (!last_block_done(counters + b, splits)) return;
    best = 0;
    for (unsigned i = threadIdx.x; i < splits; i += GREEDY_THREADS) best = max(best, __ldcg(row_partials + i));
    best = block_max<GREEDY_THREADS>(best, scratch);
    if (threadIdx.x == 0) tokens[b] = static_cast<int>(~static_cast<unsigned>(best)), counters[b] = 0;
}

}  // namespace ct
