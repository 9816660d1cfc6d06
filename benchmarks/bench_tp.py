"""Tensor parallelism over the GPUs of one host (issue 28's benchmark): a model of ``cupy_transformer.bench`` shape
(LLaMA-7B and LLaMA-13B shapes, fp16) at TP 1, 2, 4, one process per GPU through ``parallel.launch`` (NCCL).

Per shape, TP size and batch: prefill ms of the prompts and their first token, decode ms/token (GPU time of a step
of every sequence over the generation, as ``bench.time_generation`` measures it for ``benchmarks/e2e.py``: the
captured step, greedy, so the vocab-parallel head gathers (value, id) pairs, not logits), speed-ups over TP 1,
device memory per GPU, the all-reduces' share of a decode step, and the greedy tokens' agreement with TP 1's.

Weights: random fp16, no checkpoint. Each rank makes only its slices (``RandomShards``: an element is a hash of the
seed, the tensor's name and its place in the whole tensor), so TP 1 and TP N hold the same model (the agreement
column shows it, up to fp16's drift once two logits come within rounding).

All-reduce share: the decode step timed again with the all-reduces replaced by no-ops (``Switchable``; the values
are then wrong, the work is the rest of the step's), share = 1 - that / the step. Not CUDA events around each
all-reduce: inside a captured graph those need external event nodes between the kernels (and they break the
programmatic launches that overlap a kernel's start with the one before), and the difference also counts what a
rank waits for the slowest one, which is what the step loses.

Memory per GPU: the device memory in use after the timed runs (``cudaMemGetInfo``: the CUDA context, NCCL's
buffers, the weights and CuPy's pool, which keeps the blocks of its busiest moment: the KV cache and the prompt
pass's activations), the largest rank's; the pool is emptied between batches, so each batch's is its own.

    python3 benchmarks/bench_tp.py [--shapes llama-7b,llama-13b] [--tp 1,2,4] [--batches 1,16] [--prompt 2048]
                                   [--new-tokens 128] [--repeats 2] [--cpu-smoke]

Refuses (one line, exit status 2) when fewer GPUs are visible than the largest TP. A (shape, TP) runs in one
launch, all its batches on one model; where it fails (out of memory at batch 16, say) each batch is run again in a
launch of its own and a failing one is reported in the table. Writes ``bench-tp-<card>.md`` and the plot
``bench-tp-<card>.png`` to $OUT or benchmarks/results/ (the table after each TP size, should a later one not
finish). Where a command's time is limited, run the shapes one at a time (``--shapes llama-13b``), each into its own
$OUT. ``--cpu-smoke``: a tiny LLaMA on the NumPy path with simulated ranks (``parallel.run_simulated``), fp32, a
few tokens: the whole script in seconds, for a CPU test (its times say nothing).
"""

from __future__ import annotations

import argparse
import gc
import os
import sys
import time
import zlib
from pathlib import Path

import numpy

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cupy_transformer import bench, parallel  # noqa: E402
from cupy_transformer.generation import Decoder  # noqa: E402
from cupy_transformer.loading import Checkpoint  # noqa: E402
from cupy_transformer.models import MODELS  # noqa: E402

#: A tiny LLaMA for ``--cpu-smoke`` (4 heads and kv heads, MLP 128: TP 1, 2 and 4 divide them; 101 ids, which 2
#: and 4 do not divide, so the vocab-parallel padding runs), fp32 so that every TP size's greedy tokens agree.
TINY = {
    "llama-tiny": (
        dict(
            model_type="llama",
            hidden_size=64,
            num_hidden_layers=2,
            num_attention_heads=4,
            num_key_value_heads=4,
            intermediate_size=128,
            vocab_size=101,
            max_position_embeddings=256,
        ),
        "float32",
    )
}
SMOKE = dict(shapes="llama-tiny", tp="1,2,4", batches="1,2", prompt=8, new_tokens=4, repeats=1)
GOAL = (
    "Goal (issue 28): TP 2 decode at batch 1 >= 1.7x TP 1 on the 7B shape, TP 4 >= 2.8x; all-reduce <= 15% of the step."
)
STD = 0.02  # the weights' standard deviation, transformers' initializer_range for LLaMA
CHUNK = 1 << 24  # elements hashed at a time (a few 8-byte temporaries of this size)


