"""The six projection/MLP ops vs the same math in torch, side by side in one process (fp16).

Sizes: GPT-2-XL (hidden 1600, intermediate 6400) and LLaMA-7B (4096, 11008; its MLP as RMSNorm + gated
SiLU), for 1, 16 and 2048 rows. For each op: our time, torch's, the GEMMs alone through cuBLAS
(cupy.matmul: the floor for our GEMM + fused epilogue), that plus our separate passes' bytes at the copy
rate (the floor of the cuBLAS + passes design: the passes' own efficiency), and the rate: GB/s of bytes that
must move (weights + activations) against the measured copy bandwidth for decode rows, TFLOP/s against the
measured cuBLAS rate for 2048 rows. Then the elementwise passes alone and the decode GEMV kernel against
cuBLAS and a plain read of the weights. Writes the table under benchmarks/results/ (or $OUT).
"""

from __future__ import annotations

import os
import sys

import cupy
import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.common import (  # noqa: E402
    copy_bandwidth_gbs,
    fastest_in_turn,
    free_gpu_memory,
    header,
    memcpy_us,
    read_floor_us,
    spin_up,
    time_us,
    write_table,
)
from cupy_transformer import ops  # noqa: E402

MODELS = {"GPT-2-XL": (1600, 6400, "LayerNorm", "GELU"), "LLaMA-7B": (4096, 11008, "RMSNorm", "GATED_SILU")}
ROWS = (1, 16, 2048)


def matrix_tflops() -> float:
    a = cupy.random.standard_normal((8192, 8192), dtype=cupy.float32).astype(cupy.float16)
    us = time_us(lambda: cupy.matmul(a, a), [()], reps=10, rounds=1)
    return 2 * 8192**3 / us / 1e6


def t(*shape, scale=1.0):
    return (torch.randn(*shape, device="cuda", dtype=torch.float16) * scale).contiguous()


