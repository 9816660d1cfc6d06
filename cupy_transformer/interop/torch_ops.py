"""Our ops as PyTorch custom ops, so that torch modules calling them compile under ``torch.compile`` with no graph
break and can be captured in ``torch.cuda.graph``.

``import cupy_transformer.interop.torch_ops`` registers them (it imports torch; ``import cupy_transformer`` does
not) under the namespace ``cupy_transformer``: ``torch.ops.cupy_transformer.layer_norm`` and so on, which this
module's functions of the same names are:

- ``layer_norm(x, gamma, beta=None, eps=1e-5)`` and ``rms_norm(x, gamma, eps=1e-6)``: ``ops.layer_norm`` and
  ``ops.rms_norm`` over the last dimension (RMSNorm as Hugging Face's LLaMA rounds it).
- ``linear(x, weight, bias=None, activation=None)``: ``act(x @ weight.T + bias)`` with ``nn.Linear``'s ``[out, in]``
  weight, on ``ops.matmul``'s path (cuBLASLt with the bias and activation in its epilogue, or the GEMV kernel for
  decode rows). ``activation``: None, or an ``ops.ActivationType`` name: "GELU" (tanh form), "GELU_EXACT" (erf),
  "ReLU", or the gated "GATED_SILU" / "GATED_GELU", where the product's columns are ``[up | gate]`` and the result,
  half as wide, is ``up * act(gate)`` (LLaMA's MLP with its up and gate projections stacked).
- ``attention(q, k, v, causal=True, scale=None, key_mask=None)``: self-attention without a cache in
  ``F.scaled_dot_product_attention``'s layout: q ``[B, h, S, d]``, k and v ``[B, kv, S, d]`` with ``h`` a multiple
  of ``kv`` (grouped-query: query head i attends with kv head ``i // (h / kv)``, K and V not expanded), ``scale``
  None for ``1 / sqrt(d)``, ``key_mask`` ``[B, S]`` boolean (True keeps a key: padding) or None; head sizes
  multiples of 8 up to 256. Returns ``[B, h, S, d]``, a transposed view of a ``[B, S, h, d]`` tensor (the
  kernels' layout, as SDPA's flash path returns). A query row whose keys are all masked gives zeros (as SDPA's).
  On CUDA, fp16 / bf16 at head sizes 32, 64, 80, 96 and 128 run the prefill attention kernel
  (``ops/prefill_attention.py``, FlashAttention-2 style, compute capability 8.0 and later) on q, k and v as they
  are: any strides with the head size contiguous and 16-byte aligned (others are copied first). Not the Hopper
  kernel (``prefill_attention_sm90``), whose tensor maps are uploaded per K/V address, which a capture cannot do.
  The rest runs ``attention_reference``'s array operations in fp32. Not through SoftmaxContextOp: it takes the
  fused ``[B, S, (h + 2 kv) d]`` projection, which would cost a copy here, and refuses capture without a cache.

Each has a fake implementation giving the result's shape, dtype and device, which is all the compiler needs to see.
Inference only: no backward is registered.

CUDA tensors go to our kernels zero-copy through DLPack. The kernels run on torch's current stream, and every CuPy
allocation they make (results, temporaries) comes from torch's caching allocator on that stream; under
``torch.cuda.graph`` that is the graph's private pool, so a replay writes memory the graph owns. As with our own
graphs, run the module once on the capture stream before capturing (decode products make per-stream workspaces on
first use, which a capture cannot): warm up under ``torch.cuda.stream(s)`` and capture with
``torch.cuda.graph(g, stream=s)``. CPU tensors run the NumPy reference path (fp16, fp32 and, through ml_dtypes, bf16;
float64 statistics, rounded to the dtype), sharing memory with the inputs where they are contiguous. Non-contiguous
inputs are copied first (attention's are not: it takes any strides). Bad input raises our ops' ``TypeError`` /
``ValueError`` naming the argument, eagerly and while compiling (the fake implementations check it too).
"""

from __future__ import annotations

import contextlib
import contextvars
import math

