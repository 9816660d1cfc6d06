"""cupy_transformer/bench.py: what the CPU can check of the benchmark models."""

import importlib
import inspect
import re

import pytest

from cupy_transformer import bench
from cupy_transformer.loading import Checkpoint
from cupy_transformer.ops import ActivationType


def test_random_weights_take_what_the_loader_passes():
    """The models load through ``Checkpoint.tensor``'s arguments; the random weights stand in for a checkpoint, so
    they must take the same ones (a parameter added to the loader once broke every random model on the GPU)."""
    ours = list(inspect.signature(bench._RandomWeights.tensor).parameters)
    assert ours == list(inspect.signature(Checkpoint.tensor).parameters)


def test_decode_product_sweep_covers_each_models_products():
    """``benchmarks/sweep_gemv_decode.py`` times the products a decode step runs: their K x N and layouts follow
    from the shapes (GPT-2: 4h MLP; LLaMA: grouped-query QKV, up|gate fused; both: [out, in] layer weights as the
    loaders store them, the token table as the LM head)."""
    from benchmarks.sweep_gemv_decode import products

    rows, dtype, mode = products("gpt2-small")
    assert (dtype, mode) == ("float16", "layer_norm")
    assert [(k, n, tr, fused) for _, k, n, tr, fused, _, _ in rows] == [
        (768, 2304, True, "norm"),
        (768, 768, True, "residual"),
        (768, 3072, True, "norm"),
        (3072, 768, True, "residual"),
        (768, 50257, True, "norm"),
    ]
    rows, dtype, mode = products("llama-1b")
    assert (dtype, mode) == ("bfloat16", "rms_norm")
    assert [(k, n, tr) for _, k, n, tr, _, _, _ in rows] == [
        (2048, 3072, True),  # (32 + 2 x 8) heads of 64
        (2048, 2048, True),
        (2048, 16384, True),
        (8192, 2048, True),
        (2048, 128256, True),
    ]


def test_decode_product_sweep_takes_chosen_sizes():
    """``--products``: K x N pairs as [out, in] bf16 products with the RMS-norm prologue; a malformed pair is
    refused."""
    from benchmarks.sweep_gemv_decode import chosen_products

    rows, dtype, mode = chosen_products("2048x16384, 3072x128256")
    assert (dtype, mode) == ("bfloat16", "rms_norm")
    assert [(k, n, tr, fused) for _, k, n, tr, fused, _, _ in rows] == [
        (2048, 16384, True, "norm"),
        (3072, 128256, True, "norm"),
    ]
    with pytest.raises(SystemExit, match="--products: expected K x N pairs such as 2048x16384; got '2048'"):
        chosen_products("2048")


def test_ab_step_times_each_tree_in_its_own_process(tmp_path, capsys):
    """``benchmarks/ab_step.py`` runs each tree's own ``cupy_transformer.bench`` in a process of its own (two stub
    trees whose steps take 300 / 400 and 330 / 440 µs here), keeps each tree's best over the counted rounds and
    gives the ratio to the first tree; a tree without the package is refused before anything runs."""
    import pytest

    from benchmarks import ab_step

    def stub(name: str, us: float):
        package = tmp_path / name / "cupy_transformer"
        package.mkdir(parents=True)
        (package / "__init__.py").write_text("")
        (package / "bench.py").write_text(
            "def random_model(shape):\n    return shape\n"
            "def time_generation(model, batch, prompt, new_tokens, repeats, programmatic):\n"
            "    assert prompt == 2048, prompt\n"
            f"    return {{'decode_ms': ({us} if programmatic else {us * 4 / 3}) / 1e3 * (2 if model == 'b' else 1)}}\n"
        )
        return str(tmp_path / name)

    old, new = stub("old", 300.0), stub("new", 330.0)
    ab_step.main(["--shapes", "a,b", "--rounds", "1", "--prompt", "2048", old, new])
    out = capsys.readouterr().out
    assert "Decode step, batch 1, 2048-token prompts, best of 1 rounds:" in out
    assert f"| a | {old} | 300.0 | 1.000x | 400.0 | 1.000x |" in out
    assert f"| a | {new} | 330.0 | 1.100x | 440.0 | 1.100x |" in out
    assert f"| b | {new} | 660.0 | 1.100x | 880.0 | 1.100x |" in out
    with pytest.raises(SystemExit) as e:
        ab_step.parse_args([str(tmp_path)])
    assert e.value.code == 2 and "cupy_transformer/bench.py" in capsys.readouterr().err


