"""Text generation with a KV cache: prefill, then one decode step per token.

Prompts of different lengths share a batch left-padded: the padding is masked out of every key set and the
positions count real tokens only, so each sequence gets the tokens it would get alone. Sampling happens on
the host (the logits of the last position, ``[batch, vocab]``, are small): greedy, or temperature with
top-k and top-p, from a seeded generator. A sequence stops at ``eos_token_id`` or when its text contains a
stop string (cut before it); ``stream`` receives each sequence's new text as it comes.

The decode step's inputs (``Buffers``) are allocated once and updated in place, with the same shapes every
step (the key mask spans the whole cache); capturing the step in a CUDA graph is left to a later issue (the
models still check positions and upload the attention's key ranges from the host each step).
"""

from __future__ import annotations

from typing import Callable, Sequence

import numpy

from .runtime.arrays import array_module, positive_int


class Buffers:
    """The decode step's inputs, allocated once on the model's backend and updated in place, so every step
    has the same shapes: token ids [B, 1], positions [B, 1], and the key mask [B, max_tokens] over the
    whole cache (False for padding and for slots not written yet)."""

    def __init__(self, model, batch: int, max_tokens: int):
        self.xp = array_module(model.backend)
        self.ids = self.xp.zeros((batch, 1), numpy.int64)
        self.positions = self.xp.zeros((batch, 1), numpy.int64)
        self.keep = self.xp.zeros((batch, max_tokens), bool)


def prefill(model, prompts: Sequence[Sequence[int]], cache):
    """The prompts (token id lists) left-padded into the cache; returns the last position's logits
    [batch, vocab] (host float64), the decode ``Buffers`` (key mask holding the prompts) and each sequence's
    next position (host)."""
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("prompts: expected at least one prompt, each of at least one token")
    width = max(len(p) for p in prompts)
    ids = numpy.zeros((len(prompts), width), numpy.int64)
    keep = numpy.zeros((len(prompts), width), bool)
    for b, p in enumerate(prompts):
        ids[b, width - len(p) :], keep[b, width - len(p) :] = p, True
    buffers = Buffers(model, len(prompts), cache.max_tokens)
    buffers.keep[:, :width] = buffers.xp.asarray(keep)
    positions = numpy.maximum(numpy.cumsum(keep, axis=1) - 1, 0)
    logits = _last(
        model.forward(
            buffers.xp.asarray(ids), cache, attn_mask=buffers.keep, position_ids=buffers.xp.asarray(positions)
        )
    )
    return logits, buffers, keep.sum(axis=1)


def decode_step(model, tokens, cache, buffers: Buffers, positions):
    """One token per sequence after the prefill (``positions``: each one's, host): fills the buffers in place
    and returns the logits [batch, vocab] (host float64)."""
    column = int(cache.lengths[0])  # every sequence holds the same slots (left padding)
    buffers.ids[:, 0] = buffers.xp.asarray(tokens)
    buffers.positions[:, 0] = buffers.xp.asarray(positions)
    buffers.keep[:, column] = True
    return _last(model.forward(buffers.ids, cache, attn_mask=buffers.keep, position_ids=buffers.positions))


def _last(logits):
    last = logits[:, -1]
    return (last.get() if hasattr(last, "get") else last).astype(numpy.float64)


def sample(logits, rng, temperature: float = 0.0, top_k: int = 0, top_p: float = 1.0):
    """Token ids [batch] from logits [batch, vocab]: greedy when ``temperature`` is 0, else a draw from
    softmax(logits / temperature) restricted to the ``top_k`` most likely (0: all) and to the smallest set
    whose probability reaches ``top_p``."""
    if temperature == 0:
        return logits.argmax(axis=1)
    out = numpy.empty(len(logits), numpy.int64)
    for b, row in enumerate(logits / temperature):
        order = numpy.argsort(-row, kind="stable")
        if top_k:
            order = order[:top_k]
        p = numpy.exp(row[order] - row[order[0]])
        p /= p.sum()
        if top_p < 1.0:
            cut = int(numpy.searchsorted(numpy.cumsum(p), top_p)) + 1  # the first tokens reaching top_p
            order, p = order[:cut], p[:cut] / p[:cut].sum()
        out[b] = order[rng.choice(len(order), p=p)]
    return out


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | None = None,
    stop: Sequence[str] = (),
    stream: Callable[[int, str], None] | None = None,
) -> list[str]:
    """The generated text (without the prompt) of each prompt; arguments as the module docstring says."""
    max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
    if temperature < 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError(f"temperature >= 0, 0 < top_p <= 1, top_k >= 0 expected; got {temperature}, {top_p}, {top_k}")
    encoded = [tokenizer.encode(p).ids for p in prompts]
    if any(not ids for ids in encoded):
        raise ValueError("prompts: a prompt encodes to no tokens (empty prompt?)")
    longest = max(len(ids) for ids in encoded)
    if longest > model.max_positions:
        raise ValueError(f"prompts: {longest} tokens exceed the model's context of {model.max_positions}")
    if longest + max_new_tokens > model.max_positions:
        raise ValueError(
            f"max_new_tokens: {longest} prompt tokens + {max_new_tokens} exceed the model's context "
            f"(and cache) of {model.max_positions} tokens"
        )
    rng = numpy.random.default_rng(seed)
    cache = model.new_cache(len(prompts), longest + max_new_tokens)
    logits, buffers, positions = prefill(model, encoded, cache)
    new = [[] for _ in prompts]
    texts, done = [""] * len(prompts), [False] * len(prompts)
    for step in range(max_new_tokens):
        tokens = sample(logits, rng, temperature, top_k, top_p)
        for b, token in enumerate(tokens.tolist()):
            if done[b]:
                continue
            if eos_token_id is not None and token == eos_token_id:
                done[b] = True
                continue
            new[b].append(token)
            text = tokenizer.decode(new[b])
            cut = min((text.find(s) for s in stop if s and s in text), default=-1)
            if cut >= 0:
                text, done[b] = text[:cut], True
            if stream is not None and text != texts[b] and text.startswith(texts[b]):
                stream(b, text[len(texts[b]) :])
            texts[b] = text
        if all(done) or step == max_new_tokens - 1:
            break
        logits = decode_step(model, tokens, cache, buffers, positions)
        positions = positions + 1
    return texts
