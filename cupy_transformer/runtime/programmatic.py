"""Programmatic dependent launch (compute capability 9.0 and later): a kernel may start while the kernel before it
in the stream is still running, so that its launch, its blocks' start and whatever it does before
``follow_previous_kernel()`` (kernels_cu/common.cuh: a GEMV loads its first weights) overlap that kernel's tail. In a
CUDA graph of many short kernels (a decode step), each node otherwise pays its whole ramp.

CuPy's kernel launch takes no launch attributes, so a family that opts in (``KernelFamily(..., programmatic=True)``:
every kernel of its file calls ``follow_previous_kernel()`` before it reads another kernel's output or writes memory)
is launched through the driver's ``cuLaunchKernelEx`` with the programmatic-stream-serialization attribute, inside
``with programmatic_launches():``. The decode step's capture runs so (a captured launch becomes a programmatic edge
of the graph); eager launches keep CuPy's faster call (ctypes costs host time where the host is the bottleneck).
"""

from __future__ import annotations

import ctypes

import numpy

from .arrays import ThreadSwitch, import_cupy

_ON = ThreadSwitch(False)  # programmatic_launches' setting, each thread's own (as CuPy's current stream)
_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION = 6  # cuda.h's CUlaunchAttributeID


class _Attribute(ctypes.Structure):  # CUlaunchAttribute: an id, padding to 8 bytes, a 64-byte value union
    _fields_ = [("id", ctypes.c_int), ("pad", ctypes.c_char * 4), ("value", ctypes.c_int * 16)]


class _Config(ctypes.Structure):  # CUlaunchConfig
    _fields_ = [
        ("grid", ctypes.c_uint * 3),
        ("block", ctypes.c_uint * 3),
        ("shared_mem", ctypes.c_uint),
        ("stream", ctypes.c_void_p),
        ("attrs", ctypes.POINTER(_Attribute)),
        ("num_attrs", ctypes.c_uint),
    ]


_driver = None
_C_SCALARS = {
    numpy.dtype(numpy.int32): ctypes.c_int32,
    numpy.dtype(numpy.uint32): ctypes.c_uint32,
    numpy.dtype(numpy.int64): ctypes.c_int64,
    numpy.dtype(numpy.float32): ctypes.c_float,
}


def active() -> bool:
    return _ON.value()


def programmatic_launches(enabled: bool = True):
    """Launches of opted-in families inside are programmatic on compute capability 9.0 and later (``enabled``:
    False turns them off, for a comparison); for the thread that enters it."""
    from .kernels import compute_capability

    return _ON.set(enabled and compute_capability() >= 90)


def _cu_launch_kernel_ex():
    global _driver
    if _driver is None:
        lib = ctypes.CDLL("libcuda.so.1")
        f = lib.cuLaunchKernelEx
        f.argtypes = [ctypes.POINTER(_Config), ctypes.c_void_p, ctypes.POINTER(ctypes.c_void_p), ctypes.c_void_p]
        f.restype = ctypes.c_int
        _driver = f
    return _driver


def _dims(d) -> tuple[int, int, int]:
    d = (d,) if isinstance(d, int) else tuple(d)
    return tuple(int(v) for v in d) + (1,) * (3 - len(d))


def _argument(value):
    """A ctypes object holding one packed kernel argument (``KernelFamily.pack``'s values)."""
    if value is None:
        return ctypes.c_void_p(0)
    if isinstance(value, numpy.generic):
        return _C_SCALARS[value.dtype](value.item())
    data = getattr(value, "data", None)  # a CuPy array: its device pointer
    if data is not None and hasattr(data, "ptr"):
        return ctypes.c_void_p(data.ptr)
    if isinstance(value, int):
        return ctypes.c_void_p(value)
    raise TypeError(f"a kernel argument of type {type(value).__name__} cannot be launched programmatically")


def launch(kernel, grid, block, shared_mem: int, values: tuple) -> None:
    """``kernel`` (a ``cupy.RawKernel``) on the current stream with the programmatic attribute."""
    cupy = import_cupy()
    arguments = [_argument(v) for v in values]
    pointers = (ctypes.c_void_p * max(1, len(arguments)))(
        *(ctypes.cast(ctypes.byref(a), ctypes.c_void_p) for a in arguments)
    )
    attribute = _Attribute(id=_CU_LAUNCH_ATTRIBUTE_PROGRAMMATIC_STREAM_SERIALIZATION)
    attribute.value[0] = 1
    config = _Config(
        grid=_dims(grid),
        block=_dims(block),
        shared_mem=shared_mem,
        stream=cupy.cuda.get_current_stream().ptr,
        attrs=ctypes.pointer(attribute),
        num_attrs=1,
    )
    status = _cu_launch_kernel_ex()(ctypes.byref(config), kernel.kernel.ptr, pointers, None)  # its CUfunction
    if status != 0:
        raise RuntimeError(f"cuLaunchKernelEx failed with CUresult {status}")
