"""ops/prefill_attention.py (kernels_cu/prefill_attention.cu) and the prefill kernel the op takes: prompts after
pasts in a cache, without one, in grid groups of any span, with scores rising along the keys and on a long
context, against SoftmaxContextOp's NumPy path. Each scenario runs through the op (the launcher's kernel: on an
H100/H200, prefill_attention_sm90.cu at head sizes 64-128) and through prefill_attention there too (the kernel
of other GPUs); test_prefill_attention_sm90.py runs the same scenarios on the Hopper kernel's other
geometries."""

import numpy
import pytest

from cupy_transformer import ops
from cupy_transformer.kv_cache import KVCache
from cupy_transformer.ops.prefill_attention import prefill_attention
from cupy_transformer.ops.prefill_attention_sm90 import PREFILL_SM90_TILE, prefill_attention_sm90, prefill_sm90_runs
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import TOL_CHAINED, random, rel_error
from tests.ops.common import attention_config as cfg
from tests.ops.common import launch_inputs, nan_past

PREFILL_RULES = {  # attention rule, mask, alibi
    "causal": dict(),
    "causal, key mask, alibi": dict(mask="bool", alibi=True),
    "causal, key mask": dict(mask="bool"),
    "bidirectional, key mask": dict(triangular_masking=False, mask="bool"),
    "bidirectional": dict(triangular_masking=False),
    "window 40, additive mask": dict(local_attention=True, window_size=40, mask="additive"),
}


def the_ops_launcher(x, span=None):
    """The launcher the op takes for ``x`` (tests.ops.common.LaunchInputs), with its own geometry."""
    launcher = prefill_attention_sm90 if prefill_sm90_runs(x.q.shape[-1]) else prefill_attention
    return launcher(*x.prefill_args, span=span)


def mma_sync(x, span=None):
    return prefill_attention(*x.prefill_args, span=span)


LAUNCH = {"launcher's": None, "mma.sync": mma_sync}  # None: through the op


@pytest.fixture(params=list(LAUNCH))
def prefill_kernel(request):
    """Which prefill kernel a test runs: the launcher's choice, through the op (on an H100/H200
    prefill_attention_sm90.cu for head sizes 64-128, with one warpgroup a block for short causal or masked
    prompts at 64, persistent blocks for short prompts), or prefill_attention.cu's there too (the kernel of other
    GPUs), through its launcher."""
    from cupy_transformer.runtime.kernels import compute_capability

    if request.param != "launcher's" and compute_capability() != 90:
        pytest.skip("the launcher takes prefill_attention.cu here already")
    return request.param


def skip_the_launchers(prefill_kernel, d):
    """Skips a ``prefill_kernel`` variant (of this file or test_prefill_attention_sm90.py) that runs the
    launcher's own kernel at head size ``d``."""
    if prefill_kernel not in ("launcher's", "two warpgroups") and d not in PREFILL_SM90_TILE:
        pytest.skip("this head size runs prefill_attention.cu already")
    if prefill_kernel == "two warpgroups" and d != 64:
        pytest.skip("this head size runs two warpgroups a block already")


def prefill_on_gpu(op, launch, qkv, attn_mask=None, cache=None, start=None, alibi=None, span=None):
    """The context of a prefill call on the GPU (CuPy inputs): through the op where ``launch`` is None, else
    ``launch(inputs, span)`` with the inputs the op would hand its launcher (tests.ops.common.launch_inputs)."""
    if launch is None:
        return op(qkv, attn_mask, cache, 0, start, alibi=alibi)[0]
    return launch(launch_inputs(op.config, qkv, attn_mask, cache, start, alibi), span)


