"""Tensor maps for Hopper's bulk tensor copies (TMA), made with the driver's ``cuTensorMapEncodeTiled``.

A kernel that fetches tiles with ``cp.async.bulk.tensor`` (``kernels_cu/tma.cuh``) names the tensor by a
128-byte map of its address, sizes, strides, box and swizzle. CuPy wraps no tensor-map call and passes no
128-byte struct as a kernel argument, so the map is encoded through ctypes and handed to the kernel in global
memory (which the copy instruction accepts, after the kernel's ``fence.proxy.tensormap`` acquire). Maps
depend only on the address and the layout, so they are kept per (device, address, shape, strides, dtype,
box): a layer's cache and a repeated prefill shape encode and upload once; a whole cache's layers upload together
(``layer_maps``). A CUDA graph reads its maps by
address, long after the capture: whatever owns the graph holds them too (``holding``), since the LRU lets the
least recently used go and their memory would then be reused under the graph.

Constants are cuda.h's (CUDA 12 and 13 agree on them).
"""

from __future__ import annotations

import contextlib
import ctypes
import threading

import numpy

from .arrays import import_cupy
from .lru import DeviceLRU

_DATA_TYPE = {"float16": 6, "bfloat16": 9}  # CU_TENSOR_MAP_DATA_TYPE_*
_SWIZZLE_128B, _L2_PROMOTION_256B, _INTERLEAVE_NONE, _OOB_FILL_ZEROS = 3, 3, 0, 0
_KEEP = 512  # maps kept: each layer's K and V cache views have their own (2 x 80 for a 70B model's layers)
MAPS = DeviceLRU(_KEEP)


class _Holding(threading.local):
    def __init__(self):
        self.maps: list[dict] = []  # the maps of each ``holding`` open on this thread, innermost last


_HOLDING = _Holding()
_encode = None


class TensorMapError(RuntimeError):
    """The driver refused a tensor map (its CUresult is in the message)."""


def _encoder():
    global _encode
    if _encode is None:
        fn = ctypes.CDLL("libcuda.so.1").cuTensorMapEncodeTiled
        u32p, u64p = ctypes.POINTER(ctypes.c_uint32), ctypes.POINTER(ctypes.c_uint64)
        fn.argtypes = [
            ctypes.c_void_p,
            ctypes.c_int,
            ctypes.c_uint32,
            ctypes.c_void_p,
            u64p,
            u64p,
            u32p,
            u32p,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
            ctypes.c_int,
        ]
        fn.restype = ctypes.c_int
        _encode = fn
    return _encode


def _check(a, rows: int, what: str = "tile_map", ndim: int = 4) -> None:
    items = a.dtype.itemsize
    if (
        a.dtype.name not in _DATA_TYPE
        or a.ndim != ndim
        or a.strides[-1] != items
        or a.shape[-1] % 8
        or a.shape[-1] < 64
    ):
        lead = "[B, heads, T, D]" if ndim == 4 else "[layers, B, heads, T, D]"
        raise ValueError(
            f"{what}: expected an fp16 or bf16 {lead} array, D a multiple of 8, at least "
            f"64 and contiguous; got {a.dtype} {a.shape} strides {a.strides}"
        )
    if a.data.ptr % 16 or any(s % 16 or s <= 0 for s in a.strides[:-1]) or not 0 < rows <= 256:
        raise ValueError(
            f"{what}: address and strides must be positive multiples of 16 bytes and rows 1..256; "
            f"got address {a.data.ptr:#x}, strides {a.strides}, rows {rows}"
        )


def _memo(key: tuple, make):
    """``MAPS``'s value for ``key``, answered from and kept in the innermost ``holding`` dict where one is open."""
    held = _HOLDING.maps[-1] if _HOLDING.maps else None
    if held is not None and key in held:
        return held[key]
    value = MAPS.get(key, make)
    if held is not None:
        held[key] = value
    return value


def tile_map(a, rows: int):
    """The map of ``a`` [B, heads, T, D] (16-bit, D contiguous, 16-byte aligned strides) for boxes of 64
    elements by ``rows`` tokens in the 128-byte swizzle: coordinates (dim, token, head, sequence); rows past
    T and dimensions past D read as zeros. Returns a 128-byte device array holding it."""
    _check(a, rows)
    key = (a.data.ptr, a.shape, a.strides, a.dtype.str, rows)
    return _memo(key, lambda: _encode_maps([a.data.ptr], a.shape, a.strides, a.dtype, rows)[0])


def layer_maps(a, rows: int):
    """``tile_map``'s maps of ``a[0]``, ``a[1]``, ... for ``a`` [layers, B, heads, T, D] (a cache's keys or values),
    encoded together and uploaded as one [layers, 128] device array, row l ``a[l]``'s map: a new cache's first pass
    makes one upload, not one a layer."""
    _check(a, rows, "layer_maps", ndim=5)
    key = ("layers", a.data.ptr, a.shape, a.strides, a.dtype.str, rows)
    return _memo(key, lambda: _encode_maps(_layer_addresses(a), a.shape[1:], a.strides[1:], a.dtype, rows))


def _layer_addresses(a) -> list[int]:
    """Where each ``a[l]`` begins (made only for a map not yet kept: every layer's call asks for the maps)."""
    return [a.data.ptr + layer * a.strides[0] for layer in range(a.shape[0])]


@contextlib.contextmanager
def holding(maps: dict):
    """Within it, ``tile_map`` and ``layer_maps`` answer from ``maps`` and keep there every map they return: the
    owner of a CUDA graph captured within it keeps ``maps`` as long as the graph, and a capture after an eager run
    within it finds that run's maps (making one means an upload, which a capture refuses). Per thread: decoders may
    run side by side, a thread each."""
    _HOLDING.maps.append(maps)
    try:
        yield
    finally:
        _HOLDING.maps.pop()


def _encode_maps(addresses, shape, strides, dtype, rows: int):
    """The maps of arrays of one layout at ``addresses``, as a [len(addresses), 128] device array (one upload)."""
    count = len(addresses)
    host = numpy.zeros(128 * count + 64, numpy.uint8)  # the driver wants each map 64-byte aligned
    at = -host.ctypes.data % 64
    b, heads, t, d = shape
    sizes = (ctypes.c_uint64 * 4)(d, t, heads, b)
    steps = (ctypes.c_uint64 * 3)(strides[2], strides[1], strides[0])
    box, elements = (ctypes.c_uint32 * 4)(64, rows, 1, 1), (ctypes.c_uint32 * 4)(1, 1, 1, 1)
    for i, address in enumerate(addresses):
        status = _encoder()(
            host.ctypes.data + at + 128 * i,
            _DATA_TYPE[dtype.name],
            4,
            address,
            sizes,
            steps,
            box,
            elements,
            _INTERLEAVE_NONE,
            _SWIZZLE_128B,
            _L2_PROMOTION_256B,
            _OOB_FILL_ZEROS,
        )
        if status != 0:
            raise TensorMapError(
                f"cuTensorMapEncodeTiled returned CUresult {status} for {dtype} {shape} "
                f"strides {strides} at {address:#x}, box 64 x {rows}"
            )
    return _upload(host[at : at + 128 * count].reshape(count, 128))


def _upload(host):
    return import_cupy().asarray(host)
