"""sample_tokens and sample_reference: the Philox counter mapping against a Philox4x64-10 written here and NumPy's
generator; the draw's rules (greedy ties, the top-k and top-p sets with their ties, draws by seed, step and row);
draw frequencies against the restricted softmax on a small vocabulary; argument checks. On a GPU: the kernels'
tokens equal the reference's (fp16, bf16, fp32; a [B, 1, V] view; replayed in a CUDA graph with the step advanced
on the device); greedy on several blocks a row equals numpy.argmax (ties across the blocks' slices, -inf, strided
views, any number of blocks, repeated launches and graph replays leaving the counters at zero)."""

import math

import numpy
import pytest

from cupy_transformer import ops
from cupy_transformer.ops.sampling import allowed_tokens, philox_uniforms, sample_reference
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import random, side_stream

M0, M1 = 0xD2E7470EE14C6C93, 0xCA5A826395121157
W0, W1 = 0x9E3779B97F4A7C15, 0xBB67AE8584CAA73B
MASK = 2**64 - 1


def philox4x64_10(counter, key):
    """Philox4x64-10 as kernels_cu/sampling.cu computes it, on Python ints: ten rounds of two 64 x 64 -> 128-bit
    products (high and low halves, the kernel's __umul64hi and the low product), the key bumped by the Weyl
    constants between rounds."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        p0, p1 = M0 * c0, M1 * c2
        c0, c1, c2, c3 = (p1 >> 64) ^ c1 ^ k0, p1 & MASK, (p0 >> 64) ^ c3 ^ k1, p0 & MASK
        k0, k1 = (k0 + W0) & MASK, (k1 + W1) & MASK
    return c0, c1, c2, c3


def test_philox_rounds_give_random123s_known_answers():
    assert philox4x64_10((0, 0, 0, 0), (0, 0)) == (
        0x16554D9ECA36314C,
        0xDB20FE9D672D0FDC,
        0xD7E772CEE186176B,
        0x7E68B68AEC7BA23B,
    )
    assert philox4x64_10((MASK,) * 4, (MASK, MASK)) == (
        0x87B092C3013FE90B,
        0x438C3C67BE8D0224,
        0x9CC7D7C69CD777B6,
        0xA09CAEBF594F0BA0,
    )


def test_numpy_increments_the_counter_before_each_block():
    """NumPy's Philox from counter c gives the block at c + 1 first and then holds c + 1: so the NumPy twin starts at
    counter (0, step, row, 0) for the kernel's blocks (1, step, row, 0), (2, step, row, 0), ..."""
    generator = numpy.random.Philox(
        key=numpy.array([5, 0], numpy.uint64), counter=numpy.array([0, 7, 3, 0], numpy.uint64)
    )
    assert [int(w) for w in generator.random_raw(4)] == list(philox4x64_10((1, 7, 3, 0), (5, 0)))
    assert generator.state["state"]["counter"].tolist() == [1, 7, 3, 0]
    assert [int(w) for w in generator.random_raw(4)] == list(philox4x64_10((2, 7, 3, 0), (5, 0)))


@pytest.mark.parametrize(
    "seed, step, row", [(0, 0, 0), (12345, 678, 3), (MASK, MASK, 15), (2**63 + 1, 2**40, 2**31 - 1)]
)
def test_a_rows_uniforms_are_the_kernels_philox_blocks(seed, step, row):
    """u_{4j+w} comes from word w of the block at counter (j + 1, step, row, 0), key (seed, 0), its top 52 bits plus a
    half, times 2^-52; 10 draws end inside a block."""
    words = [w for j in range(3) for w in philox4x64_10((j + 1, step, row, 0), (seed, 0))][:10]
    assert philox_uniforms(seed, step, row, 10).tolist() == [((w >> 12) + 0.5) * 2.0**-52 for w in words]


def test_uniforms_stay_inside_the_open_interval():
    """From 52 bits the extremes are 2^-53 and 1 - 2^-53, where -log(-log(u)) is finite; from 53 bits plus a half the
    largest would round to 1."""
    lowest, highest = (0 + 0.5) * 2.0**-52, ((MASK >> 12) + 0.5) * 2.0**-52
    assert (lowest, highest) == (2.0**-53, 1 - 2.0**-53)
    assert numpy.isfinite(-numpy.log(-numpy.log([lowest, highest]))).all()
    assert (numpy.float64(MASK >> 11) + 0.5) * 2.0**-53 == 1.0


