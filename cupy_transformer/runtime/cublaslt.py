"""cuBLASLt through ctypes: matrix products with the bias and activation fused into cuBLAS's epilogue.

CuPy wraps cuBLAS but not cuBLASLt, whose epilogues (bias, ReLU + bias, GELU + bias) let a projection's
bias and activation ride on the GEMM's own output write instead of a second pass over it. Row-major
``D[M, N] = act(X[M, K] @ W + bias)`` is computed as the column-major product ``D^T = W^T X^T``, whose
rows are our columns, so the epilogue's per-row bias is our per-column bias. Compute in fp32
(``CUBLAS_COMPUTE_32F``), one rounding to the output type. Descriptors and the chosen algorithm are kept
per shape; the workspace is one buffer per device and stream.

The heuristic's first algorithm is often not the fastest: at 2048 rows on an H200 the best of its first eight
ran 1-10% faster (GPT-2-XL's and LLaMA-7B's MLP products). So a plan of at least ``TUNE_MIN_ROWS`` rows times up
to ``TUNE_CANDIDATES`` of them on its first call (``timing.fastest``, on that call's own operands: each run
writes the same result) and keeps the fastest. Smaller plans (decode shapes, where the product is a read of the
weights) keep the first pick, as does a call made during stream capture. Algorithms may add in different orders,
so the choice can change the low bits of a result between processes; ``CT_TUNE=0`` in the environment keeps the
heuristic's first pick everywhere.

Constants are cublasLt.h's, cublas_api.h's and library_types.h's (CUDA 12 and 13 agree on them).
"""

from __future__ import annotations

import ctypes

import numpy

from . import timing
from .arrays import import_cupy
from .lru import DeviceLRU

_COMPUTE_32F = 68
_DATA_TYPE = {numpy.dtype(numpy.float16): 2, numpy.dtype(numpy.float32): 0}
_BF16 = 14
_OP_N, _OP_T = 0, 1
_DESC_TRANSA, _DESC_TRANSB, _DESC_EPILOGUE, _DESC_BIAS_POINTER = 3, 4, 7, 8
_PREF_MAX_WORKSPACE_BYTES = 1
_PREF_MIN_ALIGNMENT = (5, 6, 7, 8)  # A, B, C, D
#: Epilogues by (activation name or None, has bias).
EPILOGUES = {
    (None, False): 1,  # DEFAULT
    (None, True): 4,  # BIAS
    ("ReLU", False): 2,
    ("ReLU", True): 6,
    ("GELU", False): 32,  # the tanh form, as DeepSpeed's and GPT-2's GELU
    ("GELU", True): 36,
}
_WORKSPACE_BYTES = 32 << 20
TUNE_CANDIDATES = 8
TUNE_MIN_ROWS = 128


class _Heuristic(ctypes.Structure):
    _fields_ = [
        ("algo", ctypes.c_uint64 * 8),
        ("workspace_size", ctypes.c_size_t),
        ("state", ctypes.c_int),
        ("waves", ctypes.c_float),
        ("reserved", ctypes.c_int * 4),
    ]


class CublasLtError(RuntimeError):
    pass


_lib = None


def _library():
    global _lib
    if _lib is None:
        try:
            from cuda.pathfinder import load_nvidia_dynamic_lib

            lib = ctypes.CDLL(load_nvidia_dynamic_lib("cublasLt").abs_path)
        except Exception as e:  # no cuda-pathfinder or no library: callers fall back to cupy.matmul
            raise CublasLtError(f"cannot load cuBLASLt: {e}") from e
        p, i, u64, i64, size = ctypes.c_void_p, ctypes.c_int, ctypes.c_uint64, ctypes.c_int64, ctypes.c_size_t
        signatures = {  # every argument typed: ctypes would pass bare Python ints as 32-bit C ints
            "cublasLtCreate": [p],
            "cublasLtMatmulDescCreate": [p, i, i],
            "cublasLtMatmulDescSetAttribute": [p, i, p, size],
            "cublasLtMatrixLayoutCreate": [p, i, u64, u64, i64],
            "cublasLtMatmulPreferenceCreate": [p],
            "cublasLtMatmulPreferenceSetAttribute": [p, i, p, size],
            "cublasLtMatmulPreferenceDestroy": [p],
            "cublasLtMatmulDescDestroy": [p],
            "cublasLtMatrixLayoutDestroy": [p],
            "cublasLtMatmulAlgoGetHeuristic": [p, p, p, p, p, p, p, i, p, p],
            "cublasLtMatmul": [p, p, p, p, p, p, p, p, p, p, p, p, p, p, size, p],
        }
        for name, argtypes in signatures.items():
            getattr(lib, name).argtypes = argtypes
            getattr(lib, name).restype = ctypes.c_int
        _lib = lib
    return _lib