def shape_config(shape: str) -> tuple[dict, str]:
    """config.json entries (with ``model_type``) and dtype of ``shape``: one of ``TINY`` or a ``bench.SHAPES``."""
    if shape in TINY:
        config, dtype = TINY[shape]
        return dict(config), dtype
    return bench.shape_config(shape)


class HashedTensor:
    """A 2-D weight ``name`` of ``shape`` that is never made whole: indexing it with slices (as ``parallel.Split``
    and ``VocabSplit`` take a rank's part) makes those elements, float32 in ``xp``, each from a hash of ``key`` and
    its row and column in the whole tensor (splitmix64's finaliser), uniform with standard deviation ``STD``. A 1-D
    tensor is ones (a norm's scale, "...weight") or zeros (a bias)."""

    def __init__(self, name: str, shape: tuple, key: int, xp):
        self.name, self.shape, self.key, self.xp = name, shape, key, xp

    def __getitem__(self, index):
        xp = self.xp
        index = index if isinstance(index, tuple) else (index,)
        index += (slice(None),) * (len(self.shape) - len(index))
        bounds = []
        for s, n in zip(index, self.shape):
            start, stop, step = s.indices(n)
            assert step == 1, "slices of consecutive rows and columns only"
            bounds.append((start, max(start, stop)))
        if len(self.shape) == 1:
            return (xp.ones if self.name.endswith("weight") else xp.zeros)(bounds[0][1] - bounds[0][0], numpy.float32)
        (r0, r1), (c0, c1) = bounds
        out = xp.empty((r1 - r0, c1 - c0), numpy.float32)
        columns = xp.arange(c0, c1, dtype=numpy.uint64)[None, :]
        step = max(1, CHUNK // max(1, c1 - c0))
        for r in range(r0, r1, step):
            rows = xp.arange(r, min(r + step, r1), dtype=numpy.uint64)[:, None]
            out[r - r0 : r - r0 + len(rows)] = self._uniform(rows * numpy.uint64(self.shape[1]) + columns)
        return out

    def _uniform(self, flat):
        """float32 in [-a, a), a = sqrt(3) STD, from the flat indices ``flat`` (uint64) and the key."""
        u64 = numpy.uint64
        z = flat * u64(0x9E3779B97F4A7C15) + u64(self.key)
        z = (z ^ (z >> u64(30))) * u64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> u64(27))) * u64(0x94D049BB133111EB)
        z = z ^ (z >> u64(31))
        a = numpy.float32(3**0.5 * STD)
        return ((z >> u64(40)).astype(numpy.float32) * numpy.float32(2.0**-23) - numpy.float32(1)) * a


class RandomShards(Checkpoint):
    """A checkpoint without files whose tensors are ``HashedTensor``s of ``seed``: a rank's ``split`` takes its
    slices of one and only they are made, so no rank makes a whole sharded tensor and every TP size gets the same
    weights."""

    def __init__(self, config: dict, name: str, seed: int, xp):
        # No folder to read: the attributes Checkpoint.__init__ would set from one.
        self.folder, self.config, self._file, self._arrays = Path(f"<random {name}>"), config, {}, None
        self.seed, self.xp = seed, xp

    def tensor(self, name: str, dtype, shape=None, backend: str = "cupy", split=None, rank: int = 0, size: int = 1):
        key = zlib.crc32(f"{self.seed}:{name}".encode()) * 0x100000001B3
        view = HashedTensor(name, tuple(shape), key % 2**64, self.xp)
        value = view[()] if split is None else split.take(name, view, tuple(shape), rank, size, self.xp)
        return self.xp.ascontiguousarray(value.astype(dtype))


