"""Text generation with a KV cache: a prompt pass, then one decode step per token, captured as a CUDA graph.

Prompts of different lengths share a batch left-padded: the padding is masked out of every key set and the
positions count real tokens only, so each sequence gets the tokens it would get alone. The next token is drawn
on the device (``ops.sample_tokens``: greedy, or temperature with top-k and top-p from a counter-based generator
keyed by the seed, the step and the sequence, the same draws on the NumPy path). A sequence stops at an
``eos_token_id`` or when its text contains a stop string (cut before it); ``stream`` receives each sequence's
new text as it comes, decoded a few tokens at a time, in pieces that join to the result byte for byte: a
character whose bytes have not all come, and a tail that could begin a stop string, wait. Settings not given
come from the checkpoint's generation_config.json as transformers reads it (``generation_defaults``,
``resolve_settings``). ``generate`` keeps its decoder (KV cache, buffers, CUDA graphs) on the model for the next
call of the same batch size and capacity (rounded up to ``CAPACITY_STEP`` tokens); ``release(model)`` lets it go.

``Decoder`` holds one batch's decode state in arrays of the model's backend: the token ids [B, 1] (the sampler
writes the next ones there), their positions, the cache's slots (``KVCache.device_lengths``) and the sampler's
(seed, step); a step advances them itself (``ops.decode_state``). So every step is the same work: on the GPU the
first runs eagerly (it times each product's GEMV / cuBLAS choice and makes the per-stream workspaces), the second
is captured as a CUDA graph, and every later one is one graph launch, with no upload and no read but the new token
ids, which the step's last kernel writes into page-locked host memory. The host keeps what its checks need from
what it already knows (how many tokens each sequence holds) and runs at most one step behind the GPU: it reads step
n's tokens while step n + 1 runs, and discards what a sequence draws after it stopped.
"""

from __future__ import annotations

import collections
import contextlib
import numbers
import threading
import weakref
from typing import Callable, NamedTuple, Sequence

import numpy

from . import ops
from .ops.decode_state import end_step
from .ops.sampling import sampling_arguments
from .runtime.arrays import array_module, cpu_float32, positive_int
from .runtime.programmatic import programmatic_launches
from .runtime.tensor_map import holding


class Sampling(NamedTuple):
    """How the next token is chosen (``ops.sample_tokens``): greedy at temperature 0; else from
    softmax(logits / temperature) over the ``top_k`` most likely (0: all) and the fewest reaching ``top_p``."""

    temperature: float = 0.0
    top_k: int = 0
    top_p: float = 1.0


# Prompt passes a decoder keeps captured (by width, padding and sampling). Their temporaries share the decoder's
# pool (each replay, on the decoder's stream, rewrites what it reads), so a kept pass costs its graph only.
PROMPT_GRAPHS_KEPT = 8
# Prompt passes of up to this many tokens (batch x width) are captured; longer ones run eagerly on the default
# allocator: their kernels outlast the host's launches (a 7B shape's 2048-token pass on an H100: 51 ms of kernels,
# 26 ms of host time), and a capture would keep their activations in the decoder's own pool.
PROMPT_GRAPH_TOKENS = 8192
# Widths are rounded up (``prompt_width``) where a pass's kernels take less time than its eager launches, so that a
# replayed graph gives back more than the padding costs: up to this many tokens x hidden size squared, 1024 tokens at
# a 7B shape's hidden 4096 (whose 2048-token pass, above, ran kernels for twice its host time).
PROMPT_BUCKET_WORK = 2**34


