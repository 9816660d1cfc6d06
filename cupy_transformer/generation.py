"""Text generation with a KV cache: a prompt pass, then one decode step per token, captured as a CUDA graph.

Prompts of different lengths share a batch left-padded: the padding is masked out of every key set and the
positions count real tokens only, so each sequence gets the tokens it would get alone. The next token is drawn
on the device (``ops.sample_tokens``: greedy, or temperature with top-k and top-p from a counter-based generator
keyed by the seed, the step and the sequence, the same draws on the NumPy path). A sequence stops at an
``eos_token_id`` or when its text contains a stop string (cut before it); ``stream`` receives each sequence's
new text as it comes.

``Decoder`` holds one batch's decode state in arrays of the model's backend: the token ids [B, 1] (the sampler
writes the next ones there), their positions, the cache's slots (``KVCache.device_lengths``) and the sampler's
(seed, step); a step advances them itself. So every step is the same work: on the GPU the first runs eagerly
(it times each product's GEMV / cuBLAS choice and makes the per-stream workspaces), the second is captured as a
CUDA graph, and every later one is one graph launch, with no upload and no read but the new token ids, copied
asynchronously into pinned memory. The host keeps what its checks need from what it already knows (how many
tokens each sequence holds) and runs at most one step behind the GPU: it reads step n's tokens while step n + 1
runs, and discards what a sequence draws after it stopped.
"""

from __future__ import annotations

import contextlib
from typing import Callable, NamedTuple, Sequence

import numpy

from . import ops
from .ops.sampling import sampling_arguments
from .runtime.arrays import array_module, positive_int


