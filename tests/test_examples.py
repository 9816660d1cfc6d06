"""The examples run (on the NumPy path here; on the GPU where there is one)."""

import importlib.util
import pathlib

import numpy

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