def prompt_width(batch: int, tokens: int, capacity: int, hidden: int) -> int:
    """The width a prompt pass of ``batch`` prompts of up to ``tokens`` runs at in a model of ``hidden`` features, so
    that prompts of nearby lengths replay one captured pass: rounded up to a multiple of 16, past 256 tokens of an
    eighth of the power of two below (at most 12.5% more past 128 tokens), and to at most ``capacity``; a pass too
    long to be captured (``PROMPT_GRAPH_TOKENS``) or whose kernels would outlast its launches (``PROMPT_BUCKET_WORK``)
    runs at its own width."""
    step = max(16, 1 << max(0, (tokens - 1).bit_length() - 4))
    width = min(-(-tokens // step) * step, capacity)
    fits = batch * width <= PROMPT_GRAPH_TOKENS and batch * width * hidden**2 <= PROMPT_BUCKET_WORK
    return width if fits else tokens


class Decoder:
    """``batch`` sequences of ``model`` in a cache of ``capacity`` tokens each. ``cuda_graph=False`` runs every
    step eagerly: the same kernels making the same choices, for debugging. ``programmatic``: the captured step's
    kernels start while the kernel before them finishes (``runtime.programmatic``; compute capability 9.0 and
    later), False for a comparison. ``fused``: the step's norms, residual adds and rotary + append inside its
    products and attention kernel (``ops.fused_decode``), False for a comparison."""

    def __init__(
        self, model, batch: int, capacity: int, cuda_graph: bool = True, programmatic: bool = True, fused: bool = True
    ):
        self.model, self.batch = model, positive_int("batch", batch)
        self.xp = xp = array_module(model.backend)
        self.gpu = xp is not numpy
        self.cache = model.new_cache(self.batch, positive_int("capacity", capacity))
        self.ids = xp.zeros((self.batch, 1), numpy.int32)
        self.positions = xp.zeros((self.batch, 1), numpy.int32)
        self.seed_step = xp.zeros(2, numpy.uint64)
        self._best = xp.zeros(self.batch, numpy.uint64)  # a greedy LM head's keys (``CausalLM.run``'s argmax)
        self.keep = None  # the padding mask [B, capacity] (False: padding) where a sequence is left-padded
        self._keep = None  # its buffer, made at the first padded prompts; graphs read it where it is
        self.cuda_graph = cuda_graph and self.gpu
        self.programmatic = programmatic
        self.fused = fused
        self._step_capturable = self._capturable(1)
        self.sampling = Sampling()
        self.steps = 0  # decode steps since the prompts: step n draws each sequence's token n
        self._finite = xp.ones((), bool)  # whether the prompts' logits are finite (``prefill`` writes it)
        self._prompts = None  # the prompts' (ids, positions, keep) until ``read(0)`` has checked ``_finite``
        # Graphs by what they run: a decode step by ("step", sampling, padded); a prompt pass by ("prompt", width,
        # padded, sampling), with its inputs' buffers, the last PROMPT_GRAPHS_KEPT widths and settings.
        self._graphs: dict[tuple, object] = {}
        self._warm: set[tuple] = set()
        self._held: dict[tuple, object] = {}  # the tensor maps its passes read (``runtime.tensor_map.holding``)
        self._prompt_inputs: collections.OrderedDict[tuple, tuple] = collections.OrderedDict()
        # Steps n and n + 1's tokens: rows of one [2, B] block (``_host``, which ``read`` returns rows of), written
        # by the pass or step that draws them through ``_ring`` (``ops.decode_state``); on a GPU page-locked, which
        # the step's last kernel writes itself (with unified addressing a kernel may write page-locked host memory).
        if not self.gpu:
            self._ring = self._host = numpy.zeros((2, self.batch), numpy.int32)
        else:
            import cupyx

            self.stream = xp.cuda.Stream(non_blocking=True)
            self._pool = xp.cuda.MemoryPool()  # the steps' own: the memory a graph's replay writes is its alone
            self._host = ring = cupyx.empty_pinned((2, self.batch), numpy.int32)
            memory = xp.cuda.UnownedMemory(ring.ctypes.data, ring.nbytes, ring, xp.cuda.Device().id)
            self._ring = xp.ndarray(ring.shape, ring.dtype, xp.cuda.MemoryPointer(memory, 0))
            self._ready = [xp.cuda.Event(disable_timing=True) for _ in range(2)]
            xp.cuda.Device().synchronize()  # the weights and the cache, made on other streams, are ready

    @property
    def capacity(self) -> int:
        return self.cache.max_tokens

    def prefill(self, prompts: Sequence[Sequence[int]], seed: int = 0, sampling: Sampling | None = None) -> None:
        """Run the prompts (token id lists, one per sequence; left-padded into the cache) and draw each
        sequence's first new token (``read(0)``). The pass is checked on the host (token ids, positions, room)
        and, as a decode step is, run eagerly the first time at a width (with the same padding and sampling),
        captured the second, then replayed: what a repeated prompt shape costs the host is one launch. The width
        is rounded up (``prompt_width``): the columns after the prompts repeat their last token and position, and
        causal attention keeps them out of the prompts' results; the cache's lengths count the prompts only, so the
        steps overwrite their slots."""
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
        self.model.check_prompts(ids, positions)
        sampling = Sampling(*(sampling or ()))
        sampling_arguments(*sampling)  # checked before anything is written
        self.sampling, self.steps = sampling, 0
        padded = not keep.all()
        run_width = prompt_width(self.batch, width, self.capacity, self.model.config.hidden_size)
        key = ("prompt", run_width, padded, sampling)
        xp = self.xp
        with self._on_stream():
            self.cache.reset()
            self.cache.advance(width)  # the host's count; the pass writes slots 0 .. run_width - 1, device_lengths
            # Padding is masked by cache slot, and every slot after the prompts holds a real token: the mask is
            # written once here (slots past a sequence's length are never read).
            self.keep = None
            if padded:
                if self._keep is None:
                    self._keep = xp.ones((self.batch, self.capacity), bool)
                whole = numpy.ones((self.batch, self.capacity), bool)
                whole[:, :width] = keep
                _upload(self._keep, whole)
                self.keep = self._keep
            inputs = self._prompt_inputs.pop(key, None)
            if inputs is None:
                shape = (self.batch, run_width)
                inputs = (xp.empty(shape, numpy.int32), xp.empty(shape, numpy.int32), xp.empty(1, numpy.int32))
                while len(self._prompt_inputs) >= PROMPT_GRAPHS_KEPT:
                    old, _ = self._prompt_inputs.popitem(last=False)
                    self._graphs.pop(old, None)
                    self._warm.discard(old)
            self._prompt_inputs[key] = inputs
            tail = run_width - width  # right padding: the last column repeated
            _upload(inputs[0], numpy.pad(ids, ((0, 0), (0, tail)), mode="edge"))
            _upload(inputs[1], numpy.pad(positions, ((0, 0), (0, tail)), mode="edge"))
            _upload(inputs[2], numpy.array([width - 1], numpy.int32))
            _upload(self.seed_step, numpy.array([seed % 2**64, 0], numpy.uint64))
            # Non-finite logits (a checkpoint's NaN weights) are looked for here once per call, in the prompts'
            # logits: read with the first tokens (``read(0)``), not per step (a NaN met only by a generated token
            # goes unseen).
            self._prompts = ids, positions, keep
            capture = self.batch * run_width <= PROMPT_GRAPH_TOKENS and self._capturable(run_width)
            self._run(key, lambda: self._prompt_ops(*inputs), capture)
            self._mark_ready(0)

    def step(self) -> None:
        """One decode step: last step's tokens go in, each sequence's next token is drawn (``read(steps)``)."""
        self.cache.advance(1)  # the capacity check, and the host's count; the step advances device_lengths
        self.steps += 1
        key = ("step", self.sampling, self.keep is not None)
        graph = self._graphs.get(key)
        if graph is not None:  # the hot path: one launch and the event the read waits for
            graph.launch(self.stream)
        else:
            with self._on_stream():
                self._run(key, self._step_ops, self._step_capturable)
        self._mark_ready(self.steps)

    def _capturable(self, tokens: int) -> bool:
        """Whether a pass of ``tokens`` tokens a sequence may be captured: its attention is a kernel (a model whose
        attention takes the array operations, such as fp32 with more than 8 query heads a kv head, runs eagerly)."""
        return not self.gpu or self.model.layer.attention.kernels(self.batch, tokens)

    def _run(self, key: tuple, work: Callable[[], None], capture: bool = True) -> None:
        """``work`` (a step's or a prompt pass's launches, on the decoder's stream) as ``key``'s graph: run eagerly
        the first time (it times each product's GEMV / cuBLAS choice and makes the per-stream workspaces a capture
        needs), captured the second, launched after that; always eagerly without ``cuda_graph``, and without
        ``capture`` on the default allocator (nothing a replay writes to keep apart)."""
        if not capture:
            with self._step_memory(own_pool=False):
                work()
            return
        graph = self._graphs.get(key)
        if graph is None and (not self.cuda_graph or key not in self._warm):
            with self._step_memory():
                work()
            self._warm.add(key)
            return
        if graph is None:
            with self._step_memory(), programmatic_launches(self.programmatic):
                self.stream.begin_capture()
                try:
                    work()
                finally:
                    graph = self.stream.end_capture()
            self._graphs[key] = graph
        graph.launch(self.stream)

    def read(self, step: int) -> numpy.ndarray:
        """The tokens [B] drawn by ``step`` (0: the prompt pass), once the device has them: the host may read
        step n while step n + 1 runs, not earlier steps."""
        self.wait(step)
        if step == 0 and self._prompts is not None:
            if not bool(self._finite):
                raise self.model.non_finite_error(*self._prompts)
            self._prompts = None  # checked
        return self._host[step % 2].astype(numpy.int64)

    def wait(self, step: int) -> None:
        """Until the device has drawn ``step``'s tokens (``read`` waits so too)."""
        if not self.steps - 1 <= step <= self.steps:
            raise ValueError(f"step: the tokens of steps {self.steps - 1} and {self.steps} are kept; asked for {step}")
        if self.gpu:
            self._ready[step % 2].synchronize()

    def _prompt_ops(self, ids, positions, last) -> None:
        """The prompt pass on its inputs' buffers (``ids``, ``positions`` [B, width]; ``last`` [1], the prompts'
        last column), all on the device: the cache's slots are its device lengths (zero after ``reset``), so one
        graph serves every pass at a width."""
        cache, xp = self.cache, self.xp
        logits = self.model.run(ids, positions, cache, cache.device_lengths, self.keep, last=last)
        cache.device_lengths[...] = last + 1
        self.positions[...] = xp.take(positions, last, axis=1) + 1  # the real tokens each sequence holds
        self._finite[...] = xp.isfinite(logits[:, -1]).all()
        ops.sample_tokens(logits[:, -1], self.ids[:, 0], self.seed_step, *self.sampling)
        end_step(self.ids, self.positions, cache.device_lengths, self.seed_step, self._ring, advance=False)  # row 0

    def _step_ops(self) -> None:
        # A vocab-parallel rank (``parallel``) at greedy keeps its own columns of the logits and picks the token
        # with the other ranks from their maxima, gathering no logits; sampling with a temperature (top-k, top-p)
        # needs whole rows, which the model gathers. The prompt pass gathers them too (once a generation; its
        # logits' finiteness is checked).
        shard = getattr(self.model, "vocab_parallel", None) if self.sampling.temperature == 0 else None
        best = None
        if shard is not None:
            with shard.own_logits():
                logits = self.model.decode(self.ids, self.positions, self.cache, attn_mask=self.keep)
            shard.greedy_tokens(logits[:, -1], self.ids[:, 0], self.seed_step)
        else:
            # Greedy: the LM head may leave each sequence's token as a key in _best (no logits, no sampler kernel),
            # which end_step turns into the ids.
            best = self._best if self.sampling.temperature == 0 else None
            logits = self.model.decode(self.ids, self.positions, self.cache, attn_mask=self.keep, argmax=best)
            if logits is not None:
                best = None
                ops.sample_tokens(logits[:, -1], self.ids[:, 0], self.seed_step, *self.sampling)
        end_step(self.ids, self.positions, self.cache.device_lengths, self.seed_step, self._ring, best=best)

    def _mark_ready(self, step: int) -> None:
        """The event ``wait(step)`` waits for, after the pass or step that writes its tokens."""
        if self.gpu:
            self._ready[step % 2].record(self.stream)

    def _on_stream(self):
        # NumPy's warnings about NaN and inf are left out: the prompts' logits are checked (``read(0)``).
        return self.stream if self.gpu else numpy.errstate(invalid="ignore", over="ignore", divide="ignore")

    @contextlib.contextmanager
    def _step_memory(self, own_pool: bool = True):
        """A step's products chosen as a graph chooses them (on the CPU: float32 math, not the float64
        references); with ``own_pool`` (a pass that may be captured), its allocations from the decoder's own pool and
        the tensor maps it reads held by the decoder."""
        with ops.graph_choices(), ops.fused_decode(self.fused), cpu_float32(not self.gpu):
            if not self.gpu or not own_pool:
                yield
                return
            with self.xp.cuda.using_allocator(self._pool.malloc), holding(self._held):
                yield


def _upload(device, host) -> None:
    """``device[...] = host``, a copy on the current stream for a GPU array (into memory a graph reads)."""
    if isinstance(device, numpy.ndarray):
        device[...] = host
    else:
        device.set(numpy.ascontiguousarray(host, device.dtype))


class GenerationDefaults(NamedTuple):
    """A checkpoint's generation settings (``generation_defaults``); None: not set there. ``generate`` uses them
    where its caller passes None."""

    eos_token_id: tuple[int, ...] = ()
    do_sample: bool | None = None
    temperature: float | None = None
    top_k: int | None = None
    top_p: float | None = None
    max_new_tokens: int | None = None
    max_length: int | None = None


# Where neither the caller nor the checkpoint sets them, transformers' global defaults (GenerationConfig's
# _get_default_generation_params), except the length: transformers' max_length 20 counts the prompt too, which
# leaves nothing for a 20-token prompt; we generate 20 new tokens instead.
FALLBACK_TEMPERATURE, FALLBACK_TOP_K, FALLBACK_TOP_P, FALLBACK_NEW_TOKENS = 1.0, 50, 1.0, 20


def _first(*values):
    """The first value that is not None."""
    return next(v for v in values if v is not None)


def generation_defaults(checkpoint) -> GenerationDefaults:
    """The generation settings of ``checkpoint`` (a folder or a ``loading.Checkpoint``) as transformers 5 reads
    them: its ``generation_config.json``, all of it, where there is one (its eos_token_id wins over config.json's,
    which is then not read), else config.json's eos_token_id and any generation keys it holds. Checked: a
    ValueError names the file and key."""
    from .loading import Checkpoint

    ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
    path, c = ck.generation_config()

    def number(key, kind, name):
        value = c.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, kind)):
            raise ValueError(f"{path}: {key} must be {name} or null; got {value!r}")
        return value

    eos = c.get("eos_token_id")
    eos = [eos] if isinstance(eos, int) and not isinstance(eos, bool) else eos
    if eos is not None and not (
        isinstance(eos, list) and all(isinstance(e, int) and not isinstance(e, bool) and e >= 0 for e in eos)
    ):
        raise ValueError(f"{path}: eos_token_id must be a token id or a list of token ids; got {eos!r}")
    do_sample = c.get("do_sample")
    if do_sample is not None and not isinstance(do_sample, bool):
        raise ValueError(f"{path}: do_sample must be true, false or null; got {do_sample!r}")
    d = GenerationDefaults(
        tuple(eos or ()),
        do_sample,
        number("temperature", numbers.Real, "a number"),
        number("top_k", numbers.Integral, "an integer"),
        number("top_p", numbers.Real, "a number"),
        number("max_new_tokens", numbers.Integral, "an integer"),
        number("max_length", numbers.Integral, "an integer"),
    )
    try:
        sampling_arguments(
            _first(d.temperature, FALLBACK_TEMPERATURE),
            _first(d.top_k, FALLBACK_TOP_K),
            _first(d.top_p, FALLBACK_TOP_P),
        )
    except ValueError as e:
        raise ValueError(f"{path}: {e}") from None
    return d


