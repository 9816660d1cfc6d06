"""The array layer: turn an op's inputs into the backend's arrays and its results back, and the checks every
module shares.

Two words, two meanings. The *kind* is what the caller passed: ``"numpy"``, ``"cupy"``, ``"torch"`` or
``"dlpack"`` (another ``__dlpack__`` producer); it decides the type of the results. The *backend* is where the
work runs: ``"numpy"`` (the float64 reference path) or ``"cupy"`` (the GPU); ``backend_of(kind)`` maps one to
the other, and each backend's name is also the kind of the arrays it makes. Code asks "is this the NumPy
path?" one way: ``xp = array_module(backend)``, then ``xp is numpy``.

Inputs may be CuPy arrays (used as they are), NumPy arrays (the op then runs its NumPy reference),
or anything with ``__dlpack__`` on a CUDA device, e.g. PyTorch tensors (imported zero-copy with
``cupy.from_dlpack``, which hands the producer CuPy's current stream, so the producer's pending work
is ordered before ours). All inputs of one call must be of one kind; results go back in that kind
(a torch tensor through ``torch.from_dlpack``, again ordered on the consumer's stream).

Every check raises ``TypeError`` (wrong kind or dtype) or ``ValueError`` (rank, shape, layout,
device, a size or a backend) naming the argument, what was expected and what was given.
"""

from __future__ import annotations

import contextlib
import sys
import threading
import warnings
from typing import Any, Iterable

import numpy

#: Element types every op accepts, by name: fp16, fp32 and bf16 (NumPy's through ml_dtypes, as CuPy 14's). Known by
#: name so that importing this package does not import ml_dtypes, which takes over a second on a small CPU (its
#: 0.7 with NumPy 2.4): bf16's dtype is looked up only where a dtype or a name says bfloat16.
FLOAT_NAMES = ("float16", "float32", "bfloat16")
_FLOATS = [numpy.dtype(numpy.float16), numpy.dtype(numpy.float32)]  # bf16 joins on its first lookup


def bfloat16_dtype() -> numpy.dtype | None:
    """ml_dtypes' bfloat16 as a NumPy dtype (imported on first need), or None where ml_dtypes is missing."""
    if len(_FLOATS) == 2:
        try:
            from ml_dtypes import bfloat16
        except ImportError:  # pragma: no cover - ml_dtypes is a dependency; bf16 is simply absent without it
            return None
        _FLOATS[2:] = [numpy.dtype(bfloat16)]  # a slice, not an append: threads racing here set it once
    return _FLOATS[2]


def is_float_dtype(dtype: numpy.dtype) -> bool:
    """Whether ``dtype`` is one of ``FLOAT_NAMES`` in native byte order (for bf16: ml_dtypes' own; whoever made a
    dtype of that name has imported it, so looking it up costs no import)."""
    return dtype in _FLOATS or (dtype.name == "bfloat16" and dtype == bfloat16_dtype())


def __getattr__(name: str):
    # FLOAT_DTYPES, the dtypes themselves, computed on first use (it imports ml_dtypes).
    if name == "FLOAT_DTYPES":
        bfloat16_dtype()
        return tuple(_FLOATS)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# DLPack device types (dlpack.h): memory a CUDA kernel can read.
_DLPACK_CUDA, _DLPACK_CUDA_MANAGED = 2, 13
_DLPACK_NAMES = {
    1: "CPU",
    2: "CUDA",
    3: "CUDA host",
    4: "OpenCL",
    7: "Vulkan",
    8: "Metal",
    10: "ROCm",
    13: "CUDA managed",
}

_cupy = None


def import_cupy():
    """CuPy, imported on first need, so the NumPy path works where CuPy is not installed."""
    global _cupy
    if _cupy is None:
        try:
            import cupy
        except ImportError as e:
            raise ImportError(
                "this needs CuPy: pip install 'cupy-transformer[cuda13]' (or [cuda12]); "
                "NumPy inputs run the reference path without it"
            ) from e
        _cupy = cupy
    return _cupy


def array_module(backend: str):
    """NumPy for the reference path (``"numpy"``), CuPy otherwise."""
    return numpy if backend == "numpy" else import_cupy()


