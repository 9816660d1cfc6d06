"""Models built from the ops, loaded from Hugging Face checkpoint folders (``config.json``'s model_type)."""

from ..loading import Checkpoint
from ..runtime.arrays import resolve_backend
from .bert import BERT
from .gpt2 import GPT2
from .llama import LLaMA

MODELS = {"bert": BERT, "gpt2": GPT2, "llama": LLaMA}


def load_model(folder, dtype=None, backend: str | None = None, progress=None, comm=None):
    """The model of ``folder``'s config.json model_type; a clear error for an unsupported one. ``backend`` None:
    the GPU where one is usable, else the NumPy path; ``dtype`` None: float16 on the GPU, float32 on NumPy.
    ``comm``: this rank's communicator for tensor parallelism (``parallel``), None for the whole model."""
    checkpoint = Checkpoint(folder)
    model_type = checkpoint.config.get("model_type")
    if model_type not in MODELS:
        raise ValueError(
            f"{checkpoint.folder}/config.json: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(sorted(MODELS))}"
        )
    backend = resolve_backend("backend", backend)
    dtype = dtype or ("float16" if backend == "cupy" else "float32")
    return MODELS[model_type](checkpoint, dtype, backend, progress, comm=comm)


__all__ = ["BERT", "GPT2", "LLaMA", "MODELS", "load_model"]