def cases(hidden, inter, norm, act, rows):
    """(op name, ours, torch, cuBLAS-only, bytes, flops, bytes of our passes outside cuBLAS) for one size."""
    gated = act == "GATED_SILU"
    inter1 = 2 * inter if gated else inter
    cfg = ops.InferenceConfig(
        hidden_size=hidden, heads=32, intermediate_size=inter, norm_type=norm, mlp_act_func_type=act, epsilon=1e-5
    )
    x, r, a = t(rows, hidden), t(rows, hidden), t(rows, hidden)
    w_qkv, b_qkv = t(hidden, 3 * hidden, scale=hidden**-0.5), t(3 * hidden)
    w_o = t(hidden, hidden, scale=hidden**-0.5)
    w1, b1 = t(hidden, inter1, scale=hidden**-0.5), t(inter1)
    w2, b2 = t(inter, hidden, scale=inter**-0.5), t(hidden)
    gamma, beta, b_o = t(hidden) + 1, t(hidden), t(hidden)
    c = {
        k: cupy.from_dlpack(v)
        for k, v in dict(
            x=x,
            r=r,
            a=a,
            w_qkv=w_qkv,
            b_qkv=b_qkv,
            w_o=w_o,
            w1=w1,
            b1=b1,
            w2=w2,
            b2=b2,
            gamma=gamma,
            beta=beta,
            b_o=b_o,
        ).items()
    }
    rms = norm == "RMSNorm"
    mm = cupy.matmul
    h_act = cupy.empty((rows, inter), cupy.float16)  # the second GEMM's input, for the cuBLAS-only time

    def torch_norm(z):
        return F.rms_norm(z, (hidden,), gamma, 1e-5) if rms else F.layer_norm(z, (hidden,), gamma, beta, 1e-5)

    def torch_act(h):
        return F.silu(h[:, inter:]) * h[:, :inter] if gated else F.gelu(h, approximate="tanh")

    linear, vmm = ops.LinearOp(cfg), ops.VectorMatMulOp(cfg)
    qkv, mlp, gelu, res = ops.QKVGemmOp(cfg), ops.MLPGemmOp(cfg), ops.GELUGemmOp(cfg), ops.ResidualAddOp(cfg)
    beta_c = None if rms else c["beta"]
    act_bytes = 2 * rows * hidden * 2
    row_bytes = rows * hidden * 2
    yield (
        "LinearOp (QKV)",
        lambda: linear(c["x"], c["w_qkv"], c["b_qkv"]),
        lambda: torch.addmm(b_qkv, x, w_qkv),
        lambda: mm(c["x"], c["w_qkv"]),
        w_qkv.nbytes + 4 * row_bytes,
        2 * rows * hidden * 3 * hidden,
        0,
    )
    yield (
        "VectorMatMulOp (out proj)",
        lambda: vmm(c["a"], c["w_o"]),
        lambda: a @ w_o,
        lambda: mm(c["a"], c["w_o"]),
        w_o.nbytes + act_bytes,
        2 * rows * hidden * hidden,
        0,
    )
    # QKVGemmOp's norm pass reads x and writes xn (which the op returns).
    yield (
        "QKVGemmOp (norm + QKV)",
        lambda: qkv(c["x"], c["w_qkv"], c["b_qkv"], c["gamma"], beta_c),
        lambda: torch.addmm(b_qkv, torch_norm(x), w_qkv),
        lambda: mm(c["x"], c["w_qkv"]),
        w_qkv.nbytes + 5 * row_bytes,
        2 * rows * hidden * 3 * hidden,
        2 * row_bytes,
    )
    mlp_bytes = w1.nbytes + w2.nbytes + 4 * row_bytes
    mlp_flops = 2 * rows * hidden * (inter1 + inter)
    # MLPGemmOp's add + norm pass reads input and residual and writes xn (and the sum z for RMSNorm); the
    # gated pass reads [up | gate] and writes their product.
    gated_bytes = 3 * rows * inter * 2 if gated else 0
    yield (
        "MLPGemmOp (add + norm + MLP)",
        lambda: mlp(c["a"], c["r"], c["w1"], c["w2"], c["b_o"], c["b1"], c["gamma"], beta_c),
        lambda: torch_act(torch.addmm(b1, torch_norm(a + r + b_o), w1)) @ w2,
        lambda: (mm(c["x"], c["w1"]), mm(h_act, c["w2"])),
        mlp_bytes,
        mlp_flops,
        (4 if rms else 3) * row_bytes + gated_bytes,
    )
    if not gated:
        yield (
            "GELUGemmOp (MLP, no norm)",
            lambda: gelu(c["x"], c["w1"], c["b1"], c["w2"]),
            lambda: F.gelu(torch.addmm(b1, x, w1), approximate="tanh") @ w2,
            lambda: (mm(c["x"], c["w1"]), mm(h_act, c["w2"])),
            mlp_bytes,
            mlp_flops,
            0,
        )
    yield (
        "ResidualAddOp",
        lambda: res(
            c["x"], c["r"], add_bias=True, attention_output=c["a"], attention_bias=c["b_o"], final_bias=c["b2"]
        ),
        lambda: x + r + a + b_o + b2,
        None,
        4 * row_bytes,
        0,
        0,
    )


