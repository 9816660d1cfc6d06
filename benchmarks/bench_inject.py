"""Hugging Face ``generate()`` on an injected model (``cupy_transformer.interop.torch.inject``) beside the original,
in one process: prefill ms and decode ms/token of four variants of the same weights.

- eager: the original, transformers eager (sdpa, its dynamic cache);
- HF static + compile: the original with ``cache_implementation="static"``, whose decoding step transformers compiles
  itself (as ``benchmarks/e2e.py`` runs it; on CUDA only: transformers compiles nothing on the CPU);
- injected: ``inject`` of a deep copy of the original (the same weights), whose
  ``generate`` is served by our decode loop (``interop.causal_lm``: the captured step, the sampler on the device);
- injected, HF loop: ``inject(..., fast_generate=False)`` of another copy: Hugging Face's own generation loop calling
  the injected forward each step with its dynamic cache, which is what the calls our loop does not serve get (beam
  search, logits processors, a cache passed in).

The models are ``cupy_transformer.bench`` shapes (GPT-2 small / XL in fp16, a LLaMA-3.2-1B shape in bf16) built by
transformers with its own random initialisation (``benchmarks.common.hf_model``); prompts are random token ids
(``bench.prompts_for``); greedy. Each variant is timed by ``benchmarks.common.hf_times``: decode ms/token is (time of
N + 1 new tokens - time of 1) / N, prefill the time of one new token. Agree: leading greedy tokens of sequence 0
equal to the eager original's (``bench.agreement``).

    python3 benchmarks/bench_inject.py [--models gpt2-small,gpt2-xl,llama-1b] [--batches 1,16] [--new-tokens 128]
                                       [--prompt 128] [--device cuda|cpu] [--quick]

``--quick``: one small model, batch 1, 16 new tokens (GPT-2 small on CUDA; on the CPU a tiny GPT-2, ``gpt2-tiny``,
whose injected model runs the NumPy path). Writes ``inject-<card>.md`` and the plot ``inject-<card>.png`` to $OUT or
benchmarks/results/ (the table after each model, should a later one not finish). The default run takes minutes
(transformers compiles its static step for each model and batch); where a command's time is limited, run the models
one at a time (``--models gpt2-xl``), each into its own $OUT.
"""

from __future__ import annotations

import argparse
import copy
import gc
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cupy_transformer import bench  # noqa: E402

DEFAULT_MODELS = "gpt2-small,gpt2-xl,llama-1b"
#: Shapes of this benchmark only, beside ``bench.SHAPES``: a tiny GPT-2 for smoke runs on the CPU (the NumPy path
#: runs it in seconds), its weights drawn wider than transformers' default so that greedy tokens are well apart.
TINY = {
    "gpt2-tiny": (
        dict(
            model_type="gpt2", n_layer=2, n_embd=64, n_head=4, vocab_size=1000, n_positions=512, initializer_range=0.3
        ),
        "float32",
    )
}
VARIANTS = ("eager", "compiled", "injected", "injected hf loop")
LABELS = {
    "eager": "HF eager",
    "compiled": "HF static + compile",
    "injected": "injected",
    "injected hf loop": "injected, Hugging Face's loop",
}
#: DeepSpeed 0.19.8's kernel injection on an H200, as issue 27 records it (not measured here): ms/token of its
#: injected model and of Hugging Face eager in the same run.
DEEPSPEED_H200 = {"gpt2-xl": (13.9, 46.8), "gpt2-small": (4.05, 11.45)}


def shape_config(shape: str) -> tuple[dict, str]:
    """config.json entries (with ``model_type``) and dtype of ``shape``: a ``bench.SHAPES`` name or one of ``TINY``."""
    if shape in TINY:
        config, dtype = TINY[shape]
        return dict(config), dtype
    return bench.shape_config(shape)