def test_greedy_takes_the_first_index_of_the_maximum():
    logits = numpy.array(
        [[1, 3, 3, 2], [-0.0, 0.0, -1, -0.0], [5, 5, 5, 5], [-numpy.inf, -1, 4, -numpy.inf]], numpy.float16
    )
    assert sample_reference(logits, seed=1, step=2).tolist() == [1, 0, 0, 2]
    assert sample_reference(logits, 1, 2, temperature=0.0, top_k=1, top_p=0.1).tolist() == [1, 0, 0, 2]


def test_top_k_keeps_every_value_tied_at_the_boundary():
    row = numpy.array([3.0, 1.0, 3.0, 3.0, 0.0, 2.0])
    assert allowed_tokens(row, 1.0, 2, 1.0).tolist() == [True, False, True, True, False, False]  # 2nd largest: 3
    assert allowed_tokens(row, 1.0, 4, 1.0).tolist() == [True, False, True, True, False, True]  # 4th largest: 2
    for keeps_all in (0, 6, 100):
        assert allowed_tokens(row, 1.0, keeps_all, 1.0).all()


def test_top_p_keeps_the_levels_that_first_reach_the_mass():
    """Masses at T = 1: 1, e^-1, e^-1, e^-2 (sum 1.871); the levels reach 53.4%, 92.8% (both 1s together) and 100%.
    Under top_k 2, which keeps both 1s, the level 2 holds 57.6% of what is left."""
    row = numpy.array([2.0, 1.0, 1.0, 0.0])
    assert allowed_tokens(row, 1.0, 0, 0.5).tolist() == [True, False, False, False]
    assert allowed_tokens(row, 1.0, 0, 0.6).tolist() == [True, True, True, False]
    assert allowed_tokens(row, 1.0, 0, 0.95).all()
    assert allowed_tokens(row, 1.0, 2, 0.55).tolist() == [True, False, False, False]
    assert allowed_tokens(row, 1.0, 2, 0.6).tolist() == [True, True, True, False]
    assert allowed_tokens(row, 1.0, 0, 1e-30).tolist() == [True, False, False, False]  # never empty


@pytest.mark.parametrize("top_k, top_p", [(5, 1.0), (0, 0.7), (20, 0.9), (1, 1.0)])
def test_draws_stay_in_the_allowed_set(rng, top_k, top_p):
    logits = numpy.round(random(rng, (8, 60), numpy.float32, scale=3.0))  # integers: many ties at the boundaries
    for step in range(50):
        tokens = sample_reference(logits, 3, step, 1.1, top_k, top_p)
        for row, token in zip(logits.astype(numpy.float64), tokens):
            assert allowed_tokens(row, float(numpy.float32(1.1)), top_k, float(numpy.float32(top_p)))[token]


def test_draws_repeat_by_seed_step_and_row(rng):
    logits = random(rng, (4, 300), numpy.float16, scale=2.0)
    tokens = sample_reference(logits, 7, 11, 1.0, 20, 0.9)
    assert (sample_reference(logits, 7, 11, 1.0, 20, 0.9) == tokens).all()
    changed = logits.copy()
    changed[[0, 1, 3]] = random(rng, (3, 300), numpy.float16, scale=2.0)
    assert sample_reference(changed, 7, 11, 1.0, 20, 0.9)[2] == tokens[2]  # row 2's draw uses row 2 alone


def test_steps_rows_and_seeds_draw_apart():
    """Over a flat 1000-token row, 20 steps, 20 rows or 20 seeds give at least 18 distinct tokens (20 independent
    uniform draws repeat a token with probability 17%, twice 1.5%)."""
    flat = numpy.zeros((20, 1000), numpy.float32)
    by_step = {int(sample_reference(flat[:1], 1, step, 1.0)[0]) for step in range(20)}
    by_row = set(sample_reference(flat, 1, 0, 1.0).tolist())
    by_seed = {int(sample_reference(flat[:1], seed, 0, 1.0)[0]) for seed in range(20)}
    assert min(len(by_step), len(by_row), len(by_seed)) >= 18