def after_a_past(rng, launch, dtype, heads, kv, d, rule):
    import cupy

    options = dict(PREFILL_RULES[rule])
    mask_kind, with_alibi = options.pop("mask", None), options.pop("alibi", False)
    c = cfg(dtype, heads=heads, kv=kv, d=d, rotary_dim=d, rotate_half=True, rotate_every_two=False, **options)
    op = ops.SoftmaxContextOp(c)
    pasts, s, room = [0, 50, 130], 77, 224
    content = [random(rng, (1, 3, kv, room, d), dtype) for _ in range(2)]
    caches = [KVCache(1, 3, kv, room, d, dtype, backend=kind) for kind in ("numpy", "cupy")]
    for cache in caches:
        xp = numpy if cache.backend == "numpy" else cupy
        cache.keys[...], cache.values[...] = xp.asarray(content[0]), xp.asarray(content[1])
        if xp is cupy:
            nan_past(cache, pasts)
        cache.set_lengths(pasts)
    qkv = random(rng, (3, s, (heads + 2 * kv) * d), dtype)
    keep = rng.random((3, room)) < 0.8
    mask = {None: None, "bool": keep, "additive": numpy.where(keep, 0.0, -30.0).astype(dtype)}[mask_kind]
    alibi = random(rng, (3, heads, 1, max(pasts) + s), dtype, scale=0.5) if with_alibi else None
    want, _, _ = op(qkv, mask, caches[0], 0, caches[0].reserve(s), alibi=alibi)
    on_gpu = [None if a is None else cupy.asarray(a) for a in (qkv, mask, alibi)]
    got = prefill_on_gpu(op, launch, on_gpu[0], on_gpu[1], caches[1], caches[1].reserve(s), on_gpu[2])
    assert got.flags.c_contiguous
    assert rel_error(got, want) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [t for t in FLOAT_DTYPES if numpy.dtype(t).itemsize == 2], ids=str)
@pytest.mark.parametrize("heads, kv, d", [(4, 2, 32), (2, 1, 64), (4, 4, 80), (6, 2, 96), (8, 2, 128)])
@pytest.mark.parametrize("rule", PREFILL_RULES)
def test_gpu_prefill_kernel_after_a_past(rng, poisoned_allocations, prefill_kernel, dtype, heads, kv, d, rule):
    """The prefill kernel against the NumPy reference on the same cache: 77 tokens (no multiple of a tile)
    after pasts of 0, 50 and 130 tokens; the GPU cache holds NaN in every slot no sequence has written."""
    skip_the_launchers(prefill_kernel, d)
    after_a_past(rng, LAUNCH[prefill_kernel], dtype, heads, kv, d, rule)


def without_a_cache(rng, launch, dtype, d, rotary):
    import cupy

    turn = dict(rotary_dim=d, rotate_half=True, rotate_every_two=False) if rotary else {}
    c = cfg(dtype, heads=4, kv=2, d=d, **turn)
    op = ops.SoftmaxContextOp(c)
    qkv = random(rng, (2, 150, 8 * d), dtype)
    want, _, _ = op(qkv)
    got = prefill_on_gpu(op, launch, cupy.asarray(qkv))
    assert rel_error(got, want) < TOL_CHAINED[numpy.dtype(dtype)]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [t for t in FLOAT_DTYPES if numpy.dtype(t).itemsize == 2], ids=str)
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("rotary", [False, True], ids=["views", "turned k"])
def test_gpu_prefill_kernel_without_a_cache(rng, poisoned_allocations, prefill_kernel, dtype, d, rotary):
    """A prompt without a cache: K and V are read where they are (views of the projection), or K turned by
    rotary into an array of its own while V stays a view, so the two have different strides."""
    skip_the_launchers(prefill_kernel, d)
    without_a_cache(rng, LAUNCH[prefill_kernel], dtype, d, rotary)


def grid_in_groups(rng, launch, span, d):
    import cupy

    c = cfg(numpy.float16, heads=4, kv=2, d=d)
    op = ops.SoftmaxContextOp(c)
    qkv = random(rng, (3, 300, 8 * d), numpy.float16)
    want, _, _ = op(qkv)
    got = prefill_on_gpu(op, launch, cupy.asarray(qkv), span=span)
    assert rel_error(got, want) < TOL_CHAINED[numpy.dtype(numpy.float16)]


