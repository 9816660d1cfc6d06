"""GPT-2 (``GPT2LMHeadModel`` / ``GPT2Model`` checkpoints) on the ops.

Embeddings ``wte[ids] + wpe[positions]``, ``n_layer`` pre-LN layers (``layers.PreLNLayer``; Conv1D weights
are already ``[in, out]``, DeepSpeed's default layout), the final LayerNorm, and the LM head tied to
``wte``. Positions are explicit (a left-padded batch passes its own); the KV cache is the caller's
(``new_cache``), which ``forward`` advances by the call's tokens.
"""

from __future__ import annotations

import numpy

from .. import ops
from ..layers import PreLNLayer, PreLNWeights
from ..runtime.arrays import resolve_backend
from .base import CausalLM, open_checkpoint

ACTIVATIONS = {"gelu_new": "GELU", "gelu_pytorch_tanh": "GELU", "gelu": "GELU_EXACT", "relu": "ReLU"}


def require(c: dict, key: str, where: str):
    """``c[key]``, or a ValueError naming ``where`` and the key."""
    if key not in c:
        raise ValueError(f"{where}: {key!r} missing (is this the right kind of model?)")
    return c[key]


def gpt2_config(c: dict, dtype, where: str) -> ops.InferenceConfig:
    """Our config for a GPT-2 config's fields ``c`` (config.json's, or a transformers config's ``to_dict()``) in
    ``dtype``; errors name ``where``."""
    act = c.get("activation_function", "gelu_new")
    if act not in ACTIVATIONS:
        raise ValueError(f"{where}: activation_function {act!r} is not one of {sorted(ACTIVATIONS)}")
    h = require(c, "n_embd", where)
    return ops.InferenceConfig(
        hidden_size=h,
        heads=require(c, "n_head", where),
        intermediate_size=c.get("n_inner") or 4 * h,
        epsilon=c.get("layer_norm_epsilon", 1e-5),
        mlp_act_func_type=ACTIVATIONS[act],
        dtype=dtype,
    )


class GPT2(CausalLM):
    model_type = "gpt2"

    def __init__(self, checkpoint, dtype=numpy.float16, backend: str | None = None, progress=None):
        """``checkpoint``: a folder or a ``loading.Checkpoint``; weights go to ``backend`` ("cupy" or "numpy")
        in ``dtype``."""
        backend = resolve_backend("backend", backend)  # None: the GPU where one is usable, else NumPy
        ck = open_checkpoint(checkpoint, self.model_type)
        c = ck.config
        self.config = gpt2_config(c, dtype, f"{ck.folder}/config.json")
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
        w = ck.load(shapes, dtype, backend, progress)
        self.wte, self.wpe = w[f"{p}wte.weight"], w[f"{p}wpe.weight"]
        self.final_norm = (w[f"{p}ln_f.weight"], w[f"{p}ln_f.bias"])
        self.head_weight = self.wte  # the LM head is wte itself, [vocab, hidden]: [out, in]
        self.weights = [PreLNWeights(*(w[f"{p}h.{i}.{name}"] for name in per_layer)) for i in range(self.layers_count)]
        self.layer = PreLNLayer(self.config)
        self.layer_prefix = f"{p}h.{{}}."  # layer i's tensor names, for errors

    def token_embeddings(self, ids, positions):
        """``wte[ids] + wpe[positions]``, summed in fp32 (float64 on the NumPy path), rounded once: ``ops.embed``."""
        return ops.embed(ids, self.wte, positions, self.wpe)