def _check(status: int, what: str) -> None:
    if status != 0:
        raise CublasLtError(f"cuBLASLt {what} failed with status {status}")


def _call(name: str, *args) -> None:
    _check(getattr(_library(), name)(*args), name)


def _data_type(dtype: numpy.dtype) -> int:
    if dtype in _DATA_TYPE:
        return _DATA_TYPE[dtype]
    if dtype.name == "bfloat16":
        return _BF16
    raise TypeError(f"cuBLASLt: no data type for {dtype}")


def _alignment(ptr: int) -> int:
    """The largest power of two up to 256 dividing the address (what the algorithm may assume)."""
    return min(256, ptr & -ptr) if ptr else 256


class _Plan:
    """Descriptors and algorithm for one (dtype, M, N, K, layout, epilogue, alignments)."""

    def __init__(self, handle, dtype, m, n, k, transposed, epilogue, alignments):
        lib, t = _library(), _data_type(dtype)
        self.desc = ctypes.c_void_p()
        _call("cublasLtMatmulDescCreate", ctypes.byref(self.desc), _COMPUTE_32F, _data_type(numpy.dtype(numpy.float32)))
        # W^T is A: [in, out] row-major memory is W^T column-major (no transpose); [out, in] needs one.
        for attr, value in ((_DESC_TRANSA, _OP_T if transposed else _OP_N), (_DESC_TRANSB, _OP_N)):
            v = ctypes.c_int32(value)
            _call("cublasLtMatmulDescSetAttribute", self.desc, attr, ctypes.byref(v), ctypes.sizeof(v))
        e = ctypes.c_uint32(epilogue)
        _call("cublasLtMatmulDescSetAttribute", self.desc, _DESC_EPILOGUE, ctypes.byref(e), ctypes.sizeof(e))
        self.layouts = []
        a_shape = (k, n, k) if transposed else (n, k, n)  # rows, cols, leading dimension (column-major)
        for rows, cols, ld in (a_shape, (k, m, k), (n, m, n), (n, m, n)):  # A = W, B = X^T, C, D = Y^T
            layout = ctypes.c_void_p()
            _call(
                "cublasLtMatrixLayoutCreate",
                ctypes.byref(layout),
                t,
                ctypes.c_uint64(rows),
                ctypes.c_uint64(cols),
                ctypes.c_int64(ld),
            )
            self.layouts.append(layout)
        pref = ctypes.c_void_p()
        _call("cublasLtMatmulPreferenceCreate", ctypes.byref(pref))
        try:
            size = ctypes.c_uint64(_WORKSPACE_BYTES)
            _call("cublasLtMatmulPreferenceSetAttribute", pref, _PREF_MAX_WORKSPACE_BYTES, ctypes.byref(size), 8)
            for attr, align in zip(_PREF_MIN_ALIGNMENT, alignments):
                a = ctypes.c_uint32(align)
                _call("cublasLtMatmulPreferenceSetAttribute", pref, attr, ctypes.byref(a), 4)
            wanted = TUNE_CANDIDATES if timing.TUNE and m >= TUNE_MIN_ROWS else 1
            results = (_Heuristic * wanted)()
            found = ctypes.c_int(0)
            _call(
                "cublasLtMatmulAlgoGetHeuristic",
                handle,
                self.desc,
                *self.layouts,
                pref,
                wanted,
                results,
                ctypes.byref(found),
            )
        finally:
            lib.cublasLtMatmulPreferenceDestroy(pref)
        if found.value < 1:
            self.destroy()
            raise CublasLtError(f"cuBLASLt found no algorithm for {m}x{k} @ {k}x{n} ({dtype}, epilogue {epilogue})")
        self.candidates = list(results[: found.value])
        self.heuristic = self.candidates[0]  # until tuned, the heuristic's first pick

    def tune(self, run) -> None:
        """Keep the fastest candidate; ``run(heuristic)`` launches the product with it on the current stream."""
        usable = []
        for candidate in self.candidates:
            try:
                run(candidate)
            except CublasLtError:  # offered by the heuristic, but this call cannot run it: skip it
                continue
            usable.append(candidate)
        if usable:
            self.heuristic = usable[timing.fastest([lambda c=c: run(c) for c in usable])]
        self.candidates = [self.heuristic]

    def destroy(self):
        lib = _library()
        for layout in self.layouts:
            lib.cublasLtMatrixLayoutDestroy(layout)
        lib.cublasLtMatmulDescDestroy(self.desc)


