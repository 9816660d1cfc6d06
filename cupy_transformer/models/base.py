"""What the models share: opening the checkpoint for one model type, checking token ids, and the start of a
causal model's step (positions and the cache)."""

from __future__ import annotations

import numpy

from ..kv_cache import KVCache
from ..loading import Checkpoint
from ..runtime.arrays import import_cupy


def open_checkpoint(checkpoint, model_type: str) -> Checkpoint:
    """``checkpoint`` (a folder or a Checkpoint) after checking its config's model_type."""
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    if ck.config.get("model_type") != model_type:
        raise ValueError(f"{ck.folder}/config.json: model_type {ck.config.get('model_type')!r} is not {model_type!r}")
    return ck


def token_ids(xp, input_ids, vocab: int):
    """``input_ids`` as a non-empty [batch, tokens] integer array of ``xp`` with ids below ``vocab``."""
    ids = xp.asarray(input_ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.size == 0:
        raise ValueError(f"input_ids: expected a non-empty [batch, tokens] integer array; got {ids.dtype} {ids.shape}")
    if int(ids.min()) < 0 or int(ids.max()) >= vocab:
        raise ValueError(f"input_ids: expected token ids in [0, {vocab}); got {int(ids.min())}..{int(ids.max())}")
    return ids


class CausalLM:
    """A decoder over ``layers_count`` layers of ``config`` with ``max_positions`` positions, on ``backend``."""

    def new_cache(self, batch: int, max_tokens: int | None = None) -> KVCache:
        """A KV cache for ``batch`` sequences of up to ``max_tokens`` (at most, and by default, the positions)."""
        tokens = self.max_positions if max_tokens is None else min(max_tokens, self.max_positions)
        cfg = self.config
        return KVCache(self.layers_count, batch, cfg.num_kv, tokens, cfg.head_size, cfg.dtype, self.backend)

    def begin(self, input_ids, cache, position_ids):
        """A step's token ids, where they go in ``cache`` (``start``, reserved) and their positions (default:
        after what each sequence holds), all checked; returns ``(xp, ids, start, positions)``."""
        xp = numpy if self.backend == "numpy" else import_cupy()
        ids = token_ids(xp, input_ids, self.vocab)
        b, s = ids.shape
        start = cache.reserve(s) if cache is not None else None
        if position_ids is None:
            first = start if start is not None else numpy.zeros(b, numpy.int64)
            position_ids = first[:, None] + numpy.arange(s)[None, :]
        positions = xp.asarray(position_ids)
        if positions.shape != (b, s) or int(positions.max()) >= self.max_positions or int(positions.min()) < 0:
            if cache is not None:
                cache.set_lengths(start)  # the step did not happen
            raise ValueError(f"position_ids: the model has {self.max_positions} positions; this call needs "
                             f"{int(positions.max()) + 1} (a prompt or generation longer than the context)")
        return xp, ids, start, positions
