"""ops/prefill_attention_sm90.py (kernels_cu/prefill_attention_sm90.cu, H100/H200): the scenarios of
test_prefill_attention.py on the geometries the launcher takes for other prompts (two warpgroups a block where
it takes one, a block an item where it takes persistent blocks, 3 persistent blocks that each take many items);
the persistent blocks' counter; the launcher's geometry rule."""

import numpy
import pytest

from cupy_transformer import ops
from cupy_transformer.ops.prefill_attention_sm90 import (
    PREFILL_SM90_PERSIST,
    PREFILL_SM90_SHORT,
    PREFILL_SM90_TILE,
    prefill_attention_sm90,
    prefill_sm90_geometry,
)
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from cupy_transformer.runtime.kernels import HALF_CTYPES, KernelFamily
from tests.helpers import TOL_CHAINED, random, rel_error, side_stream
from tests.ops.common import attention_config as cfg
from tests.ops.common import launch_inputs
from tests.ops.test_prefill_attention import (
    PREFILL_RULES,
    after_a_past,
    grid_in_groups,
    on_a_long_context,
    scores_rising_along_the_keys,
    skip_the_launchers,
    without_a_cache,
)

# A variant's thresholds for prefill_sm90_geometry, and its blocks of one wave (None: the GPU's).
VARIANTS = {
    "two warpgroups": (dict(short=0), None),
    "a block an item": (dict(persist_up_to=0), None),
    "3 persistent blocks": (dict(persist_up_to=1 << 30), 3),
}


def hopper(variant):
    """The launch of a ``VARIANTS`` geometry: ``launch(inputs, span)`` as test_prefill_attention's scenarios
    take it."""
    thresholds, blocks = VARIANTS[variant]

    def launch(x, span=None):
        s, d = x.q.shape[2:]
        bits = x.mask is not None and x.mask.dtype == numpy.bool_ and x.alibi is None
        geometry = prefill_sm90_geometry(d, s, bits, x.causal, **thresholds)
        return prefill_attention_sm90(*x.prefill_args, geometry=geometry, blocks=blocks, span=span)

    return launch


@pytest.fixture(params=list(VARIANTS))
def prefill_kernel(request):
    """Which geometry of the Hopper kernel a test runs: two warpgroups a block for the short causal or masked
    prompts at head size 64 too, a block an item for short prompts too, or 3 persistent blocks (each takes many
    items in turn). A test whose head size and length give the launcher's kernel under "two warpgroups" skips
    it."""
    from cupy_transformer.runtime.kernels import compute_capability

    if compute_capability() != 90:
        pytest.skip("the launcher takes prefill_attention.cu here already")
    return request.param


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [t for t in FLOAT_DTYPES if numpy.dtype(t).itemsize == 2], ids=str)
@pytest.mark.parametrize("heads, kv, d", [(4, 2, 32), (2, 1, 64), (4, 4, 80), (6, 2, 96), (8, 2, 128)])
@pytest.mark.parametrize("rule", PREFILL_RULES)
def test_gpu_prefill_kernel_after_a_past(rng, poisoned_allocations, prefill_kernel, dtype, heads, kv, d, rule):
    """test_prefill_attention's scenario: 77 tokens after pasts of 0, 50 and 130 tokens, NaN past them."""
    skip_the_launchers(prefill_kernel, d)
    after_a_past(rng, hopper(prefill_kernel), dtype, heads, kv, d, rule)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [t for t in FLOAT_DTYPES if numpy.dtype(t).itemsize == 2], ids=str)
@pytest.mark.parametrize("d", [64, 96, 128])
@pytest.mark.parametrize("rotary", [False, True], ids=["views", "turned k"])
def test_gpu_prefill_kernel_without_a_cache(rng, poisoned_allocations, prefill_kernel, dtype, d, rotary):
    """test_prefill_attention's scenario: K and V views of the projection, or K turned into its own array."""
    skip_the_launchers(prefill_kernel, d)
    without_a_cache(rng, hopper(prefill_kernel), dtype, d, rotary)