import numpy
import torch
from ml_dtypes import bfloat16

from .. import ops
from ..ops.config import ActivationType, parse_enum
from ..ops.matmul import matmul, weight_array
from ..ops.prefill_attention import PREFILL_GEOMETRY, prefill_attention
from ..ops.softmax_context import MAX_HEAD_SIZE, attention_reference
from ..runtime.arrays import as_array, common_kind, from_dlpack, import_cupy, to_caller
from ..runtime.kernels import compute_capability

__all__ = ["attention", "layer_norm", "linear", "rms_norm"]

# Per torch stream (its CUDA pointer): a CuPy allocator drawing from torch's caching allocator for that stream. The
# stream is bound once here, not looked up per allocation (torch.cuda.caching_allocator_alloc asks torch for the
# current stream and enters the device each call, which cost more than the rest of an allocation).
_torch_allocators: dict = {}
_raw_delete = None  # torch's C function, held so that frees at interpreter exit outlive torch.cuda's module globals


def _torch_free(pointer: int, device_id: int) -> None:
    _raw_delete(pointer)


def _allocator_for(stream: int):
    global _raw_delete
    allocator = _torch_allocators.get(stream)
    if allocator is None:
        _raw_delete = torch._C._cuda_cudaCachingAllocator_raw_delete  # what torch.cuda.caching_allocator_delete calls
        raw_alloc = torch._C._cuda_cudaCachingAllocator_raw_alloc  # on torch's current device: _torch_stream sets it

        def malloc(size: int, device_id: int) -> int:
            return raw_alloc(size, stream)

        allocator = _torch_allocators[stream] = import_cupy().cuda.memory.PythonFunctionAllocator(malloc, _torch_free)
    return allocator


# The device whose torch stream CuPy runs on (inside _torch_stream), else None: there a CUDA tensor of that device
# is read and written in stream order without DLPack's stream handshake (_cuda_view).
_on_torch_stream: contextvars.ContextVar = contextvars.ContextVar("on_torch_stream", default=None)


@contextlib.contextmanager
def _torch_stream(device: torch.device):
    """CuPy on ``device``, on torch's current stream there, allocating from torch's caching allocator."""
    cupy = import_cupy()
    stream = torch.cuda.current_stream(device)
    # torch's legacy default stream is CUDA's null stream, which is CuPy's own default.
    cupy_stream = cupy.cuda.Stream.null if stream.cuda_stream == 0 else cupy.cuda.Stream.from_external(stream)
    allocator = _allocator_for(stream.cuda_stream)
    token = _on_torch_stream.set(device.index)
    try:
        with torch.cuda.device(device), cupy.cuda.Device(device.index), cupy_stream:
            with cupy.cuda.using_allocator(allocator.malloc):
                yield
    finally:
        _on_torch_stream.reset(token)


# torch dtypes a CuPy view takes as they are (bf16 and the rest cross through DLPack).
_VIEW_DTYPES = {
    torch.float16: numpy.dtype(numpy.float16),
    torch.float32: numpy.dtype(numpy.float32),
    torch.int32: numpy.dtype(numpy.int32),
    torch.int64: numpy.dtype(numpy.int64),
    torch.uint8: numpy.dtype(numpy.uint8),
    torch.bool: numpy.dtype(numpy.bool_),
}


def _cuda_view(tensor: torch.Tensor):
    """A CuPy array over a CUDA tensor's memory (its shape and strides), or None where DLPack must do it. Only on
    torch's stream (``_torch_stream``), where CuPy's work is ordered with torch's without DLPack's handshake,
    which cost more than the rest of an injected layer's host work per tensor; the tensor is the memory's owner,
    so torch's allocator keeps it while the view lives."""
    dtype = _VIEW_DTYPES.get(tensor.dtype)
    if dtype is None or tensor.device.index != _on_torch_stream.get() or tensor.numel() == 0:
        return None
    cupy = import_cupy()
    size = tensor.element_size()
    span = (sum((n - 1) * s for n, s in zip(tensor.shape, tensor.stride())) + 1) * size
    memory = cupy.cuda.UnownedMemory(tensor.data_ptr(), span, tensor, tensor.device.index)
    strides = tuple(s * size for s in tensor.stride())
    return cupy.ndarray(tuple(tensor.shape), dtype, cupy.cuda.MemoryPointer(memory, 0), strides)


