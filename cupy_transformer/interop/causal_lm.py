"""Our decode loop behind an injected model's ``generate()``: ``inject(model)`` (``fast_generate=True``, the default)
gives a GPT-2 / LLaMA / Mistral / Qwen2 ``*ForCausalLM`` a ``generate`` that runs the calls it can serve on
``generation.Decoder`` (the prompt pass, then each decode step captured once as a CUDA graph and replayed, the next
token drawn on the device, the host one step behind) and hands every other call to Hugging Face's own ``generate``
unchanged (which then runs the injected forward).

The model our loop runs is ``InjectedCausalLM``: a ``models.CausalLM`` over the injected model's own memory (no
copy): the blocks' and the final norm's backend views that the injected forward uses, the embeddings through
``ops.embed`` on the Hugging Face embedding weights, and the LM head on ``lm_head.weight`` ([vocab, hidden], our
[out, in]). CUDA models run on CuPy (the decoder's own stream, and CuPy's memory pool for its KV cache and steps),
CPU ones on the NumPy path. One ``Decoder`` is kept per (batch, cache capacity: rounded up to 256 tokens, as
``generation.generate`` rounds it), the last few in an LRU on the injected model (each captures its own graph on
its second step); all are dropped when the weights' storage moves (``.to()``), since a captured graph holds their
addresses.

Served (anything else falls back to Hugging Face, silently): ``input_ids`` [B, S] (int32 / int64, on the model's
device) with an optional ``attention_mask`` that is left padding only (each row zeros, then at least one one;
without a mask Hugging Face's own inference from the pad token decides); greedy, or sampling with temperature,
top_k and top_p; every other generation setting at its default (``ACCEPTED`` lists the ones we honour: a setting
transformers adds later falls back until it is listed); ``return_dict_in_generate=False``; no logits processors,
stopping criteria, streamer, assistant model or other ``generate`` arguments, no cache passed in. The settings are
merged as Hugging Face merges them (its own ``_prepare_generation_config``, ``_prepare_special_tokens`` and
``_prepare_generated_length``, so a checkpoint's generation_config applies the same way), and the result is what it
returns: the input (padding kept) followed by the new tokens, int64 on the input's device, [B, S + steps run];
after its eos a sequence gets the pad token (the first eos where there is no pad token, as Hugging Face does), and
the loop stops when every sequence has ended or at the length limit.

Greedy tokens are the original model's. Sampled ones are drawn by our sampler (``ops.sample_tokens``: Philox,
Gumbel-max, on the device) from the same distribution (temperature, then top_k, then top_p on what is left) but
not with torch's draws, so they differ from the original's; the seed is drawn from torch's default CPU generator
(``torch.randint``), so ``torch.manual_seed`` makes a run reproducible.
"""

from __future__ import annotations

import collections
import contextlib
import inspect
from typing import NamedTuple

import numpy
import torch

from .. import ops
from ..generation import Decoder, Sampling, decoder_capacity
from ..models.base import CausalLM
from ..ops.sampling import sampling_arguments
from .torch import _ATTRIBUTE, DTYPES, _array, _on

__all__ = ["ACCEPTED", "FastGenerate", "InjectedCausalLM"]

# The generation settings we honour whatever their value; every other must be at GenerationConfig's default.
ACCEPTED = frozenset(
    {
        "max_length",  # with max_new_tokens: resolved by Hugging Face's _prepare_generated_length
        "max_new_tokens",
        "do_sample",
        "temperature",
        "top_k",
        "top_p",
        "eos_token_id",
        "pad_token_id",
        "bos_token_id",  # only used without input_ids (which falls back)
        "decoder_start_token_id",  # encoder-decoder models only
        "min_length",  # without an eos nothing (else it falls back)
        "min_new_tokens",
        "use_cache",  # the same tokens with or without one
        "cache_implementation",  # "static" / "dynamic" (_SERVED_CACHES): our loop keeps its own cache; others fall back
        "disable_compile",  # Hugging Face's compile of a static-cache step (inject turns it off)
        "compile_config",
        "transformers_version",  # metadata
        "_from_model_config",
    }
)
# A static cache asks for fixed shapes so that the step can be compiled: our loop's captured step is that already.
_SERVED_CACHES = (None, "dynamic", "static")
DECODERS_KEPT = 4  # Decoders (each with its KV cache and captured graph) per injected model


