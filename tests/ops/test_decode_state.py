"""end_step and end_step_reference: the tokens into the ring's row of the step's parity, positions and lengths
advanced or not, the step counter, [B] and [B, 1] arrays, the tokens taken from a greedy LM head's keys (``best``),
argument checks. On a GPU: the kernel equals the
reference (batches of one, several and more than one block's threads; even, odd and past-2^32 steps; a ring in
page-locked host memory as the decoder keeps it, and on the device), the other ring row untouched, and two replays
of a captured launch fill both rows in turn."""

import numpy
import pytest

from cupy_transformer.ops.decode_state import argmax_index, end_step, end_step_reference
from tests.helpers import side_stream


def _state(rng, batch, step):
    ids = rng.integers(0, 50000, batch).astype(numpy.int32)
    positions = rng.integers(0, 4000, (batch, 1)).astype(numpy.int32)
    lengths = rng.integers(0, 4000, batch).astype(numpy.int32)
    seed_step = numpy.array([12345, step], numpy.uint64)
    ring = rng.integers(-(2**31), 2**31, (2, batch)).astype(numpy.int32)
    return ids, positions, lengths, seed_step, ring


@pytest.mark.parametrize("step", [0, 1, 2**33 + 7])
@pytest.mark.parametrize("advance", [True, False])
def test_reference_writes_the_steps_row_and_advances(rng, step, advance):
    ids, positions, lengths, seed_step, ring = _state(rng, 5, step)
    before = [a.copy() for a in (positions, lengths, ring)]
    end_step(ids, positions, lengths, seed_step, ring, advance=advance)
    assert ring[step % 2].tolist() == ids.tolist() and ring[1 - step % 2].tolist() == before[2][1 - step % 2].tolist()
    assert positions.tolist() == (before[0] + advance).tolist() and lengths.tolist() == (before[1] + advance).tolist()
    assert seed_step.tolist() == [12345, step + 1]


def _keys(rng, batch):
    """Greedy keys as the GEMV leaves them: a value's 32-bit order key above the bitwise not of its index."""
    tokens = rng.integers(0, 2**31, batch).astype(numpy.uint64)
    high = rng.integers(0, 2**32, batch).astype(numpy.uint64)
    return tokens.astype(numpy.int32), high << numpy.uint64(32) | (~tokens & numpy.uint64(0xFFFFFFFF))


def test_reference_takes_the_tokens_from_best(rng):
    """With ``best``, the ids are each key's index (the GEMV's greedy epilogue packs ~index in the low 32 bits), then
    the step ends as without it, and ``best`` is zeroed for the next step's head."""
    ids, positions, lengths, seed_step, ring = _state(rng, 6, 3)
    tokens, best = _keys(rng, 6)
    assert argmax_index(best).tolist() == tokens.tolist()
    end_step(ids, positions, lengths, seed_step, ring, best=best)
    assert ids.tolist() == tokens.tolist() and ring[1].tolist() == tokens.tolist() and not best.any()
    assert seed_step.tolist() == [12345, 4]
    with pytest.raises(ValueError, match=r"best: expected shape \(6,\); got \(5,\)"):
        end_step(ids, positions, lengths, seed_step, ring, best=best[:5])