def parse_args(argv=None) -> argparse.Namespace:
    """The command line, checked (a bad value is a usage error naming its flag, before any model is built);
    ``--device`` defaults to CUDA where torch sees a GPU."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", help=f"comma-separated shapes (default {DEFAULT_MODELS})")
    parser.add_argument("--batches", help="comma-separated batch sizes (default 1,16)")
    parser.add_argument("--new-tokens", type=int, help="new tokens a generation (default 128)")
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens (default 128)")
    parser.add_argument("--device", choices=("cuda", "cpu"), help="default: cuda where torch sees a GPU")
    parser.add_argument("--quick", action="store_true", help="smoke run: one small model, batch 1, 16 new tokens")
    args = parser.parse_args(argv)
    if args.device is None:
        import torch

        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    quick_model = "gpt2-small" if args.device == "cuda" else "gpt2-tiny"
    models = args.models or (quick_model if args.quick else DEFAULT_MODELS)
    args.models = [m.strip() for m in models.split(",") if m.strip()]
    known = list(bench.SHAPES) + list(TINY)
    unknown = [m for m in args.models if m not in known]
    if not args.models or unknown:
        parser.error(f"--models: expected shapes among {', '.join(known)}; got {models!r}")
    batches = args.batches or ("1" if args.quick else "1,16")
    try:
        args.batches = [int(b) for b in batches.split(",")]
    except ValueError:
        args.batches = []
    if not args.batches or min(args.batches) < 1:
        parser.error(f"--batches: expected comma-separated positive integers; got {batches!r}")
    if args.new_tokens is None:
        args.new_tokens = 16 if args.quick else 128
    if args.new_tokens < 1:
        parser.error(f"--new-tokens: expected a positive integer; got {args.new_tokens}")
    if args.prompt < 1:
        parser.error(f"--prompt: expected a positive integer; got {args.prompt}")
    for shape in args.models:
        config = shape_config(shape)[0]
        positions = config.get("n_positions") or config["max_position_embeddings"]
        if args.prompt + args.new_tokens + 1 > positions:  # hf_times generates new_tokens + 1
            parser.error(
                f"--prompt, --new-tokens: {args.prompt} + {args.new_tokens} + 1 tokens exceed {shape}'s {positions} "
                "positions"
            )
    return args


def ratio(base: dict | None, new: dict | None, key: str = "decode_ms") -> str:
    """``base``'s time over ``new``'s as "2.50x" (above 1: ``new`` is faster), or "–" where either did not run."""
    if not base or not new:
        return "–"
    return f"{base[key] / new[key]:.2f}x"


def ms(result: dict | None, key: str, digits: int) -> str:
    return f"{result[key]:.{digits}f}" if result else "–"


def table_head(new_tokens: int, prompt: int) -> list[str]:
    """The table's explanation, column names and rule."""
    return [
        f"Hugging Face generate(), greedy, {prompt}-token prompts, {new_tokens} new tokens. Decode ms/token: a step "
        "of every sequence; prefill: one new token. eager: transformers eager (sdpa, dynamic cache); compiled: its "
        "static cache with the step compiled by transformers; injected: `inject` of a copy of the same model, its "
        "generate() served by our decode loop; HF loop: another injected copy with `fast_generate=False`, Hugging "
        "Face's loop and dynamic cache calling the injected forward (what beam search and logits processors get). x "
        "columns: eager's (compiled's) ms/token over the injected one's, above 1 the injected is faster. Agree: "
        "leading greedy tokens of sequence 0 equal to eager's (compiled, injected, HF loop).\n",
        "| model | dtype | batch | eager ms/token | compiled | injected | HF loop | injected vs eager "
        "| vs compiled | HF loop vs eager | vs compiled | prefill ms: eager | compiled | injected "
        "| HF loop | agree |",
        "|---" * 16 + "|",
    ]


def row(shape: str, dtype: str, batch: int, results: dict, agree: dict) -> str:
    """A table row from ``results`` (variant -> ``hf_times`` result or None) and ``agree`` (variant -> "n/N")."""
    r = {v: results.get(v) for v in VARIANTS}
    decode = [ms(r[v], "decode_ms", 3) for v in VARIANTS]
    prefill = [ms(r[v], "prefill_ms", 2) for v in VARIANTS]
    ratios = [
        ratio(r[base], r[injected]) for injected in ("injected", "injected hf loop") for base in ("eager", "compiled")
    ]
    agreed = ", ".join(agree.get(v, "–") for v in VARIANTS[1:])
    return "| " + " | ".join([shape, dtype, str(batch), *decode, *ratios, *prefill, agreed]) + " |"


def deepspeed_note() -> str:
    """The issue's DeepSpeed figures, with their speed-up over Hugging Face eager in the same run."""
    figures = ", ".join(
        f"{shape} {ds} ms/token against Hugging Face eager {hf} ({hf / ds:.2f}x)"
        for shape, (ds, hf) in DEEPSPEED_H200.items()
    )
    return (
        "\nDeepSpeed's injection, for reference (not measured here): on an H200, DeepSpeed 0.19.8's injected "
        f"{figures}, as issue 27 records them (batch and prompt not stated there). Compare the x columns, not the ms, "
        "across cards."
    )


def timed(label: str, failures: list, fn):
    """``fn()``, or None with the failure recorded in ``failures`` (the row reports what ran)."""
    try:
        return fn()
    except Exception as e:
        failures.append(f"{label}: {type(e).__name__}: {e}"[:300])
        print(failures[-1], flush=True)
        return None


