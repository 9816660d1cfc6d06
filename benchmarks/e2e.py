"""Whole models generating, beside Hugging Face in one process: prefill ms, decode ms/token, tokens/s, the share
of the weight-bandwidth floor, and host µs per token.

The models are ``cupy_transformer.bench.SHAPES`` (GPT-2 small / medium / XL in fp16, a LLaMA-3.2-1B shape in bf16
and a LLaMA-7B shape in fp16), built by transformers with its own random initialisation on the GPU; ours reads
the same tensors through DLPack (``Checkpoint.from_arrays``: no copy but LLaMA's fused QKV and up|gate weights and
GPT-2's layer weights, which our loader stores [out, in]), so both compute the same function and the greedy tokens
are compared. Prompts are random token ids.

Peers: Hugging Face eager (sdpa, its dynamic cache) through ``model.generate``, and Hugging Face with its static
cache, whose decoding step transformers compiles itself (``cache_implementation="static"``), where asked. A
peer's decode ms/token is (time of N + 1 new tokens - time of 1) / N, its prefill the time of one new token.
Ours goes through ``generation.Decoder`` as ``generate`` runs it (``bench.time_generation``): its prefill both as a
new decoder runs it (eagerly) and repeated (a replayed graph). The floor is the
bytes a step must read (every weight once, the KV cache at the middle of the generation) over the
device-to-device copy rate measured in this run.

    python3 benchmarks/e2e.py [--models gpt2-small,llama-1b] [--batches 1,16] [--prompts 128,2048]
                              [--compiled gpt2-small] [--sweeps] [--memory]

Writes ``e2e-<card>.md`` (and with --sweeps the plots ``e2e-context-<card>.png``, ``e2e-batch-<card>.png``) to
$OUT or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy  # noqa: E402

from benchmarks.common import RESULTS, card_name, card_tag, free_gpu_memory, header, hf_model, hf_times, write_table  # noqa: E402
from cupy_transformer import bench  # noqa: E402
from cupy_transformer.generation import Decoder  # noqa: E402
from cupy_transformer.loading import Checkpoint  # noqa: E402
from cupy_transformer.models import MODELS  # noqa: E402

NEW_TOKENS = 128
THROUGHPUT: dict[str, list] = {}  # the batch sweep's curves, per shape and runner


def ours_from(hf, dtype: str):
    """Our model over ``hf``'s tensors."""
    config = hf.config.to_dict()
    tensors = {name: t.detach() for name, t in hf.state_dict().items()}
    return MODELS[config["model_type"]](
        Checkpoint.from_arrays(config, tensors, name="hf"), dtype, "cupy", progress=False
    )


def row(shape, batch, prompt, ours, eager, compiled, floor_ms, agree) -> str:
    def ms(r, key):
        return f"{r[key]:.3f}" if r else "–"

    speed = batch * 1e3 / ours["decode_ms"]
    vs = [f"{r['decode_ms'] / ours['decode_ms']:.1f}x" if r else "–" for r in (eager, compiled)]
    first, host, again = ours["prefill_first_ms"], ours["prefill_first_host_ms"], ours["prefill_ms"]
    prefill_vs = f"{eager['prefill_ms'] / first:.2f}x / {eager['prefill_ms'] / again:.2f}x" if eager else "–"
    return (
        f"| {shape} | {batch} | {prompt} | {first:.2f} ({host:.1f}) / {again:.2f} | {ms(eager, 'prefill_ms')} "
        f"| {prefill_vs} "
        f"| {ours['decode_ms']:.3f} | {ms(eager, 'decode_ms')} | {ms(compiled, 'decode_ms')} | {vs[0]} | {vs[1]} "
        f"| {speed:.0f} | {floor_ms:.3f} | {100 * floor_ms / ours['decode_ms']:.0f}% "
        f"| {ours['host_us']:.1f} / {ours['host_mean_us']:.1f} / {ours['host_launch_us']:.1f} | {agree} |"
    )


