"""Kernel injection into Hugging Face decoders: ``inject(model)`` runs a transformers GPT-2 or LLaMA-style model's
transformer blocks on our ops, in place, as DeepSpeed's ``init_inference(replace_with_kernel_inject=True)`` does.

Supported: ``GPT2LMHeadModel`` / ``GPT2Model`` and ``LlamaForCausalLM``, ``MistralForCausalLM``, ``Qwen2ForCausalLM``
(QKV biases) and their bare ``*Model`` (any model whose ``base_model`` is one of these exactly); and any module
holding a ``BertModel`` (sentence-transformers models too), whose encoder layers ``interop.bert_inject`` swaps.
Afterwards ``model(...)`` and ``model.generate(...)`` work as before (greedy, sampling, beam search, padded
batches, caches handed back and forth, ``cache_implementation="static"``) with the blocks, the embeddings and the
final norm on our ops; the LM head stays the model's own ``nn.Linear``. A ``*ForCausalLM``'s ``generate`` runs
the calls it can (greedy or temperature / top-k / top-p sampling of left-padded batches, with Hugging Face's
settings otherwise at their defaults) on our own decode loop, ``generation.Decoder`` with its CUDA-graph steps,
over the same weights (``interop.causal_lm``; sampled tokens are our sampler's draws, not torch's), and hands the
rest to Hugging Face's loop; ``inject(model, fast_generate=False)`` keeps Hugging Face's loop for every call.

What changes:

- The inner model's ``forward`` (``model.transformer`` / ``model.model``) is ours. It takes the original's
  arguments (its signature, ``past_key_values`` too), and returns the original's output class. Each block in
  ``h`` / ``layers`` becomes an ``InjectedBlock`` holding the original block's submodules, so the Parameters,
  ``state_dict`` (names and values), ``.to()`` and device moves are unchanged. The layers run as our models run
  them (``layers.PreLNLayer.stack``: each norm fused with the residual add before it).
- The KV cache stays Hugging Face's (``DynamicCache``, ``StaticCache``; whatever ``generate`` or the caller passes),
  so beam search's reordering, cropping, static caches and padding keep working as Hugging Face does them. Each
  layer asks the cache for room with ``cache.update(k, v, layer)`` (placeholders of this step's [B, kv, S, d]),
  gets back the layer's whole tensors [B, kv, T, d] (for these cache layers they are the cache's own storage),
  and our attention op, given a one-layer ``KVCache.over`` view of that storage, writes the rotated keys and the
  values into the step's slots and attends. So the cache holds what Hugging Face's own layers would have put
  there. Padding: the 2-D ``attention_mask`` (1 = keep) becomes our per-key mask; a 4-D one (``generate`` makes
  one for static caches) is passed as it is (per-query masks run the op's array-operation path on the GPU).
- Weights: no second copy. GPT-2's Conv1D weights (Q, K, V fused already) are copied once each into ``[out, in]``
  storage, the layout our GPT-2 loads and the decode step reads fastest, and each Parameter re-pointed at it as its
  ``[in, out]`` transposed view. LLaMA-style q/k/v and up/gate ``[out, in]`` weights (and biases) are copied once
  into one fused tensor per layer (``[(h + 2 kv) d, H]``; ``[up | gate]``) and each Parameter's ``.data``
  re-pointed at its rows of it. So the model's parameter memory is unchanged, with a transient extra of one
  weight (GPT-2) or one layer's q/k/v and up/gate (LLaMA) while relaying (the originals are freed once nothing
  else holds them). A ``.to()`` that gives the Parameters separate storage is fused again on the next forward.

Devices: CUDA tensors run our kernels zero-copy on torch's current stream with torch's caching allocator (as the
custom ops of ``interop.torch_ops``); CPU tensors run the NumPy reference path on shared memory. Inference only:
no gradients, no dropout. Refused with a clear error before anything changes: models or options whose math we do
not implement (rope scaling, sliding windows, GPT-2's cross-attention and attention-scaling variants), dtypes other
than fp16, bf16 and fp32, models split over devices. At call time: ``output_attentions=True`` (we never form the
attention probabilities), GPT-2's ``token_type_ids`` and ``encoder_hidden_states``, caches other than Hugging Face's
dynamic and static layers.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import types

import numpy
import torch
from ml_dtypes import bfloat16
from torch import nn

from ..kv_cache import KVCache
from ..layers import PreLNLayer, PreLNWeights
from ..models.gpt2 import gpt2_config
from ..models.llama import llama_config
from ..ops import embed
from ..runtime.arrays import import_cupy
from .torch_ops import _as_backend, _from_numpy, _torch_stream

__all__ = ["InjectedBlock", "inject"]

DTYPES = {torch.float16: numpy.float16, torch.float32: numpy.float32, torch.bfloat16: bfloat16}
_ATTRIBUTE = "_cupy_transformer_injection"  # on the inner model: its _Injection


def _array(tensor: torch.Tensor):
    """``tensor`` as the backend's array sharing its memory: CuPy for CUDA tensors, NumPy for CPU ones."""
    return _as_backend("tensor", tensor)