def test_argument_checks(rng):
    ids, positions, lengths, seed_step, ring = _state(rng, 3, 0)
    with pytest.raises(TypeError, match="ids: expected dtype int32; got int64"):
        end_step(ids.astype(numpy.int64), positions, lengths, seed_step, ring)
    with pytest.raises(ValueError, match=r"positions: expected shape \(3,\) or \(3, 1\); got \(4, 1\)"):
        end_step(ids, numpy.zeros((4, 1), numpy.int32), lengths, seed_step, ring)
    with pytest.raises(ValueError, match=r"lengths: expected shape \(3,\) or \(3, 1\); got \(3, 2\)"):
        end_step(ids, positions, numpy.zeros((3, 2), numpy.int32), seed_step, ring)
    with pytest.raises(TypeError, match="seed_step: expected dtype uint64; got int64"):
        end_step(ids, positions, lengths, seed_step.astype(numpy.int64), ring)
    with pytest.raises(ValueError, match=r"ring: expected shape \(2, 3\); got \(2, 4\)"):
        end_step(ids, positions, lengths, seed_step, numpy.zeros((2, 4), numpy.int32))
    with pytest.raises(ValueError, match="ring: expected a C-contiguous array"):
        end_step(ids, positions, lengths, seed_step, numpy.zeros((4, 3), numpy.int32)[::2])
    assert seed_step.tolist() == [12345, 0]  # nothing ran


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 7, 1500])
@pytest.mark.parametrize("step", [0, 3, 2**33 + 6])
@pytest.mark.parametrize("advance", [True, False])
@pytest.mark.parametrize("pinned", [True, False], ids=["host ring", "device ring"])
def test_gpu_kernel_equals_the_reference(rng, batch, step, advance, pinned):
    import cupy
    import cupyx

    host = _state(rng, batch, step)
    want = [a.copy() for a in host]
    end_step_reference(want[0], want[1], want[2], want[3], want[4], advance)
    ids, positions, lengths, seed_step = (cupy.asarray(a) for a in host[:4])
    if pinned:  # as the decoder keeps it: a CuPy array over page-locked host memory
        ring_host = cupyx.empty_pinned((2, batch), numpy.int32)
        ring_host[...] = host[4]
        memory = cupy.cuda.UnownedMemory(ring_host.ctypes.data, ring_host.nbytes, ring_host, cupy.cuda.Device().id)
        ring = cupy.ndarray(ring_host.shape, ring_host.dtype, cupy.cuda.MemoryPointer(memory, 0))
    else:
        ring = cupy.asarray(host[4])
    end_step(ids, positions, lengths, seed_step, ring, advance=advance)
    cupy.cuda.Device().synchronize()
    got = [a.get() for a in (ids, positions, lengths, seed_step)] + [ring_host if pinned else ring.get()]
    for name, g, w in zip(("ids", "positions", "lengths", "seed_step", "ring"), got, want):
        assert numpy.array_equal(g, w), name


@pytest.mark.gpu
@pytest.mark.parametrize("batch", [1, 7, 1500])
def test_gpu_kernel_takes_the_tokens_from_best(rng, batch):
    """The kernel with ``best`` equals the reference: ids from the keys, the ring's row, ``best`` zeroed."""
    import cupy

    host = _state(rng, batch, 5)
    _, keys = _keys(rng, batch)
    want = [a.copy() for a in host] + [keys.copy()]
    end_step_reference(*want[:5], True, want[5])
    arrays = [cupy.asarray(a) for a in host] + [cupy.asarray(keys)]
    end_step(*arrays[:5], best=arrays[5])
    for name, g, w in zip(("ids", "positions", "lengths", "seed_step", "ring", "best"), arrays, want):
        assert numpy.array_equal(g.get(), w), name


@pytest.mark.gpu
def test_gpu_replays_of_a_captured_launch_fill_the_rows_in_turn(rng):
    import cupy

    ids, positions, lengths, seed_step, ring = (cupy.asarray(a) for a in _state(rng, 4, 0))
    stream = side_stream()
    with stream:
        end_step(ids, positions, lengths, seed_step, ring)  # eager: step 0 -> row 0
        stream.begin_capture()
        end_step(ids, positions, lengths, seed_step, ring)
        graph = stream.end_capture()
        rows = []
        for _ in range(3):
            ids += 1
            graph.launch(stream)
            stream.synchronize()
            rows.append(ring.get().copy())
    for step, r in enumerate(rows, start=1):  # each replay reads the step the one before wrote
        assert r[step % 2].tolist() == (ids - 3 + step).get().tolist()
    assert int(seed_step[1]) == 4