def agreement(ours_tokens, hf_tokens) -> str:
    """``bench.agreement`` of sequence 0: ours [steps, B], Hugging Face's [B, steps] (a torch tensor)."""
    return bench.agreement(ours_tokens[:, 0], hf_tokens[0].cpu().numpy())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--models", default="gpt2-small,gpt2-medium,gpt2-xl,llama-1b,llama-7b")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--prompts", default="128,2048")
    parser.add_argument("--compiled", default="gpt2-small", help="shapes (batch 1, first prompt) run compiled too")
    parser.add_argument("--sweeps", action="store_true", help="context and batch sweeps, with plots")
    parser.add_argument("--memory", action="store_true", help="GPU memory over 10,000 steps")
    args = parser.parse_args()
    rate = bench.copy_rate()
    lines = [
        header("Generation end to end, beside Hugging Face"),
        f"Device-to-device copy {rate / 1e12:.2f} TB/s (read + written). {NEW_TOKENS} new tokens, greedy. Decode "
        "ms/token: a step of every sequence. Floor: the bytes a step reads (weights once, the KV cache at the middle "
        "of the generation) at the copy rate. HF: transformers eager (sdpa, dynamic cache); HF static: its static "
        "cache with the step compiled by transformers. Agree: leading greedy tokens of sequence 0 equal to HF's. "
        "Prefill: a new decoder's prompt pass (eager, as each `generate` call's; in brackets the host's time in it) "
        "/ the same pass repeated on it (a replayed CUDA graph); HF's, repeated.\n",
        "| model | batch | prompt | prefill ms new (host) / repeated | HF prefill | HF / ours | decode ms/token | HF "
        "| HF static | HF / ours | HF static / ours | tokens/s | floor ms | of floor | host µs median / mean / launch "
        "| agree |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    after = []  # the sweeps' tables and the memory line, after the main table
    for shape in args.models.split(","):
        hf, dtype = hf_model(shape)
        ours = ours_from(hf, dtype)
        positions = ours.max_positions
        for batch in map(int, args.batches.split(",")):
            for prompt in map(int, args.prompts.split(",")):
                if prompt + NEW_TOKENS > positions:
                    continue
                ids = bench.prompts_for(ours.vocab, batch, prompt)
                try:
                    mine = bench.time_generation(ours, batch, prompt, NEW_TOKENS, prompts=ids.tolist())
                    free_gpu_memory()  # our decoder's cache and activations, before Hugging Face's run
                    eager = hf_times(hf, ids, NEW_TOKENS)
                except Exception as e:  # CuPy's and torch's: the row says so, the other rows run
                    if type(e).__name__ != "OutOfMemoryError":
                        raise
                    lines.append(f"| {shape} | {batch} | {prompt} | out of memory |" + " |" * 12)
                    print(lines[-1], f"{e}"[:300], flush=True)
                    free_gpu_memory()
                    continue
                compiled = None
                if shape in args.compiled.split(",") and batch == 1 and prompt == int(args.prompts.split(",")[0]):
                    try:
                        compiled = hf_times(hf, ids, NEW_TOKENS, static=True)
                    except Exception as e:  # report what ran
                        print(f"{shape}: HF static cache compiled failed: {type(e).__name__}: {e}"[:300])
                floor = bench.step_bytes(ours, batch, prompt + NEW_TOKENS // 2) / rate * 1e3
                agree = agreement(mine["tokens"], eager["tokens"]) + ("" if mine["repeatable"] else " (runs differ!)")
                lines.append(row(shape, batch, prompt, mine, eager, compiled, floor, agree))
                print(lines[-1], flush=True)
                free_gpu_memory()
        if args.sweeps and shape in ("gpt2-small", "llama-1b"):
            sweeps(shape, hf, ours, rate, after)
        if args.memory and shape == "llama-1b":
            after.append(memory_over_steps(ours))
            print(after[-1], flush=True)
        del hf, ours
        gc.collect()
        free_gpu_memory()
        write_table("e2e", lines + after)  # what is done so far, should a later shape not finish
    print(write_table("e2e", lines + after))


def sweeps(shape, hf, ours, rate, lines) -> None:
    """ms/token against context at batch 1 (LLaMA-1B shape), tokens/s against batch (both shapes), with plots."""
    steps = 32
    card = card_tag()
    if shape == "llama-1b":
        contexts = [128, 512, 2048, 8192, 16384]
        got = {"ours": [], "HF eager": [], "floor": []}
        for ctx in contexts:
            got["ours"].append(bench.time_generation(ours, 1, ctx, steps, repeats=1)["decode_ms"])
            got["HF eager"].append(hf_times(hf, bench.prompts_for(ours.vocab, 1, ctx), steps)["decode_ms"])
            got["floor"].append(bench.step_bytes(ours, 1, ctx + steps // 2) / rate * 1e3)
            free_gpu_memory()
        lines.append(f"\nContext sweep, {shape}, batch 1, {steps} new tokens (ms/token):\n")
        lines.append("| context | " + " | ".join(got) + " |")
        lines.append("|---" * (len(got) + 1) + "|")
        lines += [f"| {c} | " + " | ".join(f"{got[k][i]:.3f}" for k in got) + " |" for i, c in enumerate(contexts)]
        # log y: ours and the floor lie 1.2-1.4x apart, Hugging Face 10-25x above them
        plot(contexts, got, "context (tokens)", "decode ms/token", f"{shape}, batch 1", f"e2e-context-{card}.png", True)
    batches = [1, 4, 16, 64]
    got = {"ours": [], "HF eager": []}
    for b in batches:
        got["ours"].append(b * 1e3 / bench.time_generation(ours, b, 128, steps, repeats=1)["decode_ms"])
        got["HF eager"].append(b * 1e3 / hf_times(hf, bench.prompts_for(ours.vocab, b, 128), steps)["decode_ms"])
        free_gpu_memory()
    lines.append(f"\nBatch sweep, {shape}, 128-token prompts, {steps} new tokens (tokens/s):\n")
    lines.append("| batch | ours | HF eager |")
    lines.append("|---|---|---|")
    lines += [f"| {b} | {got['ours'][i]:.0f} | {got['HF eager'][i]:.0f} |" for i, b in enumerate(batches)]
    THROUGHPUT.update({f"{shape} {k}": v for k, v in got.items()})  # every shape swept so far, on one plot
    plot(batches, THROUGHPUT, "batch", "tokens/s", "decode throughput", f"e2e-batch-{card}.png", log_y=True)


def plot(xs, curves: dict, xlabel: str, ylabel: str, title: str, filename: str, log_y: bool = False) -> None:
    """Curves (name -> values at ``xs``, a log2 axis) in a PNG under $OUT or benchmarks/results/."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    plt.figure(figsize=(6, 4))
    for name, ys in curves.items():
        plt.plot(xs, ys, marker="o", label=name, linestyle="--" if name == "floor" else "-")
    plt.xscale("log", base=2)
    if log_y:
        plt.yscale("log")
    plt.xlabel(xlabel)
    plt.ylabel(ylabel)
    plt.title(f"{title} ({card_name()})")
    plt.legend()
    plt.grid(alpha=0.3)
    plt.savefig(os.path.join(os.environ.get("OUT", RESULTS), filename), dpi=120, bbox_inches="tight")
    plt.close()


def memory_over_steps(model, steps: int = 10_000) -> str:
    """GPU memory in use after a warm-up and after ``steps`` more captured steps (batch 1)."""
    decoder = Decoder(model, 1, 64 + steps + 8)
    decoder.prefill([list(range(1, 65))])
    for step in range(1, 4):
        decoder.step()
        decoder.read(step)

    def in_use():
        decoder.stream.synchronize()
        free, total = cupy.cuda.runtime.memGetInfo()
        return total - free, cupy.get_default_memory_pool().used_bytes()

    before = in_use()
    start = time.perf_counter()
    for step in range(4, 4 + steps):
        decoder.step()
        decoder.read(step - 1)
    seconds = time.perf_counter() - start
    after = in_use()
    return (
        f"\nGPU memory over {steps} captured steps (LLaMA-1B shape, batch 1, {seconds:.1f} s): device in use "
        f"{before[0] / 2**20:.1f} -> {after[0] / 2**20:.1f} MiB, CuPy's pool {before[1] / 2**20:.1f} -> "
        f"{after[1] / 2**20:.1f} MiB."
    )


if __name__ == "__main__":
    main()
