"""What the models share: opening the checkpoint for one model type, checking token ids, and the start of a
causal model's step (positions and the cache)."""

from __future__ import annotations

import collections

import numpy

from .. import ops
from ..kv_cache import KVCache
from ..loading import Checkpoint
from ..ops.matmul import fused_fits, greedy_head, matmul
from ..ops.softmax_context import key_count
from ..runtime.arrays import array_module


def extremes(xp, *arrays) -> list:
    """(min, max) of each array, on the host after one transfer (a GPU round trip per value would stall
    every step)."""
    return xp.stack([v for a in arrays for v in (a.min(), a.max())]).tolist()


def open_checkpoint(checkpoint, model_type: str) -> Checkpoint:
    """``checkpoint`` (a folder or a Checkpoint) after checking its config's model_type."""
    ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    if ck.config.get("model_type") != model_type:
        raise ValueError(f"{ck.folder}/config.json: model_type {ck.config.get('model_type')!r} is not {model_type!r}")
    return ck


def token_ids(xp, input_ids):
    """``input_ids`` as a non-empty [batch, tokens] integer array of ``xp`` (``check_ids`` checks the values)."""
    ids = xp.asarray(input_ids)
    if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.size == 0:
        raise ValueError(f"input_ids: expected a non-empty [batch, tokens] integer array; got {ids.dtype} {ids.shape}")
    return ids


def check_ids(low: int, high: int, vocab: int) -> None:
    """Token ids from ``low`` to ``high`` (as ``extremes`` read them) must be below ``vocab``."""
    if low < 0 or high >= vocab:
        raise ValueError(f"input_ids: expected token ids in [0, {vocab}); got {low}..{high}")


def check_positions(first: int, last: int, max_positions: int, shaped: bool = True) -> None:
    """Positions from ``first`` to ``last`` (``shaped``: given as [B, S]) must lie inside the model's context."""
    if not shaped or last >= max_positions or first < 0:
        raise ValueError(
            f"position_ids: the model has {max_positions} positions; this call needs "
            f"{last + 1} (a prompt or generation longer than the context)"
        )