def _tensor(array) -> torch.Tensor:
    return _from_numpy(array) if isinstance(array, numpy.ndarray) else torch.from_dlpack(array)


class InjectedBlock(nn.Module):
    """A transformer block run by our ops inside its injected model's forward. It holds the original block's
    submodules (the same Parameters, so ``state_dict`` names and values stay as they were) and, for LLaMA-style
    blocks, the fused tensors its q/k/v and up/gate Parameters are views of."""

    def __init__(self, block: nn.Module, layer_idx: int):
        super().__init__()
        for name, child in block.named_children():
            self.add_module(name, child)
        self.layer_idx, self.original = layer_idx, type(block).__name__
        self.fused: dict[str, torch.Tensor | None] = {}

    def forward(self, *args, **kwargs):
        raise RuntimeError(f"{self.original} {self.layer_idx}: an injected block runs inside its model's forward")

    def extra_repr(self) -> str:
        return f"{self.original} {self.layer_idx} on cupy_transformer's ops"


def fuse_rows(params: list, fused: torch.Tensor | None) -> torch.Tensor:
    """The rows of ``params`` (Parameters) stacked in one tensor that each is a view of: ``fused`` where they still
    are its views (same device, dtype and places), else a new one with their values copied in and their ``.data``
    re-pointed at it (one storage: no second copy). Made outside inference mode, so that the Parameters stay
    ordinary tensors (``load_state_dict`` copies into them)."""
    if fused is not None and fused.device == params[0].device and fused.dtype == params[0].dtype:
        offset, row = 0, fused.stride(0) * fused.element_size()
        for p in params:
            if p.data_ptr() != fused.data_ptr() + offset * row or p.shape[1:] != fused.shape[1:]:
                break
            offset += p.shape[0]
        else:
            return fused
    with torch.inference_mode(False), torch.no_grad():
        fused = torch.cat([p.detach() for p in params])
        offset = 0
        for p in params:
            p.data = fused[offset : offset + p.shape[0]]
            offset += p.shape[0]
    return fused


def _fuse(block: InjectedBlock, key: str, params: list) -> torch.Tensor | None:
    """``fuse_rows`` of ``params`` (or None where they are None) kept as ``block.fused[key]``."""
    if params[0] is None:
        return None
    block.fused[key] = fuse_rows(params, block.fused.get(key))
    return block.fused[key]


class _GPT2:
    blocks, final_norm_names = "h", ("ln_f",)

    @staticmethod
    def check(c: dict, where: str) -> None:
        for field, value in (
            ("add_cross_attention", False),
            ("scale_attn_by_inverse_layer_idx", False),
            ("reorder_and_upcast_attn", False),
            ("scale_attn_weights", True),
        ):
            if bool(c.get(field, value)) != value:
                raise ValueError(f"{where}: {field}={c.get(field)!r} is not supported (only {value})")

    config = staticmethod(functools.partial(gpt2_config, transposed=True))  # [out, in], as models.gpt2 loads them

    @staticmethod
    def positions(c: dict) -> int:
        return c["n_positions"]

    @staticmethod
    def conv1d(block: InjectedBlock) -> tuple:
        return block.attn.c_attn, block.attn.c_proj, block.mlp.c_fc, block.mlp.c_proj

    @staticmethod
    def prepare(block: InjectedBlock) -> None:
        """Each Conv1D weight's storage laid out ``[out, in]`` (the layout ``models.gpt2`` loads, which the decode
        step reads fastest), the Parameter re-pointed at it as its ``[in, out]`` transposed view: torch sees the same
        values, and the storage is replaced, not doubled."""
        for m in _GPT2.conv1d(block):
            if not m.weight.t().is_contiguous():
                with torch.inference_mode(False), torch.no_grad():
                    m.weight.data = m.weight.detach().t().contiguous().t()

    @staticmethod
    def weights(block: InjectedBlock) -> PreLNWeights:
        attn, mlp = block.attn, block.mlp
        c_attn, c_proj, c_fc, mlp_proj = (m.weight.t() for m in _GPT2.conv1d(block))
        return PreLNWeights(
            *(block.ln_1.weight, block.ln_1.bias, c_attn, attn.c_attn.bias, c_proj, attn.c_proj.bias),
            *(block.ln_2.weight, block.ln_2.bias, c_fc, mlp.c_fc.bias, mlp_proj, mlp.c_proj.bias),
        )

    @staticmethod
    def embeddings(inner, ids, positions, inputs_embeds):
        """The first layer's input as a backend array: ``wte[ids] + wpe[positions]`` (ours), or with
        ``inputs_embeds`` that plus ``wpe[positions]`` (torch's add, rounded once as ours is)."""
        if ids is not None:
            return embed(_array(ids), _array(inner.wte.weight), _array(positions), _array(inner.wpe.weight))
        return _array((inputs_embeds + inner.wpe.weight[positions]).contiguous())

    @staticmethod
    def final_norm(inner):
        return inner.ln_f.weight, inner.ln_f.bias

    @staticmethod
    def tables(inner):
        """The token and position embedding tables."""
        return inner.wte.weight, inner.wpe.weight


