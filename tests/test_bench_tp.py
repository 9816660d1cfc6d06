"""benchmarks/bench_tp.py: its random sharded weights (every TP size the same model, no rank making a whole
sharded tensor), its command line and refusal, and the whole script on the CPU (``--cpu-smoke``: a tiny LLaMA,
simulated ranks at TP 1, 2 and 4), whose greedy tokens must agree with TP 1's at every TP size."""

import os
import subprocess
import sys
from pathlib import Path

import numpy
import pytest

from benchmarks import bench_tp
from cupy_transformer import cli
from cupy_transformer.parallel import HEAD, TABLE, Split

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize(
    "name, shape, split, size",
    [
        ("model.layers.0.self_attn.q_proj.weight", (12, 7), Split(0), 4),  # column-parallel [out, in]
        ("model.layers.1.mlp.down_proj.weight", (5, 12), Split(1), 3),  # row-parallel [out, in]
        ("transformer.h.0.attn.c_attn.weight", (4, 18), Split(1, blocks=3), 2),  # GPT-2's fused [Q | K | V]
        ("lm_head.weight", (101, 6), HEAD, 4),  # 26 rows a rank, the last 23 and padding
        ("model.embed_tokens.weight", (5, 3), TABLE, 4),  # 2, 2, 1 and 0 rows, and the zero row
    ],
)
def test_random_shards_are_the_whole_tensors_slices(name, shape, split, size):
    ck = bench_tp.RandomShards({}, "t", seed=3, xp=numpy)
    whole = ck.tensor(name, "float32", shape, "numpy")
    assert whole.shape == shape and whole.dtype == numpy.float32
    parts = [ck.tensor(name, "float32", shape, "numpy", split, r, size) for r in range(size)]
    assert all(numpy.array_equal(p, split.take(name, whole, shape, r, size)) for r, p in enumerate(parts))
    assert numpy.array_equal(whole, bench_tp.RandomShards({}, "u", seed=3, xp=numpy).tensor(name, "float32", shape))
    other = bench_tp.RandomShards({}, "t", seed=4, xp=numpy).tensor(name, "float32", shape)
    assert not numpy.array_equal(whole, other)


def test_random_weights_spread_and_norms():
    ck = bench_tp.RandomShards({}, "t", seed=0, xp=numpy)
    w = ck.tensor("model.layers.0.mlp.up_proj.weight", "float32", (300, 200))
    assert abs(w.mean()) < 1e-3 and abs(w.std() - bench_tp.STD) < 1e-3 and len(numpy.unique(w)) > 50_000
    assert abs(numpy.corrcoef(w[:, :-1].ravel(), w[:, 1:].ravel())[0, 1]) < 0.02  # neighbours independent
    assert (ck.tensor("model.norm.weight", "float16", (8,)) == 1).all()
    assert (ck.tensor("transformer.h.0.attn.c_attn.bias", "float32", (6,), split=Split(0, blocks=3), size=2) == 0).all()


def test_arguments_defaults_smoke_and_errors(capsys):
    args = bench_tp.parse_args([])
    assert (args.shapes, args.tp, args.batches, args.prompt, args.new_tokens) == (
        ["llama-7b", "llama-13b"],
        [1, 2, 4],
        [1, 16],
        2048,
        128,
    )
    smoke = bench_tp.parse_args(["--cpu-smoke", "--tp", "1,2"])
    assert (smoke.shapes, smoke.tp, smoke.prompt) == (["llama-tiny"], [1, 2], 8)
    for argv, named in [
        (["--shapes", "llama-70b"], "--shapes"),
        (["--tp", "1,0"], "--tp"),
        (["--batches", "x"], "--batches"),
        (["--prompt", "4000"], "4096 positions"),
    ]:
        with pytest.raises(SystemExit) as exited:
            bench_tp.parse_args(argv)
        assert exited.value.code == 2 and named in capsys.readouterr().err


def test_refuses_in_one_line_with_fewer_gpus_than_the_largest_tp(monkeypatch, capsys):
    monkeypatch.setattr(cli, "_gpu_count", lambda: 2)
    monkeypatch.setattr(bench_tp, "measure", lambda *a: pytest.fail("measured"))
    with pytest.raises(SystemExit) as exited:
        bench_tp.main(["--tp", "1,2,4"])
    assert exited.value.code == 2
    assert capsys.readouterr().err == "bench_tp: --tp 4 needs 4 GPUs, one a rank; 2 visible\n"


def test_failure_row_keeps_the_columns():
    ok = bench_tp.row("s", 1, 1, {"prefill_ms": 2.0, "decode_ms": 1.0, "no_all_reduce_ms": None, "memory": None,
                                  "tokens": numpy.zeros((3, 1))}, None)  # fmt: skip
    failed = bench_tp.row("s", 2, 16, "failed (rank 1: OutOfMemoryError: ...)", None)
    assert ok.count("|") == failed.count("|") == bench_tp.table_head(8, 4, True)[1].count("|")


def test_cpu_smoke_runs_the_script_end_to_end(tmp_path):
    pytest.importorskip("cupy")  # benchmarks.common
    env = dict(os.environ, OUT=str(tmp_path), PYTHONPATH=str(ROOT))
    done = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "bench_tp.py"), "--cpu-smoke"],
        env=env,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stderr
    text = (tmp_path / "bench-tp-cpu.md").read_text()
    rows = [[c.strip() for c in line.strip("|").split("|")] for line in text.splitlines() if "| llama-tiny |" in line]
    assert [(r[1], r[2]) for r in rows] == [(t, b) for t in "124" for b in "12"], text
    for cells in rows:
        assert all(float(cells[i]) > 0 for i in (3, 5, 7))  # prefill ms, decode ms, tokens/s
        assert cells[4].endswith("x") and cells[6].endswith("x")
        assert cells[8] == "–" if cells[1] == "1" else cells[8].endswith("%")  # TP 1 has no all-reduce
        assert cells[10] == "4/4"  # fp32: every TP size holds TP 1's model and picks its greedy tokens
    assert "CPU (simulated ranks)" in text and "a smoke run, not a timing" in text
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert "matplotlib is not installed: no plot" in done.stdout
    else:
        assert (tmp_path / "bench-tp-cpu.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