@pytest.mark.cupy
def test_same_code_shows_the_kernels_a_source_change_touches(tmp_path, capsys):
    """``benchmarks/same_code.py`` compiles a family from each tree's own sources (not an installed copy's) and
    compares each kernel's machine code: a change to the gated activations' output (activation.cuh's
    ``gated_output``, which bias_act.cu's gated branch calls) leaves every other kernel of the family as it was, and
    shows each gated one as differing."""
    import shutil
    from pathlib import Path

    from benchmarks import same_code

    bias_act = importlib.import_module("cupy_transformer.ops.bias_act")  # the module (ops names its function so)

    root = Path(__file__).resolve().parents[1]
    for tree in ("old", "new"):
        for part in ("cupy_transformer", "kernels_cu"):
            shutil.copytree(root / part, tmp_path / tree / part, ignore=shutil.ignore_patterns("__pycache__"))
    source = tmp_path / "new" / "kernels_cu" / "activation.cuh"
    text = source.read_text()
    assert text.count("return from_float<T>(up * ") == 1
    source.write_text(text.replace("return from_float<T>(up * ", "return from_float<T>(1.f + up * "))
    names = bias_act._KERNELS.name_expressions
    gated = sum(int(name.split(", ")[1]) in (ActivationType.GATED_GELU, ActivationType.GATED_SILU) for name in names)
    assert 0 < gated < len(names)
    same_code.main(
        ["--arch", "80", "cupy_transformer.ops.bias_act:_KERNELS", str(tmp_path / "old"), str(tmp_path / "new")]
    )
    out = capsys.readouterr().out
    assert f"{len(names) - gated} of {len(names)} kernels the same code" in out
    assert out.count("  differs: ") == gated
    lines = [line for line in out.splitlines() if line.startswith("  differs: ")]
    assert all(re.search(r"\(\d+ registers, 0 B of stack -> \d+ registers, 0 B of stack\)$", line) for line in lines)


@pytest.mark.cupy
def test_same_code_reads_each_kernels_registers_from_its_cubin():
    """``resources``: every kernel of a family, its registers a thread (within sm_80's 255, at least the few a
    kernel needs) and no stack (none of bias_act's kernels spills); the kernels are those of the cubin's code."""
    from benchmarks import same_code

    bias_act = importlib.import_module("cupy_transformer.ops.bias_act")
    cubin = bias_act._KERNELS.compile_offline("80")
    use = same_code.resources(cubin)
    assert set(use) == set(same_code.text_sections(cubin)) and len(use) == len(bias_act._KERNELS.name_expressions)
    assert all(8 <= registers <= 255 and frame == 0 for registers, frame in use.values())


def test_staged_reads_reads_each_layers_products():
    """``benchmarks/staged_reads.py`` reads the bytes of a step's layer products in order (GPT-2 XL: 48 layers of
    QKV, out, up and down; LLaMA-1B: QKV, o, up|gate, down; 16-bit)."""
    from benchmarks.staged_reads import step_products

    sizes = step_products("gpt2-xl")
    assert sizes == [2 * 1600 * 4800, 2 * 1600 * 1600, 2 * 1600 * 6400, 2 * 6400 * 1600] * 48
    assert step_products("llama-1b") == [2 * 2048 * 3072, 2 * 2048 * 2048, 2 * 2048 * 16384, 2 * 8192 * 2048] * 16


@pytest.mark.cupy
def test_staged_reads_kernel_compiles_for_sm90():
    """Its kernel (cp.async into shared memory before griddepcontrol.wait) compiles for sm_90 without a GPU."""
    from cupy.cuda import nvrtc

    from benchmarks.staged_reads import source
    from cupy_transformer.runtime.kernels import compile_options

    program = nvrtc.createProgram(source(), "staged_reads.cu", [], [])
    nvrtc.compileProgram(program, [*compile_options(), "--gpu-architecture=sm_90"])
    assert len(nvrtc.getCUBIN(program)) > 0


def test_chain_floor_chains_each_layers_products():
    """``benchmarks/chain_floor.py`` chains a step's layer products in order ((K, N): GPT-2 small's QKV, out, up,
    down, 12 times), and a block stages the rows its share of an SM's KiB holds, at most its own."""
    from benchmarks.chain_floor import staged_rows, step_shapes

    assert step_shapes("gpt2-small") == [(768, 2304), (768, 768), (768, 3072), (3072, 768)] * 12
    assert staged_rows(768, 3072, 32, 132, 132) == 21  # 32 KiB / 1536 B a row
    assert staged_rows(768, 3072, 96, 132, 132) == 24  # all of its ceil(3072 / 132) rows
    assert staged_rows(6400, 1600, 96, 264, 132) == 3  # 48 KiB a block / 12800 B a row
    assert staged_rows(768, 768, 0, 264, 132) == 0


