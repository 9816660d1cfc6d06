"""Decode GEMVs as a captured decode step runs them (issue 3's GEMV goal, measured where it applies).

A model's decode step is a CUDA graph of back-to-back kernels, each product on its own weights (a layer's
weights are not in L2 when its turn comes). Timed per product in one graph of N products over N different
weight copies (more bytes than 3x L2, so each product reads its weights from DRAM), after an L2 flush:
the GEMV kernel with its bias epilogue, and the op's product (ops.matmul: the GEMV or cuBLASLt, whichever its
first eager call timed faster in a graph), both captured by CuPy, against torch's addmm (cuBLAS) captured
by torch.cuda.graph, and against a plain read of each weight in a graph (the floor at that size). First, what
a plain read costs at each size on its own (event-timed, as bench_ops times) and in a graph, and an empty
kernel: the fixed cost that keeps a lone 20 MB read far from the copy rate. fp16, 1 and 8 rows.
Writes the table under benchmarks/results/ (or $OUT).
"""

from __future__ import annotations

import os
import sys

import cupy
import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from benchmarks.bench_ops import GEMV_SHAPES  # noqa: E402
from benchmarks.common import (  # noqa: E402
    copy_bandwidth_gbs,
    difference_line,
    free_gpu_memory,
    header,
    read_launch,
    side_stream,
    spin_up,
    time_us,
    write_table,
)
from cupy_transformer.ops.gemv import gemv, gemv_fits  # noqa: E402
from cupy_transformer.ops.matmul import matmul  # noqa: E402


def captured(calls):
    """A CuPy graph of ``calls`` and a call that replays it. The calls run once on the capturing stream first:
    the GEMV's split workspace is kept per stream and cannot be made during capture."""
    stream = side_stream()
    with stream:
        for call in calls:
            call()
        stream.begin_capture()
        for call in calls:
            call()
        graph = stream.end_capture()
    return lambda: graph.launch(stream=cupy.cuda.Stream.null)


