"""A captured decode step's time across source trees, on one GPU in one call: for each round, each tree runs in a
process of its own (its own ``cupy_transformer``, kernels and kernel cache entries) and times the step of each shape
(``bench.time_generation``: batch, a 128-token prompt or ``--prompt``'s, 64 new tokens, best of 3 runs), with
programmatic launches and plain ones. A first round, not counted, compiles every tree's kernels. Prints each tree's
best over the rounds and its ratio to the first tree's.

    python3 benchmarks/ab_step.py [--shapes gpt2-small,gpt2-xl,llama-1b] [--batch 1] [--prompt 128] [--rounds 2] TREE
        [TREE ...]

A TREE is a directory holding a checkout of the project (``.`` for this one). An older commit becomes one with
``git archive <commit> | tar -x -C <dir>`` in a folder git ignores, carried to the GPU machine with the working tree.
Trees alternate within a round, so a drift of the machine falls on all of them alike.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys

# What a tree's process runs: its own package, the step of each shape, one JSON line a shape.
CHILD = """
import json, sys
from cupy_transformer import bench
batch, prompt = int(sys.argv[2]), int(sys.argv[3])
for shape in sys.argv[1].split(","):
    model = bench.random_model(shape)
    best = {}
    for _ in range(3):
        for programmatic in (True, False):
            r = bench.time_generation(model, batch, prompt, 64, repeats=1, programmatic=programmatic)
            key = "programmatic" if programmatic else "plain"
            best[key] = min(best.get(key, 1e9), r["decode_ms"] * 1e3)
    print(json.dumps({"shape": shape, **best}), flush=True)
    del model
"""


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("trees", nargs="+", metavar="TREE", help="directories holding a checkout of the project")
    parser.add_argument("--shapes", default="gpt2-small,gpt2-xl,llama-1b", help="comma-separated bench shapes")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128, help="prompt tokens a sequence (default 128)")
    parser.add_argument("--rounds", type=int, default=2, help="counted rounds after the compiling one (default 2)")
    parser.add_argument("--timeout", type=float, default=300, help="seconds a tree's process may take (default 300)")
    args = parser.parse_args(argv)
    missing = [t for t in args.trees if not os.path.isfile(os.path.join(t, "cupy_transformer", "bench.py"))]
    if missing:
        parser.error(f"TREE: expected directories holding cupy_transformer/bench.py; got {', '.join(missing)}")
    if args.batch < 1 or args.prompt < 1 or args.rounds < 1:
        parser.error(
            f"--batch, --prompt, --rounds: expected positive integers; got {args.batch}, {args.prompt}, {args.rounds}"
        )
    args.shapes = [s.strip() for s in args.shapes.split(",") if s.strip()]
    if not args.shapes:
        parser.error("--shapes: expected at least one shape")
    return args


def run_tree(tree: str, shapes: list[str], batch: int, timeout: float, prompt: int = 128) -> dict:
    """shape -> {"programmatic": µs, "plain": µs} from one process of ``tree``; a failed process reports on stderr
    and gives what it printed before failing."""
    tree = os.path.abspath(tree)
    env = dict(os.environ, PYTHONPATH=tree, PYTHONUNBUFFERED="1")
    command = [sys.executable, "-c", CHILD, ",".join(shapes), str(batch), str(prompt)]
    failure = None
    try:
        done = subprocess.run(command, cwd=tree, env=env, capture_output=True, text=True, timeout=timeout)
        out = done.stdout
        if done.returncode != 0:
            failure = (done.stderr.strip().splitlines() or [f"exit status {done.returncode}"])[-1]
    except subprocess.TimeoutExpired as e:
        out = e.stdout.decode() if isinstance(e.stdout, bytes) else e.stdout or ""
        failure = f"timed out after {timeout:.0f} s"
    if failure:
        print(f"{tree}: {failure}", file=sys.stderr, flush=True)
    results = {}
    for line in out.splitlines():
        if line.startswith("{"):
            r = json.loads(line)
            results[r.pop("shape")] = r
    return results


def merge(best: dict, tree: str, results: dict) -> None:
    """Keeps in ``best[tree][shape][key]`` the least µs of every round."""
    for shape, times in results.items():
        slot = best.setdefault(tree, {}).setdefault(shape, {})
        for key, us in times.items():
            slot[key] = min(slot.get(key, us), us)


def table(best: dict, trees: list[str], shapes: list[str]) -> list[str]:
    """A markdown table: µs a step per (shape, tree), programmatic and plain, with the ratio to the first tree."""
    lines = ["| shape | tree | step µs | vs first | plain launches µs | vs first |", "|---|---|---|---|---|---|"]
    for shape in shapes:
        first = best.get(trees[0], {}).get(shape, {})
        for tree in trees:
            times = best.get(tree, {}).get(shape, {})
            cells = []
            for key in ("programmatic", "plain"):
                us, base = times.get(key), first.get(key)
                cells += [f"{us:.1f}" if us else "–", f"{us / base:.3f}x" if us and base else "–"]
            lines.append(f"| {shape} | {tree} | " + " | ".join(cells) + " |")
    return lines


def main(argv=None) -> None:
    args = parse_args(argv)
    best: dict = {}
    for round_ in range(args.rounds + 1):
        for tree in args.trees:
            results = run_tree(tree, args.shapes, args.batch, args.timeout, args.prompt)
            for shape, times in results.items():
                times_text = ", ".join(f"{k} {v:.1f}" for k, v in times.items())
                print(f"round {round_}{' (compiling)' if round_ == 0 else ''} {tree} {shape}: {times_text}", flush=True)
            if round_ > 0:
                merge(best, tree, results)
    print(f"\nDecode step, batch {args.batch}, {args.prompt}-token prompts, best of {args.rounds} rounds:")
    print("\n".join(table(best, args.trees, args.shapes)))


if __name__ == "__main__":
    main()