@pytest.mark.parametrize(
    "temperature, top_k, top_p, allowed",
    [
        (1.0, 0, 1.0, [0, 1, 2, 3, 4, 5, 6]),
        (0.7, 3, 1.0, [0, 2, 5]),
        (1.3, 0, 0.8, [0, 1, 2, 4, 5]),
        (1.0, 4, 0.64, [2, 5]),  # over all seven, 0.64 would keep the 1.0 too
    ],
)
def test_draw_frequencies_follow_the_restricted_softmax(temperature, top_k, top_p, allowed):
    """20,000 draws (100 rows x 200 steps) from a 7-token vocabulary: each allowed token's frequency lies within 4.5
    standard errors, sqrt(p (1 - p) / n), of softmax(l / T) over the allowed set; no other token is drawn."""
    logits = numpy.array([1.0, 0.5, 2.0, -1.0, 0.5, 1.5, 0.0])
    rows = numpy.tile(logits, (100, 1))
    counts = sum(
        numpy.bincount(sample_reference(rows, 2024, step, temperature, top_k, top_p), minlength=7)
        for step in range(200)
    )
    assert numpy.flatnonzero(counts).tolist() == allowed
    p = numpy.zeros(7)
    p[allowed] = numpy.exp(logits[allowed] / temperature)
    p /= p.sum()
    n = counts.sum()
    standard_error = numpy.sqrt(p * (1 - p) / n)
    assert (numpy.abs(counts / n - p) <= 4.5 * standard_error).all(), (counts / n, p)


def test_numpy_arrays_run_the_reference_into_tokens(rng):
    sequence = random(rng, (3, 4, 50), numpy.float32, scale=2.0)
    last = sequence[:, -1:]  # [B, 1, V]: rows 200 values apart
    tokens = numpy.full(3, -1, numpy.int32)
    state = numpy.array([9, 4], numpy.uint64)
    assert ops.sample_tokens(last, tokens, state, temperature=0.8, top_k=10) is tokens
    assert tokens.tolist() == sample_reference(sequence[:, -1], 9, 4, 0.8, 10).tolist()
    ops.sample_tokens(sequence[:, -1], tokens, state)
    assert tokens.tolist() == sequence[:, -1].argmax(axis=1).tolist()


def _bad(**change):
    arguments = dict(
        logits=numpy.zeros((2, 5), numpy.float16),
        tokens=numpy.zeros(2, numpy.int32),
        seed_step=numpy.array([1, 2], numpy.uint64),
    )
    arguments.update(change)
    return arguments


@pytest.mark.parametrize(
    "arguments, error, message",
    [
        (
            _bad(logits=numpy.zeros(5, numpy.float16)),
            ValueError,
            r"logits: expected a \[batch, vocab\] or \[batch, 1, vocab\] array; got shape \(5,\)",
        ),
        (_bad(logits=numpy.zeros((2, 3, 5), numpy.float16)), ValueError, r"got shape \(2, 3, 5\)"),
        (
            _bad(logits=numpy.zeros((2, 5), numpy.int32)),
            TypeError,
            r"logits: expected dtype float16, float32, bfloat16; got int32",
        ),
        (_bad(logits=numpy.zeros((2, 0), numpy.float16)), ValueError, r"logits: expected at least one value a row"),
        (
            _bad(logits=numpy.zeros((2, 10), numpy.float16)[:, ::2]),
            ValueError,
            r"logits: expected consecutive values in a row .*got strides \(20, 4\)",
        ),
        (_bad(logits=[[0.0, 1.0]]), TypeError, r"logits: expected a CuPy array, a NumPy array"),
        (_bad(tokens=numpy.zeros(2, numpy.int64)), TypeError, r"tokens: expected dtype int32; got int64"),
        (_bad(tokens=numpy.zeros(3, numpy.int32)), ValueError, r"tokens: expected shape \(2,\); got \(3,\)"),
        (_bad(seed_step=numpy.array([1, 2], numpy.int64)), TypeError, r"seed_step: expected dtype uint64; got int64"),
        (_bad(seed_step=numpy.zeros(3, numpy.uint64)), ValueError, r"seed_step: expected shape \(2,\); got \(3,\)"),
        (_bad(temperature=-0.5), ValueError, r"temperature: expected a finite number >= 0 \(0: greedy\); got -0.5"),
        (_bad(temperature=math.nan), ValueError, r"temperature: .* got nan"),
        (_bad(temperature=1e39), ValueError, r"temperature: .* got 1e\+39"),  # past float32
        (_bad(temperature=True), ValueError, r"temperature: .* got True"),
        (_bad(top_k=-1), ValueError, r"top_k: expected an integer >= 0 \(0: no top-k cut\); got -1"),
        (_bad(top_k=2.0), ValueError, r"top_k: .* got 2.0"),
        (_bad(top_p=0.0), ValueError, r"top_p: expected a number in \(0, 1\] \(1: no top-p cut\); got 0.0"),
        (_bad(top_p=1.5), ValueError, r"top_p: .* got 1.5"),
        (_bad(top_p=math.nan), ValueError, r"top_p: .* got nan"),
        (_bad(splits=0), ValueError, r"splits: expected an integer in \[1, 256\] or None; got 0"),
        (_bad(splits=257), ValueError, r"splits: .* got 257"),
        (_bad(splits=2.0), ValueError, r"splits: .* got 2.0"),
    ],
)
def test_bad_arguments_name_the_argument(arguments, error, message):
    with pytest.raises(error, match=message):
        ops.sample_tokens(**arguments)