def resolve_settings(
    defaults: GenerationDefaults | None,
    prompt_tokens: int,
    context: int,
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    eos_token_id: int | Sequence[int] | None = None,
) -> tuple[int, Sampling, frozenset]:
    """``(max_new_tokens, Sampling, eos ids)`` for ``generate``: each argument given (not None) wins over
    ``defaults`` (a checkpoint's), which win over the fallbacks, as transformers' generate merges them. Where this
    departs from transformers, on purpose:
    - a temperature given > 0 samples (transformers samples only with do_sample), and 0 is greedy; without one,
      the checkpoint's do_sample decides (default greedy) and a sampling run takes its temperature, top_k, top_p;
    - a length not given is the checkpoint's max_new_tokens, else its max_length less the longest prompt, else
      20 new tokens, each cut to the model's context (a length given that does not fit is an error).
    ``prompt_tokens``: the longest prompt's tokens; ``context``: the model's positions."""
    d = defaults or GenerationDefaults()
    # The values given are checked whether or not they are used (greedy ignores top_k and top_p).
    sampling_arguments(_first(temperature, 0.0), _first(top_k, 0), _first(top_p, 1.0))
    if _first(temperature, 1.0 if d.do_sample else 0.0) > 0:
        sampling = Sampling(
            *sampling_arguments(
                _first(temperature, d.temperature, FALLBACK_TEMPERATURE),
                _first(top_k, d.top_k, FALLBACK_TOP_K),
                _first(top_p, d.top_p, FALLBACK_TOP_P),
            )
        )
    else:
        sampling = Sampling()
    if max_new_tokens is not None:
        max_new_tokens = positive_int("max_new_tokens", max_new_tokens)
        if prompt_tokens + max_new_tokens > context:
            raise ValueError(
                f"max_new_tokens: {prompt_tokens} prompt tokens + {max_new_tokens} exceed the model's context "
                f"(and cache) of {context} tokens"
            )
    else:
        if d.max_new_tokens is not None:
            wanted, source = d.max_new_tokens, f"the checkpoint's max_new_tokens {d.max_new_tokens}"
        elif d.max_length is not None:
            wanted = d.max_length - prompt_tokens
            source = f"the checkpoint's max_length {d.max_length} less {prompt_tokens} prompt tokens"
        else:
            wanted, source = FALLBACK_NEW_TOKENS, "the default"
        max_new_tokens = min(wanted, context - prompt_tokens)
        if max_new_tokens < 1:
            raise ValueError(
                f"max_new_tokens: not given, and {source} leaves no new token within the model's context of "
                f"{context}; pass max_new_tokens"
            )
    eos = d.eos_token_id if eos_token_id is None else eos_token_id
    eos = frozenset([eos] if isinstance(eos, (int, numpy.integer)) else eos)
    return max_new_tokens, sampling, eos