def module_of(array: Any):
    """NumPy for a NumPy array, CuPy for any other (already converted) array: with ``array_module``, the one way
    this package asks whether it is on the NumPy path (``xp is numpy``)."""
    return numpy if isinstance(array, numpy.ndarray) else import_cupy()


_TILE = 64  # a tile of 64 x 64 elements: its rows in and its columns out stay in L1


def transposed_copy(a):
    """``a.T`` of a 2-D array as a new C-contiguous array. NumPy's own copy of a large transpose walks one side
    with a stride of a whole row, a cache miss an element (2-3x the tiles' time at GPT-2's shapes); CuPy's is a
    kernel."""
    xp = module_of(a)
    if xp is not numpy:
        return xp.ascontiguousarray(a.T)
    out = numpy.empty(a.shape[::-1], a.dtype)
    rows, cols = a.shape
    for i in range(0, rows, _TILE):
        for j in range(0, cols, _TILE):
            out[j : j + _TILE, i : i + _TILE] = a[i : i + _TILE, j : j + _TILE].T
    return out


class ThreadSwitch:
    """A setting each thread holds for itself, as CuPy's current stream is: ``set(value)`` is a context manager
    that sets it for the code inside, ``value()`` reads the calling thread's. Decoders running in threads
    (simulated tensor-parallel ranks, a server's requests) then do not steer one another; a process-wide flag,
    entered and left by threads crosswise, was turned off under one still inside and left on after all."""

    def __init__(self, default):
        self._local, self._default = threading.local(), default

    def value(self):
        return getattr(self._local, "value", self._default)

    @contextlib.contextmanager
    def set(self, value):
        before = self.value()
        self._local.value = value
        try:
            yield
        finally:
            self._local.value = before


_FLOAT32 = ThreadSwitch(False)


def cpu_float32(enabled: bool = True):
    """Within it (with ``enabled``), the NumPy path computes float32 arrays in float32: products through BLAS,
    attention, softmax and activations in float32 (``reference_compute``), what PyTorch's CPU path computes, for a
    model's own passes on the CPU (``generation.Decoder``: a GPT-2-small token 5x faster). Outside it the NumPy
    references compute in float64: what the kernels are tested against. It holds for the thread that enters it."""
    return _FLOAT32.set(enabled)


def reference_compute(xp, dtype) -> type:
    """The float type a reference formula computes arrays of ``dtype`` in on ``xp``: float32 on CuPy, float64 on
    NumPy, but float32 for float32 arrays inside ``cpu_float32``."""
    if xp is not numpy or (_FLOAT32.value() and numpy.dtype(dtype) == numpy.float32):
        return numpy.float32
    return numpy.float64


def gpu_problem() -> str | None:
    """None where CuPy is installed and sees a CUDA device; else why the GPU is not usable (CuPy's own words)."""
    try:
        import cupy
    except ImportError as e:
        return f"CuPy is not installed ({e})"
    try:
        count = cupy.cuda.runtime.getDeviceCount()
    except Exception as e:  # no driver, an old driver, no device: CuPy says which
        return str(e) or type(e).__name__
    return None if count > 0 else "no CUDA device"


def gpu_available() -> bool:
    """Whether CuPy is installed and sees a CUDA device (the question behind choosing the ``"cupy"`` backend)."""
    return gpu_problem() is None


def require_gpu(what: str) -> None:
    """A RuntimeError, ``what`` first, where the GPU was asked for and none is usable."""
    problem = gpu_problem()
    if problem is not None:
        raise RuntimeError(f"{what}: no usable CUDA GPU (CuPy reports: {problem})")


_SAID_NUMPY = False


def resolve_backend(name: str, value: Any) -> str:
    """The backend a model or cache runs on: ``value`` checked (``"cupy"`` needs a usable GPU: else a
    RuntimeError saying so), or for None the GPU where one is usable and else the NumPy path, with a warning
    once per process (a silent float64 CPU run could pass for a slow GPU)."""
    global _SAID_NUMPY
    if value is None:
        problem = gpu_problem()
        if problem is None:
            return "cupy"
        if not _SAID_NUMPY:
            _SAID_NUMPY = True
            warnings.warn(f"no usable CUDA GPU ({problem}): running on the NumPy path", stacklevel=3)
        return "numpy"
    if check_backend(name, value) == "cupy":
        require_gpu(f"{name}='cupy'")
    return value


