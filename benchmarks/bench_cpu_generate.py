"""Greedy generation on the CPU: our NumPy path (``generation.Decoder``, float32 math inside
``runtime.arrays.cpu_float32``) beside Hugging Face eager (PyTorch, its KV cache), the same random float32 weights,
the same prompts, in one process; and our path with the float64 references (what it ran before), with
``--reference``. Prints a markdown table: prefill ms, ms per step (a new token of every sequence; best of the
rounds), the tokens the same. ``--batch B``: B prompts of the same length; our path with each product of the
step's B rows one BLAS product (``ops.matmul.ROW_PRODUCTS`` 0) beside it.

    python benchmarks/bench_cpu_generate.py [--shapes gpt2-small,llama-small] [--prompt 32] [--tokens 32]
                                            [--batch 1] [--rounds 3] [--reference]

Needs the parity extra (PyTorch and transformers) for the checkpoints and the peer.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import tempfile
import time

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from benchmarks.bench_cpu_embed import cpu_model  # noqa: E402
from cupy_transformer import bench  # noqa: E402

SHAPES = {  # small enough for a CI-class CPU: GPT-2 small (the GPU benchmarks'), a LLaMA-style model of 0.3B
    "gpt2-small": bench.SHAPES["gpt2-small"][:2],
    "llama-small": (
        "llama",
        dict(
            num_hidden_layers=8,
            hidden_size=1024,
            num_attention_heads=16,
            num_key_value_heads=4,
            intermediate_size=4096,
            vocab_size=32000,
            max_position_embeddings=2048,
            tie_word_embeddings=False,
        ),
    ),
}


def hf_model(shape: str):
    import torch
    import transformers

    family, config = SHAPES[shape]
    torch.manual_seed(0)
    if family == "gpt2":
        return transformers.GPT2LMHeadModel(transformers.GPT2Config(**config)).eval()
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(**config)).eval()


def theirs(model, prompts: list[list[int]], tokens: int) -> tuple[float, float, list[list[int]]]:
    """(prefill ms, ms a step, each step's tokens) of Hugging Face eager greedy decoding with its cache."""
    import torch

    with torch.no_grad():
        start = time.perf_counter()
        out = model(torch.tensor(prompts), use_cache=True)
        nxt = out.logits[:, -1].argmax(-1, keepdim=True)
        first = time.perf_counter()
        drawn = [nxt[:, 0].tolist()]
        for _ in range(tokens):
            out = model(nxt, past_key_values=out.past_key_values, use_cache=True)
            nxt = out.logits[:, -1].argmax(-1, keepdim=True)
            drawn.append(nxt[:, 0].tolist())
        end = time.perf_counter()
    return (first - start) * 1e3, (end - first) / tokens * 1e3, drawn


def ours(model, prompts: list[list[int]], tokens: int, reference: bool = False, row_products: int | None = None):
    """The same for ``generation.Decoder`` on the NumPy backend (``reference``: the float64 references;
    ``row_products``: ``ops.matmul.ROW_PRODUCTS`` for the run, None: as it is)."""
    from cupy_transformer import generation
    from cupy_transformer.ops import matmul

    saved, saved_rows = generation.cpu_float32, matmul.ROW_PRODUCTS
    if reference:
        generation.cpu_float32 = lambda enabled=True: contextlib.nullcontext()
    if row_products is not None:
        matmul.ROW_PRODUCTS = row_products
    try:
        decoder = generation.Decoder(model, len(prompts), len(prompts[0]) + tokens + 1)
        start = time.perf_counter()
        decoder.prefill(prompts)
        drawn = [decoder.read(0).tolist()]
        first = time.perf_counter()
        for _ in range(tokens):
            decoder.step()
            drawn.append(decoder.read(decoder.steps).tolist())
        end = time.perf_counter()
    finally:
        generation.cpu_float32, matmul.ROW_PRODUCTS = saved, saved_rows
    return (first - start) * 1e3, (end - first) / tokens * 1e3, drawn


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="gpt2-small,llama-small")
    parser.add_argument("--prompt", type=int, default=32)
    parser.add_argument("--tokens", type=int, default=32)
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--reference", action="store_true", help="also our path with the float64 references")
    args = parser.parse_args(argv)
    import torch

    from cupy_transformer.models import load_model

    print(f"{cpu_model()}, {os.cpu_count()} cores, torch {torch.__version__} ({torch.get_num_threads()} threads)")
    print(f"Batch {args.batch}, {args.prompt}-token prompts, {args.tokens} new tokens")
    print("| shape | path | prefill ms | ms a step | vs Hugging Face | same tokens |")
    print("|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        hf = hf_model(shape)
        with tempfile.TemporaryDirectory() as folder:
            hf.save_pretrained(folder)
            model = load_model(folder, dtype="float32", backend="numpy")
        prompts = numpy.random.default_rng(0).integers(0, hf.config.vocab_size, (args.batch, args.prompt)).tolist()
        paths = {"Hugging Face eager": lambda: theirs(hf, prompts, args.tokens)}
        paths["ours"] = lambda: ours(model, prompts, args.tokens)
        if args.batch > 1:
            paths["ours, a step's rows in one product"] = lambda: ours(model, prompts, args.tokens, row_products=0)
        if args.reference:
            paths["ours, float64 references"] = lambda: ours(model, prompts, args.tokens, reference=True)
        best = {name: (float("inf"), float("inf"), None) for name in paths}
        for _ in range(args.rounds):  # alternating, best of the rounds
            for name, run in paths.items():
                prefill, step, drawn = run()
                old = best[name]
                best[name] = (min(old[0], prefill), min(old[1], step), drawn)
        peer = best["Hugging Face eager"]
        for name, (prefill, step, drawn) in best.items():
            same = "yes" if drawn == peer[2] else f"{sum(a == b for a, b in zip(drawn, peer[2]))} of {len(drawn)} steps"
            print(f"| {shape} | {name} | {prefill:.1f} | {step:.2f} | {step / peer[1]:.2f}x | {same} |")


if __name__ == "__main__":
    main()
