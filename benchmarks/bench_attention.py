"""Attention kernels against torch's scaled_dot_product_attention in one process, SDPA with its default
backend choice (cuDNN on this stack) and with the flash backend forced, on the issue's sizes:
- prefill (the launcher's kernel: prefill_attention_sm90.cu on an H100/H200, with prefill_attention.cu, the
  mma.sync kernel of other GPUs, beside it), fp16, B8 H16 S2048 D64 and B4 H32 S4096 D128 causal and not, a
  short causal sequence, and BERT-style boolean padding masks (MiniLM's head size 32, BERT-base's 64): TFLOP/s
  (causal: half of 4 B H S^2 D, FlashAttention's convention) against cuBLAS's measured fp16 rate;
- decode (kernels_cu/decode_attention.cu): one query token per sequence over a KV cache, context 4096, 32
  heads of 128, batch 1 and 16, and grouped-query 32/8: GB/s of K + V read against the copy bandwidth.
Both through their launchers (ops/decode_attention.py, ops/prefill_attention*.py). Then SoftmaxOp
(kernels_cu/softmax.cu) on precomputed scores against torch's masked softmax: GB/s of scores read + written.
Writes the table under benchmarks/results/ (or $OUT)."""

from __future__ import annotations

import os
import sys

import cupy
import numpy
import torch
import torch.nn.functional as F
from torch.nn.attention import SDPBackend, sdpa_kernel

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    copy_bandwidth_gbs,
    difference_line,
    fastest_in_turn,
    free_gpu_memory,
    header,
    memcpy_us,
    read_launch,
    spin_up,
    time_us,
    write_table,
)
from cupy_transformer.kv_cache import KVCache  # noqa: E402
from cupy_transformer.ops import InferenceConfig, SoftmaxOp  # noqa: E402
from cupy_transformer.ops.decode_attention import decode_attention  # noqa: E402
from cupy_transformer.ops.prefill_attention import prefill_attention  # noqa: E402
from cupy_transformer.ops.prefill_attention_sm90 import prefill_attention_sm90, prefill_sm90_runs  # noqa: E402

CASES = [(1, 32, 32, 4096), (16, 32, 32, 4096), (1, 32, 8, 4096), (16, 32, 8, 4096), (1, 32, 32, 16384)]
D = 128
# Prefill: (B, H, S, D, keys a query sees: "causal", "all", or "padding" (a boolean mask a sequence keeping
# its first S/2 to S keys, every query))
PREFILL = [
    (8, 16, 2048, 64, "causal"),
    (4, 32, 4096, 128, "causal"),
    (8, 16, 2048, 64, "all"),
    (4, 32, 4096, 128, "all"),
    (32, 16, 512, 64, "causal"),
    (128, 16, 256, 64, "causal"),
    (32, 32, 512, 128, "causal"),
    (64, 12, 256, 32, "padding"),
    (64, 12, 384, 64, "padding"),
]
# SoftmaxOp: (B, h, Q, K, causal, mask kind, alibi)
SOFTMAX = [
    (4, 16, 2048, 2048, True, "additive", False),
    (8, 16, 512, 512, False, "bool", True),
    (16, 32, 1, 16384, False, "bool", False),
    (1, 32, 1, 131072, False, None, True),
    (8, 32, 128, 128, True, None, False),
    (16, 16, 1024, 1024, True, None, False),
    (2, 32, 1024, 4096, True, "bool", False),
    (1, 32, 2048, 8192, True, None, False),
]


def on_flash(fn):
    """``fn`` (an SDPA call) with torch's flash backend forced."""

    def run():
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            return fn()

    return run


def matmul_tflops() -> float:
    a = cupy.random.standard_normal((8192, 8192), dtype=cupy.float32).astype(cupy.float16)
    us = time_us(lambda: a @ a, [()], reps=20)
    return 2 * 8192**3 / us / 1e6


