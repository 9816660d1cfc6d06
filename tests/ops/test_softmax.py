"""SoftmaxOp: masks (2-D, 4-D, additive, boolean), alibi with a head offset, causal with and without a past,
HF GPT-Neo's local window, layer_scale; against a per-row float64 loop written from the docstring's formula."""

import math
import re

import numpy
import pytest

from cupy_transformer import ops
from cupy_transformer.ops.softmax import _VARIANTS, MaskKind, mask_kind, softmax_plan
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import TOL_CHAINED, random, rel_error
from tests.ops.common import on_backend


def row_by_row(s, mask=None, alibi=None, triangular=False, window=None, layer_scale=1.0):
    """float64, one query row at a time: ``mask`` [B, h, Q, K] (additive or bool), ``alibi`` [B, h, K]."""
    s = s.astype(numpy.float64)
    b_, h_, q_, k_ = s.shape
    p = numpy.zeros_like(s)
    for b in range(b_):
        for h in range(h_):
            for i in range(q_):
                position = k_ - q_ + i
                z, keys = [], []
                for j in range(k_):
                    if triangular and j > position:
                        continue
                    if window is not None and j <= position - window:
                        continue
                    v = s[b, h, i, j] * layer_scale
                    if alibi is not None:
                        v += float(alibi[b, h, j])
                    if mask is not None:
                        if mask.dtype == bool:
                            if not mask[b, h, i, j]:
                                continue
                        else:
                            v += float(mask[b, h, i, j])
                    z.append(v)
                    keys.append(j)
                if keys:
                    top = max(z)
                    e = [math.exp(v - top) for v in z]
                    for j, ej in zip(keys, e):
                        p[b, h, i, j] = ej / sum(e)
    return p


def config(dtype, mp_size=1):
    """4 heads on this rank: 4 * mp_size in the whole model."""
    heads = 4 * mp_size
    return ops.InferenceConfig(hidden_size=heads * 8, heads=heads, dtype=dtype, mp_size=mp_size)


CASES = {
    "plain": {},
    "causal prompt": dict(triangular=True),
    "causal with past": dict(triangular=True, past=5),
    "window 3 with past": dict(triangular=True, window=3, past=4),
    "window 2 decode": dict(triangular=True, window=2, q=1, past=9),
    "2-D additive mask": dict(mask="2d"),
    "4-D per-head boolean mask": dict(mask="4d-bool", triangular=True),
    "4-D broadcast additive mask": dict(mask="4d-bcast"),
    "alibi, head offset, layer scale": dict(alibi=True, layer_scale=0.5, mp_size=2, head_offset=4),
}


def inputs(rng, dtype, case, q=6, past=0, b=2, h=4):
    q = case.get("q", q)
    k = q + case.get("past", past)
    mp = case.get("mp_size", 1)
    s = random(rng, (b, h, q, k), dtype, scale=3.0)
    full_mask, mask = None, None
    kind = case.get("mask")
    if kind == "2d":
        mask = numpy.where(rng.random((b, k)) < 0.3, -10000.0, 0.0).astype(dtype)
        full_mask = numpy.broadcast_to(mask[:, None, None, :], s.shape)
    elif kind == "4d-bool":
        mask = rng.random((b, h, q, k)) < 0.7
        mask[0, 1, 2, :] = False  # a row with every key dropped
        full_mask = mask
    elif kind == "4d-bcast":
        mask = random(rng, (b, 1, 1, k), dtype, scale=2.0)
        full_mask = numpy.broadcast_to(mask, s.shape)
    alibi, rows = None, None
    if case.get("alibi"):
        alibi = random(rng, (b * h * mp, 1, k), dtype)
        off = case.get("head_offset", 0)
        rows = alibi.reshape(b, h * mp, k)[:, off : off + h]
    return s, mask, full_mask, alibi, rows


def run(rng, dtype, name, gpu):
    case = CASES[name]
    s, mask, full_mask, alibi, rows = inputs(rng, dtype, case)
    op = ops.SoftmaxOp(config(dtype, mp_size=case.get("mp_size", 1)))
    a = on_backend({"s": s, "mask": mask, "alibi": alibi}, gpu)
    window = case.get("window")
    p = op(
        a["s"],
        a["mask"],
        a["alibi"],
        case.get("triangular", False),
        window is not None,
        window,
        case.get("layer_scale", 1.0),
        case.get("head_offset", 0),
    )
    exact = row_by_row(s, full_mask, rows, case.get("triangular", False), window, case.get("layer_scale", 1.0))
    assert p.shape == s.shape and p.dtype == dtype
    assert rel_error(p, exact) < TOL_CHAINED[numpy.dtype(dtype)]
    return p, exact


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_numpy_path(rng, dtype, name):
    p, exact = run(rng, dtype, name, gpu=False)
    if name == "4-D per-head boolean mask":
        assert (p[0, 1, 2] == 0).all()  # every key dropped: zeros, not NaN


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", CASES)
def test_gpu_path(rng, poisoned_allocations, dtype, name):
    run(rng, dtype, name, gpu=True)