@pytest.mark.gpu
@pytest.mark.parametrize("span", [1, 2, 5, 64])
@pytest.mark.parametrize("d", [64, 128])
def test_gpu_prefill_grid_in_groups_of_any_span(rng, poisoned_allocations, prefill_kernel, span, d):
    """test_prefill_attention's scenario: the grid's (sequence, head) pairs in groups of ``span``."""
    skip_the_launchers(prefill_kernel, d)
    grid_in_groups(rng, hopper(prefill_kernel), span, d)


@pytest.mark.gpu
@pytest.mark.parametrize("rise", [6.0, 60.0, -60.0])
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
def test_gpu_prefill_with_scores_rising_along_the_keys(rng, poisoned_allocations, prefill_kernel, rise, causal):
    """test_prefill_attention's scenario: a row's running maximum moving on many tiles."""
    if prefill_kernel == "two warpgroups":
        pytest.skip("600 tokens run two warpgroups a block already")
    scores_rising_along_the_keys(rng, hopper(prefill_kernel), rise, causal)


@pytest.mark.gpu
def test_gpu_prefill_kernel_on_a_long_context(rng, poisoned_allocations, prefill_kernel):
    """test_prefill_attention's scenario: 300 queries after pasts up to 16084 tokens, causal with a key mask."""
    if prefill_kernel == "two warpgroups":
        pytest.skip("head size 128 runs two warpgroups a block already")
    on_a_long_context(rng, hopper(prefill_kernel))


@pytest.mark.gpu
def test_gpu_persistent_prefill_leaves_its_counter_at_zero(rng, poisoned_allocations):
    """Persistent prefill blocks claim their work items from a counter of the stream's split workspace, which
    the last block done resets: three calls in a row on one stream and one on another, each as 3 blocks
    taking 32 items, all match the reference, and the counters read zero after each."""
    import cupy

    from cupy_transformer.runtime.kernels import compute_capability, split_workspace

    if compute_capability() != 90:
        pytest.skip("persistent blocks are the Hopper prefill kernel's")
    op = ops.SoftmaxContextOp(cfg(numpy.float16, heads=4, kv=2, d=64))
    qkv = random(rng, (2, 200, 8 * 64), numpy.float16)
    assert prefill_sm90_geometry(64, 200, False, True) == (64, 1, True)  # the launcher's: persistent
    want, _, _ = op(qkv)
    for stream in [cupy.cuda.Stream.null] * 3 + [side_stream()]:
        with stream:
            got = prefill_attention_sm90(*launch_inputs(op.config, cupy.asarray(qkv)).prefill_args, blocks=3)
            assert rel_error(got, want) < TOL_CHAINED[numpy.dtype(numpy.float16)]
            assert not split_workspace(0, 2)[1][:2].any()


def test_geometry_rule_and_its_instantiations():
    """prefill_sm90_geometry's picks (one warpgroup for short causal or masked prompts at head size 64, the mask's
    tile, persistent blocks up to PREFILL_SM90_PERSIST tokens but not at 64 with a mask), and every geometry it
    gives, with the thresholds the tests' variants set too, is an instantiation of the family."""
    assert prefill_sm90_geometry(64, 200, False, True) == (64, 1, True)
    assert prefill_sm90_geometry(64, 200, True, False) == (64, 1, False)
    assert prefill_sm90_geometry(64, 200, False, False) == (128, 2, True)
    assert prefill_sm90_geometry(64, PREFILL_SM90_SHORT + 1, False, True) == (128, 2, True)
    assert prefill_sm90_geometry(128, PREFILL_SM90_PERSIST + 1, True, True) == (64, 2, False)
    assert prefill_sm90_geometry(80, 77, False, True) == (64, 2, True)
    names = KernelFamily.registry["prefill_attention_sm90.cu"].name_expressions
    for thresholds, _ in [({}, None)] + list(VARIANTS.values()):
        for d in PREFILL_SM90_TILE:
            for s in (1, 77, 150, 200, 300, 600, PREFILL_SM90_SHORT + 1, PREFILL_SM90_PERSIST + 1):
                for bits in (False, True):
                    for causal in (False, True):
                        bn, wg, persist = prefill_sm90_geometry(d, s, bits, causal, **thresholds)
                        for ctype in HALF_CTYPES:
                            name = f"ct::attention_prefill_sm90<{ctype}, {d}, {bn}, {wg}, {str(persist).lower()}>"
                            assert name in names
