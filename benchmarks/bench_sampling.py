"""Next-token sampling (kernels_cu/sampling.cu through ops.sample_tokens) against torch in one process: greedy
against torch.argmax, and sampling against the usual torch sampler (temperature, top-k by torch.topk, top-p by a
sort and cumulative softmax, then softmax and torch.multinomial, as Hugging Face's logits warpers do), at batch 1 and
16 over GPT-2's vocabulary (50257, fp16) and LLaMA-3's (128256, bf16). GPU time per call, the lower of two medians of
CUDA-event-timed calls, ours and torch's timed in turn; writes the table under benchmarks/results/ (or $OUT)."""

from __future__ import annotations

import os
import sys

import cupy
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import fastest_in_turn, free_gpu_memory, header, spin_up, write_table  # noqa: E402
from cupy_transformer import ops  # noqa: E402

VOCABS = [(50257, torch.float16), (128256, torch.bfloat16)]
BATCHES = [1, 16]
# (name, temperature, top_k, top_p)
MODES = [
    ("greedy", 0.0, 0, 1.0),
    ("T 1", 1.0, 0, 1.0),
    ("T 0.8, top-k 50, top-p 0.9", 0.8, 50, 0.9),
    ("T 0.8, top-p 0.9", 0.8, 0, 0.9),
]


def torch_sample(logits, temperature, top_k, top_p):
    """Token ids [B, 1] the way a torch generation loop samples: fp32 scores, top-k then top-p masking (the smallest
    prefix of the sorted distribution reaching top_p), softmax, multinomial."""
    if temperature == 0:
        return torch.argmax(logits, dim=-1)
    scores = logits.float() / temperature
    if top_k:
        kth = torch.topk(scores, top_k).values[:, -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1:
        ordered, order = torch.sort(scores, descending=True)
        probs = ordered.softmax(dim=-1)
        ordered = ordered.masked_fill(probs.cumsum(dim=-1) - probs > top_p, float("-inf"))
        scores = torch.empty_like(scores).scatter_(1, order, ordered)
    return torch.multinomial(scores.softmax(dim=-1), 1)


def rows(batch, vocab, dtype):
    logits = torch.randn(batch, vocab, device="cuda", dtype=torch.float32).mul_(4).to(dtype)
    ours_in = cupy.from_dlpack(logits)
    tokens = cupy.full(batch, -1, cupy.int32)
    state = cupy.asarray([2024, 0], cupy.uint64)
    lines = []
    for name, temperature, top_k, top_p in MODES:
        ops.sample_tokens(ours_in, tokens, state, temperature, top_k, top_p)
        drawn = tokens.get()
        assert ((drawn >= 0) & (drawn < vocab)).all(), drawn
        if temperature == 0:
            assert drawn.tolist() == torch.argmax(logits, dim=-1).tolist()
        t = fastest_in_turn(
            {
                "ours": lambda: ops.sample_tokens(ours_in, tokens, state, temperature, top_k, top_p),
                "torch": lambda: torch_sample(logits, temperature, top_k, top_p),
            }
        )
        line = (
            f"| {batch} | {vocab} | {str(dtype).split('.')[-1]} | {name} | {t['ours']:.1f} | {t['torch']:.1f} "
            f"| {t['torch'] / t['ours']:.2f} |"
        )
        print(line)
        lines.append(line)
    free_gpu_memory()
    return lines


def main():
    spin_up()
    lines = [
        header("Token sampling vs torch"),
        "GPU times: lower of two medians of 60 event-timed calls, each behind a 1 GiB read that evicts L2 and hides "
        "host overhead; ours and torch's timed in turn over three rounds, the fastest of each kept. Ours: each row "
        "over several blocks (greedy: one launch; top-k / top-p: a radix-selection launch per 8 key bits; then "
        "Gumbel-max with Philox4x64-10, scores in double), launched eagerly. Torch: argmax, or fp32 softmax with "
        "topk / sort + cumsum masking and multinomial. 'vs torch' = torch time / ours.\n",
        "| batch | vocab | dtype | mode | ours µs | torch µs | vs torch |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    for vocab, dtype in VOCABS:
        for batch in BATCHES:
            lines += rows(batch, vocab, dtype)
    write_table("sampling", lines)


if __name__ == "__main__":
    main()