@pytest.mark.parametrize("k", [7, 3001], ids=["one block a row", "chunks over blocks"])
@pytest.mark.parametrize("gpu", [False, pytest.param(True, marks=pytest.mark.gpu)], ids=["numpy", "gpu"])
def test_nan_and_inf_scores_follow_torch(rng, gpu, k):
    """A NaN or +inf score makes its row NaN (torch.softmax's answer), other rows keep their values; a row with
    every key excluded stays zeros (where torch gives NaN: the documented choice). The GPU's maximum skips a NaN
    (fmaxf): its sum must carry it to the whole row."""
    torch = pytest.importorskip("torch")
    s = random(rng, (2, 4, 3, k), numpy.float32)
    s[0, 1, 2, 4] = numpy.nan
    s[1, 3, 0, k - 1] = numpy.inf
    s[1, 0, 1, 2] = -numpy.inf  # one key of a row excluded by its score: a normal row
    keep = numpy.ones((2, 1, 3, k), bool)
    keep[1, 0, 2] = False  # a row with every key excluded
    a = on_backend({"s": s, "keep": keep}, gpu)
    p = ops.SoftmaxOp(config(numpy.float32))(a["s"], a["keep"])
    p = p.get() if gpu else p
    ref = torch.softmax(torch.from_numpy(s).masked_fill(~torch.from_numpy(keep), float("-inf")), -1).numpy()
    nan_rows = numpy.isnan(p).any(-1)
    assert nan_rows.sum() == 2 and nan_rows[0, 1, 2] and nan_rows[1, 3, 0]
    assert numpy.isnan(p[nan_rows]).all() and numpy.isnan(ref[nan_rows]).all()
    assert (p[1, :, 2] == 0).all() and numpy.isnan(ref[1, :, 2]).all()
    normal = ~nan_rows
    normal[1, :, 2] = False
    assert numpy.allclose(p[normal], ref[normal], rtol=1e-5, atol=1e-7)


def test_rows_sum_to_one_and_out_may_be_the_scores(rng):
    s = random(rng, (1, 4, 3, 70001), numpy.float32)  # a row longer than any block's registers
    op = ops.SoftmaxOp(config(numpy.float32))
    p = op(s, triangular=True, out=s)
    assert p is s
    assert numpy.allclose(p.astype(numpy.float64).sum(-1), 1.0, atol=1e-5)
    assert (p[..., -1, 70001 - 3 + 2 + 1 :] == 0).all() and (p[..., 0, 70001 - 3 + 1 :] == 0).all()


@pytest.mark.gpu
def test_gpu_matches_torch_softmax(rng):
    import cupy
    import torch

    s = random(rng, (2, 4, 5, 9), numpy.float32)
    m = numpy.where(rng.random((2, 9)) < 0.3, -1e4, 0.0).astype(numpy.float32)
    ts, tm = torch.from_numpy(s).cuda(), torch.from_numpy(m).cuda()
    causal = torch.ones(5, 9, dtype=torch.bool, device="cuda").tril(9 - 5)
    ref = torch.softmax((ts * 0.5 + tm[:, None, None, :]).masked_fill(~causal, float("-inf")), -1)
    p = ops.SoftmaxOp(config(numpy.float32))(ts, tm, None, True, layer_scale=0.5)
    assert isinstance(p, torch.Tensor)
    assert rel_error(p, ref) < 1e-6
    assert cupy.asarray(p).shape == (2, 4, 5, 9)