class Switchable:
    """A communicator whose ``all_reduce`` does nothing while ``reducing`` is False (the all-reduce share's
    timing); the all-gathers and broadcasts always run, so every rank still picks the same token."""

    def __init__(self, comm):
        self.comm, self.rank, self.size, self.reducing = comm, comm.rank, comm.size, True

    def all_reduce(self, x):
        return self.comm.all_reduce(x) if self.reducing else x

    def all_gather(self, x):
        return self.comm.all_gather(x)

    def broadcast(self, x, root: int = 0):
        return self.comm.broadcast(x, root)


def time_on_cpu(model, batch: int, prompt: int, new_tokens: int, repeats: int, prompts) -> dict:
    """``bench.time_generation``'s figures on the NumPy path, by the host's clock (after one warm-up run)."""
    decoder = Decoder(model, batch, prompt + new_tokens)
    runs = []
    for _ in range(repeats + 1):
        start = time.perf_counter()
        decoder.prefill(prompts)
        prefilled = time.perf_counter()
        tokens = [decoder.read(0)]
        for step in range(1, new_tokens):
            decoder.step()
            tokens.append(decoder.read(step))
        steps = (time.perf_counter() - prefilled) / max(1, new_tokens - 1)
        runs.append({"prefill_ms": (prefilled - start) * 1e3, "decode_ms": steps * 1e3, "tokens": numpy.stack(tokens)})
    return min(runs[1:], key=lambda r: r["decode_ms"])


def rank_cells(comm, shape: str, batches: list, prompt: int, new_tokens: int, repeats: int, seed: int, gpu: bool):
    """A ``parallel.launch`` (or ``run_simulated``) target: this rank's shards of a random model of ``shape``, timed
    at each of ``batches``; returns batch -> figures (the device's name with them)."""
    config, dtype = shape_config(shape)
    xp = numpy
    if gpu:
        import cupy as xp
    switch = Switchable(comm)
    model = MODELS[config["model_type"]](
        RandomShards(config, shape, seed, xp), dtype, "cupy" if gpu else "numpy", progress=False, comm=switch
    )
    cells = {}
    for batch in batches:
        prompts = bench.prompts_for(model.vocab, batch, prompt).tolist()

        def timed(runs):
            if gpu:
                return bench.time_generation(model, batch, prompt, new_tokens, repeats=runs, prompts=prompts)
            return time_on_cpu(model, batch, prompt, new_tokens, runs, prompts)

        cell = timed(repeats)
        cell["memory"] = device_memory() if gpu else None
        cell["no_all_reduce_ms"] = None
        if comm.size > 1:
            switch.reducing = False
            try:
                cell["no_all_reduce_ms"] = timed(1)["decode_ms"]
            except ValueError:  # non-finite logits without the sums (every rank alike: the logits are gathered)
                pass
            switch.reducing = True
        cell["card"] = device_name() if gpu else "CPU (simulated ranks)"
        cells[batch] = cell
        gc.collect()
        if gpu:
            xp.get_default_memory_pool().free_all_blocks()  # each batch's memory its own
    return cells


def device_memory() -> int:
    """Bytes in use on the current GPU (all of it: this process is its only user)."""
    import cupy

    cupy.cuda.Device().synchronize()
    free, total = cupy.cuda.runtime.memGetInfo()
    return total - free


def device_name() -> str:
    import cupy

    name = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["name"]
    return name.decode() if isinstance(name, bytes) else name


def measure(shape: str, tp: int, batches: list, args) -> dict:
    """batch -> (rank 0's figures, the largest rank's memory), or an error's text where it failed."""
    task = (shape, batches, args.prompt, args.new_tokens, args.repeats, args.seed, not args.cpu_smoke)
    if args.cpu_smoke:
        ranks = parallel.run_simulated(tp, lambda comm: rank_cells(comm, *task))
    else:
        try:
            ranks = parallel.launch(tp, rank_cells, task)
        except parallel.RankError as e:
            if len(batches) > 1:  # each batch alone: those that fit are measured
                return {b: cell for batch in batches for b, cell in measure(shape, tp, [batch], args).items()}
            message = f"{type(e.error).__name__}: {e.error}".replace("|", "/").replace("\n", " ")
            print(f"{shape} TP {tp} batch {batches[0]}: rank {e.rank} failed: {message}", flush=True)
            return {batches[0]: f"failed (rank {e.rank}: {message[:120]})"}
    cells = {}
    for batch in batches:
        cell = dict(ranks[0][batch])
        if cell["memory"] is not None:
            cell["memory"] = max(r[batch]["memory"] for r in ranks)
        cells[batch] = cell
    return cells