class InjectedCausalLM(CausalLM):
    """A ``CausalLM`` (what ``generation.Decoder`` runs) over the memory of an injected ``*ForCausalLM``: its
    blocks' weights as the injected forward sees them, its embedding tables and ``lm_head.weight``. Build it
    under ``interop.torch._on(device)``."""

    def __init__(self, model, backend: str):
        inner = model.base_model
        injection = getattr(inner, _ATTRIBUTE)
        family = injection.family
        blocks = getattr(inner, family.blocks)
        dtype = next(model.parameters()).dtype
        self.weights, self.final_norm = injection.weights(inner, blocks)
        self.layer = injection.layer(DTYPES[dtype])
        self.config, self.layers_count, self.backend = self.layer.config, len(blocks), backend
        self.tables = tuple(_array(t) for t in family.tables(inner))  # token (and position) embeddings
        self.head_weight = _array(model.lm_head.weight)  # [vocab, hidden]: our [out, in]
        self.vocab = self.head_weight.shape[0]
        self.max_positions = model.config.max_position_embeddings  # GPT-2's n_positions
        self.layer_prefix = f"{model.base_model_prefix}.{family.blocks}.{{}}."  # layer i's parameter names

    def token_embeddings(self, ids, positions):
        if len(self.tables) == 1:
            return ops.embed(ids, self.tables[0])
        return ops.embed(ids, self.tables[0], positions, self.tables[1])


class FastGenerate:
    """An injected model's generation state: the ``InjectedCausalLM`` over its current weights and an LRU of
    ``Decoder`` by (batch, capacity). ``served`` counts the ``generate`` calls our loop ran."""

    def __init__(self):
        self.key, self.model = None, None  # the weights' (device, dtype, addresses) the model was built over
        self.decoders: collections.OrderedDict = collections.OrderedDict()
        self.served = 0

    def __getstate__(self):  # a copied model builds its own (graphs and caches are not copied)
        return dict(self.__dict__, key=None, model=None, decoders=collections.OrderedDict())

    def decoder(self, model, batch: int, tokens: int) -> Decoder:
        """The ``Decoder`` for ``batch`` sequences of up to ``tokens`` over ``model``'s current weights: its capacity
        rounded up as ``generation.generate``'s is (``decoder_capacity``), so that calls of nearby lengths share
        one (its cache, and its graphs: prompt widths are rounded too)."""
        param = next(model.parameters())
        device = param.device
        with _on(device):
            inner = model.base_model
            injection = getattr(inner, _ATTRIBUTE)
            injection.weights(inner, getattr(inner, injection.family.blocks))  # re-fuses after a move
            key = (device, param.dtype, tuple(p.data_ptr() for p in model.parameters()))
            if key != self.key:  # new storage: the old graphs point at the old weights
                self.decoders.clear()
                self.key, self.model = key, None  # the old views go first
                self.model = InjectedCausalLM(model, "cupy" if device.type == "cuda" else "numpy")
        capacity = decoder_capacity(tokens, self.model.max_positions)
        decoder = self.decoders.pop((batch, capacity), None)
        if decoder is None:
            while len(self.decoders) >= DECODERS_KEPT:
                self.decoders.popitem(last=False)
            decoder = Decoder(self.model, batch, capacity)
        self.decoders[(batch, capacity)] = decoder
        return decoder


class _Plan(NamedTuple):
    """A ``generate`` call our loop serves: its inputs and settings, resolved as Hugging Face resolves them."""

    input_ids: torch.Tensor  # as given
    prompts: list  # each row's tokens (int64 NumPy), padding left out
    steps: int  # the most new tokens
    sampling: Sampling
    eos: tuple  # token ids
    pad: int | None  # what a sequence gets after its eos


def _no_value(value) -> bool:
    """Whether a ``generate`` argument is unset: None, False or an empty list (LogitsProcessorList(), ...)."""
    return value is None or value is False or (isinstance(value, list) and not value)


def _at_default(value, default) -> bool:
    if value is None or value is False:  # unset and off read the same (output_attentions None / False, ...)
        return default is None or default is False
    return type(value) is type(default) and value == default


