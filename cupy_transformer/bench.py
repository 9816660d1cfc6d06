"""Whole-model generation timing: prefill ms, decode ms/token, tokens/s and host µs per token through
``generation.Decoder`` (the captured decode step), and the weight-bandwidth floor they are held against.

``cupy-transformer bench`` runs it on random weights of a named shape (no checkpoint, no PyTorch);
``benchmarks/e2e.py`` runs it beside Hugging Face on the same weights.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy

from .generation import Decoder, Sampling
from .loading import Checkpoint
from .models import MODELS
from .runtime.arrays import import_cupy

#: Model shapes by name: (model_type, config.json entries, dtype).
SHAPES = {
    "gpt2-small": ("gpt2", dict(n_layer=12, n_embd=768, n_head=12, vocab_size=50257, n_positions=1024), "float16"),
    "gpt2-medium": ("gpt2", dict(n_layer=24, n_embd=1024, n_head=16, vocab_size=50257, n_positions=1024), "float16"),
    "gpt2-xl": ("gpt2", dict(n_layer=48, n_embd=1600, n_head=25, vocab_size=50257, n_positions=1024), "float16"),
    "llama-1b": (  # LLaMA-3.2-1B's shape
        "llama",
        dict(
            hidden_size=2048,
            num_hidden_layers=16,
            num_attention_heads=32,
            num_key_value_heads=8,
            head_dim=64,
            intermediate_size=8192,
            vocab_size=128256,
            tie_word_embeddings=True,
            max_position_embeddings=131072,
            rope_theta=500000.0,
        ),
        "bfloat16",
    ),
    "llama-7b": (
        "llama",
        dict(
            hidden_size=4096,
            num_hidden_layers=32,
            num_attention_heads=32,
            num_key_value_heads=32,
            intermediate_size=11008,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
        "float16",
    ),
    "llama-13b": (
        "llama",
        dict(
            hidden_size=5120,
            num_hidden_layers=40,
            num_attention_heads=40,
            num_key_value_heads=40,
            intermediate_size=13824,
            vocab_size=32000,
            max_position_embeddings=4096,
        ),
        "float16",
    ),
}


def shape_config(name: str) -> tuple[dict, str]:
    """config.json of shape ``name`` and its dtype."""
    if name not in SHAPES:
        raise ValueError(f"shape: expected one of {', '.join(SHAPES)}; got {name!r}")
    model_type, sizes, dtype = SHAPES[name]
    return dict(sizes, model_type=model_type), dtype


class _RandomWeights(Checkpoint):
    """A checkpoint that makes whatever tensor a model asks for, on the GPU: normal with std 0.02, norm scales
    (1-D "weight") ones and biases zeros."""

    def __init__(self, config: dict, name: str, seed: int):
        # No folder to read: the attributes Checkpoint.__init__ would set from one.
        self.folder, self.config, self._file, self._arrays = Path(f"<random {name}>"), config, {}, None
        self._rng = import_cupy().random.default_rng(seed)

    def tensor(self, name: str, dtype, shape=None, backend: str = "cupy", split=None, rank: int = 0, size: int = 1):
        """``Checkpoint.tensor``'s signature; whole tensors only (``benchmarks/bench_tp.py`` makes sharded ones)."""
        if size != 1:
            raise ValueError(f"size: a random model is whole (size 1); got {size}")
        cupy = import_cupy()
        if len(shape) == 1:
            return (cupy.ones if name.endswith("weight") else cupy.zeros)(shape, dtype)
        return (self._rng.standard_normal(shape, dtype=cupy.float32) * 0.02).astype(dtype)


def random_model(name: str, seed: int = 0):
    """A model of shape ``name`` with random weights made on the GPU."""
    config, dtype = shape_config(name)
    return MODELS[config["model_type"]](_RandomWeights(config, name, seed), dtype, "cupy", progress=False)


