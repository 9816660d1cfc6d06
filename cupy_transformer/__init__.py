"""cupy_transformer: DeepSpeed-Inference-style fused transformer kernels, compiled at run time by CuPy.

``from cupy_transformer import ops`` gives the ops; they take CuPy arrays, NumPy arrays (the NumPy
reference path, no GPU needed) or CUDA tensors through DLPack, and return results of the same kind.
"""

from . import ops
from .kv_cache import KVCache
from .runtime.kernels import compile_all, warmup

__version__ = "0.1.0"
__all__ = ["KVCache", "compile_all", "ops", "warmup", "__version__"]