def _as_numpy(tensor: torch.Tensor) -> numpy.ndarray:
    if tensor.dtype == torch.bfloat16:  # NumPy has no bf16: the same bits, viewed as ml_dtypes' bfloat16
        return tensor.view(torch.int16).numpy().view(bfloat16)
    return tensor.numpy()


def _as_backend(name: str, tensor: torch.Tensor):
    """``tensor`` as the backend's array on its memory: a CuPy array for a CUDA tensor (on torch's stream a view
    made directly, ``_cuda_view``; otherwise through DLPack, where booleans travel as bytes, DLPack's boolean type
    not being accepted everywhere, and are viewed back as booleans), a NumPy view for a CPU one (``_as_numpy``).
    ``name``: the argument, for errors."""
    tensor = tensor.detach()
    if tensor.device.type != "cuda":
        return _as_numpy(tensor)
    view = _cuda_view(tensor)
    if view is not None:
        return view
    if tensor.dtype == torch.bool:
        return from_dlpack(name, tensor.view(torch.uint8)).view(numpy.bool_)
    return from_dlpack(name, tensor)


def _from_numpy(array: numpy.ndarray) -> torch.Tensor:
    if array.dtype == bfloat16:
        return torch.from_numpy(array.view(numpy.int16)).view(torch.bfloat16)
    return torch.from_numpy(array)


def _on_one_device(tensors: dict) -> tuple[str, torch.Tensor]:
    """The first (name, tensor), after checking that every given tensor is on its device (eagerly and, through the
    fake implementations, while compiling)."""
    first_name, first = next(iter(tensors.items()))
    for name, tensor in tensors.items():
        if tensor is not None and tensor.device != first.device:
            where = f"{first.device} like {first_name}"
            raise ValueError(f"{name}: expected a tensor on {where}; got one on {tensor.device}")
    return first_name, first


def _run(function, tensors: dict, contiguous: bool = True, **options) -> torch.Tensor:
    """``function(**tensors, **options)``: on CUDA tensors as they are (on torch's stream and allocator), on CPU
    tensors as NumPy arrays (the reference path); the result as a tensor. The first tensor decides the device.
    ``contiguous``: copy non-contiguous tensors first (False: the function takes any strides)."""
    first_name, first = _on_one_device(tensors)
    given = {name: None if t is None else t.detach() for name, t in tensors.items()}
    if contiguous:
        given = {name: None if t is None else t.contiguous() for name, t in given.items()}
    if first.device.type == "cuda":
        with _torch_stream(first.device):
            return function(**given, **options)
    if first.device.type != "cpu":
        raise ValueError(f"{first_name}: expected a CPU or CUDA tensor; got one on {first.device}")
    return _from_numpy(function(**{name: None if t is None else _as_numpy(t) for name, t in given.items()}, **options))


@torch.library.custom_op("cupy_transformer::layer_norm", mutates_args=())
def layer_norm(
    x: torch.Tensor, gamma: torch.Tensor, beta: torch.Tensor | None = None, eps: float = 1e-5
) -> torch.Tensor:
    """``ops.layer_norm`` over the last dimension of ``x``; ``beta`` optional."""
    return _run(ops.layer_norm, {"x": x, "gamma": gamma, "beta": beta}, eps=eps)


@layer_norm.register_fake
def _(x, gamma, beta=None, eps=1e-5):
    _on_one_device({"x": x, "gamma": gamma, "beta": beta})
    return x.new_empty(x.shape)


