"""Runtime: the array layer (``arrays``) and the NVRTC kernel runtime (``kernels``)."""

from .arrays import (
    FLOAT_NAMES,
    array_module,
    as_array,
    backend_of,
    check_backend,
    common_kind,
    float_dtype,
    gpu_available,
    import_cupy,
    is_float_dtype,
    kind_of,
    positive_int,
    to_caller,
)
from .kernels import KernelCompileError, KernelFamily, compile_all, warmup

__all__ = [
    "FLOAT_NAMES",
    "KernelCompileError",
    "KernelFamily",
    "array_module",
    "as_array",
    "backend_of",
    "check_backend",
    "common_kind",
    "compile_all",
    "float_dtype",
    "gpu_available",
    "import_cupy",
    "is_float_dtype",
    "kind_of",
    "positive_int",
    "to_caller",
    "warmup",
]