class CausalLM:
    """A decoder over ``layers_count`` layers of ``config`` with ``max_positions`` positions, on ``backend``.
    A model defines ``token_embeddings(ids, positions)`` (token ids [B, S] to the first layer's input), its
    ``weights`` (``layers.PreLNWeights``) and ``layer`` (``layers.PreLNLayer``), ``final_norm`` (gamma, beta or
    None) and ``head_weight`` (the LM head, [vocab, hidden]): the logits are final_norm(the last layer's output) @
    head_weight.T. A tensor-parallel rank sets ``vocab_parallel`` (``parallel.VocabParallel``): its table and head
    are then its rows of the vocabulary, looked up (``lookup``) and gathered (``run``) across the ranks."""

    vocab_parallel = None  # a whole model

    def forward(self, input_ids, cache: KVCache | None = None, attn_mask=None, position_ids=None, *, last_only=False):
        """Logits [B, S, vocab] for ``input_ids`` [B, S] (``last_only``: [B, 1, vocab], the last position's, as
        generation needs); with a ``cache``, the tokens follow what it holds (and are added to it).
        ``attn_mask`` [B, keys] boolean (False = padding), ``position_ids`` [B, S] (default: after what each
        sequence holds). Token ids and positions are checked, which reads them back from the GPU once."""
        _, ids, start, positions = self.begin(input_ids, cache, position_ids)
        return self.run(ids, positions, cache, start, attn_mask, last_only=last_only)

    def decode(self, ids, positions, cache: KVCache, attn_mask=None, argmax=None):
        """One token per sequence with every input in the backend's arrays, read nowhere but there: ``ids`` and
        ``positions`` [B, 1] int32, the cache slots ``cache.device_lengths``. What ``forward`` checks is the
        caller's to know (``generation.Decoder`` counts the tokens with ``cache.reserve``); so one CUDA graph of
        this call serves every step. Returns the logits [B, 1, vocab]; ``cache.device_lengths`` is left as it
        was (the caller advances it). ``argmax``: ``run``'s."""
        return self.run(ids, positions, cache, cache.device_lengths, attn_mask, argmax=argmax)

    def run(self, ids, positions, cache, start, attn_mask, last_only: bool = False, last=None, argmax=None):
        """The layers between ``token_embeddings`` and ``head`` on checked inputs (``start``: where the tokens go in
        ``cache``, from ``cache.reserve`` or on the device). ``last_only``: the logits of the last position only
        ([B, 1, vocab]); ``last``: of column ``last`` instead (an int32 array [1] of the backend's, read where it
        is: a captured pass replays for another column). ``argmax`` (uint64 [B] zeros, one token a sequence): where
        the LM head can (``ops.matmul.greedy_head``: a whole model's decode graph), each sequence's greedy key goes
        there instead of logits, and None is returned."""
        # The last layer's output, normalised by the final norm (or, xn None, to be normalised by the LM head).
        x, xn = collections.deque(self.hidden_states(ids, positions, cache, start, attn_mask), maxlen=1)[0]
        if last_only or last is not None:
            xp = array_module(self.backend)

            def pick(a):
                return xp.ascontiguousarray(a[:, -1:]) if last is None else xp.take(a, last, axis=1)

            x, xn = pick(x), None if xn is None else pick(xn)
        greedy = argmax is not None and self.vocab_parallel is None and x.shape[1] == 1
        if xn is None:
            norm = self.layer.norm_spec(*self.final_norm)
            rows = x.reshape(-1, x.shape[-1])
            if greedy and greedy_head(rows, self.head_weight, argmax, norm=norm):
                return None
            if self.vocab_parallel is None and fused_fits(rows, self.head_weight, True, norm=norm):
                return matmul(x, self.head_weight, True, norm=norm)
            xn = self.layer.norm(x, *self.final_norm)
        if greedy and greedy_head(xn, self.head_weight, argmax):
            return None
        if self.vocab_parallel is not None:
            return self.vocab_parallel.logits(xn, self.head_weight)
        return ops.lm_logits(xn, self.head_weight)

    def tied_head(self, table):
        """The LM head tied to the token embedding ``table``: the table itself, or a vocab-parallel rank's rows of
        it (a view without the zero row, ``parallel.VocabParallel.tied_head``)."""
        return table if self.vocab_parallel is None else self.vocab_parallel.tied_head(table)

    def lookup(self, ids, table, positions=None, position_table=None):
        """``ops.embed`` of the token ``table`` (and the positions'), or a vocab-parallel rank's share of it summed
        over the ranks (``parallel.VocabParallel.embed``)."""
        if self.vocab_parallel is not None:
            return self.vocab_parallel.embed(ids, table, positions, position_table)
        return ops.embed(ids, table, positions, position_table)

    def hidden_states(self, ids, positions, cache, start, attn_mask):
        """Yields ``(x, xn)``: the token embeddings, then each layer's output, with ``xn`` x normalised by the norm
        that follows (the next layer's input norm; after the last layer, the final norm), or None on the decode path
        (``layers.PreLNLayer.fuses``), where the product that follows normalises x in its prologue (``self.layer.norm``
        makes it). ``run``'s arguments."""
        x = self.token_embeddings(ids, positions)
        s = x.shape[1]
        attn_mask = self.layer.attention_mask(attn_mask, x, s if cache is None else key_count(cache, start, s))
        w = self.weights
        xn = None if self.layer.fuses(x) else self.layer.norm(x, w[0].ln1_gamma, w[0].ln1_beta)
        yield x, xn
        for i in range(len(w)):
            after = (w[i + 1].ln1_gamma, w[i + 1].ln1_beta) if i + 1 < len(w) else self.final_norm
            x, xn = self.layer.stack(
                x,
                xn,
                w[i],
                after,
                cache=cache,
                layer_id=i,
                start=start,
                attn_mask=attn_mask,
                position_ids=positions,
                lazy_norm=True,
            )
            yield x, xn

    def non_finite_error(self, ids, positions, keep) -> ValueError:
        """The error for prompts whose logits hold NaN or inf, naming where such values first appear: the prompts
        ``ids`` [B, S] (``positions``, ``keep`` [B, S]: False at padding, whose rows are not looked at) run again
        without a cache, one layer at a time, each output read back (a diagnostic path, slow on the GPU)."""
        xp = array_module(self.backend)
        rows = xp.asarray(keep)
        layer = getattr(self, "layer_prefix", "layer {}.")
        where = "the final norm or the LM head"
        with numpy.errstate(invalid="ignore", over="ignore", divide="ignore"):
            mask = None if keep.all() else rows
            outputs = self.hidden_states(xp.asarray(ids), xp.asarray(positions), None, None, mask)
            for i, (x, _) in enumerate(outputs):
                if not bool(xp.isfinite(x[rows]).all()):
                    where = "the token embeddings" if i == 0 else f"layer {i - 1}'s output ({layer.format(i - 1)}*)"
                    break
        overflow = ", or float16 overflowed" if self.config.dtype == numpy.float16 else ""
        return ValueError(
            f"non-finite values (NaN or inf) first appear in {where}: the checkpoint holds non-finite weights"
            f"{overflow}?"
        )

    def new_cache(self, batch: int, max_tokens: int | None = None) -> KVCache:
        """A KV cache for ``batch`` sequences of up to ``max_tokens`` (at most, and by default, the positions), with
        this rank's kv heads (``num_kv / mp_size``: the attention op's per-rank shard)."""
        tokens = self.max_positions if max_tokens is None else min(max_tokens, self.max_positions)
        cfg = self.config
        return KVCache(
            layers=self.layers_count,
            batch=batch,
            kv_heads=cfg.num_kv // cfg.mp_size,
            max_tokens=tokens,
            head_dim=cfg.head_size,
            dtype=cfg.dtype,
            backend=self.backend,
        )

    def check_prompts(self, ids: numpy.ndarray, positions: numpy.ndarray) -> None:
        """What ``begin`` checks of token ids and positions [B, S], on host arrays: a caller that holds its inputs
        on the host (``generation.Decoder``) checks them with no device read and runs ``run``."""
        check_ids(int(ids.min()), int(ids.max()), self.vocab)
        check_positions(int(positions.min()), int(positions.max()), self.max_positions)

    def begin(self, input_ids, cache, position_ids):
        """A step's token ids, where they go in ``cache`` (``start``, reserved) and their positions (default:
        after what each sequence holds), all checked; returns ``(xp, ids, start, positions)``."""
        xp = array_module(self.backend)
        ids = token_ids(xp, input_ids)
        b, s = ids.shape
        if cache is not None:
            cache.check_room(s)
        if position_ids is None:
            first = cache.lengths if cache is not None else numpy.zeros(b, numpy.int64)
            position_ids = first[:, None] + numpy.arange(s)[None, :]
        positions = xp.asarray(position_ids)
        low, high, first_position, last_position = extremes(xp, ids, positions)
        check_ids(low, high, self.vocab)
        check_positions(first_position, last_position, self.max_positions, positions.shape == (b, s))
        start = cache.reserve(s) if cache is not None else None  # checked: nothing to undo
        # int32, the kernels' (below max_positions, checked): not converted again by every layer's attention
        return xp, ids, start, positions.astype(numpy.int32, copy=False)
