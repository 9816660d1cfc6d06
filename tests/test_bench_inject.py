"""benchmarks/bench_inject.py: its command line, table rows and ratios, and a quick run on the CPU (a tiny GPT-2,
the injected copy on the NumPy path) whose injected greedy tokens must equal the original's."""

import math

import pytest

from benchmarks import bench_inject


def test_arguments_defaults_quick_and_overrides():
    args = bench_inject.parse_args(["--device", "cpu"])
    assert (args.models, args.batches, args.new_tokens, args.prompt) == (
        ["gpt2-small", "gpt2-xl", "llama-1b"],
        [1, 16],
        128,
        128,
    )
    quick = bench_inject.parse_args(["--quick", "--device", "cpu"])
    assert (quick.models, quick.batches, quick.new_tokens) == (["gpt2-tiny"], [1], 16)
    assert bench_inject.parse_args(["--quick", "--device", "cuda"]).models == ["gpt2-small"]
    given = bench_inject.parse_args(["--quick", "--device", "cpu", "--models", "llama-1b", "--batches", "2,4"])
    assert (given.models, given.batches, given.new_tokens) == (["llama-1b"], [2, 4], 16)


@pytest.mark.parametrize(
    "argv, named",
    [
        (["--models", "gpt2-small,gpt3"], "--models"),
        (["--batches", "1,x"], "--batches"),
        (["--batches", "0"], "--batches"),
        (["--new-tokens", "0"], "--new-tokens"),
        (["--models", "gpt2-small", "--prompt", "900"], "1024 positions"),  # 900 + 128 + 1 > GPT-2's 1024
    ],
)
def test_bad_arguments_are_usage_errors_naming_the_flag(argv, named, capsys):
    with pytest.raises(SystemExit) as exited:
        bench_inject.parse_args(argv + ["--device", "cpu"])
    assert exited.value.code == 2 and named in capsys.readouterr().err


def test_ratio_and_row():
    eager, compiled = {"decode_ms": 10.0, "prefill_ms": 20.0}, {"decode_ms": 5.0, "prefill_ms": 30.0}
    injected, static = {"decode_ms": 4.0, "prefill_ms": 8.0}, {"decode_ms": 2.5, "prefill_ms": 9.0}
    assert bench_inject.ratio(eager, injected) == "2.50x" and bench_inject.ratio(compiled, injected) == "1.25x"
    assert bench_inject.ratio(None, injected) == bench_inject.ratio(eager, None) == "–"
    results = {"eager": eager, "compiled": compiled, "injected": injected, "injected hf loop": static}
    agree = {"compiled": "129/129", "injected": "40/129", "injected hf loop": "41/129"}
    line = bench_inject.row("gpt2-xl", "float16", 16, results, agree)
    cells = [c.strip() for c in line.strip("|").split("|")]
    assert cells == [
        *("gpt2-xl", "float16", "16"),
        *("10.000", "5.000", "4.000", "2.500"),  # decode ms/token
        *("2.50x", "1.25x", "4.00x", "2.00x"),  # injected vs eager, vs compiled; the same for the HF loop
        *("20.00", "30.00", "8.00", "9.00"),  # prefill ms
        "129/129, 40/129, 41/129",
    ]
    head = bench_inject.table_head(128, 128)
    assert head[1].count("|") == line.count("|") == head[2].count("|")
    missing = bench_inject.row("gpt2-small", "float32", 1, dict(results, compiled=None), {"injected": "17/17"})
    cells = [c.strip() for c in missing.strip("|").split("|")]
    assert [cells[i] for i in (4, 8, 10, 12, 15)] == ["–", "–", "–", "–", "–, 17/17, –"]  # compiled's columns


def test_deepspeed_note_gives_the_issues_figures_and_speedups():
    note = bench_inject.deepspeed_note()
    assert "gpt2-xl 13.9 ms/token against Hugging Face eager 46.8 (3.37x)" in note
    assert "gpt2-small 4.05 ms/token against Hugging Face eager 11.45 (2.83x)" in note


def test_quick_run_on_the_cpu(tmp_path, monkeypatch):
    pytest.importorskip("cupy")  # benchmarks.common
    pytest.importorskip("torch")
    pytest.importorskip("transformers")
    monkeypatch.setenv("OUT", str(tmp_path))
    path = bench_inject.main(["--quick", "--device", "cpu", "--prompt", "12", "--new-tokens", "6", "--batches", "1,2"])
    assert path == str(tmp_path / "inject-cpu.md")
    text = (tmp_path / "inject-cpu.md").read_text()
    rows = [line for line in text.splitlines() if line.startswith("| gpt2-tiny |")]
    assert len(rows) == 2, text
    for batch, line in zip((1, 2), rows):
        cells = [c.strip() for c in line.strip("|").split("|")]
        assert cells[:3] == ["gpt2-tiny", "float32", str(batch)]
        decode = cells[3:7]
        # Nothing compiled on the CPU; the others ran (a difference of two timings of this tiny model can come out
        # at or below zero: a number is what is checked).
        assert decode[1] == "–" and all(math.isfinite(float(x)) for x in decode[:1] + decode[2:])
        assert cells[7].endswith("x") and cells[9].endswith("x") and cells[8] == cells[10] == "–"
        assert cells[-1] == "–, 7/7, 7/7"  # fp32: the injected greedy tokens are the original's, every one
    assert "not measured here" in text and "no compiled column" in text and "Failed" not in text


def test_plot_draws_the_variants_that_ran(tmp_path):
    pytest.importorskip("matplotlib")
    curves = {"eager": [10.0, 20.0], "compiled": [None, None], "injected": [4.0, None], "injected hf loop": [3.0, 5.0]}
    path = bench_inject.plot(curves, ["a\nbatch 1", "a\nbatch 16"], "title", str(tmp_path / "p.png"))
    assert path and (tmp_path / "p.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