class _Text:
    """One sequence's new text, decoded a few tokens at a time as vLLM's detokenize_incrementally does: the text
    of ``tokens[prefix:]`` past that of ``tokens[prefix:read]`` (decoded with the token before it, so that a
    decoder which drops a first token's leading space sees the same context) is new, unless it ends in U+FFFD (a
    character whose bytes have not all come: it waits for the next token). ``text`` is cut before the first stop
    string; ``piece`` gives what may be shown: all but a tail that could begin a stop string."""

    def __init__(self, tokenizer, stop: Sequence[str]):
        self.tokenizer, self.stop = tokenizer, [s for s in stop if s]  # "" would stop everything: ignored
        self.longest = max(map(len, self.stop), default=0)
        self.tokens: list[int] = []
        self.prefix = self.read = self.sent = 0
        self.text, self.done = "", False

    def add(self, token: int) -> None:
        self.tokens.append(token)
        before = self.tokenizer.decode(self.tokens[self.prefix : self.read])
        after = self.tokenizer.decode(self.tokens[self.prefix :])
        if len(after) <= len(before) or after.endswith("\ufffd"):
            return
        checked = max(0, len(self.text) - self.longest + 1)  # a stop ending in the new text starts here or later
        self.text += after[len(before) :]
        self.prefix, self.read = self.read, len(self.tokens)
        cut = min((i for i in (self.text.find(s, checked) for s in self.stop) if i >= 0), default=-1)
        if cut >= 0:
            self.text, self.done = self.text[:cut], True

    def piece(self) -> str:
        """The text not shown yet that will stay in the result (nothing past a stop, no start of one)."""
        end = len(self.text) if self.done else len(self.text) - self._could_begin_a_stop()
        piece, self.sent = self.text[self.sent : end], max(self.sent, end)
        return piece

    def _could_begin_a_stop(self) -> int:
        """The length of the longest tail of ``text`` that begins a stop string (0: none)."""
        for n in range(min(self.longest - 1, len(self.text)), 0, -1):
            if any(s.startswith(self.text[-n:]) for s in self.stop):
                return n
        return 0

    def final(self) -> str:
        """``tokenizer.decode`` of all the kept tokens, cut before the first stop string; the stream's last piece
        (held characters and tails) is what ``piece`` has not shown of it."""
        text = self.tokenizer.decode(self.tokens)
        cut = min((i for i in (text.find(s) for s in self.stop) if i >= 0), default=-1)
        self.text, self.done = (text[:cut] if cut >= 0 else text), True
        return self.text


