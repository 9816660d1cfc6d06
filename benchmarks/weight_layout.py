"""GPT-2's layer weights as the loader stores them ([out, in]) against the checkpoint's Conv1D layout ([in, out]), in
one process: the same random model in both layouts (the second a transposed copy), each decoded as ``generate``
runs it (``bench.time_generation``: 128-token prompts, 64 new tokens, three repeated runs: the first repeat
captures the prompt pass, the next two replay it), the layouts alternating for ``--rounds`` rounds; the best decode
step and the median replayed prompt pass of each, and how many greedy tokens agree.

    python3 benchmarks/weight_layout.py [--shapes gpt2-small,gpt2-medium,gpt2-xl] [--batches 1,16] [--rounds 3]
"""

from __future__ import annotations

import argparse
import copy
import dataclasses
import statistics

from benchmarks.common import free_gpu_memory
from cupy_transformer import bench
from cupy_transformer.layers import PreLNLayer
from cupy_transformer.runtime.arrays import import_cupy

WEIGHTS = ("w_qkv", "w_o", "w1", "w2")  # the Conv1D weights; the rest are vectors


def in_out(model):
    """``model`` (weights [out, in]) with its layer weights copied into Conv1D's [in, out] and a config to match;
    the embeddings, norms and LM head shared."""
    cupy = import_cupy()
    twin = copy.copy(model)
    twin.config = dataclasses.replace(model.config, transposed_mode=False)
    twin.layer = PreLNLayer(twin.config)
    twin.weights = [
        dataclasses.replace(w, **{f: cupy.ascontiguousarray(getattr(w, f).T) for f in WEIGHTS}) for w in model.weights
    ]
    return twin


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--shapes", default="gpt2-small,gpt2-medium,gpt2-xl")
    parser.add_argument("--batches", default="1,16")
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args(argv)
    print("| shape | batch | decode µs [in, out] | [out, in] | ratio | prompt pass ms [in, out] | [out, in] | ratio "
          "| greedy tokens agreeing |")  # fmt: skip
    print("|---|---|---|---|---|---|---|---|---|")
    for shape in args.shapes.split(","):
        model = bench.random_model(shape)
        assert model.config.transposed_mode, "the loader stores GPT-2's weights [out, in]"
        layouts = {"[in, out]": in_out(model), "[out, in]": model}
        for batch in map(int, args.batches.split(",")):
            decode, prefill, tokens = {k: [] for k in layouts}, {k: [] for k in layouts}, {}
            for _ in range(args.rounds):
                for key, m in layouts.items():
                    r = bench.time_generation(m, batch, 128, 64, repeats=3)
                    decode[key].append(r["decode_ms"] * 1e3)
                    prefill[key].append(r["prefill_ms"])
                    tokens[key] = r["tokens"][:, 0]
            (a, b), (pa, pb) = (min(v) for v in decode.values()), (statistics.median(v) for v in prefill.values())
            agree = bench.agreement(*tokens.values())
            print(f"| {shape} | {batch} | {a:.1f} | {b:.1f} | {a / b:.3f} | {pa:.3f} | {pb:.3f} | {pa / pb:.3f} "
                  f"| {agree} |", flush=True)  # fmt: skip
        del model, layouts
        free_gpu_memory()


if __name__ == "__main__":
    main()