def prefill_rows() -> list[str]:
    rate = matmul_tflops()
    lines = [
        f"\n## Prefill (fp16), cuBLAS fp16 matmul 8192^3: {rate:.0f} TFLOP/s\n",
        "q, k, v contiguous [B, H, S, D] (ours reads them in place; its launcher also takes the strided views of "
        "a fused QKV projection and a cache layer). TFLOP/s = 4 B H S^2 D (halved when causal; over all S keys "
        "with a padding mask) / time. 'ours' is the launcher's kernel; 'mma.sync' is prefill_attention.cu (the kernel "
        "of GPUs before Hopper, and of head size 32 on this one) on this one. SDPA's flash backend takes no mask.\n",
        "| B | H | S | D | keys | ours µs | TFLOP/s | of cuBLAS | mma.sync µs | SDPA µs | TFLOP/s | flash µs "
        "| TFLOP/s | vs SDPA | vs flash |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    errors = []
    for b, h, s, d, keys in PREFILL:
        q, k, v = (cupy.random.standard_normal((b, h, s, d), dtype=cupy.float32).astype(cupy.float16) for _ in "qkv")
        causal = keys == "causal"
        launcher = prefill_attention_sm90 if prefill_sm90_runs(d) else prefill_attention  # the op's choice
        start = cupy.zeros(b, cupy.int32)
        mask = None
        if keys == "padding":
            lengths = numpy.random.default_rng(0).integers(s // 2, s + 1, b)
            mask = cupy.asarray(numpy.arange(s) < lengths[:, None]).reshape(b, 1, 1, s)
        tq, tk, tv = (torch.from_dlpack(x) for x in (q, k, v))
        tmask = None if mask is None else torch.from_dlpack(mask)

        def sdpa():
            return F.scaled_dot_product_attention(tq, tk, tv, attn_mask=tmask, is_causal=causal)

        # In turn over three rounds (timed once, right after the matmul rate, ours read 13% slower on an H200
        # than in an A/B run minutes later).
        fns = {
            "ours": lambda: launcher(q, k, v, start, mask, None, d**-0.5, causal, 0),
            "other": lambda: prefill_attention(q, k, v, start, mask, None, d**-0.5, causal, 0),
            "theirs": sdpa,
        }
        if mask is None:
            fns["flash"] = on_flash(sdpa)
        t = fastest_in_turn(fns, reps=20)
        ours, other, theirs, flash = t["ours"], t["other"], t["theirs"], t.get("flash")
        got = launcher(q, k, v, start, mask, None, d**-0.5, causal, 0).reshape(b, s, h, d)
        err = float(
            cupy.linalg.norm(got.astype(cupy.float32) - cupy.asarray(sdpa().transpose(1, 2)).astype(cupy.float32))
            / cupy.linalg.norm(got.astype(cupy.float32))
        )
        flops = 4 * b * h * s * s * d / (2 if causal else 1)
        tf = [flops / us / 1e6 for us in (ours, theirs)]
        flash_us, flash_tf, vs_flash = (
            (f"{flash:.0f}", f"{flops / flash / 1e6:.0f}", f"{flash / ours:.2f}") if flash else ("-",) * 3
        )
        line = (
            f"| {b} | {h} | {s} | {d} | {keys} | {ours:.0f} | {tf[0]:.0f} | {100 * tf[0] / rate:.0f}% | "
            f"{other:.0f} | {theirs:.0f} | {tf[1]:.0f} | {flash_us} | {flash_tf} | {theirs / ours:.2f} | "
            f"{vs_flash} |"
        )
        print(line, f"(rel. diff vs SDPA {err:.1e})")
        lines.append(line)
        errors.append(err)
        q = k = v = tq = tk = tv = mask = tmask = None
        free_gpu_memory()
    lines.append(difference_line("Each row's output was compared with SDPA's", errors))
    return lines


def softmax_rows(copy) -> list[str]:
    lines = [
        f"\n## SoftmaxOp (fp16), copy {copy:.0f} GB/s\n",
        "Scores [B, h, Q, K] times 0.125, plus a 2-D [B, K] mask (additive or boolean) and an alibi [B, h, 1, K] "
        "where marked, causal where marked; torch: the same math as masked_fill / add and torch.softmax in fp16. "
        "GB/s of scores read + probabilities written; 'same-size copy' is a device-to-device memcpy of the scores "
        "(as many bytes read and written), timed the same way, and 'of that' = its time / ours.\n",
        "| B | h | Q | K | causal | mask | alibi | ours µs | GB/s | of copy | same-size copy µs | of that | torch µs "
        "| vs torch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    errors = []
    for b, h, q, k, causal, mask_kind, with_alibi in SOFTMAX:
        s = cupy.random.standard_normal((b, h, q, k), dtype=cupy.float32).astype(cupy.float16)
        keep = cupy.random.random((b, k)) < 0.9
        mask = (
            None
            if mask_kind is None
            else keep
            if mask_kind == "bool"
            else cupy.where(keep, 0, -1e4).astype(cupy.float16)
        )
        alibi = (
            (cupy.random.standard_normal((b, h, 1, k), dtype=cupy.float32) * 0.1).astype(cupy.float16)
            if with_alibi
            else None
        )
        op = SoftmaxOp(InferenceConfig(hidden_size=h * 64, heads=h, dtype=numpy.float16))
        ours = time_us(lambda: op(s, mask, alibi, causal, layer_scale=0.125), [()], reps=30)
        same = memcpy_us(s.nbytes, reps=30)
        ts, tkeep = torch.from_dlpack(s), torch.from_dlpack(keep)
        tmask = None if mask is None else torch.from_dlpack(mask)
        talibi = None if alibi is None else torch.from_dlpack(alibi)
        rule = torch.ones(q, k, dtype=torch.bool, device="cuda").tril(k - q) if causal else None

        def reference():
            z = ts * 0.125
            if talibi is not None:
                z = z + talibi
            if mask_kind == "additive":
                z = z + tmask[:, None, None, :]
            drop = None if mask_kind != "bool" else ~tkeep[:, None, None, :]
            if rule is not None:
                drop = ~rule if drop is None else drop | ~rule
            return torch.softmax(z if drop is None else z.masked_fill(drop, float("-inf")), -1)

        theirs = time_us(reference, [()], reps=30)
        got = op(s, mask, alibi, causal, layer_scale=0.125).astype(cupy.float32)
        want = cupy.asarray(reference()).astype(cupy.float32)
        errors.append(float(cupy.linalg.norm(got - want) / cupy.linalg.norm(want)))
        gbs = 2 * s.nbytes / ours / 1e3
        line = (
            f"| {b} | {h} | {q} | {k} | {'yes' if causal else 'no'} | {mask_kind or '-'} | "
            f"{'yes' if with_alibi else '-'} | {ours:.1f} | {gbs:.0f} | {100 * gbs / copy:.0f}% | {same:.1f} | "
            f"{100 * same / ours:.0f}% | {theirs:.1f} | {theirs / ours:.2f} |"
        )
        print(line, f"(rel. diff vs torch {errors[-1]:.1e})")
        lines.append(line)
        s = mask = alibi = ts = tmask = talibi = None
        free_gpu_memory()
    lines.append(difference_line("Each row's output was compared with torch's", errors))
    return lines


def main():
    spin_up()
    copy = copy_bandwidth_gbs()
    lines = [
        header("Attention vs torch SDPA (fp16)"),
        f"## Decode (fp16), copy {copy:.0f} GB/s (1 GiB memcpy, read + written)\n",
        "One query token per sequence, keys and values in a "
        "KV cache (ours: [B, kv, T, d] with room for more tokens; SDPA: contiguous [B, kv, T, d] tensors, "
        "expanded to the query heads for grouped-query cases, as SDPA's math needs, or enable_gqa). GB/s of K + V "
        "bytes (kv heads) over the time; timed as bench_ops does (1 GiB read between calls; in turn over three "
        "rounds, the fastest of each kept). 'read' is a plain read of as many bytes timed the same way (the floor "
        "at that size), 'of read' its time / ours.\n",
        "| B | heads | kv heads | context | K+V MB | ours µs | GB/s | of copy | read µs | of read | SDPA µs "
        "| flash µs | vs SDPA | vs flash |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    errors = []
    for b, h, kv, t in CASES:
        cache = KVCache(1, b, kv, t, D, numpy.float16, backend="cupy")
        cache.keys[...] = cupy.random.standard_normal(cache.keys.shape, dtype=cupy.float32).astype(cupy.float16)
        cache.values[...] = cupy.random.standard_normal(cache.values.shape, dtype=cupy.float32).astype(cupy.float16)
        q = cupy.random.standard_normal((b, h, 1, D), dtype=cupy.float32).astype(cupy.float16)
        start = numpy.full(b, t - 1, numpy.int64)  # the query in the last slot: keys 0 .. t - 1
        tq = torch.from_dlpack(q)
        tk, tv = torch.from_dlpack(cache.keys[0]), torch.from_dlpack(cache.values[0])
        gqa = kv != h

        def sdpa():
            return F.scaled_dot_product_attention(tq, tk, tv, enable_gqa=gqa)

        flash_sdpa = on_flash(sdpa)
        nbytes = 2 * b * kv * t * D * 2
        runs = {
            "ours": lambda: decode_attention(q, cache, 0, start, 0, None, None, D**-0.5),
            "theirs": sdpa,
            "read": read_launch(cupy.empty(nbytes, cupy.uint8)),
        }
        try:
            flash_sdpa()
            runs["flash"] = flash_sdpa
        except RuntimeError:  # the flash backend does not take this case
            pass
        times = fastest_in_turn(runs)
        ours, theirs, floor, flash = times["ours"], times["theirs"], times["read"], times.get("flash", float("nan"))
        gbs = nbytes / ours / 1e3
        got = decode_attention(q, cache, 0, start, 0, None, None, D**-0.5).reshape(b, h, D).astype(cupy.float32)
        err = float(cupy.linalg.norm(got - cupy.asarray(sdpa()[:, :, 0]).astype(cupy.float32)) / cupy.linalg.norm(got))
        line = (
            f"| {b} | {h} | {kv} | {t} | {nbytes / 1e6:.1f} | {ours:.1f} | {gbs:.0f} | {100 * gbs / copy:.0f}% "
            f"| {floor:.1f} | {100 * floor / ours:.0f}% | {theirs:.1f} | {flash:.1f} | {theirs / ours:.2f} "
            f"| {flash / ours:.2f} |"
        )
        print(line, f"(rel. diff vs SDPA {err:.1e})")
        lines.append(line)
        errors.append(err)
        cache = tq = tk = tv = None  # free before the next size
        free_gpu_memory()
    lines.append(difference_line("Each row's output was compared with SDPA's", errors))
    lines += prefill_rows()
    lines += softmax_rows(copy)
    write_table("attention", lines)


if __name__ == "__main__":
    main()