# --- GPU ---

GPU_VOCABS = [7, 1000, 50257, 128256]
GPU_CUTS = [(top_k, top_p) for top_k in (0, 1, 5, 50) for top_p in (1.0, 0.9, 0.5)]


def _state(seed, step):
    import cupy

    return cupy.asarray(numpy.array([seed, step], numpy.uint64))


@pytest.mark.gpu
@pytest.mark.parametrize("temperature", [0.0, 0.7, 1.3])
@pytest.mark.parametrize("vocab", GPU_VOCABS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_kernel_draws_the_references_tokens(rng, dtype, vocab, temperature):
    """Batches 1, 3 and 16, every (top_k, top_p) of the grid, a fresh seed each: every token equals the reference's,
    written over tokens prefilled with -1."""
    import cupy

    for batch in (1, 3, 16):
        logits = random(rng, (batch, vocab), dtype, scale=4.0)
        on_gpu = cupy.asarray(logits)
        for step, (top_k, top_p) in enumerate(GPU_CUTS):
            seed = int(rng.integers(2**64, dtype=numpy.uint64))
            tokens = cupy.full(batch, -1, cupy.int32)
            ops.sample_tokens(on_gpu, tokens, _state(seed, step), temperature, top_k, top_p)
            expected = sample_reference(logits, seed, step, temperature, top_k, top_p)
            assert tokens.get().tolist() == expected.tolist(), (batch, top_k, top_p)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_kernel_keeps_ties_and_never_draws_minus_infinity(rng, dtype):
    """Integer logits (thousands of ties at every top-k and top-p boundary), a third of them -inf."""
    import cupy

    logits = rng.integers(-3, 4, (16, 50257)).astype(dtype)
    logits[:, rng.integers(0, 50257, 50257 // 3)] = -numpy.inf
    for step, (top_k, top_p) in enumerate(GPU_CUTS + [(5000, 0.3), (20000, 1.0)]):
        tokens = cupy.full(16, -1, cupy.int32)
        ops.sample_tokens(cupy.asarray(logits), tokens, _state(77, step), 0.9, top_k, top_p)
        got = tokens.get()
        assert got.tolist() == sample_reference(logits, 77, step, 0.9, top_k, top_p).tolist(), (top_k, top_p)
        assert numpy.isfinite(logits[numpy.arange(16), got].astype(numpy.float32)).all()


@pytest.mark.gpu
def test_kernel_reads_the_rows_of_a_strided_view(rng):
    import cupy

    sequence = random(rng, (4, 3, 1001), numpy.float16, scale=3.0)
    last = cupy.asarray(sequence)[:, -1:]  # [B, 1, V]: rows 3003 values apart
    tokens = cupy.full(4, -1, cupy.int32)
    ops.sample_tokens(last, tokens, _state(5, 6), 0.9, 50, 0.9)
    assert tokens.get().tolist() == sample_reference(sequence[:, -1], 5, 6, 0.9, 50, 0.9).tolist()


@pytest.mark.gpu
def test_a_captured_graph_draws_each_steps_tokens_as_the_step_advances_on_the_device(rng):
    """The sampler and a step increment captured once; each replay draws the reference's tokens for the next step."""
    import cupy

    logits = random(rng, (3, 50257), FLOAT_DTYPES[-1], scale=4.0)
    on_gpu = cupy.asarray(logits)
    tokens = cupy.full(3, -1, cupy.int32)
    state = _state(2024, 0)
    stream = side_stream()
    with stream:
        ops.sample_tokens(on_gpu, tokens, state, 0.8, 40, 0.95)  # compile and load before the capture
        state[1:] += 1
        state[...] = _state(2024, 5)
        stream.synchronize()
        stream.begin_capture()
        ops.sample_tokens(on_gpu, tokens, state, 0.8, 40, 0.95)
        state[1:] += 1
        graph = stream.end_capture()
        for step in range(5, 15):
            tokens.fill(-1)
            graph.launch(stream)
            assert tokens.get().tolist() == sample_reference(logits, 2024, step, 0.8, 40, 0.95).tolist(), step
        assert state.get().tolist() == [2024, 15]


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64, 256])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_sampling_draws_the_references_tokens_for_any_number_of_blocks(rng, dtype, splits):
    """Vocabularies 7 (blocks with empty slices) and 5003, every cut of the grid and deeper ones: rows normal, rows
    of small integers (ties at every boundary), rows whose first 60% are -inf (slices with nothing but -inf, whose
    top_p weights the merge must not turn into NaN). The stream's counters are zero afterwards."""
    import cupy

    from cupy_transformer.runtime.kernels import split_workspace

    stream = side_stream()
    with stream:
        for vocab in (7, 5003):
            logits = random(rng, (6, vocab), numpy.float32, scale=4.0)
            logits[1::3] = rng.integers(-4, 5, logits[1::3].shape)
            logits[2::3, : vocab * 3 // 5] = -numpy.inf
            logits = logits.astype(dtype)
            on_gpu = cupy.asarray(logits)
            for step, (top_k, top_p) in enumerate(GPU_CUTS + [(1000, 0.2), (3, 0.999)]):
                tokens = cupy.full(6, -1, cupy.int32)
                ops.sample_tokens(on_gpu, tokens, _state(31, step), 0.8, top_k, top_p, splits=splits)
                expected = sample_reference(logits, 31, step, 0.8, top_k, top_p)
                assert tokens.get().tolist() == expected.tolist(), (vocab, top_k, top_p)
        stream.synchronize()
        assert not split_workspace(0, 0)[1][:64].any()


# --- GPU: greedy on several blocks a row ---

GREEDY_VOCABS = [1, 7, 50257, 100003, 128256]  # 100003: prime


def _greedy_logits(rng, batch, vocab, dtype):
    """Rows of every kind greedy must order: even rows small integers (hundreds of ties at the maximum, spread over
    every block's slice), odd rows normal; a third of the entries -inf; the last row all -inf (the first index)."""
    logits = random(rng, (batch, vocab), numpy.float32, scale=4.0)
    logits[::2] = rng.integers(-50, 50, logits[::2].shape)
    logits[rng.random((batch, vocab)) < 1 / 3] = -numpy.inf
    if batch > 1:
        logits[-1] = -numpy.inf
    return logits.astype(dtype)


def _first_argmax(logits):
    """numpy.argmax in float64: the first index of the maximum."""
    return numpy.asarray(logits).astype(numpy.float64).argmax(axis=-1).tolist()


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", GREEDY_VOCABS)
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_greedy_equals_numpy_argmax(rng, dtype, vocab):
    """Batches 1, 3, 17 and 64 (the blocks a row from sample_splits: up to 32 at 128256, fewer as the batch fills
    the GPU), over tokens prefilled with -1."""
    import cupy

    for batch in (1, 3, 17, 64):
        logits = _greedy_logits(rng, batch, vocab, dtype)
        tokens = cupy.full(batch, -1, cupy.int32)
        ops.sample_tokens(cupy.asarray(logits), tokens, _state(1, 2))
        assert tokens.get().tolist() == _first_argmax(logits), batch


def _slice_starts(address, itemsize, vocab, splits):
    """Where greedy_tokens' blocks start in a row at ``address`` (kernels_cu/sampling.cu: whole 16-byte vectors from
    the row's first 16-byte boundary, ceil(vectors / splits) a block rounded up to 8 elements), with the first
    whole vector's index and the first index after the last (the elements before and after go to the last block)."""
    vec = 16 // itemsize
    head = min(vocab, (16 - address % 16) % 16 // itemsize)
    vectors = (vocab - head) // vec
    per = -(-vectors // splits)
    per = -(-per // (8 // vec)) * (8 // vec)
    starts = [head + k * per * vec for k in range(1, splits) if k * per < vectors]
    return starts, head, head + vectors * vec


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [2, 5, 13, 256])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_greedy_ties_across_the_blocks_go_to_the_first_index(rng, dtype, splits):
    """Each row holds its maximum twice, at the two sides of one edge of the kernel's slicing: the last element of a
    block's slice and the first of the next one's; the element before the first whole vector (the last block's) and
    the first; the last whole vector's last element and the one after it (the last block's). The edges are spread
    over the batch's rows; the first index wins. Rows vocab + 1 elements apart, starting one element in, so that
    their 16-byte alignments differ."""
    import cupy

    vocab, batch = 50257, 64
    rows = cupy.asarray(random(rng, (batch, vocab + 1), dtype, scale=1.0))[:, 1:]
    pairs = []
    for b in range(batch):
        starts, head, rest = _slice_starts(rows[b].data.ptr, rows.itemsize, vocab, splits)
        edges = [(head - 1, head)] if 0 < head < vocab else []
        edges += [(rest - 1, rest)] if 0 < rest < vocab else []
        edges += [(start - 1, start) for start in starts]
        pairs.append(edges[b * len(edges) // batch])
    host = rows.get()
    for b, (i, j) in enumerate(pairs):
        host[b, [i, j]] = 100
    rows[...] = cupy.asarray(host)
    tokens = cupy.full(rows.shape[0], -1, cupy.int32)
    ops.sample_tokens(rows, tokens, _state(1, 2), splits=splits)
    assert tokens.get().tolist() == [i for i, _ in pairs] == _first_argmax(host)


@pytest.mark.gpu
@pytest.mark.parametrize("splits", [1, 2, 3, 7, 64, 256])
@pytest.mark.parametrize("vocab", [7, 4097, 50257])
def test_greedy_gives_one_answer_for_any_number_of_blocks(rng, vocab, splits):
    """Blocks with empty slices (more blocks than vectors) included."""
    import cupy

    logits = _greedy_logits(rng, 5, vocab, numpy.float16)
    tokens = cupy.full(5, -1, cupy.int32)
    ops.sample_tokens(cupy.asarray(logits), tokens, _state(1, 2), splits=splits)
    assert tokens.get().tolist() == _first_argmax(logits)


@pytest.mark.gpu
@pytest.mark.parametrize("vocab", [7, 50257])
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
def test_greedy_reads_the_rows_of_a_strided_view(rng, dtype, vocab):
    """The last position of [B, 3, V] logits: rows 3 V elements apart, each at its own 16-byte alignment."""
    import cupy

    sequence = _greedy_logits(rng, 12, 3 * vocab, dtype).reshape(12, 3, vocab)
    tokens = cupy.full(12, -1, cupy.int32)
    ops.sample_tokens(cupy.asarray(sequence)[:, -1:], tokens, _state(1, 2))
    assert tokens.get().tolist() == _first_argmax(sequence[:, -1])


@pytest.mark.gpu
def test_greedy_launches_leave_the_counters_at_zero(rng):
    """Launch after launch on one stream (new logits each time, batches that use different counters) and then
    replays of a captured launch: each gives numpy.argmax, and the stream's counters are zero afterwards."""
    import cupy

    from cupy_transformer.runtime.kernels import split_workspace

    stream = side_stream()
    with stream:
        for launch in range(6):
            batch = (17, 3, 64)[launch % 3]
            logits = _greedy_logits(rng, batch, 128256, numpy.float16)
            tokens = cupy.full(batch, -1, cupy.int32)
            ops.sample_tokens(cupy.asarray(logits), tokens, _state(1, 2))
            assert tokens.get().tolist() == _first_argmax(logits), launch
        assert not split_workspace(0, 0)[1][:64].any()

        on_gpu = cupy.empty((17, 50257), numpy.float16)
        tokens = cupy.full(17, -1, cupy.int32)
        state = _state(1, 2)
        stream.begin_capture()
        ops.sample_tokens(on_gpu, tokens, state)
        graph = stream.end_capture()
        for replay in range(5):
            logits = _greedy_logits(rng, 17, 50257, numpy.float16)
            on_gpu[...] = cupy.asarray(logits)
            tokens.fill(-1)
            graph.launch(stream)
            assert tokens.get().tolist() == _first_argmax(logits), replay
        stream.synchronize()
        assert not split_workspace(0, 0)[1][:64].any()
