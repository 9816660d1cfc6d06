"""Whole models' decode products as a captured decode step runs them (programmatic launches; the norm prologue or the
residual epilogue; each model's layout and dtype), at the launcher's choice and at forced variants: the first weights
loaded early or late (``gemv(early=)``) and every tensor-core geometry (pieces, chunks a batch, blocks a SM, which
also sets the K splits). µs a product in a graph of N products over N weight copies (each read from DRAM, as in a
step), against a plain read of the same bytes in a graph. What the launcher's rules (``EARLY_WEIGHTS_K``,
``nk_geometry``, the K split) are set from at decode sizes.

    python3 benchmarks/sweep_gemv_decode.py [--models gpt2-small,gpt2-xl,llama-1b] [--rows 1]
    python3 benchmarks/sweep_gemv_decode.py --products 2048x16384,3072x128256    # K x N, bf16, [out, in], RMS norm

Writes ``gemv-decode-<card>.md`` to $OUT or benchmarks/results/.
"""

from __future__ import annotations

import argparse
import os
import sys

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from cupy_transformer.ops import ActivationType  # noqa: E402

# Every model's layer weights are [out, in] (transposed True) once loaded (GPT-2's Conv1D [in, out] is transposed at
# load); the LM head is the token table [vocab, hidden]. (product, K, N, transposed, fused: "norm" or "residual",
# activation, bias)
PRODUCTS = {
    "gpt2": lambda h, inter, q, vocab: [
        ("QKV + LN1", h, q, True, "norm", None, True),
        ("out + residual", h, h, True, "residual", None, True),
        ("up + LN2, GELU", h, inter, True, "norm", ActivationType.GELU, True),
        ("down + residual", inter, h, True, "residual", None, True),
        ("LM head + final norm", h, vocab, True, "norm", None, False),
    ],
    "llama": lambda h, inter, q, vocab: [
        ("QKV + norm", h, q, True, "norm", None, False),
        ("o + residual", h, h, True, "residual", None, False),
        ("up|gate + norm", h, 2 * inter, True, "norm", None, False),
        ("down + residual", inter, h, True, "residual", None, False),
        ("LM head + final norm", h, vocab, True, "norm", None, False),
    ],
}