def check_backend(name: str, value: Any) -> str:
    """``value`` if it names a backend (``"cupy"`` or ``"numpy"``); else a ValueError naming ``name``."""
    if value not in ("cupy", "numpy"):
        raise ValueError(f"{name}: expected 'cupy' or 'numpy'; got {value!r}")
    return value


def float_dtype(name: str, value: Any) -> numpy.dtype:
    """``value`` (a dtype, a type or a name) as a dtype of ``FLOAT_NAMES``; else a TypeError naming ``name`` and the
    accepted dtypes."""
    if isinstance(value, numpy.dtype) and value in _FLOATS:  # an array's dtype, on every op call: no message
        return value
    want = ", ".join(FLOAT_NAMES)
    if isinstance(value, str) and value == "bfloat16":
        bfloat16_dtype()  # ml_dtypes gives NumPy the name
    try:
        dtype = numpy.dtype(value)
    except TypeError:
        raise TypeError(f"{name}: expected one of {want}; got {value!r}") from None
    if not is_float_dtype(dtype):
        raise TypeError(f"{name}: expected one of {want}; got {dtype}")
    return dtype


def positive_int(name: str, value: Any, *, alternative: str | None = None) -> int:
    """``value`` (a Python or NumPy integer, not a bool) as an int >= 1; else a ValueError naming ``name``, and
    ``alternative`` (e.g. "-1 for the default") where the caller accepts another value in its place."""
    if isinstance(value, bool) or not isinstance(value, (int, numpy.integer)) or value < 1:
        or_else = f" or {alternative}" if alternative else ""
        raise ValueError(f"{name}: expected a positive integer{or_else}; got {value!r}")
    return int(value)


def _describe(value: Any) -> str:
    t = type(value)
    return f"{t.__module__}.{t.__qualname__}"


def _is_cupy(value: Any) -> bool:
    return "cupy" in sys.modules and isinstance(value, sys.modules["cupy"].ndarray)


def kind_of(name: str, value: Any) -> str:
    """``"numpy"``, ``"cupy"``, ``"torch"`` or ``"dlpack"`` (another ``__dlpack__`` producer)."""
    if isinstance(value, numpy.ndarray):
        return "numpy"
    if _is_cupy(value):
        return "cupy"
    if hasattr(value, "__dlpack__") and hasattr(value, "__dlpack_device__"):
        return "torch" if type(value).__module__.split(".")[0] == "torch" else "dlpack"
    raise TypeError(
        f"{name}: expected a CuPy array, a NumPy array or a CUDA array with __dlpack__ (e.g. a torch.Tensor); "
        f"got {_describe(value)}"
    )


def backend_of(kind: str) -> str:
    """The backend a call on arrays of ``kind`` runs on: ``"numpy"`` for NumPy arrays, ``"cupy"`` for the rest."""
    return "numpy" if kind == "numpy" else "cupy"


def common_kind(**arrays: Any) -> str:
    """The kind of the first given (non-None) array; NumPy mixed with GPU arrays is a TypeError.

    GPU kinds may mix (a CuPy weight with a torch activation): all become CuPy arrays, and the result
    takes the first array's kind.
    """
    first = None
    for name, value in arrays.items():
        if value is None:
            continue
        kind = kind_of(name, value)
        if first is None:
            first = (name, kind)
        elif backend_of(kind) != backend_of(first[1]):
            want = "a NumPy array" if first[1] == "numpy" else "a GPU array"
            raise TypeError(f"{name}: expected {want} like {first[0]}; got {_describe(value)}")
    if first is None:
        raise TypeError("no array given")
    return first[1]


def from_dlpack(name: str, value: Any):
    """A DLPack producer on the current GPU (a torch CUDA tensor) as a CuPy array sharing its memory, ordered on
    CuPy's current stream; a clear error for one elsewhere. Any strides (``as_array`` checks the layout)."""
    device_type, device_id = value.__dlpack_device__()
    if device_type not in (_DLPACK_CUDA, _DLPACK_CUDA_MANAGED):
        where = _DLPACK_NAMES.get(int(device_type), f"DLPack device type {int(device_type)}")
        raise ValueError(
            f"{name}: expected an array on a CUDA GPU (or a NumPy array for the reference path); "
            f"got a {_describe(value)} on {where}"
        )
    cupy = import_cupy()
    current = cupy.cuda.runtime.getDevice()
    if device_type == _DLPACK_CUDA and device_id != current:
        raise ValueError(f"{name}: expected an array on the current GPU {current}; got one on GPU {device_id}")
    return cupy.from_dlpack(value)