def copies(nbytes: int) -> int:
    l2 = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["l2CacheSize"]
    return max(4, min(32, -(-3 * l2 // nbytes)))


def read_rows(copy) -> list[str]:
    empty = cupy.RawKernel('extern "C" __global__ void empty() {}', "empty")
    empty_us = time_us(lambda: empty((1,), (32,), ()), [()])
    lines = [
        "",
        f"Reading N MB once: a plain read kernel event-timed on its own (as bench_ops times the GEMV: "
        f"an empty kernel takes {empty_us:.2f} µs that way), and per read in a graph of back-to-back reads "
        "of different buffers. GB/s and % of the copy rate.",
        "",
        "| MB | alone µs | GB/s | of copy | in a graph µs | GB/s | of copy |",
        "|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    for mb in (5.1, 20.5, 33.6, 90.2, 134.2, 268.4):
        nbytes = int(mb * 1e6) // 16 * 16
        bufs = [cupy.ones(nbytes // 4, cupy.uint32) for _ in range(copies(nbytes))]
        alone = time_us(read_launch(bufs[0]), [()], reps=30)
        graph = time_us(captured([read_launch(b) for b in bufs]), [()], reps=20) / len(bufs)
        rates = [nbytes / us / 1e3 for us in (alone, graph)]
        line = (
            f"| {mb} | {alone:.1f} | {rates[0]:.0f} | {100 * rates[0] / copy:.0f}% | {graph:.1f} | {rates[1]:.0f} "
            f"| {100 * rates[1] / copy:.0f}% |"
        )
        print(line)
        lines.append(line)
        bufs = None
        free_gpu_memory()
    return lines


def gemv_rows(copy) -> list[str]:
    lines = [
        "",
        "Per product in a graph of N products over N weight copies (fp16, bias): GEMV = the GEMV kernel, "
        "op = ops.matmul, which runs the GEMV or cuBLASLt ('op runs': the faster in a graph when its first "
        "eager call timed both), each captured by CuPy; torch = addmm (cuBLAS) in torch.cuda.graph; read = a "
        "plain read of each weight in a graph. GB/s of weight bytes; 'of copy' against the copy rate; 'of "
        "read' = read time / GEMV's; 'vs torch' = torch time / ours.",
        "",
        "| K x N | layout | rows | weights MB | N | GEMV µs | GB/s | of copy | of read | op runs | op µs "
        "| torch µs | GEMV vs torch | op vs torch | read µs |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines))
    diffs = []
    for k, n in GEMV_SHAPES[:1] + [(1600, 4800)] + GEMV_SHAPES[1:]:  # and GPT-2 XL's fused QKV
        for transposed in (False, True):
            nbytes = 2 * k * n
            count = copies(nbytes)
            weights = [torch.randn(n, k, device="cuda", dtype=torch.float16) * k**-0.5 for _ in range(count)]
            if not transposed:
                weights = [w.t().contiguous() for w in weights]  # [in, out]
            bias = torch.randn(n, device="cuda", dtype=torch.float16)
            wc, bc = [cupy.from_dlpack(w) for w in weights], cupy.from_dlpack(bias)
            mats = [w.t() if transposed else w for w in weights]  # addmm's [K, N]
            read_us = time_us(captured([read_launch(w) for w in wc]), [()], reps=20) / count
            for rows in (1, 8):
                x = torch.randn(rows, k, device="cuda", dtype=torch.float16)
                xc = cupy.from_dlpack(x)
                outs, op_outs = [], []
                ours = (
                    time_us(captured([lambda w=w: outs.append(gemv(xc, w, transposed, bc)) for w in wc]), [()], reps=20)
                    / count
                )
                op = (
                    time_us(
                        captured([lambda w=w: op_outs.append(matmul(xc, w, transposed, bc)) for w in wc]), [()], reps=20
                    )
                    / count
                )  # the warm-up calls before capture time the choice
                op_runs = "GEMV" if gemv_fits(xc, wc[0], transposed, bc, None) else "cuBLASLt"  # in a graph
                side = torch.cuda.Stream()
                with torch.cuda.stream(side):
                    for m in mats:
                        torch.addmm(bias, x, m)
                torch.cuda.current_stream().wait_stream(side)
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph):
                    theirs_out = [torch.addmm(bias, x, m) for m in mats]
                theirs = time_us(graph.replay, [()], reps=20) / count
                want = cupy.from_dlpack(theirs_out[-1]).astype(cupy.float32)
                for got in (outs[-1], op_outs[-1]):
                    got = got.astype(cupy.float32)
                    diffs.append(float(cupy.linalg.norm(got - want) / cupy.linalg.norm(want)))
                gbs = nbytes / ours / 1e3
                layout = "[out,in]" if transposed else "[in,out]"
                line = (
                    f"| {k}x{n} | {layout} | {rows} | {nbytes / 1e6:.1f} | {count} "
                    f"| {ours:.1f} | {gbs:.0f} | {100 * gbs / copy:.0f}% | {100 * read_us / ours:.0f}% | {op_runs} "
                    f"| {op:.1f} | {theirs:.1f} | {theirs / ours:.2f} | {theirs / op:.2f} | {read_us:.1f} |"
                )
                print(line)
                lines.append(line)
                graph = theirs_out = outs = op_outs = None
            weights = wc = mats = None
            free_gpu_memory()
    lines.append(difference_line("The last product of each of our graphs (GEMV, op) against torch's", diffs))
    return lines


def main():
    spin_up()
    copy = copy_bandwidth_gbs()
    lines = [
        header("Decode GEMVs in a CUDA graph, as a captured decode step runs them (fp16)"),
        "",
        f"Copy rate measured here: {copy:.0f} GB/s (1 GiB memcpy, read + written).",
    ]
    lines += read_rows(copy)
    lines += gemv_rows(copy)
    write_table("gemv-captured", lines)


if __name__ == "__main__":
    main()