def generate(
    model,
    tokenizer,
    prompts: Sequence[str],
    max_new_tokens: int | None = None,
    temperature: float | None = None,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eos_token_id: int | Sequence[int] | None = None,
    stop: Sequence[str] = (),
    stream: Callable[[int, str], None] | None = None,
    cuda_graph: bool = True,
    defaults: GenerationDefaults | None = None,
) -> list[str]:
    """The generated text (without the prompt) of each prompt; arguments as the module docstring says. None
    (not given) takes the value from ``defaults``, a checkpoint's settings (``generation_defaults(folder)``), else
    a fallback: ``resolve_settings`` says how (``eos_token_id``: one id or several, ``[]`` none; ``seed`` None: a
    fresh one; ``cuda_graph=False``: eager steps). ``stream(b, piece)`` gets sequence b's text in pieces whose
    concatenation is its result, byte for byte."""
    encoded = [tokenizer.encode(p).ids for p in prompts]
    if any(not ids for ids in encoded):
        raise ValueError("prompts: a prompt encodes to no tokens (empty prompt?)")
    longest = max(len(ids) for ids in encoded)
    if longest > model.max_positions:
        raise ValueError(f"prompts: {longest} tokens exceed the model's context of {model.max_positions}")
    max_new_tokens, sampling, eos = resolve_settings(
        defaults, longest, model.max_positions, max_new_tokens, temperature, top_k, top_p, eos_token_id
    )
    if seed is None:
        seed = int(numpy.random.SeedSequence().entropy) % 2**64
    decoder = _take_decoder(model, len(prompts), longest + max_new_tokens, cuda_graph)
    decoder.prefill(encoded, seed, sampling)
    texts = [_Text(tokenizer, stop) for _ in prompts]
    for step in range(max_new_tokens):
        if step + 1 < max_new_tokens:
            decoder.step()  # the next tokens are drawn while the host reads these
        for b, token in enumerate(decoder.read(step).tolist()):
            text = texts[b]
            if text.done:
                continue
            if token in eos:
                text.done = True
            else:
                text.add(token)
            if stream is not None and (piece := text.piece()):
                stream(b, piece)
        if all(t.done for t in texts):
            break
    _keep_decoder(model, decoder)
    results = []
    for b, text in enumerate(texts):
        shown = text.text[: text.sent]
        results.append(text.final())
        if stream is not None and len(results[-1]) > len(shown):
            stream(b, results[-1][len(shown) :])
    return results


