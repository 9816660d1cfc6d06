"""Where an injected model's ``generate()`` spends its host time: cProfile of one warm call per variant.

    python3 benchmarks/profile_inject.py [--model gpt2-small] [--batch 1] [--new-tokens 16] [--top 25]

Variants: the injected model with its fast generate (our decode loop), with the static cache (Hugging Face's loop
on the injected forward), and with ``fast_generate=False`` (Hugging Face's loop and dynamic cache on the injected
forward). Prints each variant's wall time and the functions with the most cumulative and own time.
"""

from __future__ import annotations

import argparse
import copy
import cProfile
import os
import pstats
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", default="gpt2-small")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--prompt", type=int, default=128)
    parser.add_argument("--new-tokens", type=int, default=16)
    parser.add_argument("--top", type=int, default=25)
    args = parser.parse_args(argv)

    import torch

    from benchmarks.common import hf_model
    from cupy_transformer import bench
    from cupy_transformer.interop.torch import inject

    original, _ = hf_model(args.model)
    prompts = bench.prompts_for(original.config.vocab_size, args.batch, args.prompt)
    ids = torch.from_numpy(prompts).cuda()
    base = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    variants = {
        "fast generate": (inject(copy.deepcopy(original)), {}),
        "static cache": (inject(copy.deepcopy(original)), {"cache_implementation": "static"}),
        "fast_generate=False": (inject(copy.deepcopy(original), fast_generate=False), {}),
    }
    for label, (model, extra) in variants.items():
        kwargs = dict(base, **extra)
        with torch.inference_mode():
            for _ in range(2):
                model.generate(ids, max_new_tokens=args.new_tokens, **kwargs)
            torch.cuda.synchronize()
            profile = cProfile.Profile()
            start = time.perf_counter()
            profile.enable()
            model.generate(ids, max_new_tokens=args.new_tokens, **kwargs)
            torch.cuda.synchronize()
            profile.disable()
            wall = time.perf_counter() - start
        print(f"\n## {label}: {wall * 1e3:.2f} ms for {args.new_tokens} new tokens (under cProfile)", flush=True)
        stats = pstats.Stats(profile)
        stats.sort_stats("cumulative").print_stats(args.top)
        stats.sort_stats("tottime").print_stats(args.top)


if __name__ == "__main__":
    main()
