"""Our post-LN layers inside Hugging Face's BERT: ``inject_bert(module)`` makes every ``BertModel`` in ``module`` (a
``BertModel``, a model holding one, or a sentence-transformers ``SentenceTransformer`` whose ``Transformer`` wraps
one) run its encoder layers on our kernels, in place, and returns ``module``. ``model(input_ids, attention_mask,
token_type_ids)`` then gives what it gave before (last_hidden_state, pooler_output, hidden_states with
``output_hidden_states``), and ``SentenceTransformer.encode`` the same embeddings. Imports torch and transformers.

How: each ``BertLayer`` in ``encoder.layer`` stays the same object, its class becomes ``InjectedBertLayer`` (a
``BertLayer`` subclass) whose forward runs ``layers.PostLNLayer`` (LinearOp for Q, K and V at once,
SoftmaxContextOp, VectorMatMulOp, MLPGemmOp, ResidualAddOp, layer_norm) on the layer's own Parameters. Keeping the
object keeps its submodules, so ``state_dict`` keeps its names, and its hooks: transformers 5 collects
``hidden_states`` with forward hooks on ``BertLayer`` instances, installed once per model. The embeddings and the
pooler stay Hugging Face's (cheap next to the layers). The attention mask the encoder hands the layers (the 4-D
boolean or additive mask of the sdpa and eager implementations, the 2-D one of flash attention, or None) becomes our
``[B, T]`` boolean key mask when every query row of it is the same, as a padding mask's are (checked once per call:
one device-to-host read); other masks (packed sequences, a caller's 4-D mask) go to the attention op as they are.

Memory: no second copy of the weights. BERT keeps Q, K and V as three ``[H, H]`` Linear weights (and ``[H]``
biases); injection allocates one ``[3H, H]`` weight and one ``[3H]`` bias per layer, copies the three in, and points
the three Parameters' ``.data`` at row blocks of them, so the old storage is freed and the parameter bytes are what
they were (the injection's peak is one layer's QKV more). Every other weight is used where it is. If the
Parameters stop being those views (``model.to``, ``model.half``, ``copy.deepcopy``, ``load_state_dict(...,
assign=True)``), the next call fuses them again; ``load_state_dict`` copying in place keeps the views.

Devices: CUDA tensors run our kernels zero-copy through DLPack on torch's current stream, allocating from torch's
caching allocator (``interop.torch_ops``); CPU tensors run the ops' NumPy reference path on ``tensor.numpy()``
views (float64 math rounded to the dtype: a check, not a fast path).

Refused, with the model unchanged: no ``BertModel`` in ``module``; decoders (``is_decoder``, cross-attention);
``position_embedding_type`` other than "absolute"; a ``hidden_act`` our BERT does not run (``models.bert``'s rules
and messages); flex attention; head sizes the attention op does not take; layer weights not of the config's shapes
(pruned heads); dtypes other than float16, bfloat16 and float32, or more than one; parameters on more than one
device, or on one that is neither CPU nor CUDA. At call time: ``output_attentions`` (our attention keeps no
probabilities), a KV cache, and training mode (inference only: no dropout, no autograd through the layers).
"""

from __future__ import annotations

import dataclasses

import torch
from transformers.models.bert.modeling_bert import BertLayer, BertModel

from ..layers import PostLNLayer, PostLNWeights
from ..models.bert import inference_config
from ..ops.softmax_context import MAX_HEAD_SIZE
from ..runtime.arrays import import_cupy
from .torch import fuse_rows
from .torch_ops import _as_backend, _as_numpy, _from_numpy, _torch_stream

__all__ = ["InjectedBertLayer", "inject_bert"]

DTYPES = {torch.float16: "float16", torch.bfloat16: "bfloat16", torch.float32: "float32"}