_handles: dict[int, ctypes.c_void_p] = {}
PLANS = DeviceLRU(256, drop=_Plan.destroy)  # prompt lengths vary: keep the most recently used shapes
_workspaces: dict[tuple[int, int], object] = {}
_ONE, _ZERO = ctypes.c_float(1.0), ctypes.c_float(0.0)


def stream_workspace():
    """cuBLASLt's workspace for the current stream, made on first use."""
    cupy = import_cupy()
    key = (cupy.cuda.runtime.getDevice(), cupy.cuda.get_current_stream().ptr)
    if key not in _workspaces:
        _workspaces[key] = cupy.empty(_WORKSPACE_BYTES, cupy.uint8)
    return _workspaces[key]


def matmul(x, w, transposed: bool, bias=None, activation: str | None = None):
    """``act(x[M, K] @ W + bias)`` as a new [M, N] CuPy array; ``activation`` one of None, "ReLU", "GELU"."""
    cupy = import_cupy()
    device = cupy.cuda.runtime.getDevice()
    stream = cupy.cuda.get_current_stream()
    handle = _handles.get(device)
    if handle is None:
        handle = ctypes.c_void_p()
        _call("cublasLtCreate", ctypes.byref(handle))
        _handles[device] = handle
    m, k = x.shape
    n = w.shape[0] if transposed else w.shape[1]
    y = cupy.empty((m, n), x.dtype)
    epilogue = EPILOGUES[(activation, bias is not None)]
    alignments = tuple(_alignment(p) for p in (w.data.ptr, x.data.ptr, y.data.ptr, y.data.ptr))
    plan = PLANS.get(
        (x.dtype, m, n, k, transposed, epilogue, alignments),
        lambda: _Plan(handle, x.dtype, m, n, k, transposed, epilogue, alignments),
    )
    if bias is not None:
        p = ctypes.c_void_p(bias.data.ptr)
        _call("cublasLtMatmulDescSetAttribute", plan.desc, _DESC_BIAS_POINTER, ctypes.byref(p), ctypes.sizeof(p))
    workspace = stream_workspace()
    a, b, c, d = plan.layouts

    def run(heuristic):
        _call(
            "cublasLtMatmul",
            handle,
            plan.desc,
            ctypes.byref(_ONE),
            ctypes.c_void_p(w.data.ptr),
            a,
            ctypes.c_void_p(x.data.ptr),
            b,
            ctypes.byref(_ZERO),
            ctypes.c_void_p(y.data.ptr),
            c,
            ctypes.c_void_p(y.data.ptr),
            d,
            ctypes.byref(heuristic.algo),
            ctypes.c_void_p(workspace.data.ptr),
            ctypes.c_size_t(_WORKSPACE_BYTES),
            ctypes.c_void_p(stream.ptr),
        )

    if len(plan.candidates) > 1 and not stream.is_capturing():
        plan.tune(run)
    run(plan.heuristic)
    return y