# ``generate`` keeps its last decoder on the model (``_KEPT``) for the next call of the same batch size, graph
# setting and capacity, rounded up to CAPACITY_STEP tokens so that nearby lengths share one: a new decoder's cache,
# eager first pass and step and the step's capture took a GPT-2-small call of 32 new tokens from 11 to 45 ms (H100).
CAPACITY_STEP = 256
_KEPT = "_generation_decoder"
_KEEPING = threading.Lock()


def decoder_capacity(tokens: int, max_positions: int) -> int:
    """The cache capacity of a decoder made for sequences of up to ``tokens`` (prompt and new tokens): rounded up to
    CAPACITY_STEP so that calls of nearby lengths share one decoder, at most the model's ``max_positions`` (or
    ``tokens`` where more: the decoder's cache caps it, and its checks name the positions)."""
    return min(-(-tokens // CAPACITY_STEP) * CAPACITY_STEP, max(tokens, max_positions))


def _take_decoder(model, batch: int, tokens: int, cuda_graph: bool) -> Decoder:
    """The decoder for a ``generate`` call of ``batch`` sequences of up to ``tokens``: the model's kept one where it
    matches (taken off the model while in use, so a concurrent call makes its own), else a new one, made after the
    kept one is let go (its cache is freed first)."""
    capacity = decoder_capacity(tokens, model.max_positions)
    with _KEEPING:
        kept = getattr(model, _KEPT, None)
        if kept is not None:
            setattr(model, _KEPT, None)
    if kept is not None and (kept.batch, kept.capacity, kept.cuda_graph) == (batch, capacity, cuda_graph and kept.gpu):
        return kept
    del kept
    try:  # the model holds its kept decoder, which holds it weakly: no cycle keeps a deleted model's memory
        model = weakref.proxy(model)
    except TypeError:  # a model that takes no weak reference: its decoder is not kept (``_keep_decoder``)
        pass
    return Decoder(model, batch, capacity, cuda_graph=cuda_graph)


def _keep_decoder(model, decoder: Decoder) -> None:
    """Keep ``decoder`` on ``model`` for the next ``generate`` call (after a call that ended normally: one that
    raised leaves nothing kept)."""
    if isinstance(getattr(decoder, "model", None), weakref.ProxyTypes):  # made by _take_decoder
        try:
            setattr(model, _KEPT, decoder)
        except AttributeError:  # a model that takes no attributes keeps nothing
            pass


def release(model) -> None:
    """Let go of the decoder ``generate`` keeps on ``model`` (its KV cache, buffers and CUDA graphs)."""
    with _KEEPING:
        if getattr(model, _KEPT, None) is not None:
            setattr(model, _KEPT, None)