@pytest.mark.gpu
@pytest.mark.parametrize("span", [1, 2, 5, 64])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_prefill_grid_in_groups_of_any_span(rng, poisoned_allocations, prefill_kernel, span, d):
    """The prefill grid walks its (sequence, head) pairs in groups of ``span`` (12 pairs of 3 row blocks here,
    5 with one warpgroup a block: one pair a group, groups splitting a kv head's two query heads, a last group
    of 2, all in one): every block still computes its own rows, causal over a 300-token prompt."""
    skip_the_launchers(prefill_kernel, d)
    grid_in_groups(rng, LAUNCH[prefill_kernel] or the_ops_launcher, span, d)


def scores_rising_along_the_keys(rng, launch, rise, causal):
    import cupy

    c = cfg(numpy.float16, heads=2, kv=2, d=64, triangular_masking=causal)
    op = ops.SoftmaxContextOp(c)
    qkv = random(rng, (2, 600, 6 * 64), numpy.float32, scale=0.3)
    qkv[:, :, 0:128:64] = 8.0  # the two query heads' first dimension
    qkv[:, :, 128:256:64] = numpy.linspace(0.0, rise, 600, dtype=numpy.float32)[None, :, None]  # the keys'
    qkv = qkv.astype(numpy.float16)
    want, _, _ = op(qkv)
    got = prefill_on_gpu(op, launch, cupy.asarray(qkv))
    assert rel_error(got, want) < TOL_CHAINED[numpy.dtype(numpy.float16)]


@pytest.mark.gpu
@pytest.mark.parametrize("rise", [6.0, 60.0, -60.0])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_gpu_prefill_with_scores_rising_along_the_keys(rng, poisoned_allocations, prefill_kernel, rise, causal):
    """Scores that climb (or fall) along the keys, by about 0.9 or 9 (log2 units) a tile of 64 keys, so a
    row's running maximum moves on many tiles: by less than the lazy rule's 8 (a stale maximum, exp2 values
    up to 256) and by more (o and l rescaled); fp16 against the float64 reference, 600 tokens, d 64."""
    scores_rising_along_the_keys(rng, LAUNCH[prefill_kernel], rise, causal)


def on_a_long_context(rng, launch):
    import cupy

    c = cfg(numpy.float16, heads=4, kv=2, d=128, rotary_dim=64, rope_theta=500000.0)
    op = ops.SoftmaxContextOp(c)
    pasts, s, room = [0, 4000, 16084], 300, 16384
    content = [random(rng, (1, 3, 2, room, 128), numpy.float16) for _ in range(2)]
    caches = [KVCache(1, 3, 2, room, 128, numpy.float16, backend=kind) for kind in ("numpy", "cupy")]
    for cache in caches:
        xp = numpy if cache.backend == "numpy" else cupy
        cache.keys[...], cache.values[...] = xp.asarray(content[0]), xp.asarray(content[1])
        cache.set_lengths(pasts)
    qkv = random(rng, (3, s, 8 * 128), numpy.float16)
    keep = rng.random((3, room)) < 0.95
    want, _, _ = op(qkv, keep, caches[0], 0, caches[0].reserve(s))
    got = prefill_on_gpu(op, launch, cupy.asarray(qkv), cupy.asarray(keep), caches[1], caches[1].reserve(s))
    assert rel_error(got, want) < TOL_CHAINED[numpy.dtype(numpy.float16)]


@pytest.mark.gpu
def test_gpu_prefill_kernel_on_a_long_context(rng, poisoned_allocations, prefill_kernel):
    """300 queries after pasts of 0, 4000 and 16084 tokens (keys up to 16384), causal with a key mask."""
    on_a_long_context(rng, LAUNCH[prefill_kernel])
