"""Runtime: the array layer (``arrays``) and the NVRTC kernel runtime (``kernels``)."""

from .arrays import FLOAT_DTYPES, as_array, common_kind, import_cupy, kind_of, to_caller
from .kernels import KernelCompileError, KernelFamily, compile_all, warmup

__all__ = [
    "FLOAT_DTYPES",
    "KernelCompileError",
    "KernelFamily",
    "as_array",
    "common_kind",
    "compile_all",
    "import_cupy",
    "kind_of",
    "to_caller",
    "warmup",
]
