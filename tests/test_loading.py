"""loading.Checkpoint: config, single-file and sharded safetensors, dtype conversion, tokenizer, and errors
that name the file or tensor. The tests write their own small checkpoints."""

import json

import ml_dtypes
import numpy
import pytest
from safetensors.numpy import save_file

from cupy_transformer.loading import Checkpoint
from tests.helpers import random


def tokenizer_json(path):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({"[UNK]": 0, "hello": 1, "world": 2}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.save(str(path / "tokenizer.json"))


@pytest.fixture
def tensors(rng):
    return {
        "wte.weight": random(rng, (10, 8), numpy.float32),
        "h.0.attn.c_attn.weight": random(rng, (8, 24), numpy.float32).astype(ml_dtypes.bfloat16),
        "h.0.ln_1.bias": random(rng, (8,), numpy.float16),
    }


def write(path, tensors, shards=1):
    (path / "config.json").write_text(json.dumps({"model_type": "gpt2", "n_embd": 8}))
    if shards == 1:
        save_file(tensors, str(path / "model.safetensors"))
        return
    names = sorted(tensors)
    weight_map = {}
    for i in range(shards):
        part = names[i::shards]
        shard = f"model-{i + 1:05d}-of-{shards:05d}.safetensors"
        save_file({n: tensors[n] for n in part}, str(path / shard))
        weight_map.update(dict.fromkeys(part, shard))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))


def check(path, tensors, backend):
    ck = Checkpoint(path)
    assert ck.config["model_type"] == "gpt2" and ck.names == sorted(tensors)
    for name, stored in tensors.items():
        for dtype in (numpy.float16, numpy.float32):
            got = ck.tensor(name, dtype, stored.shape, backend)
            got = got.get() if hasattr(got, "get") else got
            assert got.dtype == dtype and (got == stored.astype(dtype)).all()
    loaded = ck.load({n: t.shape for n, t in tensors.items()}, numpy.float16, backend, progress=False)
    assert set(loaded) == set(tensors)


@pytest.mark.parametrize("shards", [1, 2])
def test_reads_single_and_sharded_checkpoints(tmp_path, tensors, shards):
    write(tmp_path, tensors, shards)
    check(tmp_path, tensors, "numpy")


def test_a_fresh_process_reads_bf16_weights(tmp_path, tensors):
    # The package imports ml_dtypes only for bf16, and safetensors reads bf16 into NumPy by the name it registers:
    # a process that has not imported it yet still reads a bf16 tensor, whole and split by rows.
    import subprocess
    import sys

    write(tmp_path, tensors)
    name = "h.0.attn.c_attn.weight"
    code = f"""
import sys, numpy
from cupy_transformer.loading import Checkpoint
from cupy_transformer.parallel import Split
assert "ml_dtypes" not in sys.modules
ck = Checkpoint({str(tmp_path)!r})
whole = ck.tensor({name!r}, numpy.float32, (8, 24), "numpy")
half = ck.tensor({name!r}, numpy.float32, (8, 24), "numpy", split=Split(0), rank=1, size=2)
numpy.save(sys.stdout.buffer, numpy.stack([whole[4:], half]))
"""
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, timeout=120)
    assert done.returncode == 0, done.stderr.decode()
    import io

    whole, half = numpy.load(io.BytesIO(done.stdout))
    expected = tensors[name].astype(numpy.float32)[4:]
    assert (whole == expected).all() and (half == expected).all()


@pytest.mark.gpu
def test_gpu_reads_a_checkpoint_tensor_by_tensor(tmp_path, tensors):
    write(tmp_path, tensors, 2)
    check(tmp_path, tensors, "cupy")


def test_tokenizer(tmp_path, tensors):
    write(tmp_path, tensors)
    with pytest.raises(FileNotFoundError, match=r"tokenizer.json not found in"):
        Checkpoint(tmp_path).tokenizer()
    tokenizer_json(tmp_path)
    assert Checkpoint(tmp_path).tokenizer().encode("hello world").ids == [1, 2]


def test_errors_name_the_file_or_tensor(tmp_path, tensors):
    with pytest.raises(FileNotFoundError, match=r"model folder .* does not exist"):
        Checkpoint(tmp_path / "absent")
    (tmp_path / "a file").write_text("")
    with pytest.raises(NotADirectoryError, match=r"model folder .*a file is a file \(give the folder"):
        Checkpoint(tmp_path / "a file")
    with pytest.raises(FileNotFoundError, match=r"config.json not found in"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(ValueError, match=r"config.json: not valid JSON"):
        Checkpoint(tmp_path)
    (tmp_path / "config.json").write_text("{}")
    with pytest.raises(FileNotFoundError, match=r"neither model.safetensors nor model.safetensors.index.json"):
        Checkpoint(tmp_path)
    write(tmp_path, tensors, 2)
    (tmp_path / "model-00002-of-00002.safetensors").unlink()
    with pytest.raises(FileNotFoundError, match=r"model-00002-of-00002.safetensors \(holding .*\) not found"):
        Checkpoint(tmp_path)
    write(tmp_path, tensors, 1)
    (tmp_path / "model.safetensors.index.json").unlink()
    ck = Checkpoint(tmp_path)
    with pytest.raises(ValueError, match=r"tensor 'h.1.attn.c_attn.weight' not found in the checkpoint"):
        ck.tensor("h.1.attn.c_attn.weight", numpy.float16, backend="numpy")
    with pytest.raises(
        ValueError, match=r"tensor 'wte.weight' in model.safetensors: expected shape \(8, 10\); got \(10, 8\)"
    ):
        ck.tensor("wte.weight", numpy.float16, (8, 10), backend="numpy")
    with pytest.raises(TypeError, match=r"dtype: expected one of"):
        ck.tensor("wte.weight", numpy.int8, backend="numpy")
    save_file({"mask": numpy.ones((2, 2), numpy.uint8)}, str(tmp_path / "model.safetensors"))
    with pytest.raises(
        TypeError, match=r"tensor 'mask' in model.safetensors: expected floating-point weights; got uint8"
    ):
        Checkpoint(tmp_path).tensor("mask", numpy.float16, backend="numpy")


def test_a_checkpoint_of_arrays_loads_like_a_folder(tmp_path, rng):
    """Checkpoint.from_arrays (a state dict in memory: NumPy arrays or torch tensors) gives the model a folder
    with the same tensors gives, and names what is missing or misshapen."""
    from safetensors.numpy import load_file

    from cupy_transformer.loading import Checkpoint
    from cupy_transformer.models import GPT2
    from tests.models import test_gpt2

    test_gpt2.checkpoint(tmp_path, rng)
    config = json.loads((tmp_path / "config.json").read_text())
    arrays = load_file(str(tmp_path / "model.safetensors"))
    ids = numpy.array([[3, 1, 4, 1, 5]])
    want = GPT2(tmp_path, numpy.float32, "numpy", progress=False).forward(ids)
    got = GPT2(Checkpoint.from_arrays(config, arrays), numpy.float32, "numpy", progress=False).forward(ids)
    assert (got == want).all()
    torch = pytest.importorskip("torch")
    tensors = {k: torch.from_numpy(v) for k, v in arrays.items()}
    got = GPT2(Checkpoint.from_arrays(config, tensors), numpy.float32, "numpy", progress=False).forward(ids)
    assert (got == want).all()
    del arrays["transformer.ln_f.bias"]
    with pytest.raises(ValueError, match=r"tensor 'transformer.ln_f.bias' not found in the checkpoint <arrays>"):
        GPT2(Checkpoint.from_arrays(config, arrays), numpy.float32, "numpy", progress=False)
