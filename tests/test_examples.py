"""The examples run (on the NumPy path here; on the GPU where there is one)."""

import importlib.util
import pathlib

import numpy
import pytest

ROOT = pathlib.Path(__file__).resolve().parents[1]


def load(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_layer_norm_example(capsys):
    load("layer_norm").main()
    assert "reference row 0:" in capsys.readouterr().out


def test_sentence_similarity_example(capsys):
    similarity = load("sentence_similarity").main(
        ["A man is eating food.", "A man is eating a piece of bread.", "The girl is carrying a baby."]
    )
    assert abs(similarity[0, 1] - 0.7553) < 5e-3 and similarity[0, 1] > similarity[0, 2]
    assert "closest: 'A man is eating a piece of bread.'" in capsys.readouterr().out


def test_gpt2_generate_example(tmp_path, rng, capsys):
    from tokenizers import Tokenizer, models, pre_tokenizers

    from tests.models import test_gpt2

    test_gpt2.checkpoint(tmp_path, rng)
    tok = Tokenizer(models.WordLevel({f"w{i}": i for i in range(test_gpt2.VOCAB)}, unk_token="w0"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(tmp_path / "tokenizer.json"))
    text = load("gpt2_generate").main(str(tmp_path), "w1 w2", 4)
    assert len(text.split()) == 4 and text in capsys.readouterr().out
    assert numpy.all([w.startswith("w") for w in text.split()])


def test_torch_custom_op_example(capsys):
    pytest.importorskip("torch")
    differences = load("torch_custom_op").main()  # torch.compile's default backend, inductor
    assert set(differences) == {"eager", "compiled (inductor)"}
    assert max(differences.values()) < 1e-5  # fp32, an output of about unit size
    assert "1 graph(s), 0 graph break(s)" in capsys.readouterr().out


def test_readme_use_snippets_run():
    """The README's "Use" section, run as written (on the NumPy path here: no GPU needed, no CuPy error)."""
    import re
    import warnings

    readme = (ROOT / "README.md").read_text()
    use = readme.split("\n## Use\n", 1)[1].split("\n## ", 1)[0]
    blocks = re.findall(r"```python\n(.*?)```", use, flags=re.S)
    assert len(blocks) == 2
    scope = {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # the one "no usable CUDA GPU" warning of a GPU-less machine
        for block in blocks:
            exec(compile(block, "README.md", "exec"), scope)
    assert scope["y"].shape == (8, 4096) and scope["ctx"].shape == (1, 8, 4096)
    assert scope["cache"].backend == ("cupy" if scope["xp"] is not numpy else "numpy")
    assert numpy.isfinite(numpy.asarray(scope["z"])).all()