@torch.library.custom_op("cupy_transformer::rms_norm", mutates_args=())
def rms_norm(x: torch.Tensor, gamma: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """``ops.rms_norm`` over the last dimension of ``x``, as Hugging Face's LLaMA RMSNorm."""
    return _run(ops.rms_norm, {"x": x, "gamma": gamma}, eps=eps)


@rms_norm.register_fake
def _(x, gamma, eps=1e-6):
    _on_one_device({"x": x, "gamma": gamma})
    return x.new_empty(x.shape)


def _activation(value: str | None) -> ActivationType | None:
    return None if value is None else parse_enum(ActivationType, "activation", value)


def _linear_shape(x, weight, activation: str | None) -> tuple:
    """The result's shape, after the checks it depends on (the same errors eagerly and while compiling)."""
    if x.dim() < 1:
        raise ValueError("x: expected a tensor of at least 1 dimension; got a 0-D tensor")
    if weight.dim() != 2 or weight.shape[1] != x.shape[-1]:
        raise ValueError(
            f"weight: expected an [out, in] weight (nn.Linear's layout) whose in-dimension matches the input width "
            f"{x.shape[-1]}; got shape {tuple(weight.shape)}"
        )
    act, out_features = _activation(activation), weight.shape[0]
    if act is not None and act.gated:
        if out_features % 2:
            raise ValueError(f"weight: a gated activation needs [up | gate] rows, an even count; got {out_features}")
        out_features //= 2
    return tuple(x.shape[:-1]) + (out_features,)


def _linear_arrays(x, weight, bias, act: ActivationType | None):
    """``act(x @ weight.T + bias)`` on NumPy arrays or CUDA tensors, checked as ``LinearOp`` checks its inputs."""
    kind = common_kind(x=x, weight=weight, bias=bias)
    x = as_array("x", x, kind, min_ndim=1)
    w, out_features = weight_array("weight", weight, kind, x.dtype, x.shape[-1], transposed=True)
    b = None if bias is None else as_array("bias", bias, kind, dtypes=x.dtype, shape=(out_features,))
    return to_caller(matmul(x, w, True, b, act), kind)


@torch.library.custom_op("cupy_transformer::linear", mutates_args=())
def linear(
    x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None = None, activation: str | None = None
) -> torch.Tensor:
    """``act(x @ weight.T + bias)``: ``weight`` [out, in] as ``nn.Linear``'s, ``bias`` [out] or None,
    ``activation`` None or an ``ActivationType`` name (gated ones halve the width)."""
    shape = _linear_shape(x, weight, activation)
    if x.shape[:-1].numel() == 0:  # no rows: nothing to launch (cuBLASLt takes no empty product)
        return x.new_empty(shape)
    return _run(_linear_arrays, {"x": x, "weight": weight, "bias": bias}, act=_activation(activation))


@linear.register_fake
def _(x, weight, bias=None, activation=None):
    _on_one_device({"x": x, "weight": weight, "bias": bias})
    return x.new_empty(_linear_shape(x, weight, activation))


_ATTENTION_DTYPES = (torch.float16, torch.float32, torch.bfloat16)


def _attention_shape(q, k, v, key_mask, scale) -> tuple[int, int, int, int]:
    """(B, h, S, d), after the checks (the same errors eagerly and while compiling)."""
    _on_one_device({"q": q, "k": k, "v": v, "key_mask": key_mask})
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != 4:
            want = "a 4-D [batch, heads, tokens, head size] tensor"
            raise ValueError(f"{name}: expected {want}; got shape {tuple(t.shape)}")
    if q.dtype not in _ATTENTION_DTYPES:
        raise TypeError(f"q: expected dtype float16, float32 or bfloat16; got {q.dtype}")
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise TypeError(f"{name}: expected dtype {q.dtype} like q; got {t.dtype}")
    b, h, s, d = q.shape
    kv = k.shape[1]
    if k.shape[0] != b or k.shape[2:] != (s, d):
        want = f"[{b}, kv heads, {s}, {d}] (q's batch, tokens and head size)"
        raise ValueError(f"k: expected shape {want}; got {tuple(k.shape)}")
    if v.shape != k.shape:
        raise ValueError(f"v: expected k's shape {tuple(k.shape)}; got {tuple(v.shape)}")
    if kv == 0 or h % kv:
        raise ValueError(f"k: expected a number of kv heads that divides q's {h} heads (grouped-query); got {kv}")
    if d % 8 or not 8 <= d <= MAX_HEAD_SIZE:
        raise ValueError(f"q: expected a head size that is a multiple of 8 from 8 to {MAX_HEAD_SIZE}; got {d}")
    if key_mask is not None and (key_mask.dtype != torch.bool or key_mask.shape != (b, s)):
        raise ValueError(
            f"key_mask: expected a boolean [batch, keys] = [{b}, {s}] mask (True keeps a key); "
            f"got {key_mask.dtype} of shape {tuple(key_mask.shape)}"
        )
    if scale is not None and not math.isfinite(scale):
        raise ValueError(f"scale: expected a finite number; got {scale!r}")
    return b, h, s, d


def _prefill_kernel_runs(dtype, b: int, h: int, s: int, d: int) -> bool:
    """Whether the prefill kernel takes this call: SoftmaxContextOp's conditions (16-bit, its head sizes, compute
    capability 8.0 and later, the grids' limits)."""
    return (
        dtype.itemsize == 2
        and d in PREFILL_GEOMETRY
        and b <= 65535
        and h <= 65535
        and b * h * s < 2**31
        and compute_capability() >= 80
    )


def _attention_arrays(q, k, v, key_mask, causal: bool, scale: float):
    """The context [B, S, h d] of NumPy arrays (the reference, in float64) or CUDA tensors (the prefill kernel,
    else the reference in fp32), taken as views of any strides: the kernel copies only arrays whose rows it
    cannot read (a head size not contiguous or not 16-byte aligned)."""
    kind = common_kind(q=q, k=k, v=v, key_mask=key_mask)
    if kind != "numpy":
        q, k, v = (_as_backend(name, t) for name, t in (("q", q), ("k", k), ("v", v)))
        key_mask = None if key_mask is None else _as_backend("key_mask", key_mask)
    mask = None if key_mask is None else key_mask[:, None, None, :]
    b, h, s, d = q.shape
    if kind == "numpy":
        return attention_reference(q, k, v, numpy.zeros(b, numpy.int64), mask, None, scale, causal)
    # Every sequence's keys start at slot 0; made on the device (a memset, which a CUDA graph captures).
    start = import_cupy().zeros(b, numpy.int32)
    if _prefill_kernel_runs(q.dtype, b, h, s, d):
        # prefill_attention.cu on every GPU, not the Hopper kernel: that one reads K and V through tensor maps
        # made and uploaded per address, which a torch.cuda.graph capture (new addresses, from the graph's
        # pool) cannot do.
        context = prefill_attention(q, k, v, start, mask, None, scale, causal=causal, window=0)
    else:
        context = attention_reference(q, k, v, start, mask, None, scale, causal)
    return to_caller(context, kind)


@torch.library.custom_op("cupy_transformer::attention", mutates_args=())
def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    key_mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """``softmax(q k^T * scale + mask) v`` as ``F.scaled_dot_product_attention``: q [B, h, S, d], k and v
    [B, kv, S, d] (query head i with kv head i // (h / kv)), ``scale`` None for 1 / sqrt(d), ``key_mask`` [B, S]
    boolean (True keeps a key) or None. Returns [B, h, S, d]."""
    b, h, s, d = _attention_shape(q, k, v, key_mask, scale)
    factor = 1 / math.sqrt(d) if scale is None else scale
    if b * h * s == 0:  # nothing to attend: no launch
        return q.new_empty((b, s, h, d)).transpose(1, 2)
    tensors = {"q": q, "k": k, "v": v, "key_mask": key_mask}
    context = _run(_attention_arrays, tensors, contiguous=False, causal=causal, scale=factor)
    return context.view(b, s, h, d).transpose(1, 2)  # the kernels' [B, S, h, d] layout, as SDPA's flash path


@attention.register_fake
def _(q, k, v, causal=True, scale=None, key_mask=None):
    b, h, s, d = _attention_shape(q, k, v, key_mask, scale)
    return q.new_empty((b, s, h, d)).transpose(1, 2)