class _LLaMA:
    blocks, final_norm_names = "layers", ("norm",)

    @staticmethod
    def check(c: dict, where: str) -> None:
        types_ = c.get("layer_types")
        sliding = [t for t in types_ if t != "full_attention"] if types_ else c.get("sliding_window")
        if sliding:
            raise ValueError(
                f"{where}: sliding-window attention ({'layer_types' if types_ else 'sliding_window'} "
                f"{types_ or c.get('sliding_window')!r}) is not supported (only full attention)"
            )

    config = staticmethod(llama_config)

    @staticmethod
    def positions(c: dict) -> int:
        return 2**31  # rotary: any position the kernels' int32 holds

    @staticmethod
    def prepare(block: InjectedBlock) -> None:
        attn, mlp = block.self_attn, block.mlp
        for key, modules in (("qkv", (attn.q_proj, attn.k_proj, attn.v_proj)), ("mlp", (mlp.up_proj, mlp.gate_proj))):
            _fuse(block, key, [m.weight for m in modules])
            _fuse(block, key + "_bias", [m.bias for m in modules])

    @staticmethod
    def weights(block: InjectedBlock) -> PreLNWeights:
        f, attn, mlp = block.fused, block.self_attn, block.mlp
        return PreLNWeights(
            *(block.input_layernorm.weight, None, f["qkv"], f.get("qkv_bias"), attn.o_proj.weight, attn.o_proj.bias),
            *(block.post_attention_layernorm.weight, None, f["mlp"], f.get("mlp_bias")),
            *(mlp.down_proj.weight, mlp.down_proj.bias),
        )

    @staticmethod
    def embeddings(inner, ids, positions, inputs_embeds):
        return embed(_array(ids), _array(inner.embed_tokens.weight)) if ids is not None else _array(inputs_embeds)

    @staticmethod
    def final_norm(inner):
        return inner.norm.weight, None

    @staticmethod
    def tables(inner):
        """The token embedding table (positions are rotary)."""
        return (inner.embed_tokens.weight,)


def _families() -> dict:
    """model_type -> (the inner model's class, its family, its causal LM class)."""
    import transformers

    return {
        "gpt2": (transformers.GPT2Model, _GPT2, transformers.GPT2LMHeadModel),
        "llama": (transformers.LlamaModel, _LLaMA, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralModel, _LLaMA, transformers.MistralForCausalLM),
        "qwen2": (transformers.Qwen2Model, _LLaMA, transformers.Qwen2ForCausalLM),
    }


