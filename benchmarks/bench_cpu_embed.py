"""CPU sentence embedding: our NumPy fast path beside sentence-transformers (PyTorch), same model, same texts, same
threads; the agreement of both with the float64 reference. Writes benchmarks/results/cpu-embed-<machine>.md.

python benchmarks/bench_cpu_embed.py [--texts 1000] [--batch-size 64]

sentence-transformers is not a dependency (nor in the parity extra): install it beside the venv to compare
(without it only our times are recorded).
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import time

import numpy

from cupy_transformer.loading import default_model_dir
from cupy_transformer.models import load_model
from cupy_transformer.models.bert import CPU_BATCH_TOKENS

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")
WORDS = (
    "the a of and to in is was for on that with as by at from his her they we it this an be are have had not but "
    "which one all were when there can their more if about would will so what out up into no time only new some "
    "could these two may first then do any like my now over such our man me even most made after also did many "
    "before must through back years where much your way well down should because each just those people how too "
    "little state good very make world still own see men work long get here between both life being under never "
    "day same another know while last might us great old year off come since against go came right used take "
    "three sentence embedding model benchmark transformer numpy processor thread quickly carefully measured"
).split()


def mixed_texts(count: int, seed: int = 0) -> list[str]:
    """``count`` sentences of mixed length: 70% of 5-30 words, 25% of 30-120, 5% of 120-400 (past the model's
    256 tokens, so cut)."""
    rng = numpy.random.default_rng(seed)
    bands = rng.choice(3, count, p=[0.7, 0.25, 0.05])
    lengths = [int(rng.integers(*((5, 30), (30, 120), (120, 400))[b])) for b in bands]
    return [" ".join(rng.choice(WORDS, n)).capitalize() + "." for n in lengths]


def cpu_model() -> str:
    with open("/proc/cpuinfo") as f:
        names = [line.split(":", 1)[1].strip() for line in f if line.startswith("model name")]
    return names[0] if names else platform.processor() or "unknown CPU"


def best_of(runs: int, fn):
    times, result = [], None
    for _ in range(runs):
        start = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - start)
    return min(times), result


def cosines(a, b) -> numpy.ndarray:
    return (a * b).sum(1) / numpy.linalg.norm(a, axis=1) / numpy.linalg.norm(b, axis=1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--texts", type=int, default=1000)
    parser.add_argument("--batch-size", type=int, default=64)
    parser.add_argument("--runs", type=int, default=2, help="timed runs of each; the best is kept")
    parser.add_argument("--reference-texts", type=int, default=48, help="texts checked against the float64 path")
    args = parser.parse_args()
    threads = os.cpu_count()
    folder = default_model_dir()
    texts = mixed_texts(args.texts)
    model = load_model(folder, "float32", "numpy", progress=False)
    ours_s, ours = best_of(args.runs, lambda: model.embed_texts(texts, batch_size=args.batch_size, progress=False))
    few = texts[: args.reference_texts]
    reference_s, reference = best_of(1, lambda: model.embed_texts(few, batch_size=args.batch_size, fast=False))
    rows = [
        ("ours, NumPy fast path (float32)", len(texts), ours_s, cosines(ours[: len(few)], reference).min()),
        ("ours, float64 reference (fast=False)", len(few), reference_s, 1.0),
    ]
    ratio = "sentence-transformers not installed: no comparison"
    try:
        import torch
        from sentence_transformers import SentenceTransformer
    except ImportError:
        torch = None
    if torch is not None:
        torch.set_num_threads(threads)
        st = SentenceTransformer(str(folder), device="cpu")
        st_s, theirs = best_of(args.runs, lambda: st.encode(texts, batch_size=args.batch_size))
        rows.append((f"sentence-transformers (torch {torch.__version__})", len(texts), st_s, None))
        agree = cosines(ours, theirs).min()
        ratio = f"ours / sentence-transformers = {ours_s / st_s:.2f}x the time; min cosine ours vs theirs {agree:.7f}"
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    lines = [
        "# CPU sentence embedding: all-MiniLM-L6-v2, ours vs sentence-transformers",
        "",
        f"{cpu_model()}, {threads} cores (nproc), {datetime.date.today().isoformat()}, commit {commit or 'unknown'}, "
        f"NumPy {numpy.__version__}",
        "",
        f"{len(texts)} mixed-length texts (`mixed_texts`: 70% of 5-30 words, 25% of 30-120, 5% of 120-400, cut at "
        f"256 tokens), batches of {args.batch_size} sorted by length on both sides (ours also of at most "
        f"{CPU_BATCH_TOKENS} padded tokens), every thread; best of "
        f"{args.runs} runs, model loading excluded. The float64 reference is timed on the first {len(few)} texts "
        "only; 'min cosine' is against it on those texts.",
        "",
        "| path | texts | seconds | texts/s | min cosine vs reference |",
        "|---|---|---|---|---|",
    ]
    for name, n, seconds, cos in rows:
        lines.append(f"| {name} | {n} | {seconds:.2f} | {n / seconds:.0f} | {'' if cos is None else f'{cos:.7f}'} |")
    lines += ["", ratio, ""]
    name = platform.node().split(".")[0] or "cpu"
    path = os.path.join(RESULTS, f"cpu-embed-{name}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines))
    print("\n".join(lines))
    print(f"written to {path}")


if __name__ == "__main__":
    main()