def measure(original, injected, looped, prompts, new_tokens: int, cuda: bool, failures: list, where: str) -> dict:
    """variant -> ``hf_times`` result (None where it failed or cannot run: the compiled static cache on the CPU)."""
    from benchmarks.common import hf_times

    runs = {
        "eager": (original, False),
        "compiled": (original, True),
        "injected": (injected, False),
        "injected hf loop": (looped, False),
    }
    results = {}
    for variant, (model, static) in runs.items():
        if variant == "compiled" and not cuda:
            results[variant] = None
            continue
        results[variant] = timed(
            f"{where}, {LABELS[variant]}", failures, lambda: hf_times(model, prompts, new_tokens, static=static)
        )
    return results


def agreements(results: dict) -> dict:
    """variant -> ``bench.agreement`` of its sequence 0 with eager's, for the variants that ran beside eager."""
    if not results.get("eager"):
        return {}
    reference = results["eager"]["tokens"][0].cpu().numpy()
    return {
        v: bench.agreement(r["tokens"][0].cpu().numpy(), reference)
        for v, r in results.items()
        if v != "eager" and r is not None
    }


def plot(curves: dict, groups: list[str], title: str, path: str) -> str | None:
    """Decode ms/token per model and batch (``groups``), a bar per variant (``curves``: variant -> values, None where
    it did not run), as a PNG at ``path``; None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    shown = [v for v in VARIANTS if any(x is not None for x in curves.get(v, ()))]  # a variant that never ran: no bar
    width = 0.8 / max(1, len(shown))
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups)), 4))
    for i, variant in enumerate(shown):
        offset = (i - (len(shown) - 1) / 2) * width
        at = [(g + offset, x) for g, x in enumerate(curves[variant]) if x is not None]
        color = f"C{VARIANTS.index(variant)}"  # the same colour for a variant on every card's plot
        ax.bar([a for a, _ in at], [x for _, x in at], width, label=LABELS[variant], color=color)
    ax.set_xticks(range(len(groups)), groups)
    ax.set_yscale("log")  # GPT-2 small at batch 1 and GPT-2 XL eager are two orders of magnitude apart
    ax.set_ylabel("decode ms/token (log)")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(axis="y", alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def main(argv=None) -> str:
    """Runs the benchmark; returns the table's path."""
    args = parse_args(argv)
    import torch
    import transformers

    from benchmarks.common import RESULTS, card_name, card_tag, free_gpu_memory, header, hf_model_from, write_table
    from cupy_transformer.interop.torch import inject

    cuda = args.device == "cuda"
    card = card_name() if cuda else "CPU"
    lines = [
        header("Injected Hugging Face generate() beside the original", card).rstrip("\n")
        + f", transformers {transformers.__version__}\n",
        *table_head(args.new_tokens, args.prompt),
    ]
    failures: list[str] = []
    curves: dict = {v: [] for v in VARIANTS}
    groups: list[str] = []
    path = None
    for shape in args.models:
        config, dtype = shape_config(shape)
        original = hf_model_from(config, dtype, args.device)
        injected = inject(copy.deepcopy(original))  # copied before any run: nothing compiled is carried over
        looped = inject(copy.deepcopy(original), fast_generate=False)
        for batch in args.batches:
            prompts = bench.prompts_for(original.config.vocab_size, batch, args.prompt)
            where = f"{shape} batch {batch}"
            results = measure(original, injected, looped, prompts, args.new_tokens, cuda, failures, where)
            lines.append(row(shape, dtype, batch, results, agreements(results)))
            print(lines[-1], flush=True)
            groups.append(f"{shape}\nbatch {batch}")
            for v in VARIANTS:
                curves[v].append(results[v]["decode_ms"] if results[v] else None)
            if cuda:
                free_gpu_memory()
        del original, injected, looped
        if cuda:
            torch._dynamo.reset()  # the compiled steps of this model, which hold it and their CUDA graphs' memory
        gc.collect()
        if cuda:
            free_gpu_memory()
        # table and plot after each model: a run cut short keeps what it measured
        path = write_table("inject", finish(lines, failures, cuda), card)
        png = os.path.join(os.environ.get("OUT", RESULTS), f"inject-{card_tag(card)}.png")
        plot(curves, groups, f"generate() decode, {args.prompt}-token prompts ({card})", png)
    return path


def finish(lines: list[str], failures: list[str], cuda: bool) -> list[str]:
    """The table with its notes: the DeepSpeed reference, what could not run and what failed."""
    notes = [deepspeed_note()]
    if not cuda:
        notes.append("\nOn the CPU transformers compiles nothing: no compiled column.")
    if failures:
        notes.append("\nFailed (the row reports what ran):\n")
        notes += [f"- {f}" for f in failures]
    return lines + notes


if __name__ == "__main__":
    main()
