"""What the models share: the causal models' cache."""

import numpy

from cupy_transformer import ops
from cupy_transformer.models.base import CausalLM
from tests.helpers import random


class OneLayer(CausalLM):
    """The attributes ``CausalLM`` reads, without a checkpoint."""

    def __init__(self, config):
        self.config, self.layers_count, self.max_positions, self.vocab, self.backend = config, 1, 8, 16, "numpy"


def test_new_cache_holds_this_ranks_kv_heads(rng):
    # Tensor parallel over 2 ranks: each rank's attention sees 4 / 2 query and 2 / 2 kv heads.
    cfg = ops.InferenceConfig(hidden_size=64, heads=4, num_kv=2, mp_size=2, dtype=numpy.float32)
    cache = OneLayer(cfg).new_cache(batch=2)
    assert (cache.kv_heads, cache.head_dim, cache.max_tokens) == (1, 16, 8)
    heads, kv_heads = cfg.heads // cfg.mp_size, cfg.num_kv // cfg.mp_size
    qkv = random(rng, (2, 3, (heads + 2 * kv_heads) * cfg.head_size), numpy.float32)
    context, keys, _ = ops.SoftmaxContextOp(cfg)(qkv, cache=cache, start=cache.reserve(3))
    assert context.shape == (2, 3, heads * cfg.head_size) and keys.shape == (2, kv_heads, 3, cfg.head_size)
    assert cache.lengths.tolist() == [3, 3]