def row(shape: str, tp: int, batch: int, cell, base) -> str:
    """A table row: ``cell`` this TP size's figures (or a failure's text), ``base`` TP 1's (None where it did not
    run)."""
    if isinstance(cell, str):
        return f"| {shape} | {tp} | {batch} | {cell} |" + " |" * 7  # the other 7 columns empty
    ok = isinstance(base, dict)
    speedup = f"{base['decode_ms'] / cell['decode_ms']:.2f}x" if ok else "–"
    prefill_speedup = f"{base['prefill_ms'] / cell['prefill_ms']:.2f}x" if ok else "–"
    share = "–"
    if cell["no_all_reduce_ms"] is not None:
        share = f"{100 * (1 - cell['no_all_reduce_ms'] / cell['decode_ms']):.1f}%"
    memory = f"{cell['memory'] / 2**30:.1f}" if cell["memory"] is not None else "–"
    agree = bench.agreement(cell["tokens"][:, 0], base["tokens"][:, 0]) if ok else "–"
    return (
        f"| {shape} | {tp} | {batch} | {cell['prefill_ms']:.2f} | {prefill_speedup} | {cell['decode_ms']:.3f} "
        f"| {speedup} | {batch * 1e3 / cell['decode_ms']:.0f} | {share} | {memory} | {agree} |"
    )