def as_array(
    name: str,
    value: Any,
    kind: str,
    *,
    ndim: int | Iterable[int] | None = None,
    min_ndim: int | None = None,
    dtypes: tuple[numpy.dtype, ...] | numpy.dtype | None = None,
    shape: tuple[int, ...] | None = None,
):
    """``value`` as a C-contiguous array of the backend for ``kind``, after the given checks.

    ``kind`` is the call's common kind (``common_kind``); ``dtypes`` None accepts those of ``FLOAT_NAMES``;
    ``shape`` entries of -1 match any size.
    """
    own = kind_of(name, value)
    if backend_of(own) != backend_of(kind):
        want = "a NumPy array" if kind == "numpy" else "a GPU array"
        raise TypeError(f"{name}: expected {want} like the other inputs; got {_describe(value)}")
    if own == "numpy":
        array = value
    elif own == "cupy":
        array = value
        current = import_cupy().cuda.runtime.getDevice()
        if array.data.device_id != current:
            raise ValueError(
                f"{name}: expected an array on the current GPU {current}; got one on GPU {array.data.device_id}"
            )
    else:
        array = from_dlpack(name, value)

    if ndim is not None:
        allowed = (ndim,) if isinstance(ndim, int) else tuple(ndim)
        if array.ndim not in allowed:
            want = " or ".join(f"{n}-D" for n in allowed)
            raise ValueError(f"{name}: expected a {want} array; got {array.ndim}-D with shape {tuple(array.shape)}")
    if min_ndim is not None and array.ndim < min_ndim:
        raise ValueError(f"{name}: expected an array of at least {min_ndim} dimension(s); got {array.ndim}-D")
    if dtypes is None:  # the list first: no call on the usual path
        wrong, want = array.dtype not in _FLOATS and not is_float_dtype(array.dtype), FLOAT_NAMES
    else:
        want = (dtypes,) if isinstance(dtypes, numpy.dtype) else dtypes
        wrong = array.dtype not in want
    if wrong:
        raise TypeError(f"{name}: expected dtype {', '.join(map(str, want))}; got {array.dtype}")
    if shape is not None and (len(shape) != array.ndim or any(w != -1 and w != g for w, g in zip(shape, array.shape))):
        want = "(" + ", ".join("*" if w == -1 else str(w) for w in shape) + ("," if len(shape) == 1 else "") + ")"
        raise ValueError(f"{name}: expected shape {want}; got {tuple(array.shape)}")
    if not array.flags.c_contiguous:
        raise ValueError(
            f"{name}: expected a C-contiguous array; got shape {tuple(array.shape)} with strides {array.strides} "
            "(call .copy() / .contiguous() first)"
        )
    return array


def check_no_overlap(out_name: str, out: Any, **inputs: Any) -> None:
    """``out`` must not share memory with an input (kernels read inputs through ``__restrict__``)."""
    if isinstance(out, numpy.ndarray):
        return  # the NumPy path computes into a temporary before writing `out`
    lo, hi = out.data.ptr, out.data.ptr + out.nbytes
    for name, array in inputs.items():
        if array is not None and array.nbytes and out.nbytes:
            a_lo, a_hi = array.data.ptr, array.data.ptr + array.nbytes
            if a_lo < hi and lo < a_hi:
                raise ValueError(f"{out_name}: must not overlap the input {name}")


def empty_like_kind(kind: str, shape: tuple[int, ...], dtype: numpy.dtype):
    """A new array of the backend for ``kind`` (torch/dlpack results are made in CuPy)."""
    return array_module(backend_of(kind)).empty(shape, dtype)


def deliver(result, out):
    """``result``, or ``out`` holding it when the caller gave one (the NumPy paths compute, then copy)."""
    if out is None:
        return result
    out[...] = result
    return out


def to_caller(array: Any, kind: str):
    """Return a result in the caller's kind: torch gets a tensor (zero-copy), others the array as is."""
    if kind == "torch":
        return sys.modules["torch"].from_dlpack(array)
    return array