def step_bytes(model, batch: int, context: int) -> int:
    """The bytes one decode step must read at ``context`` tokens a sequence: every layer weight and the LM head
    once (the embeddings' gathered rows are negligible), and the keys and values attended."""
    cupy = import_cupy()
    weights = sum(a.nbytes for w in model.weights for a in vars(w).values() if isinstance(a, cupy.ndarray))
    head = model.head_weight
    cfg = model.config
    kv = 2 * model.layers_count * batch * context * (cfg.num_kv // cfg.mp_size) * cfg.head_size
    return weights + head.nbytes + kv * cfg.dtype.itemsize


def time_generation(model, batch: int, prompt: int, new_tokens: int, *, cuda_graph: bool = True, seed: int = 0,
                    sampling: Sampling | None = None, repeats: int = 3, prompts=None,
                    programmatic: bool = True, fused: bool = True) -> dict:  # fmt: skip
    """Prefill and decode of ``batch`` random prompts (or ``prompts``, token id lists) of ``prompt`` tokens and
    ``new_tokens`` new ones, as ``generation.generate`` runs them (a step ahead of the host, which reads each step's
    tokens), after a warm-up run on another decoder (compiles, times the products' choices): ``prefill_first_ms``
    (the prompt pass and its first token on a new decoder, eager, as every ``generate`` call's is),
    ``prefill_first_host_ms`` (the host's time in that call: near the pass's own where the pass waits on the host),
    ``prefill_ms`` (the same pass repeated on that decoder, captured the first time: median of ``repeats``),
    ``decode_ms`` (a token of every sequence, GPU time over the whole loop, the best run), ``host_us`` and
    ``host_mean_us`` (the host's own time per step, launching it and reading the tokens: the median and the mean
    step of the repeated runs; an operating-system pause of a few ms moves the mean, not the median),
    ``host_launch_us`` (the median step's launch alone: the graph's and its tokens' event), ``tokens`` (that run's,
    [steps + 1, B]) and ``repeatable`` (whether every run drew them). ``programmatic``, ``fused``: the decoder's
    (``generation.Decoder``)."""
    cupy = import_cupy()
    rng = numpy.random.default_rng(seed)
    if prompts is None:
        prompts = [rng.integers(0, model.vocab, prompt).tolist() for _ in range(batch)]

    def new_decoder():
        return Decoder(model, batch, prompt + new_tokens, cuda_graph=cuda_graph, programmatic=programmatic, fused=fused)

    def run(decoder):
        stream = decoder.stream
        start, after_prefill, end = (cupy.cuda.Event() for _ in range(3))
        start.record(stream)
        began = time.perf_counter()
        decoder.prefill(prompts, seed, sampling)
        prefill_host = time.perf_counter() - began
        after_prefill.record(stream)
        tokens, host = [], []
        for step in range(new_tokens):
            begin = time.perf_counter()
            if step + 1 < new_tokens:
                decoder.step()
            launched = time.perf_counter()
            decoder.wait(step)  # the wait is the GPU's time, not the host's
            waited = time.perf_counter()
            tokens.append(decoder.read(step))
            host.append((launched - begin + time.perf_counter() - waited, launched - begin))
        end.record(stream)
        end.synchronize()
        prefill = cupy.cuda.get_elapsed_time(start, after_prefill)
        per_step = cupy.cuda.get_elapsed_time(after_prefill, end) / max(1, new_tokens - 1)
        return prefill, per_step, host, tokens, prefill_host * 1e3

    run(new_decoder())  # warm-up (its cache is freed before the next one's is made)
    decoder = new_decoder()
    runs = [run(decoder) for _ in range(repeats + 1)]
    best = min(runs, key=lambda r: r[1])
    steps = [t for r in runs[1:] for t, _ in r[2]] or [0.0]
    launches = [t for r in runs[1:] for _, t in r[2][:-1]] or [0.0]  # the last step launches nothing
    # The eager pass, its capture and its replays draw the same tokens (a difference is a defect, not noise).
    repeat = all(numpy.array_equal(numpy.stack(r[3]), numpy.stack(runs[0][3])) for r in runs)
    return {
        "repeatable": repeat,
        "prefill_first_ms": runs[0][0],
        "prefill_first_host_ms": runs[0][4],
        "prefill_ms": statistics.median(r[0] for r in runs[1:]),
        "decode_ms": best[1],
        "host_us": statistics.median(steps) * 1e6,
        "host_mean_us": statistics.fmean(steps) * 1e6,
        "host_launch_us": statistics.median(launches) * 1e6,
        "tokens": numpy.stack(best[3]),
    }


def prompts_for(vocab: int, batch: int, prompt: int) -> numpy.ndarray:
    """Random token ids [batch, prompt], the same for the same sizes."""
    return numpy.random.default_rng(prompt * 1000 + batch).integers(0, vocab, (batch, prompt))


def agreement(a, b) -> str:
    """ "n/N": how many leading tokens of two greedy sequences agree, of the N both have (fp16/bf16 products in
    another order drift apart once two logits come within rounding)."""
    a, b = numpy.asarray(a), numpy.asarray(b)
    n = min(len(a), len(b))
    differ = numpy.flatnonzero(a[:n] != b[:n])
    return f"{n if differ.size == 0 else differ[0]}/{n}"


def copy_rate(nbytes: int = 1 << 30, repeats: int = 10) -> float:
    """The device-to-device copy rate in bytes/s, counting bytes read and written (the memory ceiling a decode
    step's floor is taken against), the best of ``repeats`` copies of ``nbytes``."""
    cupy = import_cupy()
    src = cupy.ones(nbytes, cupy.uint8)
    dst = cupy.empty_like(src)
    best = float("inf")
    for _ in range(repeats):
        start, end = cupy.cuda.Event(), cupy.cuda.Event()
        start.record()
        dst[...] = src
        end.record()
        end.synchronize()
        best = min(best, cupy.cuda.get_elapsed_time(start, end) / 1e3)
    return 2 * nbytes / best


def report(shape: str, batch: int, prompt: int, new_tokens: int, cuda_graph: bool = True) -> str:
    """``time_generation`` of a random model of ``shape``, as lines of text with the floor beside it."""
    cupy = import_cupy()
    model = random_model(shape)
    result = time_generation(model, batch, prompt, new_tokens, cuda_graph=cuda_graph)
    rate = copy_rate()
    floor_ms = step_bytes(model, batch, prompt + new_tokens // 2) / rate * 1e3
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    card = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
    return "\n".join([
        f"{shape}, batch {batch}, {prompt}-token prompts, {new_tokens} new tokens, "
        f"{'CUDA graph' if cuda_graph else 'eager steps'}, {card}",
        f"prefill: {result['prefill_first_ms']:.2f} ms (a new decoder's; the host's time in it "
        f"{result['prefill_first_host_ms']:.2f}), {result['prefill_ms']:.2f} ms repeated (replayed)",
        f"decode: {result['decode_ms']:.3f} ms/token, {batch * 1e3 / result['decode_ms']:.0f} tokens/s, "
        f"host {result['host_us']:.1f} µs/token (median step; mean {result['host_mean_us']:.1f}; launching "
        f"{result['host_launch_us']:.1f})",
        f"floor: {floor_ms:.3f} ms/token (the bytes a step reads at copy rate, {rate / 1e12:.2f} TB/s): "
        f"{100 * floor_ms / result['decode_ms']:.0f}% of it",
    ])  # fmt: skip