class _Injection:
    """What the injected forward of one inner model needs: its family, our layer per dtype and the backend views
    of its weights (rebuilt whenever a Parameter's storage changes, e.g. after ``.to()``)."""

    def __init__(self, family, hf_config, where: str, inner_class):
        self.family, self.where = family, where
        self.signature = inspect.signature(inner_class.forward)  # the original's, through its decorators
        self.cache_name = "cache" if "cache" in self.signature.parameters else "past_key_values"
        self.output_class = _output_class(self.signature)
        self.c = hf_config.to_dict()
        self.max_positions = family.positions(self.c)
        self.layers: dict = {}  # numpy dtype -> PreLNLayer
        self.views = None  # (key, [PreLNWeights], final norm) for the current storage
        self.slots = None  # (module, name) of every Parameter of the inner model, for the views' key
        self.fast = None  # causal_lm.FastGenerate where generate() runs our decode loop

    def __getstate__(self):  # a copied model rebuilds its own views (and slots, which name the original's modules)
        return dict(self.__dict__, views=None, slots=None)

    def _key(self) -> tuple | None:
        """Where each Parameter's storage is now, looked up in its module (a Parameter replaced or moved changes it),
        without walking the module tree each call (a forward's Python cost)."""
        if self.slots is None:
            return None
        return tuple(None if (p := m._parameters[n]) is None else p.data_ptr() for m, n in self.slots)

    def layer(self, dtype) -> PreLNLayer:
        if dtype not in self.layers:
            self.layers[dtype] = PreLNLayer(self.family.config(self.c, dtype, self.where))
        return self.layers[dtype]

    def weights(self, inner, blocks) -> tuple[list, tuple]:
        """Each block's ``PreLNWeights`` and the final norm as backend arrays over the Parameters' memory."""
        key = self._key()
        if self.views is None or self.views[0] != key:
            for block in blocks:
                self.family.prepare(block)  # after a move: fuse again
            self.slots = [(m, n) for m in inner.modules() for n in m._parameters]
            key = self._key()

            def arrays(values):
                return [None if v is None else _array(v) for v in values]

            weights = [PreLNWeights(*arrays(vars(self.family.weights(b)).values())) for b in blocks]
            self.views = (key, weights, tuple(arrays(self.family.final_norm(inner))))
        return self.views[1], self.views[2]


def _check_model(model) -> tuple:
    """(inner model, family, device, dtype) of a model ``inject`` supports, or a clear error (nothing changed)."""
    import transformers

    if not isinstance(model, transformers.PreTrainedModel):
        raise TypeError(f"model: expected a transformers PreTrainedModel (GPT-2 or LLaMA-style); got {type(model)!r}")
    inner = model.base_model
    model_type = getattr(model.config, "model_type", None)
    families = _families()
    if model_type not in families or type(inner) is not families[model_type][0]:
        names = ", ".join(f"{cls.__name__} ({t})" for t, (cls, *_) in families.items())
        raise TypeError(
            f"model: unsupported: expected a model built on one of {names}; got {type(model).__name__} "
            f"(model_type {model_type!r}, base model {type(inner).__name__})"
        )
    params = list(model.parameters())
    devices = sorted({str(p.device) for p in params})
    if len(devices) != 1:
        raise ValueError(f"model: expected every parameter on one device; got a model split over {devices}")
    dtypes = sorted({str(p.dtype) for p in params})
    if len(dtypes) != 1 or params[0].dtype not in DTYPES:
        raise TypeError(f"model: expected parameters of one dtype, float16, bfloat16 or float32; got {dtypes}")
    device = params[0].device
    if device.type not in ("cpu", "cuda"):
        raise ValueError(f"model: expected a model on the CPU or a CUDA GPU; got one on {device}")
    return inner, families[model_type][1], device, params[0].dtype


def inject(model, fast_generate: bool = True):
    """Run ``model``'s transformer blocks on our ops, in place (the module docstring says how); returns ``model``.
    ``fast_generate``: a ``*ForCausalLM``'s ``generate`` runs the calls it can on our captured decode loop
    (``interop.causal_lm``), the rest on Hugging Face's loop; False: Hugging Face's loop always. A model already
    injected is returned as it is. Unsupported models and options raise ``TypeError`` / ``ValueError`` before
    anything changes. A module holding a ``BertModel`` (a BertModel, a task model on one, a sentence-transformers
    model) goes to ``interop.bert_inject.inject_bert``."""
    import transformers

    if not isinstance(fast_generate, bool):
        raise TypeError(f"fast_generate: expected True or False; got {fast_generate!r}")
    if isinstance(model, nn.Module) and any(isinstance(m, transformers.BertModel) for m in model.modules()):
        from .bert_inject import inject_bert

        return inject_bert(model)
    inner, family, device, dtype = _check_model(model)
    if hasattr(inner, _ATTRIBUTE):
        return model
    where = f"{type(model).__name__}.config"
    family.check(model.config.to_dict(), where)
    injection = _Injection(family, model.config, where, type(inner))
    injection.layer(DTYPES[dtype])  # the config's own checks
    if device.type == "cuda":
        import_cupy()  # CuPy's own error where it is missing
    blocks = getattr(inner, family.blocks)
    # Everything is checked: swap.
    for i, block in enumerate(blocks):
        blocks[i] = InjectedBlock(block, i)
    setattr(inner, _ATTRIBUTE, injection)
    # TorchDynamo cannot trace our ops (CuPy launches): under torch.compile the forward runs eagerly, and generate's
    # own compile of a static-cache step (on CUDA) is turned off, as it would compile nothing.
    inner.forward = types.MethodType(torch.compiler.disable(_forward), inner)
    if getattr(model, "generation_config", None) is not None:
        model.generation_config.disable_compile = True
    if fast_generate and type(model) is _families()[model.config.model_type][2]:
        from .causal_lm import FastGenerate, generate

        injection.fast = FastGenerate()
        model.generate = types.MethodType(generate, model)
    with _on(device):
        injection.weights(inner, blocks)  # fuses the LLaMA-style projections now
    return model