def products(shape: str) -> tuple[list[tuple], str, str]:
    """The decode products of ``bench.SHAPES[shape]``, with its dtype name and norm mode."""
    from cupy_transformer import bench

    family, c, dtype = bench.SHAPES[shape]
    if family == "gpt2":
        h, vocab = c["n_embd"], c["vocab_size"]
        return PRODUCTS[family](h, 4 * h, 3 * h, vocab), dtype, "layer_norm"
    h, heads, kv = c["hidden_size"], c["num_attention_heads"], c["num_key_value_heads"]
    head = c.get("head_dim", h // heads)
    return PRODUCTS[family](h, c["intermediate_size"], (heads + 2 * kv) * head, c["vocab_size"]), dtype, "rms_norm"


def chosen_products(text: str) -> tuple[list[tuple], str, str]:
    """``--products``' K x N list as products with the RMS-norm prologue, [out, in], bf16 (a LLaMA-style model's
    QKV, up|gate or LM head at other sizes), with the dtype name and norm mode."""
    rows = []
    for item in text.split(","):
        k, _, n = item.strip().partition("x")
        if not (k.isdigit() and n.isdigit() and int(k) > 0 and int(n) > 0):
            raise SystemExit(f"--products: expected K x N pairs such as 2048x16384; got {item.strip()!r}")
        rows.append((f"{k} x {n} + norm", int(k), int(n), True, "norm", None, False))
    return rows, "bfloat16", "rms_norm"


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default="gpt2-small,gpt2-xl,llama-1b")
    parser.add_argument("--rows", type=int, default=1)
    parser.add_argument("--products", help="K x N pairs instead of the models' products")
    args = parser.parse_args(argv)
    groups = (
        [("products", *chosen_products(args.products))]
        if args.products
        else [(shape, *products(shape)) for shape in args.models.split(",")]
    )

    import cupy
    from ml_dtypes import bfloat16

    from benchmarks.bench_gemv_captured import captured, copies
    from benchmarks.common import free_gpu_memory, header, read_launch, spin_up, time_us, write_table
    from cupy_transformer.ops.gemv import (
        EARLY_WEIGHTS_K,
        FUSE_NORM,
        FUSE_RESIDUAL,
        GEMV_KERNELS,
        GEMV_TC_KN,
        GEMV_TC_NK,
        GemvNorm,
        _launch_plan,
        fused_kernel_name,
        gemv,
        prologue_fits,
    )
    from cupy_transformer.runtime.kernels import CTYPES
    from cupy_transformer.runtime.programmatic import programmatic_launches

    geometries = {False: sorted(set(GEMV_TC_KN) | {(1, 2, 1), (1, 4, 1)}), True: sorted(set(GEMV_TC_NK.values()))}
    names = [
        fused_kernel_name(CTYPES[numpy_dtype.name], transposed, g, fuse)
        for numpy_dtype in (cupy.dtype(cupy.float16), cupy.dtype(bfloat16))
        for transposed, gs in geometries.items()
        for g in gs
        for fuse in (FUSE_NORM, FUSE_RESIDUAL)
    ]
    family = GEMV_KERNELS.extended(names)
    spin_up()
    lines = [
        header("Decode products as a captured step runs them (programmatic launches, fused)"),
        "",
        f"Rows: {args.rows}. µs a product in a graph of N over N weight copies; read: a plain read of the same "
        f"bytes in a graph. Launcher: its geometry (pieces, chunks, blocks a SM) and K splits, early weights where a "
        f"split is at most {EARLY_WEIGHTS_K} k. Then early / late forced at the launcher's geometry, then each "
        "geometry at the launcher's early rule ('–': the norm prologue does not fit its split).",
    ]
    worst = 0.0
    for shape, rows_of, dtype_name, mode in groups:
        dtype = cupy.dtype(bfloat16 if dtype_name == "bfloat16" else dtype_name)
        lines += ["", f"{shape} ({dtype_name})", ""]
        for transposed in (False, True):
            if not any(p[3] == transposed for p in rows_of):
                continue
            columns = ["launcher", "early", "late"] + ["/".join(map(str, g)) for g in geometries[transposed]]
            lines += [
                "| product | K x N | layout | launcher geometry, splits | " + " | ".join(columns) + " | read |",
                "|---|---|---|---|" + "---|" * (len(columns) + 1),
            ]
            for name, k, n, tr, fused, act, has_bias in (p for p in rows_of if p[3] == transposed):
                rng = cupy.random.default_rng(0)
                count = copies(2 * k * n)
                weights = [
                    (rng.standard_normal((n, k) if tr else (k, n), dtype=cupy.float32) * k**-0.5).astype(dtype)
                    for _ in range(count)
                ]
                x = rng.standard_normal((args.rows, k), dtype=cupy.float32).astype(dtype)
                bias = rng.standard_normal(n, dtype=cupy.float32).astype(dtype) if has_bias else None
                norm = residual = None
                if fused == "norm":
                    gamma = (1 + 0.1 * rng.standard_normal(k, dtype=cupy.float32)).astype(dtype)
                    beta = (0.1 * rng.standard_normal(k, dtype=cupy.float32)).astype(dtype)
                    norm = GemvNorm(mode, gamma, beta if mode == "layer_norm" else None, 1e-5)
                else:
                    residual = rng.standard_normal((args.rows, n), dtype=cupy.float32).astype(dtype)
                read_us = time_us(captured([read_launch(w) for w in weights]), [()], reps=20) / count
                kernel, grid, per_split, _ = _launch_plan(x, weights[0], tr, make_workspace=False)

                def fits(geometry):  # the norm prologue's rows of a split in shared memory
                    split = _launch_plan(x, weights[0], tr, geometry, make_workspace=False)[2]
                    return norm is None or prologue_fits(args.rows, k, split, dtype.itemsize)

                def timed(geometry=None, early=None):
                    outs = []

                    def call(w):
                        return lambda: outs.append(
                            gemv(x, w, tr, bias, act, geometry, family, norm=norm, residual=residual, early=early)
                        )

                    with programmatic_launches():
                        replay = captured([call(w) for w in weights])
                    return time_us(replay, [()], reps=20) / count, outs[-1]

                base_us, want = timed()
                cells = [f"{base_us:.2f}"]
                for variant in [dict(early=True), dict(early=False)] + [dict(geometry=g) for g in geometries[tr]]:
                    if not fits(variant.get("geometry")):
                        cells.append("–")
                        continue
                    us, got = timed(**variant)
                    scale = float(cupy.abs(want.astype(cupy.float32)).max())
                    worst = max(
                        worst, float(cupy.abs(got.astype(cupy.float32) - want.astype(cupy.float32)).max()) / scale
                    )
                    cells.append(f"{us:.2f}")
                plan = f"{kernel[kernel.index(',') + 2 : -1]}; {grid[1]} x {per_split} k, {grid[0]} tiles"
                line = (
                    f"| {name} | {k}x{n} | {'[out,in]' if tr else '[in,out]'} | {plan} | "
                    + " | ".join(cells)
                    + f" | {read_us:.2f} |"
                )
                print(line, flush=True)
                lines.append(line)
                weights = x = bias = norm = residual = None
                free_gpu_memory()
    lines += ["", f"Largest difference from the launcher's result, relative to its largest |y|: {worst:.2e}"]
    print(lines[-1])
    write_table("gemv-decode", lines)


if __name__ == "__main__":
    main()