def inject_bert(module: torch.nn.Module) -> torch.nn.Module:
    """Every ``BertModel`` in ``module`` on our layers, in place (the module docstring); returns ``module``. All
    are checked before any changes: an unsupported one is a ValueError (TypeError: no BertModel at all) and leaves
    ``module`` as it was. Injecting an injected model again changes nothing."""
    if not isinstance(module, torch.nn.Module):
        raise TypeError(f"module: expected a torch.nn.Module holding a BertModel; got {type(module).__name__}")
    found = [m for m in module.modules() if isinstance(m, BertModel)]
    if not found:
        raise TypeError(
            f"module: expected a transformers BertModel or a module holding one (a SentenceTransformer over BERT); "
            f"found none in {type(module).__name__}"
        )
    plans = [_plan(model) for model in found]  # every check first: never half-swapped
    for model, state in zip(found, plans):
        if state is None:  # injected already
            continue
        for index, layer in enumerate(model.encoder.layer):
            layer.__class__ = InjectedBertLayer
            layer._ct_state, layer._ct_index = state, index
            layer._ct_qkv = _fuse(layer.attention.self)
    return module


def _plan(model: BertModel) -> _EncoderState | None:
    """The shared state for ``model``'s injected layers, after every check; None if they are injected already."""
    layers = list(model.encoder.layer)
    if layers and all(isinstance(layer, InjectedBertLayer) for layer in layers):
        return None
    hf = model.config
    where = f"{type(model).__name__}.config"
    if hf.is_decoder or hf.add_cross_attention:
        raise ValueError(
            f"{where}: is_decoder={hf.is_decoder}, add_cross_attention={hf.add_cross_attention}: only the encoder "
            "(bidirectional self-attention, no cross-attention) is supported"
        )
    position = getattr(hf, "position_embedding_type", "absolute")
    if position != "absolute":
        raise ValueError(f"{where}: position_embedding_type {position!r} is not supported; expected 'absolute'")
    if hf._attn_implementation == "flex_attention":
        raise ValueError(f"{where}: attn_implementation 'flex_attention' is not supported (its masks are BlockMasks)")
    config = inference_config(hf.to_dict(), "float32", where)
    if config.head_size % 8 or config.head_size > MAX_HEAD_SIZE:
        raise ValueError(
            f"{where}: head size {config.head_size} (hidden_size / num_attention_heads): the attention op takes "
            f"multiples of 8 up to {MAX_HEAD_SIZE}"
        )
    tensors = list(model.parameters()) + list(model.buffers())
    dtypes = {t.dtype for t in tensors if t.is_floating_point()}
    if not dtypes <= set(DTYPES) or len(dtypes) != 1:
        raise ValueError(
            f"{type(model).__name__}: expected all its weights in one of float16, bfloat16 or float32; got "
            f"{', '.join(sorted(map(str, dtypes)))}"
        )
    devices = {t.device for t in tensors}
    if len(devices) != 1 or next(iter(devices)).type not in ("cpu", "cuda"):
        raise ValueError(
            f"{type(model).__name__}: expected all its weights on one device, the CPU or a CUDA GPU; got them on "
            f"{', '.join(sorted(map(str, devices)))}"
        )
    if next(iter(devices)).type == "cuda":
        import_cupy()  # a clear error now where CuPy is missing, not at the first call
    for index, layer in enumerate(layers):
        _check_layer(f"{type(model).__name__}.encoder.layer.{index}", layer, config)
    return _EncoderState(hf, config, len(layers))