def _on(device: torch.device):
    """Where our ops run for tensors on ``device``: CUDA on torch's stream and allocator; the CPU as it is."""
    return _torch_stream(device) if device.type == "cuda" else contextlib.nullcontext()


def _check_cache(cache):
    """``cache`` if its layers are ones whose ``update`` returns the cache's own storage (dynamic and static)."""
    from transformers.cache_utils import Cache, DynamicLayer, StaticLayer

    if not isinstance(cache, Cache):
        raise TypeError(f"cache: expected a transformers Cache (DynamicCache, StaticCache); got {type(cache)!r}")
    kinds = {type(layer) for layer in cache.layers} | {cache.layer_class_to_replicate} - {None}
    if getattr(cache, "offloading", False) or not kinds <= {DynamicLayer, StaticLayer}:
        raise ValueError(
            f"cache: expected a {type(cache).__name__} of DynamicLayer or StaticLayer layers without offloading; "
            f"got layers {sorted(k.__name__ for k in kinds)}, offloading {getattr(cache, 'offloading', False)}"
        )
    return cache


def _mask(attention_mask, dtype):
    """HF's attention mask as our op's: 2-D [B, T] (nonzero = keep) as booleans; 4-D as it is (also from a
    per-layer-type mapping of full-attention layers only, as ``generate`` makes for static caches)."""
    if isinstance(attention_mask, dict) and list(attention_mask) == ["full_attention"]:
        attention_mask = attention_mask["full_attention"]
    if attention_mask is None:
        return None
    if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() not in (2, 4):
        raise TypeError(f"attention_mask: expected a 2-D or 4-D tensor or None; got {attention_mask!r:.80}")
    if attention_mask.dim() == 2 or attention_mask.dtype == torch.bool:
        return _array((attention_mask != 0).contiguous())  # booleans (they cross DLPack as bytes: _as_backend)
    return _array(attention_mask.to(dtype).contiguous())


def _layer_cache(cache, i: int, placeholder: torch.Tensor, past: int) -> KVCache:
    """Room for this step in layer ``i`` of HF's ``cache``: a one-layer ``KVCache`` view over the tensors
    ``cache.update`` returns, where our op writes the step's keys and values (at ``past``). ``placeholder``: the
    step's [B, kv, S, d] (every slot is overwritten by our op before anything reads it; one for every layer, as
    dynamic and static layers copy what they are given)."""
    b, kv, s, d = placeholder.shape
    keys, values = cache.update(placeholder, placeholder, i)
    if keys.shape[:2] != (b, kv) or keys.shape[2] < past + s:
        raise ValueError(
            f"cache: layer {i} returned keys of shape {tuple(keys.shape)}; expected [{b}, {kv}, {past + s} or more, "
            f"{d}] (a cache of another batch size or model?)"
        )
    return KVCache.over(_array(keys)[None], _array(values)[None])