def table_head(prompt: int, new_tokens: int, gpu: bool) -> list[str]:
    where = "GPU ms (CUDA events)" if gpu else "host ms (the NumPy path, simulated ranks: a smoke run, not a timing)"
    return [
        f"{prompt}-token prompts (random ids), {new_tokens} new tokens, greedy, captured steps. Prefill: the prompt "
        f"pass and its first token. Decode: {where} for a step of every sequence. Speed-ups over TP 1 of the same "
        "shape and batch. All-reduce: the share of a decode step that the all-reduces take (the step timed with them "
        "as no-ops). Memory: device memory in use per GPU after the runs, the largest rank's. Agree: leading greedy "
        f"tokens of sequence 0 equal to TP 1's.\n\n{GOAL}\n",
        "| model | TP | batch | prefill ms | prefill speed-up | decode ms/token | decode speed-up | tokens/s "
        "| all-reduce share | memory GiB/GPU | agree with TP 1 |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]


def plot(curves: dict, tps: list, title: str, path: str) -> str | None:
    """Decode speed-up over TP 1 against TP size, a line per (shape, batch) in ``curves`` (None where it did not
    run) and the ideal; a PNG at ``path``, or None where matplotlib is not installed."""
    try:
        import matplotlib
    except ImportError:
        print("matplotlib is not installed: no plot", flush=True)
        return None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    ax.plot(tps, tps, linestyle="--", color="grey", label="ideal")
    for name, ys in curves.items():
        at = [(t, y) for t, y in zip(tps, ys) if y is not None]
        ax.plot([t for t, _ in at], [y for _, y in at], marker="o", label=name)
    ax.set_xscale("log", base=2)
    ax.set_xticks(tps, [str(t) for t in tps])
    ax.set_xlabel("GPUs (TP size)")
    ax.set_ylabel("decode speed-up over TP 1")
    ax.set_title(title)
    ax.legend(fontsize="small")
    ax.grid(alpha=0.3)
    fig.savefig(path, dpi=120, bbox_inches="tight")
    plt.close(fig)
    return path


def integers(flag: str):
    def parse(text: str) -> list[int]:
        try:
            values = [int(v) for v in text.split(",")]
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected comma-separated integers; got {text!r}") from None
        if any(v < 1 for v in values):
            raise argparse.ArgumentTypeError(f"expected integers >= 1; got {text!r}")
        return values

    parse.__name__ = flag  # argparse names the flag in its message
    return parse


def parse_args(argv=None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", help="comma-separated shapes (default llama-7b,llama-13b)")
    parser.add_argument("--tp", type=integers("--tp"), help="TP sizes (default 1,2,4)")
    parser.add_argument("--batches", type=integers("--batches"), help="batch sizes (default 1,16)")
    parser.add_argument("--prompt", type=int, help="prompt tokens (default 2048)")
    parser.add_argument("--new-tokens", type=int, help="new tokens a generation (default 128)")
    parser.add_argument("--repeats", type=int, help="timed runs after a warm-up, the best kept (default 2)")
    parser.add_argument("--seed", type=int, default=0, help="the weights' seed")
    parser.add_argument("--cpu-smoke", action="store_true", help="a tiny model on the NumPy path, simulated ranks")
    args = parser.parse_args(argv)
    defaults = dict(shapes="llama-7b,llama-13b", tp="1,2,4", batches="1,16", prompt=2048, new_tokens=128, repeats=2)
    for key, value in (SMOKE if args.cpu_smoke else defaults).items():
        if getattr(args, key) is None:
            setattr(args, key, integers(key)(value) if key in ("tp", "batches") else value)
    args.shapes = args.shapes.split(",")
    for shape in args.shapes:
        if shape not in TINY and shape not in bench.SHAPES:
            parser.error(f"--shapes: {shape!r} is not one of {', '.join([*bench.SHAPES, *TINY])}")
        positions = shape_config(shape)[0].get("max_position_embeddings", 2048)
        if args.prompt + args.new_tokens > positions:
            parser.error(f"--prompt {args.prompt} + --new-tokens {args.new_tokens}: {shape} has {positions} positions")
    for flag in ("prompt", "new_tokens", "repeats"):
        if getattr(args, flag) < 1:
            parser.error(f"--{flag.replace('_', '-')}: expected an integer >= 1; got {getattr(args, flag)}")
    return args


def main(argv=None) -> str:
    """Runs the benchmark; returns the table's path."""
    args = parse_args(argv)
    if not args.cpu_smoke:
        from cupy_transformer.cli import _gpu_count

        gpus = _gpu_count()  # cudaGetDeviceCount: no context here, so the ranks' memory figures are their own
        largest = max(args.tp)
        if largest > gpus:
            print(f"bench_tp: --tp {largest} needs {largest} GPUs, one a rank; {gpus} visible", file=sys.stderr)
            raise SystemExit(2)
    from benchmarks.common import RESULTS, card_tag, header, write_table

    results: dict = {}  # (shape, TP, batch) -> figures or a failure's text
    card, path = "unknown card", None
    for shape in args.shapes:
        for tp in args.tp:
            results.update({(shape, tp, b): cell for b, cell in measure(shape, tp, args.batches, args).items()})
            card = next((c["card"] for c in results.values() if isinstance(c, dict)), card)
            lines = [header("Tensor parallelism: one model over the GPUs of a host", card)]
            lines += table_head(args.prompt, args.new_tokens, not args.cpu_smoke)
            for (s, t, b), cell in results.items():
                lines.append(row(s, t, b, cell, results.get((s, 1, b))))
                if (s, t) == (shape, tp):
                    print(lines[-1], flush=True)
            path = write_table("bench-tp", lines, card)
    curves = {
        f"{s}, batch {b}": [
            results[(s, 1, b)]["decode_ms"] / results[(s, t, b)]["decode_ms"]
            if isinstance(results.get((s, 1, b)), dict) and isinstance(results.get((s, t, b)), dict)
            else None
            for t in args.tp
        ]
        for s in args.shapes
        for b in args.batches
    }
    folder = os.environ.get("OUT", RESULTS)
    plot(curves, args.tp, f"decode speed-up over TP 1 ({card})", os.path.join(folder, f"bench-tp-{card_tag(card)}.png"))
    return path


if __name__ == "__main__":
    main()