def test_chain_floor_step_is_the_fused_steps_kernels():
    """``--step``'s kernels are the fused decode step's, in order: the embedding, five a layer (QKV, attention over
    [2 kv heads x context, head size], out, up, down), the LM head, the sampler's logits (64-wide rows), the end."""
    from benchmarks.chain_floor import step_kernels

    kernels = step_kernels("gpt2-small", context=192)
    assert len(kernels) == 1 + 5 * 12 + 3
    assert [(k, n) for _, k, n in kernels[1:6]] == [
        (768, 2304),
        (64, 2 * 12 * 192),
        (768, 768),
        (768, 3072),
        (3072, 768),
    ]
    assert [(k, n) for _, k, n in kernels[-3:]] == [(768, 50257), (64, 786), (8, 1)]
    llama = step_kernels("llama-1b", context=100)  # 8 kv heads of 64; up|gate one product
    assert len(llama) == 1 + 5 * 16 + 3 and llama[2][1:] == (64, 2 * 8 * 100) and llama[4][1:] == (2048, 16384)


def test_chain_floor_handoffs_wait_where_asked():
    """``--handoff``'s plans: "head" has each attention kernel wait on its QKV product by the kv heads (the QKV
    product raising as many counters) and every other kernel wait as a kernel does; "all" has every kernel after the
    first wait on the one before by one counter. A kernel raises what the next waits on."""
    from benchmarks.chain_floor import handoffs, step_kernels

    kernels = step_kernels("gpt2-small")
    head = handoffs(kernels, 12, "head")
    assert head[:7] == [(0, 0), (0, 12), (12, 0), (0, 0), (0, 0), (0, 0), (0, 12)]
    assert sum(waits == 12 for waits, _ in head) == 12 and head[-4:] == [(0, 0)] * 4
    every = handoffs(kernels, 12, "all")
    assert every[0] == (0, 1) and every[-1] == (1, 0) and set(every[1:-1]) == {(1, 1)}
    for plan in (head, every):
        assert all(raises == plan[i + 1][0] for i, (_, raises) in enumerate(plan[:-1]))
    with pytest.raises(ValueError, match="way: expected 'head' or 'all'; got 'some'"):
        handoffs(kernels, 12, "some")
    with pytest.raises(ValueError, match="heads: expected 1 to 32 groups"):
        handoffs(kernels, 33, "head")


@pytest.mark.cupy
def test_chain_floor_kernel_compiles_for_sm90():
    """Its kernel (cp.async into shared memory before griddepcontrol.wait, then the product) compiles for sm_90
    without a GPU."""
    from cupy.cuda import nvrtc

    from benchmarks.chain_floor import source
    from cupy_transformer.runtime.kernels import compile_options

    program = nvrtc.createProgram(source(), "chain_floor.cu", [], [])
    nvrtc.compileProgram(program, [*compile_options(), "--gpu-architecture=sm_90"])
    assert len(nvrtc.getCUBIN(program)) > 0


@pytest.mark.cupy  # benchmarks.common imports CuPy
def test_results_name_a_dirty_tree_as_dirty(tmp_path, monkeypatch):
    """A result's commit: ``CT_COMMIT`` when set; else HEAD's hash, with "-dirty" once a tracked file differs from it
    (a copy of a tree with older git metadata does not pass for that older commit)."""
    import subprocess

    from benchmarks.common import commit

    def git(*args):
        return subprocess.run(["git", *args], cwd=tmp_path, capture_output=True, text=True, check=True).stdout.strip()

    git("init", "-q")
    (tmp_path / "a.txt").write_text("a\n")
    git("add", "a.txt")
    git("-c", "user.name=t", "-c", "user.email=t@t", "commit", "-qm", "a")
    git("tag", "v1")  # a tag is not what names the tree
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("CT_COMMIT", raising=False)
    head = git("rev-parse", "--short=7", "HEAD")
    assert commit() == head
    (tmp_path / "a.txt").write_text("b\n")
    assert commit() == f"{head}-dirty"
    monkeypatch.setenv("CT_COMMIT", "abc1234")
    assert commit() == "abc1234"