def _forward(inner, *args, **kwargs):
    """The injected forward of a GPT-2 / LLaMA-style inner model: the original's signature and output class."""
    injection: _Injection = getattr(inner, _ATTRIBUTE)
    bound = injection.signature.bind(inner, *args, **kwargs)
    a = dict(bound.arguments)
    a.pop("self", None)
    a.update(a.pop("kwargs", {}))
    cache_name = injection.cache_name
    cache = a.pop(cache_name, None)
    if a.get("past_key_values") is not None:
        cache = a.pop("past_key_values")
    ids, inputs_embeds = a.pop("input_ids", None), a.pop("inputs_embeds", None)
    attention_mask, position_ids = a.pop("attention_mask", None), a.pop("position_ids", None)
    config = inner.config
    use_cache = a.pop("use_cache", None)
    use_cache = config.use_cache if use_cache is None else use_cache
    want_hidden = a.pop("output_hidden_states", None)
    want_hidden = config.output_hidden_states if want_hidden is None else want_hidden
    return_dict = a.pop("return_dict", None)
    return_dict = config.return_dict if return_dict is None else return_dict
    want_attentions = a.pop("output_attentions", None)
    if config.output_attentions if want_attentions is None else want_attentions:
        raise ValueError(
            "output_attentions=True: not supported by the injected model (our attention never forms the attention "
            "probabilities); run the original model for them"
        )
    unsupported = {k: v for k, v in a.items() if v is not None}
    if unsupported:
        raise ValueError(f"{', '.join(unsupported)}: not supported by the injected model; got {unsupported!r:.200}")
    if want_hidden not in (True, False):
        raise ValueError(f"output_hidden_states: expected True or False; got {want_hidden!r}")
    if (ids is None) == (inputs_embeds is None):
        raise ValueError("input_ids, inputs_embeds: give exactly one")
    first = ids if ids is not None else inputs_embeds
    b, s = first.shape[:2]
    if use_cache and cache is None:
        from transformers.cache_utils import DynamicCache

        cache = DynamicCache(config=config)
    past = 0 if cache is None else int(_check_cache(cache).get_seq_length())  # StaticCache: a 0-d tensor
    param = next(inner.parameters())
    device, dtype = param.device, param.dtype
    if dtype not in DTYPES:
        raise TypeError(f"model: expected float16, bfloat16 or float32 parameters; got {dtype}")
    if ids is not None:
        ids = ids.reshape(b, s).to(device).contiguous()
    if position_ids is None:
        position_ids = torch.arange(past, past + s, device=device)[None]
    position_ids = position_ids.to(device).expand(b, s).contiguous()
    # The ids' and the positions' ranges, read back together: one wait for the GPU a call, not two.
    ranges = [("input_ids", "token ids", ids, config.vocab_size)] if ids is not None else []
    ranges.append(("position_ids", "positions", position_ids, injection.max_positions))
    extremes = torch.stack([v.to(torch.int64) for _, _, t, _ in ranges for v in torch.aminmax(t)]).tolist()
    for (name, what, _, limit), low, high in zip(ranges, extremes[::2], extremes[1::2]):
        if low < 0 or high >= limit:
            raise ValueError(f"{name}: expected {what} in [0, {limit}); got {low}..{high}")
    layer = injection.layer(DTYPES[dtype])
    blocks = getattr(inner, injection.family.blocks)
    with torch.no_grad(), _on(device):
        weights, final_norm = injection.weights(inner, blocks)
        # int32 positions (checked above), which the attention kernels read: no conversion in every layer
        mask, positions = _mask(attention_mask, dtype), _array(position_ids.to(torch.int32))
        x = injection.family.embeddings(inner, ids, position_ids, inputs_embeds)
        mask = layer.attention_mask(mask, x, past + s)  # every layer's keys: the cached ones and this call's
        xn = layer.norm(x, weights[0].ln1_gamma, weights[0].ln1_beta)
        states = [x]
        start = placeholder = None
        if cache is not None:  # where the step's keys go in every layer, and what stands in for them in update
            start = numpy.full(b, past, numpy.int64)
            placeholder = param.new_empty((b, layer.config.num_kv, s, layer.config.head_size))
        for i, w in enumerate(weights):
            view = None if cache is None else _layer_cache(cache, i, placeholder, past)
            after = (weights[i + 1].ln1_gamma, weights[i + 1].ln1_beta) if i + 1 < len(weights) else final_norm
            x, xn = layer.stack(
                x, xn, w, after, cache=view, layer_id=0, start=start, attn_mask=mask, position_ids=positions
            )
            states.append(x)
        last = _tensor(xn)
        hidden = tuple(_tensor(h) for h in states[:-1]) + (last,) if want_hidden else None
    fields = {"last_hidden_state": last, cache_name: cache if use_cache or injection.family is _LLaMA else None}
    output = injection.output_class(**fields, hidden_states=hidden)
    return output if return_dict else output.to_tuple()


def _output_class(signature: inspect.Signature):
    """The output class the original forward returns (its return annotation)."""
    import transformers.modeling_outputs as outputs

    annotation = signature.return_annotation
    return getattr(outputs, annotation) if isinstance(annotation, str) else annotation