class Sampling(NamedTuple):
    """How the next token is chosen (``ops.sample_tokens``): greedy at temperature 0; else from
    softmax(logits / temperature) over the ``top_k`` most likely (0: all) and the fewest reaching ``top_p``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


_ADVANCE = None


def _advance(xp, positions, lengths, seed_step) -> None:
    """The end of a step: each sequence's position and cache length, and the sampler's step, plus one."""
    global _ADVANCE
    if xp is numpy:
        positions += 1
        lengths += 1
        seed_step[1] += 1
        return
    if _ADVANCE is None:
        _ADVANCE = xp.ElementwiseKernel(
            "",
            "raw int32 positions, raw int32 lengths, raw uint64 seed_step",
            "positions[i] += 1; lengths[i] += 1; if (i == 0) seed_step[1] += 1;",
            "ct_advance_step",
        )
    _ADVANCE(positions, lengths, seed_step, size=positions.size)


class Decoder:
    """``batch`` sequences of ``model`` in a cache of ``capacity`` tokens each. ``cuda_graph=False`` runs every
    step eagerly: the same kernels making the same choices, for debugging."""

    def __init__(self, model, batch: int, capacity: int, cuda_graph: bool = True):
        self.model, self.batch = model, positive_int("batch", batch)
        self.xp = xp = array_module(model.backend)
        self.gpu = xp is not numpy
        self.cache = model.new_cache(self.batch, positive_int("capacity", capacity))
        self.ids = xp.zeros((self.batch, 1), numpy.int32)
        self.positions = xp.zeros((self.batch, 1), numpy.int32)
        self.seed_step = xp.zeros(2, numpy.uint64)
        self.keep = None  # [B, capacity] boolean where a sequence is left-padded
        self.cuda_graph = cuda_graph and self.gpu
        self.sampling = Sampling()
        self.steps = 0  # decode steps since the prompts: step n draws each sequence's token n
        self._graphs: dict[Sampling, object] = {}
        self._warm: set[Sampling] = set()
        self._host = [numpy.zeros(self.batch, numpy.int32) for _ in range(2)]  # steps n and n + 1's tokens
        if self.gpu:
            import cupyx

            self.stream = xp.cuda.Stream(non_blocking=True)
            self._pool = xp.cuda.MemoryPool()  # the steps' own: the memory a graph's replay writes is its alone
            self._host = [cupyx.empty_pinned((self.batch,), numpy.int32) for _ in range(2)]
            self._ready = [xp.cuda.Event(disable_timing=True) for _ in range(2)]
            xp.cuda.Device().synchronize()  # the weights and the cache, made on other streams, are ready

    @property
    def capacity(self) -> int:
        return self.cache.max_tokens

    def prefill(self, prompts: Sequence[Sequence[int]], seed: int = 0, sampling: Sampling | None = None) -> None:
        """Run the prompts (token id lists, one per sequence; left-padded into the cache) and draw each
        sequence's first new token (``read(0)``)."""
        if len(prompts) != self.batch or any(len(p) == 0 for p in prompts):
            raise ValueError(
                f"prompts: expected {self.batch} prompts of at least one token each; got lengths "
                f"{[len(p) for p in prompts]}"
            )
        width = max(len(p) for p in prompts)
        if width >= self.capacity:
            raise ValueError(f"prompts: {width} tokens leave no room for a new one in a cache of {self.capacity}")
        ids = numpy.zeros((self.batch, width), numpy.int32)
        keep = numpy.zeros((self.batch, width), bool)
        for b, p in enumerate(prompts):
            ids[b, width - len(p) :], keep[b, width - len(p) :] = p, True
        positions = numpy.maximum(numpy.cumsum(keep, axis=1) - 1, 0).astype(numpy.int32)
        self.sampling, self.steps = Sampling(*(sampling or ())), 0
        xp = self.xp
        with self._on_stream():
            self.cache.reset()
            # Padding is masked by cache slot, and every slot after the prompts holds a real token: the mask is
            # written once here (slots past a sequence's length are never read).
            self.keep = None
            if not keep.all():
                self.keep = xp.ones((self.batch, self.capacity), bool)
                self.keep[:, :width] = xp.asarray(keep)
            logits = self.model.forward(
                xp.asarray(ids), self.cache, attn_mask=self.keep, position_ids=xp.asarray(positions), last_only=True
            )
            self.cache.sync_device()
            self.positions[:, 0] = xp.asarray(keep.sum(axis=1).astype(numpy.int32))
            self.seed_step[...] = xp.asarray(numpy.array([seed % 2**64, 0], numpy.uint64))
            ops.sample_tokens(logits[:, -1], self.ids[:, 0], self.seed_step, *self.sampling)
            self.seed_step[1:] += 1
            self._copy_out(0)

    def step(self) -> None:
        """One decode step: last step's tokens go in, each sequence's next token is drawn (``read(steps)``)."""
        self.cache.reserve(1)  # the capacity check, and the host's count; the step advances device_lengths
        self.steps += 1
        graph = self._graphs.get(self.sampling)
        if graph is not None:  # the hot path: one launch and one copy
            graph.launch(self.stream)
            self._copy_out(self.steps)
            return
        with self._on_stream():
            if not self.cuda_graph or self.sampling not in self._warm:
                with self._step_memory():
                    self._step_ops()
                self._warm.add(self.sampling)
            else:
                with self._step_memory():
                    self.stream.begin_capture()
                    try:
                        self._step_ops()
                    finally:
                        graph = self.stream.end_capture()
                self._graphs[self.sampling] = graph
                graph.launch(self.stream)
            self._copy_out(self.steps)

    def read(self, step: int) -> numpy.ndarray:
        """The tokens [B] drawn by ``step`` (0: the prompt pass), once the device has them: the host may read
        step n while step n + 1 runs, not earlier steps."""
        self.wait(step)
        return self._host[step % 2].astype(numpy.int64)

    def wait(self, step: int) -> None:
        """Until the device has drawn ``step``'s tokens (``read`` waits so too)."""
        if not self.steps - 1 <= step <= self.steps:
            raise ValueError(f"step: the tokens of steps {self.steps - 1} and {self.steps} are kept; asked for {step}")
        if self.gpu:
            self._ready[step % 2].synchronize()

    def _step_ops(self) -> None:
        logits = self.model.decode(self.ids, self.positions, self.cache, attn_mask=self.keep)
        ops.sample_tokens(logits[:, -1], self.ids[:, 0], self.seed_step, *self.sampling)
        _advance(self.xp, self.positions, self.cache.device_lengths, self.seed_step)

    def _copy_out(self, step: int) -> None:
        host = self._host[step % 2]
        if not self.gpu:
            host[...] = self.ids[:, 0]
            return
        runtime = self.xp.cuda.runtime
        runtime.memcpyAsync(
            host.ctypes.data, self.ids.data.ptr, host.nbytes, runtime.memcpyDeviceToHost, self.stream.ptr
        )
        self._ready[step % 2].record(self.stream)

    def _on_stream(self):
        return self.stream if self.gpu else contextlib.nullcontext()

    @contextlib.contextmanager
    def _step_memory(self):
        """A step's allocations from the decoder's own pool, and its products chosen as a graph chooses them."""
        with ops.graph_choices():
            if not self.gpu:
                yield
                return
            with self.xp.cuda.using_allocator(self._pool.malloc):
                yield


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int = 20,
    temperature: float = 0.0,
    top_k: int = 0,
    top_p: float = 1.0,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop: Sequence[str] = (),
    stream: Callable[[int, str], None] | None = None,
    cuda_graph: bool = True,
) -> list[str]:
    """The generated text (without the prompt) of each prompt; arguments as the module docstring says
    (``eos_token_id``: one id or several; ``seed`` None: a fresh one; ``cuda_graph=False``: eager steps)."""
    max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
    sampling = Sampling(*sampling_arguments(temperature, top_k, top_p))
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
    eos = {eos_token_id} if isinstance(eos_token_id, (int, numpy.integer)) else set(eos_token_id or ())
    if seed is None:
        seed = int(numpy.random.SeedSequence().entropy) % 2**64
    decoder = Decoder(model, len(prompts), longest + max_new_tokens, cuda_graph=cuda_graph)
    decoder.prefill(encoded, seed, sampling)
    new = [[] for _ in prompts]
    texts, done = [""] * len(prompts), [False] * len(prompts)
    for step in range(max_new_tokens):
        if step + 1 < max_new_tokens:
            decoder.step()  # the next tokens are drawn while the host reads these
        for b, token in enumerate(decoder.read(step).tolist()):
            if done[b]:
                continue
            if token in eos:
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
        if all(done):
            break
    return texts
