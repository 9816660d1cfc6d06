"""Models built from the ops, loaded from Hugging Face checkpoint folders (``config.json``'s model_type)."""

from ..loading import Checkpoint
from .bert import BERT
from .gpt2 import GPT2
from .llama import LLaMA

MODELS = {"bert": BERT, "gpt2": GPT2, "llama": LLaMA}


def load_model(folder, dtype="float16", backend: str = "cupy", progress=None):
    """The model of ``folder``'s config.json model_type; a clear error for an unsupported one."""
    checkpoint = Checkpoint(folder)
    model_type = checkpoint.config.get("model_type")
    if model_type not in MODELS:
        raise ValueError(
            f"{checkpoint.folder}/config.json: model_type {model_type!r} is not supported; "
            f"supported: {', '.join(sorted(MODELS))}"
        )
    return MODELS[model_type](checkpoint, dtype, backend, progress)


__all__ = ["BERT", "GPT2", "LLaMA", "MODELS", "load_model"]
