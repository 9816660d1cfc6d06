"""LLaMA-style models (``LlamaForCausalLM`` checkpoints) on the ops.

RMSNorm, rotary (rotate-half over the whole head, ``rope_theta``), grouped-query attention and a gated-SiLU
MLP, no biases: ``layers.PreLNLayer`` with an RMSNorm config, as DeepSpeed composes LLaMA layers
(``r = x + Attn(RMS1(x))``, ``y = r + W_down(W_up RMS2(r) * silu(W_gate RMS2(r)))``). nn.Linear
weights are ``[out, in]`` (``transposed_mode``); Q, K and V are fused into one ``[(h + 2 kv) d, H]`` weight
and gate/up into one ``[up | gate]`` weight at load time. The LM head is ``lm_head.weight`` or, with
``tie_word_embeddings``, the embedding. ``rope_theta`` is read from the top level or from transformers 5's
``rope_parameters``; rope scaling variants are not supported (an error names them). With a communicator
(``comm``) the model is one rank of a tensor-parallel group (``parallel``: q/k/v and gate/up cut by heads and
columns, o_proj and down_proj by rows, the embedding and the head, tied or not, by vocabulary rows, the norms
whole); ``num_key_value_heads`` must then be divisible by the rank count (K/V heads are not replicated: a clear
error before anything is read).
"""

from __future__ import annotations

import numpy

from .. import ops
from ..layers import PreLNLayer, PreLNWeights
from ..loading import require
from ..parallel import (
    HEAD,
    LLAMA_LAYER,
    TABLE,
    all_reduce_of,
    check_divisible,
    layer_shards,
    rank_and_size,
    vocab_parallel_of,
)
from ..runtime.arrays import array_module, resolve_backend
from .base import CausalLM, open_checkpoint


def llama_config(c: dict, dtype, where: str, mp_size: int = 1) -> ops.InferenceConfig:
    """Our config for a LLaMA-style config's fields ``c`` (config.json's, or a transformers config's ``to_dict()``)
    in ``dtype``, for ``mp_size`` tensor-parallel ranks; errors name ``where``."""
    if c.get("hidden_act", "silu") != "silu":
        raise ValueError(f"{where}: hidden_act {c.get('hidden_act')!r}: only 'silu' is supported")
    # Older configs: rope_theta and rope_scaling; transformers 5 writes rope_parameters {rope_theta, rope_type}.
    rope = dict(c.get("rope_parameters") or {}, **(c.get("rope_scaling") or {}))
    if rope.get("rope_type", rope.get("type", "default")) != "default":
        raise ValueError(f"{where}: rope scaling {rope!r} is not supported (only the default rope)")
    theta = float(c.get("rope_theta") or rope.get("rope_theta") or 10000.0)
    h, heads = require(c, "hidden_size", where), require(c, "num_attention_heads", where)
    inner = require(c, "intermediate_size", where)
    d = c.get("head_dim") or h // heads
    if d * heads != h:
        raise ValueError(f"{where}: head_dim {d} x {heads} heads is not hidden_size {h}")
    kv = c.get("num_key_value_heads") or heads
    sizes = {"num_attention_heads": heads, "num_key_value_heads": kv, "intermediate_size": inner}
    check_divisible(where, sizes, mp_size)
    return ops.InferenceConfig(
        hidden_size=h,
        heads=heads,
        num_kv=kv,
        intermediate_size=inner,
        mp_size=mp_size,
        epsilon=c.get("rms_norm_eps", 1e-6),
        norm_type="RMSNorm",
        mlp_act_func_type="GATED_SILU",
        dtype=dtype,
        transposed_mode=True,
        rotary_dim=d,
        rotate_half=True,
        rotate_every_two=False,
        rope_theta=theta,
    )


class LLaMA(CausalLM):
    model_type = "llama"
    layer_prefix = "model.layers.{}."  # layer i's tensor names, for errors

    def __init__(self, checkpoint, dtype=numpy.float16, backend: str | None = None, progress=None, comm=None):
        """As ``GPT2``'s: ``comm`` this rank's communicator, None for the whole model."""
        backend = resolve_backend("backend", backend)  # None: the GPU where one is usable, else NumPy
        rank, size = rank_and_size(comm)
        ck = open_checkpoint(checkpoint, self.model_type)
        c = ck.config
        self.config = llama_config(c, dtype, f"{ck.folder}/config.json", size)
        h, heads, inner = self.config.hidden_size, self.config.heads, self.config.intermediate_size
        kv, d = self.config.num_kv, self.config.head_size
        self.layers_count, self.vocab, self.backend = ck.require("num_hidden_layers"), ck.require("vocab_size"), backend
        self.max_positions = c.get("max_position_embeddings", 2048)
        self.tied = bool(c.get("tie_word_embeddings", False))
        shapes = {"model.embed_tokens.weight": (self.vocab, h), "model.norm.weight": (h,)}
        if not self.tied:
            shapes["lm_head.weight"] = (self.vocab, h)
        per_layer = {
            "input_layernorm.weight": (h,),
            "self_attn.q_proj.weight": (heads * d, h),
            "self_attn.k_proj.weight": (kv * d, h),
            "self_attn.v_proj.weight": (kv * d, h),
            "self_attn.o_proj.weight": (h, heads * d),
            "post_attention_layernorm.weight": (h,),
            "mlp.up_proj.weight": (inner, h),
            "mlp.gate_proj.weight": (inner, h),
            "mlp.down_proj.weight": (h, inner),
        }
        for i in range(self.layers_count):
            shapes.update({f"model.layers.{i}.{name}": shape for name, shape in per_layer.items()})
        self.vocab_parallel = vocab_parallel_of(comm, self.vocab)
        shards = layer_shards(LLAMA_LAYER, "model.layers.{}.", self.layers_count)
        shards.update({"model.embed_tokens.weight": TABLE, "lm_head.weight": HEAD})
        w = ck.load(shapes, dtype, backend, progress, shards if size > 1 else None, rank, size)
        xp = array_module(backend)
        self.embed_tokens, self.norm = w["model.embed_tokens.weight"], w["model.norm.weight"]
        self.lm_head = self.tied_head(self.embed_tokens) if self.tied else w["lm_head.weight"]
        self.final_norm, self.head_weight = (self.norm, None), self.lm_head
        self.weights = []
        for i in range(self.layers_count):
            t = {name: w.pop(f"model.layers.{i}.{name}") for name in per_layer}
            attn, mlp = "self_attn.", "mlp."
            self.weights.append(
                PreLNWeights(
                    ln1_gamma=t["input_layernorm.weight"],
                    ln1_beta=None,
                    w_qkv=xp.concatenate([t[attn + f"{n}_proj.weight"] for n in "qkv"]),
                    b_qkv=None,
                    w_o=t[attn + "o_proj.weight"],
                    b_o=None,
                    ln2_gamma=t["post_attention_layernorm.weight"],
                    ln2_beta=None,
                    w1=xp.concatenate([t[mlp + "up_proj.weight"], t[mlp + "gate_proj.weight"]]),
                    b1=None,
                    w2=t[mlp + "down_proj.weight"],
                    b2=None,
                )
            )
        self.layer = PreLNLayer(self.config, all_reduce_of(comm))

    def token_embeddings(self, ids, positions):
        """``embed_tokens[ids]``: ``ops.embed``."""
        return self.lookup(ids, self.embed_tokens)
