"""The `embed` command's input and output: texts from arguments, stdin and --input, one JSON line per text,
--out's real file name."""

import io
import json
import re
import subprocess
import sys

import numpy
import pytest

from cupy_transformer import cli
from tests.models import test_bert
from tests.test_loading import tokenizer_json


@pytest.fixture
def bert(tmp_path, rng):
    folder = tmp_path / "bert"
    folder.mkdir()
    test_bert.checkpoint(folder, rng)
    tokenizer_json(folder)
    return folder


def embed_lines(capsys, argv) -> numpy.ndarray:
    assert cli.main(["embed", *argv, "--device", "cpu"]) == 0
    lines = capsys.readouterr().out.splitlines()
    return numpy.array([json.loads(line) for line in lines])


def test_one_json_line_per_text_from_arguments_stdin_and_file(bert, tmp_path, capsys, monkeypatch):
    texts = ["hello world", "world", "hello hello world", ""]
    args = ["--model", str(bert)]
    want = embed_lines(capsys, [*texts, *args])
    assert want.shape == (4, test_bert.H) and numpy.allclose(numpy.linalg.norm(want[:3], axis=1), 1.0, atol=1e-6)
    assert not numpy.allclose(want[0], want[1])
    # stdin (`-`), in place among the arguments; a file after them; one line each, empty lines kept.
    monkeypatch.setattr(sys, "stdin", io.TextIOWrapper(io.BytesIO(b"world\r\nhello hello world\n")))
    # Three texts, not four: another batch shape, whose fp32 products the CPU's BLAS may sum in another order.
    assert numpy.allclose(embed_lines(capsys, ["hello world", "-", *args]), want[:3], rtol=0, atol=1e-6)
    (tmp_path / "texts.txt").write_text("world\nhello hello world\n\n")
    assert numpy.array_equal(embed_lines(capsys, ["hello world", "--input", str(tmp_path / "texts.txt"), *args]), want)


@pytest.mark.parametrize(
    "argv, setup, message",
    [
        ([], None, r"embed: no texts to embed \(give TEXT"),
        (["--input", "{tmp}/absent.txt"], None, r"--input .*absent.txt: no such file"),
        (["--input", "{tmp}/latin1.txt"], b"caf\xe9\n", r"--input .*latin1.txt: not UTF-8 text \(byte 3"),
        (["-", "-"], None, r"`-` \(read stdin\) may be given once"),
        (["hello", "caf\udce9"], None, r"argument TEXT: not valid UTF-8 \(byte 0xe9"),
    ],
)
def test_bad_input_is_named(bert, tmp_path, capsys, argv, setup, message):
    """One line on stderr naming the input, exit status 2."""
    if setup is not None:
        (tmp_path / "latin1.txt").write_bytes(setup)
    with pytest.raises(SystemExit) as exit:
        cli.main(["embed", *[a.format(tmp=tmp_path) for a in argv], "--model", str(bert), "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit.value.code == 2 and len(err) == 1 and re.search(message, err[0]), err


@pytest.mark.parametrize("name", ["emb_out", "emb_out.npy"])
def test_out_reports_the_file_it_writes(bert, tmp_path, capsys, name):
    argv = ["embed", "hello", "world", "--model", str(bert), "--device", "cpu", "--out", str(tmp_path / name)]
    assert cli.main(argv) == 0
    path = tmp_path / "emb_out.npy"
    assert capsys.readouterr().out.strip() == f"2 embeddings of {test_bert.H} dims written to {path}"
    assert numpy.load(path).shape == (2, test_bert.H) and not (tmp_path / "emb_out").exists()


def test_piped_into_head_ends_quietly(bert, tmp_path):
    """`embed ... | head -1`: the lines are written one by one, so the command ends when head closes the pipe."""
    (tmp_path / "texts.txt").write_text("hello world\n" * 3000)
    command = (
        f"{sys.executable} -m cupy_transformer.cli embed --input {tmp_path / 'texts.txt'} --model {bert} "
        "--device cpu | head -1"
    )
    out = subprocess.run(["bash", "-o", "pipefail", "-c", command], capture_output=True, text=True, timeout=300)
    assert len(json.loads(out.stdout)) == test_bert.H
    assert "Traceback" not in out.stderr, out.stderr