LONG = {  # (b, h, q, k), the rule, the mask, alibi: the kernel's paths (a warp a row, a block a row, blocks
    # over chunks of a row), whole 16-byte vectors or not, rows far longer than a block's threads
    "70001 keys, causal past, 2-D bool mask, alibi": ((1, 4, 3, 70001), dict(triangular=True), "2d-bool", True),
    "4104 keys, window 300, per-head additive mask": ((2, 4, 5, 4104), dict(window=300), "4d-head", False),
    "320 keys, a warp or 16 lanes a row, causal past, bool [B,1,Q,K]": (
        (2, 4, 300, 320),
        dict(triangular=True),
        "4d-q",
        True,
    ),
    "1000 keys, 16 lanes a row (fp16), 2-D additive": ((2, 4, 50, 1000), {}, "2d-add", True),
    "1500 keys, few rows: 2 warps or chunks, causal past": ((1, 4, 2, 1500), dict(triangular=True), "2d-add", False),
    "3000 keys, 2 or 4 warps a row": ((2, 4, 40, 3000), dict(triangular=True), "2d-add", True),
    "9000 keys, a block a row (fp16)": ((1, 4, 70, 9000), dict(window=5000), "4d-head", False),
    "20000 keys, few rows: chunks over blocks": ((1, 4, 2, 20000), dict(triangular=True), "2d-add", True),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("name", LONG)
def test_gpu_kernel_on_long_and_many_rows(rng, poisoned_allocations, dtype, name):
    """The kernel against the float64 NumPy path on the same inputs."""
    import cupy

    (b, h, q, k), rule, mask_kind, with_alibi = LONG[name]
    s = random(rng, (b, h, q, k), dtype, scale=3.0)
    mask = {
        "2d-bool": lambda: rng.random((b, k)) < 0.8,
        "2d-add": lambda: numpy.where(rng.random((b, k)) < 0.2, -1e4, 0.0).astype(dtype),
        "4d-head": lambda: numpy.where(rng.random((b, h, 1, k)) < 0.2, -1e4, 0.0).astype(dtype),
        "4d-q": lambda: rng.random((b, 1, q, k)) < 0.9,
    }[mask_kind]()
    alibi = random(rng, (b, h, 1, k), dtype) if with_alibi else None
    op = ops.SoftmaxOp(config(dtype))
    window = rule.get("window")
    args = (rule.get("triangular", False), window is not None, window, 0.7)
    want = op(s, mask, alibi, *args)
    got = op(cupy.asarray(s), cupy.asarray(mask), None if alibi is None else cupy.asarray(alibi), *args)
    assert rel_error(got, want) < TOL_CHAINED[numpy.dtype(dtype)]


def test_plan_takes_rows_by_warp_block_or_chunks():
    """The launcher's rule (lanes a row, vectors a lane, chunks, keys a chunk) on the paths the GPU tests take,
    and its invariants: the chunks cover the row, each fits its lanes' registers, whole vectors."""
    assert softmax_plan(30, 96, 8, 264) == (8, 2, 1, 96)  # 8 lanes a row
    assert softmax_plan(30, 40, 4, 264) == (8, 2, 1, 40)
    assert softmax_plan(30, 15, 1, 264) == (8, 2, 1, 15)
    assert softmax_plan(2400, 320, 8, 264) == (32, 2, 1, 320)  # a warp a row
    assert softmax_plan(2400, 320, 4, 264) == (16, 8, 1, 320)  # 16 lanes
    assert softmax_plan(400, 1000, 8, 264) == (16, 8, 1, 1000)
    assert softmax_plan(2400, 320, 1, 264) == (64, 8, 1, 320)  # warps a row
    assert softmax_plan(4, 2048, 8, 264) == (32, 8, 1, 2048)
    assert softmax_plan(320, 3000, 8, 264) == (64, 8, 1, 3000)  # warps a row
    assert softmax_plan(320, 3000, 4, 264) == (128, 8, 1, 3000)
    assert softmax_plan(280, 9000, 8, 264) == (256, 8, 1, 9000)
    assert softmax_plan(1000, 40000, 8, 264) == (256, 8, 3, 13336)  # past 8 vectors a thread: chunks
    assert softmax_plan(32, 131072, 8, 264) == (256, 8, 8, 16384)  # few rows: cut to fill the GPU
    assert softmax_plan(8, 20000, 8, 264) == (256, 8, 10, 2000)
    assert softmax_plan(8, 4104, 8, 264) == (128, 8, 1, 4104)  # fits 4 warps: not cut
    for rows in (1, 7, 263, 264, 5000):
        for k in (1, 9, 255, 256, 2049, 4096, 16385, 70001, 1 << 20):
            for vec in (8, 4, 1):
                if k % vec:
                    continue
                threads, nv, chunks, chunk = softmax_plan(rows, k, vec, 264)
                assert chunk % vec == 0 and chunk <= threads * vec * nv and (threads, nv, 0) in _VARIANTS
                assert (chunks - 1) * chunk < k <= chunks * chunk
                assert chunks == 1 or (threads, nv) == (256, 8)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("k", [15, 40, 96])
def test_gpu_short_rows_share_a_warp(rng, poisoned_allocations, dtype, k):
    """Rows of 8 lanes, 4 to a warp, with 2 * 3 * 5 = 30 rows: the last warp's last two rows do not exist."""
    import cupy

    s = random(rng, (2, 3, 5, k), dtype, scale=3.0)
    mask = rng.random((2, 1, 5, k)) < 0.8
    op = ops.SoftmaxOp(ops.InferenceConfig(hidden_size=24, heads=3, dtype=dtype))
    got = op(cupy.asarray(s), cupy.asarray(mask), None, True, layer_scale=0.7)
    exact = row_by_row(s, numpy.broadcast_to(mask, s.shape), None, True, None, 0.7)
    assert rel_error(got, exact) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.gpu
def test_gpu_misaligned_mask_and_alibi_views(rng):
    """The kernel reads masks and alibi a 16-byte vector at a time: views 2 bytes off a vector are copied first."""
    import cupy

    k = 64
    s = random(rng, (2, 4, 3, k), numpy.float16, scale=3.0)
    mask = numpy.where(rng.random((2, k)) < 0.3, -1e4, 0.0).astype(numpy.float16)
    alibi = random(rng, (2, 4, 1, k), numpy.float16)
    op = ops.SoftmaxOp(config(numpy.float16))
    want = op(s, mask, alibi, True, layer_scale=0.5)
    views = []
    for a in (mask, alibi):
        view = cupy.zeros(a.size + 1, cupy.float16)[1:].reshape(a.shape)
        view[...] = cupy.asarray(a)
        assert view.data.ptr % 16 != 0
        views.append(view)
    got = op(cupy.asarray(s), views[0], views[1], True, layer_scale=0.5)
    assert rel_error(got, want) < TOL_CHAINED[numpy.dtype(numpy.float16)]


@pytest.mark.gpu
def test_gpu_in_place_and_overlap(rng):
    import cupy

    op = ops.SoftmaxOp(config(numpy.float16))
    s = cupy.asarray(random(rng, (2, 4, 6, 100), numpy.float16))
    want = op(s, triangular=True)
    assert op(s, triangular=True, out=s) is s and rel_error(s, want) == 0
    buffer = cupy.zeros(2 * 4 * 6 * 100 + 100, numpy.float16)
    mask = buffer[:200].reshape(2, 100)
    with pytest.raises(ValueError, match=r"out: must not overlap the input attn_mask"):
        op(s, mask, out=buffer[100:].reshape(2, 4, 6, 100))


def test_bad_inputs_are_named_errors(rng):
    op = ops.SoftmaxOp(config(numpy.float16))
    s = random(rng, (2, 4, 3, 5), numpy.float16)
    with pytest.raises(ValueError, match=r"attn_scores: expected a 4-D array"):
        op(s[0])
    with pytest.raises(ValueError, match=r"attn_scores: expected 4 heads"):
        op(s[:, :2].copy())
    with pytest.raises(TypeError, match=r"attn_scores: expected dtype float16"):
        op(s.astype(numpy.float32))
    with pytest.raises(ValueError, match=r"attn_scores: expected at least one query"):
        op(s[:, :, :0].copy())
    with pytest.raises(ValueError, match=r"attn_mask: expected a 2-D or 4-D array"):
        op(s, numpy.zeros((2, 3, 5), numpy.float16))
    with pytest.raises(ValueError, match=r"attn_mask: expected a \[batch, keys\] = \[2, 5\] mask"):
        op(s, numpy.zeros((2, 6), numpy.float16))
    with pytest.raises(ValueError, match=r"attn_mask: expected a \[2, 1 or 4, 1 or 3, 5\] mask"):
        op(s, numpy.zeros((2, 2, 3, 5), numpy.float16))
    with pytest.raises(TypeError, match=r"attn_mask: expected dtype float16, bool"):
        op(s, numpy.zeros((2, 5), numpy.float32))
    with pytest.raises(ValueError, match=r"alibi: expected \[8, 1, 5\] or \[2, 4, 1, 5\]"):
        op(s, alibi=numpy.zeros((8, 1, 4), numpy.float16))
    with pytest.raises(ValueError, match=r"head_offset: expected an integer in \[0, 0\]"):
        op(s, head_offset=1)
    with pytest.raises(ValueError, match=r"window_size: expected a positive integer"):
        op(s, local_attention=True, window_size=0)
    with pytest.raises(ValueError, match=r"layer_scale: expected a finite number"):
        op(s, layer_scale=float("nan"))
    with pytest.raises(ValueError, match=r"out: expected shape"):
        op(s, out=numpy.empty((2, 4, 3, 6), numpy.float16))


def test_mask_kind_is_the_kernels_enum():
    """MaskKind (what launchers pass as the kernels' mask_kind) holds kernels_cu/mask.cuh's values, and
    mask_kind tells the kinds apart."""
    from cupy_transformer.runtime.kernels import read_source

    body = re.search(r"enum MaskKind : int \{([^}]*)\}", read_source("mask.cuh")).group(1)
    values = {name.strip(): int(value) for name, value in (item.split("=") for item in body.split(","))}
    assert values == {"NO_MASK": MaskKind.NONE, "ADDITIVE_MASK": MaskKind.ADDITIVE, "BOOL_MASK": MaskKind.BOOLEAN}
    assert mask_kind(None) == MaskKind.NONE
    assert mask_kind(numpy.zeros((2, 3), numpy.float16)) == MaskKind.ADDITIVE
    assert mask_kind(numpy.ones((2, 3), bool)) == MaskKind.BOOLEAN