def _check_layer(where: str, layer, config) -> None:
    """``layer`` a BertLayer of plain Linears and LayerNorms, every weight and bias of the config's shapes, the
    norms of its epsilon."""
    if not isinstance(layer, BertLayer) or isinstance(layer, InjectedBertLayer):
        raise ValueError(f"{where}: expected a BertLayer; got {type(layer).__name__}")
    h, inner = config.hidden_size, config.intermediate_size
    a = layer.attention
    linears = {
        "attention.self.query": (a.self.query, (h, h)),
        "attention.self.key": (a.self.key, (h, h)),
        "attention.self.value": (a.self.value, (h, h)),
        "attention.output.dense": (a.output.dense, (h, h)),
        "intermediate.dense": (layer.intermediate.dense, (inner, h)),
        "output.dense": (layer.output.dense, (h, inner)),
    }
    for name, (linear, shape) in linears.items():
        if type(linear) is not torch.nn.Linear:  # a LoRA or quantized wrapper would be bypassed: refuse it
            raise ValueError(f"{where}.{name}: expected a torch.nn.Linear; got {type(linear).__name__}")
        bias = getattr(linear, "bias", None)
        if tuple(linear.weight.shape) != shape or bias is None or tuple(bias.shape) != shape[:1]:
            got = f"weight {tuple(linear.weight.shape)}, bias {None if bias is None else tuple(bias.shape)}"
            raise ValueError(f"{where}.{name}: expected weight {shape} and bias {shape[:1]} (pruned heads?); got {got}")
    for name, norm in (
        ("attention.output.LayerNorm", a.output.LayerNorm),
        ("output.LayerNorm", layer.output.LayerNorm),
    ):
        plain = type(norm) is torch.nn.LayerNorm and norm.weight is not None and norm.bias is not None
        if not plain or tuple(norm.weight.shape) != (h,) or norm.eps != config.epsilon:
            raise ValueError(
                f"{where}.{name}: expected a LayerNorm over {h} with weight, bias and eps {config.epsilon}"
            )


def _fuse(attention, fused=(None, None)) -> tuple[torch.Tensor, torch.Tensor]:
    """One ``[3H, H]`` weight and ``[3H]`` bias holding Q, K and V (``fused`` where the three Linears' Parameters
    are still its row blocks), the Parameters pointed at row blocks of them (``interop.torch.fuse_rows``)."""
    linears = (attention.query, attention.key, attention.value)
    return tuple(fuse_rows([getattr(lin, name) for lin in linears], f) for name, f in zip(("weight", "bias"), fused))


class _EncoderState:
    """What one BertModel's injected layers share: its Hugging Face config (``output_attentions``), our layer per
    dtype, and the key mask of the call in progress (made once, by layer 0)."""

    def __init__(self, hf_config, config, count: int):
        self.hf_config, self.config, self.count = hf_config, config, count
        self.layers: dict[torch.dtype, PostLNLayer] = {}
        self.last_mask = (None, None)  # (the encoder's mask, ours): one attribute, replaced whole

    def layer(self, dtype: torch.dtype) -> PostLNLayer:
        if dtype not in DTYPES:
            raise TypeError(f"hidden_states: expected float16, bfloat16 or float32; got {dtype}")
        if dtype not in self.layers:
            self.layers[dtype] = PostLNLayer(dataclasses.replace(self.config, dtype=DTYPES[dtype]))
        return self.layers[dtype]

    def key_mask(self, index: int, mask):
        """``mask`` (as the encoder hands it to layer ``index``) as the attention op takes it; layer 0 makes it,
        the others reuse it while the encoder passes the same object, and the last lets it go."""
        given, out = self.last_mask
        if index == 0 or mask is not given:
            out = _key_mask(mask)
            self.last_mask = (mask, out)
        if index == self.count - 1:
            self.last_mask = (None, None)
        return out