def elementwise_rows(copy_gbs):
    """The elementwise passes alone at prefill size, GB/s of bytes read + written, against the 1 GiB copy rate
    and against a memcpy moving the same bytes timed the same way (the fair ceiling at that size)."""
    lines = [
        "",
        "Elementwise passes alone (fp16, 2048 rows): GB/s of bytes read + written; 'of copy' against the "
        "copy rate above; 'same-size copy' is a device-to-device memcpy moving as many bytes (read + written), "
        "timed the same way, and 'of that' = its time / ours.",
        "",
        "| pass | shape | ours µs | GB/s | of copy | same-size copy µs | of that | torch µs | vs torch |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, act, width in [
        ("bias + gated SiLU (LLaMA-7B MLP)", "GATED_SILU", 2 * 11008),
        ("bias + GELU tanh (GPT-2-XL MLP)", "GELU", 6400),
        ("bias + GELU erf (BERT)", "GELU_EXACT", 3072),
        ("ResidualAddOp (GPT-2-XL)", None, 1600),
        ("ResidualAddOp (LLaMA-7B)", None, 4096),
    ]:
        if act is None:  # out = x + residual + attention output + two biases (pre-LN, mp_size 1)
            cfg = ops.InferenceConfig(hidden_size=width, heads=32, intermediate_size=4 * width)
            res = ops.ResidualAddOp(cfg)
            x, r, a, b1, b2 = t(2048, width), t(2048, width), t(2048, width), t(width), t(width)
            xc, rc, ac, b1c, b2c = (cupy.from_dlpack(v) for v in (x, r, a, b1, b2))
            run = lambda: res(
                xc,
                rc,
                add_bias=True,
                attention_output=ac,  # noqa: E731
                attention_bias=b1c,
                final_bias=b2c,
            )
            ref = lambda: x + r + a + b1 + b2  # noqa: E731
            nbytes = 4 * x.nbytes
        else:
            h, b = t(2048, width), t(width)
            hc, bc = cupy.from_dlpack(h), cupy.from_dlpack(b)
            half = width // 2
            if act.startswith("GATED"):
                ref = lambda: F.silu(h[:, half:] + b[half:]) * (h[:, :half] + b[:half])  # noqa: E731
                nbytes = h.nbytes + h.nbytes // 2
            else:
                ref = lambda: F.gelu(h + b, approximate="tanh" if act == "GELU" else "none")  # noqa: E731
                nbytes = 2 * h.nbytes
            run = lambda: ops.bias_act(hc, bc, act)  # noqa: E731
        ours, theirs, same = time_us(run, [()]), time_us(ref, [()]), memcpy_us(nbytes // 2)
        gbs = nbytes / ours / 1e3
        line = (
            f"| {name} | 2048x{width} | {ours:.1f} | {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | {same:.1f} "
            f"| {100 * same / ours:.0f}% | {theirs:.1f} | {theirs / ours:.2f} |"
        )
        print(line)
        lines.append(line)
    return lines


GEMV_SHAPES = [(1600, 6400), (6400, 1600), (1600, 1600), (4096, 4096), (4096, 11008), (11008, 4096), (8192, 8192)]


def gemv_rows(copy_gbs):
    """The GEMV kernel alone (bias in its epilogue) vs cuBLAS, torch and a plain read of the weights, GB/s
    of weights. (ops.matmul runs it where its first call timed it faster than cuBLAS; here it is called
    directly.)"""
    from cupy_transformer.ops.gemv import gemv

    lines = [
        "",
        "Decode GEMV kernel (kernels_cu/gemv.cu, bias in its epilogue), y = x @ W + b (fp16): GB/s of weight "
        "bytes read; 'of copy' against the copy rate above; 'read' is a plain read of the same bytes (the floor "
        "at that size); cuBLAS is cupy.matmul (the product alone), torch is addmm.",
        "",
        "| K x N | layout | rows | weights MB | ours µs | GB/s | of copy | read GB/s | cuBLAS µs | vs cuBLAS "
        "| torch µs | vs torch |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    for k, n in GEMV_SHAPES:
        for transposed in (False, True):
            w = t(n, k, scale=k**-0.5) if transposed else t(k, n, scale=k**-0.5)
            b = t(n)
            wc, bc = cupy.from_dlpack(w), cupy.from_dlpack(b)
            floor = w.nbytes / read_floor_us(wc) / 1e3
            for rows in (1, 4, 8):
                x = t(rows, k)
                xc = cupy.from_dlpack(x)
                wt = w.t() if transposed else w
                ours = time_us(lambda: gemv(xc, wc, transposed, bc), [()])
                theirs = time_us(lambda: torch.addmm(b, x, wt), [()])
                plain = time_us(lambda: cupy.matmul(xc, wc.T if transposed else wc), [()])
                gbs = w.nbytes / ours / 1e3
                layout = "[out,in]" if transposed else "[in,out]"
                line = (
                    f"| {k}x{n} | {layout} | {rows} | {w.nbytes / 1e6:.1f} | {ours:.1f} "
                    f"| {gbs:.0f} | {100 * gbs / copy_gbs:.0f}% | {floor:.0f} | {plain:.1f} | {plain / ours:.2f} "
                    f"| {theirs:.1f} | {theirs / ours:.2f} |"
                )
                print(line)
                lines.append(line)
    return lines


def main():
    spin_up()
    copy_gbs, tflops = copy_bandwidth_gbs(), matrix_tflops()
    lines = [
        header("Projection and MLP ops vs torch (fp16)"),
        f"Ceilings measured here: copy {copy_gbs:.0f} GB/s (1 GiB memcpy, read + written); cuBLAS fp16 matmul "
        f"8192^3 {tflops:.0f} TFLOP/s. GPU times: lower of two medians of 60 event-timed calls, each behind a 1 GiB "
        "read that evicts L2 (weights start cold) and hides host overhead; an op, torch and cuBLAS timed in "
        "turn over three rounds, the fastest of each kept. 'vs torch' = torch time / ours; "
        "'vs cuBLAS' = the op's GEMMs alone through cupy.matmul / ours (1.00 = the fused epilogue is free); "
        "'+ passes' = that plus the bytes of our passes outside cuBLAS (norm, add + norm, gated activation) at the "
        "copy rate, and 'vs that' = it / ours (1.00 = the passes run at copy speed). "
        "Rate: GB/s of weights + activations for 1 and 16 rows (and % of copy), TFLOP/s for 2048 rows "
        "(and % of the cuBLAS rate). Products run on cuBLAS(Lt) with its bias/GELU epilogue plus our passes, or "
        "up to 8 rows on the GEMV kernel where a shape's first call timed it faster (its own table follows).\n",
        "| model | rows | op | ours µs | torch µs | vs torch | cuBLAS-only µs | vs cuBLAS | + passes µs | vs that "
        "| rate | of ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    for model, (hidden, inter, norm, act) in MODELS.items():
        for rows in ROWS:
            for name, ours, theirs, cublas, nbytes, flops, pass_bytes in cases(hidden, inter, norm, act, rows):
                t = fastest_in_turn({"ours": ours, "torch": theirs, **({"cublas": cublas} if cublas else {})})
                t_ours, t_torch, t_cublas = t["ours"], t["torch"], t.get("cublas")
                if rows <= 16 or not flops:
                    rate = f"{nbytes / t_ours / 1e3:.0f} GB/s"
                    ceiling = f"{100 * nbytes / t_ours / 1e3 / copy_gbs:.0f}%"
                else:
                    rate, ceiling = f"{flops / t_ours / 1e6:.0f} TFLOP/s", f"{100 * flops / t_ours / 1e6 / tflops:.0f}%"
                if t_cublas:
                    floor = t_cublas + pass_bytes / copy_gbs / 1e3
                    cub = f"{t_cublas:.1f} | {t_cublas / t_ours:.2f} | {floor:.1f} | {floor / t_ours:.2f}"
                else:
                    cub = "- | - | - | -"
                line = (
                    f"| {model} | {rows} | {name} | {t_ours:.1f} | {t_torch:.1f} | {t_torch / t_ours:.2f} | {cub} "
                    f"| {rate} | {ceiling} |"
                )
                print(line)
                lines.append(line)
            free_gpu_memory()
    lines += elementwise_rows(copy_gbs)
    lines += gemv_rows(copy_gbs)
    write_table("ops", lines)


if __name__ == "__main__":
    main()