def _plan(model, args, kwargs) -> _Plan | None:
    """The call's plan if our loop serves it, else None (Hugging Face's generate runs it, and raises its own
    errors for bad arguments). Nothing here changes the model."""
    from transformers import GenerationConfig
    from transformers.generation.utils import GenerationMixin

    try:
        bound = inspect.signature(GenerationMixin.generate).bind(model, *args, **kwargs)
    except TypeError:
        return None
    call = dict(bound.arguments)
    inputs, generation_config = call.get("inputs"), call.get("generation_config")
    options = call.get("kwargs", {})
    if any(not _no_value(v) for k, v in call.items() if k not in ("self", "inputs", "generation_config", "kwargs")):
        return None  # logits_processor, stopping_criteria, streamer, assistant_model, ...
    # Hugging Face's own merge: the call's settings over the model's generation_config over the global defaults.
    has_default_max_length = (
        options.get("max_length") is None
        and (generation_config is None or generation_config.max_length is None)
        and model.generation_config.max_length is None
    )
    has_default_min_length = (
        options.get("min_length") is None
        and (generation_config is None or generation_config.min_length is None)
        and model.generation_config.min_length is None
    )
    try:
        config, model_kwargs = model._prepare_generation_config(generation_config, **options)
    except (TypeError, ValueError):
        return None
    if not set(model_kwargs) <= {"attention_mask", "input_ids"}:
        return None  # past_key_values, inputs_embeds, position_ids, output_attentions, tokenizer, ...
    defaults = GenerationConfig()
    defaults.update(**defaults._get_default_generation_params())
    defaults = defaults.to_dict()
    settings = config.to_dict()
    if any(k not in ACCEPTED and not _at_default(v, defaults.get(k)) for k, v in settings.items()):
        return None
    if settings.get("cache_implementation") not in _SERVED_CACHES:
        return None  # offloaded, quantized, sliding-window, hybrid: Hugging Face's loop
    ids = model_kwargs.get("input_ids") if inputs is None else inputs
    if inputs is not None and model_kwargs.get("input_ids") is not None:
        return None
    device = next(model.parameters()).device
    if (
        not isinstance(ids, torch.Tensor)
        or ids.dim() != 2
        or ids.dtype not in (torch.int32, torch.int64)
        or ids.device != device
        or ids.numel() == 0
    ):
        return None
    batch, width = ids.shape
    if config.do_sample:
        temperature = 1.0 if config.temperature is None else config.temperature
        try:
            sampling = Sampling(*sampling_arguments(temperature, config.top_k or 0, config.top_p or 1.0))
        except ValueError:
            return None
        if sampling.temperature == 0:  # greedy here, an error in Hugging Face's warper
            return None
    else:
        sampling = Sampling()
    mask = model_kwargs.get("attention_mask")
    model._prepare_special_tokens(config, mask is not None, device=device, batch_size=batch)
    if config._eos_token_tensor is not None and ((config.min_length or 0) > 0 or (config.min_new_tokens or 0) > 0):
        return None  # Hugging Face holds the eos back until then
    if mask is None:
        mask = model._prepare_attention_mask_for_generation(ids, config, model_kwargs)
    if not isinstance(mask, torch.Tensor) or mask.shape != ids.shape:
        return None
    mask = mask.cpu().numpy()
    if not numpy.isin(mask, (0, 1)).all() or (numpy.diff(mask, axis=1) < 0).any() or not mask[:, -1].all():
        return None  # right padding, holes or an empty row: Hugging Face's loop
    config = model._prepare_generated_length(
        generation_config=config,
        has_default_max_length=has_default_max_length,
        has_default_min_length=has_default_min_length,
        model_input_name="input_ids",
        input_ids_length=width,
        inputs_tensor=ids,
    )
    steps = config.max_length - width
    if steps < 1 or width + steps > model.config.max_position_embeddings:
        return None  # Hugging Face warns, raises or runs past the positions as it does
    host = ids.cpu().numpy().astype(numpy.int64)
    if host.min() < 0 or host.max() >= model.get_input_embeddings().weight.shape[0]:
        return None
    eos, pad = config._eos_token_tensor, config._pad_token_tensor
    eos = () if eos is None else tuple(int(e) for e in eos.reshape(-1).tolist())
    pad = None if pad is None else int(pad)
    prompts = [row[keep] for row, keep in zip(host, mask.astype(bool))]
    return _Plan(ids, prompts, steps, sampling, eos, pad)


def generate(model, *args, **kwargs):
    """An injected ``*ForCausalLM``'s ``generate``: ours where the call is served, else Hugging Face's."""
    plan = _plan(model, args, kwargs)
    if plan is None:
        return type(model).generate(model, *args, **kwargs)
    fast: FastGenerate = getattr(model.base_model, _ATTRIBUTE).fast
    ids = plan.input_ids
    batch, width = ids.shape
    seed = int(torch.randint(2**63 - 1, ())) if plan.sampling.temperature > 0 else 0
    device = ids.device
    done = numpy.zeros(batch, bool)
    new = []
    with _on_gpu(device):
        decoder = fast.decoder(model, batch, width + plan.steps)
        if device.type == "cuda":
            torch.cuda.current_stream(device).synchronize()  # the weights as torch last wrote them
        decoder.prefill(plan.prompts, seed, plan.sampling)
        for step in range(plan.steps):
            if step + 1 < plan.steps:
                decoder.step()  # the next tokens are drawn while the host reads these
            tokens = decoder.read(step)
            if plan.eos:  # as Hugging Face: after its eos a sequence gets the pad token
                tokens = numpy.where(done, plan.pad, tokens)
                done |= numpy.isin(tokens, plan.eos)
            new.append(tokens)
            if done.all():
                break
        # After an early stop the step drawn ahead may still run: nothing of ours is left running when we return
        # (the weights it reads may be freed next, or its decoder dropped).
        decoder.wait(decoder.steps)
    fast.served += 1
    out = torch.from_numpy(numpy.stack(new, axis=1)).to(device)
    return torch.cat([ids.to(torch.int64), out], dim=1)


def _on_gpu(device: torch.device):
    """CuPy on the model's GPU (the decoder runs on its own stream and memory pool), or nothing on the CPU."""
    if device.type != "cuda":
        return contextlib.nullcontext()
    import cupy

    return cupy.cuda.Device(device.index)