def _key_mask(mask):
    """None; a 2-D mask (flash attention's: the padding mask) as boolean; a 4-D one ``[B, 1, S, T]`` whose query
    rows are all the same and whose values keep or drop a key (boolean, or additive 0 / the dtype's lowest, as the
    eager implementation makes them) as the ``[B, T]`` boolean key mask; any other 4-D mask as it is."""
    if mask is None:
        return None
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"attention_mask: expected a tensor or None from the encoder; got {type(mask).__name__}")
    if mask.dim() == 2:
        return mask.bool()
    if mask.dim() != 4:
        raise ValueError(f"attention_mask: expected a 2-D or 4-D mask; got shape {tuple(mask.shape)}")
    keep = mask if mask.dtype == torch.bool else mask == 0
    padding = (keep == keep[:, :, :1]).all()
    if mask.dtype != torch.bool:
        padding &= (keep | (mask == torch.finfo(mask.dtype).min)).all()
    if mask.shape[1] == 1 and bool(padding):  # one device-to-host read per call
        return keep[:, 0, 0].contiguous()
    return mask.contiguous()


def _run(layer: PostLNLayer, x: torch.Tensor, weights: PostLNWeights, keys) -> torch.Tensor:
    """``layer`` on torch tensors: CUDA ones as CuPy arrays on their memory (torch's stream and allocator), CPU
    ones as NumPy views (the reference path)."""
    tensors = {"hidden_states": x, "attention_mask": keys, **vars(weights)}
    if x.device.type == "cuda":
        with _torch_stream(x.device):
            arrays = {name: None if t is None else _as_backend(name, t) for name, t in tensors.items()}
            return torch.from_dlpack(_call(layer, arrays))
    if x.device.type != "cpu":
        raise ValueError(f"hidden_states: expected a CPU or CUDA tensor; got one on {x.device}")
    return _from_numpy(_call(layer, {name: None if t is None else _as_numpy(t) for name, t in tensors.items()}))


def _call(layer: PostLNLayer, arrays: dict):
    x, mask = arrays.pop("hidden_states"), arrays.pop("attention_mask")
    return layer(x, PostLNWeights(**arrays), mask)


class InjectedBertLayer(BertLayer):
    """A ``BertLayer`` whose forward runs our post-LN layer on its own Parameters (``inject_bert`` turns layers
    into these; it is never built directly). Its submodules, and so its ``state_dict``, are the original's."""

    def forward(self, hidden_states, attention_mask=None, *args, cache=None, **kwargs):
        """BertLayer's call as BertEncoder makes it; the encoder's ``attention_mask``, any ``encoder_hidden_states``
        ignored as an encoder's BertLayer ignores them."""
        if self.training:
            raise RuntimeError(
                "inject_bert: the injected layers run inference only (no dropout, no autograd); call model.eval()"
            )
        state = self._ct_state
        output_attentions = kwargs.get("output_attentions")
        if output_attentions is None:
            output_attentions = state.hf_config.output_attentions
        if output_attentions:
            raise ValueError("output_attentions: not supported by the injected layers (they keep no probabilities)")
        if cache is not None or kwargs.get("past_key_values") is not None:
            raise ValueError("cache: the injected encoder layers keep no KV cache; pass none")
        keys = state.key_mask(self._ct_index, attention_mask)
        return _run(state.layer(hidden_states.dtype), hidden_states.detach().contiguous(), self._weights(), keys)

    def _weights(self) -> PostLNWeights:
        """The layer's Parameters (detached), Q, K and V as the fused weight and bias (fused again if they are no
        longer its views)."""
        a = self.attention
        fused = self._ct_qkv = _fuse(a.self, self._ct_qkv or (None, None))
        parts = (a.output.dense, a.output.LayerNorm, self.intermediate.dense, self.output.dense, self.output.LayerNorm)
        (w_o, b_o), (g1, be1), (w1, b1), (w2, b2), (g2, be2) = ((m.weight.detach(), m.bias.detach()) for m in parts)
        return PostLNWeights(fused[0], fused[1], w_o, b_o, g1, be1, w1, b1, w2, b2, g2, be2)

    def _apply(self, fn, recurse=True):
        # model.to / half / cuda give the Parameters new storage: drop the fused tensors (the next call fuses the
        # new ones) rather than hold the old ones.
        self._ct_qkv = None
        return super()._apply(fn, recurse)
