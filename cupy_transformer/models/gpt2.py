"""GPT-2 (``GPT2LMHeadModel`` / ``GPT2Model`` checkpoints) on the ops.

Embeddings ``wte[ids] + wpe[positions]``, ``n_layer`` pre-LN layers (``layers.PreLNLayer``), the final
LayerNorm, and the LM head tied to ``wte``. The checkpoint's Conv1D weights are ``[in, out]``; the loader stores
them ``[out, in]`` (``transposed_mode``, each copied once at load), the layout the decode step's GEMV reads
fastest: an output's weights are then one contiguous run of K values instead of 64-byte pieces a row of N apart.
With a communicator (``comm``) the model is one rank of a tensor-parallel group (``parallel``: ``c_attn`` cut by
heads in each of its Q, K and V blocks, ``c_fc`` by columns, the two ``c_proj`` by rows, as the file holds them;
``wte`` and with it the tied head by vocabulary rows; ``wpe`` whole). Positions are explicit (a left-padded batch
passes its own); the KV cache is the caller's (``new_cache``), which ``forward`` advances by the call's tokens.
"""

from __future__ import annotations

import numpy

from .. import ops
from ..layers import PreLNLayer, PreLNWeights
from ..loading import require
from ..parallel import GPT2_LAYER, TABLE, all_reduce_of, check_divisible, layer_shards, rank_and_size, vocab_parallel_of
from ..runtime.arrays import resolve_backend, transposed_copy
from .base import CausalLM, open_checkpoint

CONV1D = ("attn.c_attn.weight", "attn.c_proj.weight", "mlp.c_fc.weight", "mlp.c_proj.weight")
ACTIVATIONS = {"gelu_new": "GELU", "gelu_pytorch_tanh": "GELU", "gelu": "GELU_EXACT", "relu": "ReLU"}


def gpt2_config(c: dict, dtype, where: str, mp_size: int = 1, transposed: bool = False) -> ops.InferenceConfig:
    """Our config for a GPT-2 config's fields ``c`` (config.json's, or a transformers config's ``to_dict()``) in
    ``dtype``, for ``mp_size`` tensor-parallel ranks, weights ``[out, in]`` where ``transposed`` (else Conv1D's
    ``[in, out]``); errors name ``where``."""
    act = c.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(f"{where}: activation_function {act!r} is not one of {sorted(ACTIVATIONS)}")
    h, heads = require(c, "n_embd", where), require(c, "n_head", where)
    inner = c.get("n_inner") or 4 * h
    check_divisible(where, {"n_head": heads, "n_inner (the MLP width)": inner}, mp_size)
    return ops.InferenceConfig(
        hidden_size=h,
        heads=heads,
        intermediate_size=inner,
        mp_size=mp_size,
        epsilon=c.get("layer_norm_epsilon", 1e-5),
        mlp_act_func_type=ACTIVATIONS[act],
        dtype=dtype,
        transposed_mode=transposed,
    )


class GPT2(CausalLM):
    model_type = "gpt2"

    def __init__(self, checkpoint, dtype=numpy.float16, backend: str | None = None, progress=None, comm=None):
        """``checkpoint``: a folder or a ``loading.Checkpoint``; weights go to ``backend`` ("cupy" or "numpy")
        in ``dtype``. ``comm``: this rank's communicator (``parallel``), None for the whole model."""
        backend = resolve_backend("backend", backend)  # None: the GPU where one is usable, else NumPy
        rank, size = rank_and_size(comm)
        ck = open_checkpoint(checkpoint, self.model_type)
        c = ck.config
        self.config = gpt2_config(c, dtype, f"{ck.folder}/config.json", size, transposed=True)
        h, self.layers_count = self.config.hidden_size, ck.require("n_layer")
        self.vocab, self.max_positions, self.backend = ck.require("vocab_size"), ck.require("n_positions"), backend
        inner = self.config.intermediate_size
        p = "transformer." if "transformer.wte.weight" in ck.names else ""
        shapes = {
            f"{p}wte.weight": (self.vocab, h),
            f"{p}wpe.weight": (self.max_positions, h),
            f"{p}ln_f.weight": (h,),
            f"{p}ln_f.bias": (h,),
        }
        per_layer = {
            "ln_1.weight": (h,),
            "ln_1.bias": (h,),
            "attn.c_attn.weight": (h, 3 * h),
            "attn.c_attn.bias": (3 * h,),
            "attn.c_proj.weight": (h, h),
            "attn.c_proj.bias": (h,),
            "ln_2.weight": (h,),
            "ln_2.bias": (h,),
            "mlp.c_fc.weight": (h, inner),
            "mlp.c_fc.bias": (inner,),
            "mlp.c_proj.weight": (inner, h),
            "mlp.c_proj.bias": (h,),
        }
        for i in range(self.layers_count):
            shapes.update({f"{p}h.{i}.{name}": shape for name, shape in per_layer.items()})
        self.vocab_parallel = vocab_parallel_of(comm, self.vocab)
        shards = {**layer_shards(GPT2_LAYER, f"{p}h.{{}}.", self.layers_count), f"{p}wte.weight": TABLE}
        w = ck.load(shapes, dtype, backend, progress, shards if size > 1 else None, rank, size)
        for i in range(self.layers_count):  # [in, out] -> [out, in] (the module docstring), a rank's part alike
            for name in CONV1D:
                key = f"{p}h.{i}.{name}"
                w[key] = transposed_copy(w[key])
        self.wte, self.wpe = w[f"{p}wte.weight"], w[f"{p}wpe.weight"]
        self.final_norm = (w[f"{p}ln_f.weight"], w[f"{p}ln_f.bias"])
        self.head_weight = self.tied_head(self.wte)  # the LM head is wte itself, [vocab, hidden]: [out, in]
        self.weights = [PreLNWeights(*(w[f"{p}h.{i}.{name}"] for name in per_layer)) for i in range(self.layers_count)]
        self.layer = PreLNLayer(self.config, all_reduce_of(comm))
        self.layer_prefix = f"{p}h.{{}}."  # layer i's tensor names, for errors

    def token_embeddings(self, ids, positions):
        """``wte[ids] + wpe[positions]``, summed in fp32 (float64 on the NumPy path), rounded once: ``ops.embed``."""
        return self.lookup(ids, self.wte, positions, self.wpe)
