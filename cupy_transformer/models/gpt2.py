"""GPT-2 (``GPT2LMHeadModel`` / ``GPT2Model`` checkpoints) on the ops.

Embeddings ``wte[ids] + wpe[positions]``, ``n_layer`` pre-LN layers (``layers.PreLNLayer``; Conv1D weights
are already ``[in, out]``, DeepSpeed's default layout), the final LayerNorm, and the LM head tied to
``wte``. Positions are explicit (a left-padded batch passes its own); the KV cache is the caller's
(``new_cache``), which ``forward`` advances by the call's tokens.
"""

from __future__ import annotations

import numpy

from .. import ops
from ..kv_cache import KVCache
from ..layers import PreLNLayer, PreLNWeights
from ..loading import Checkpoint
from ..ops.matmul import matmul
from ..runtime.arrays import import_cupy

ACTIVATIONS = {"gelu_new": "GELU", "gelu_pytorch_tanh": "GELU", "gelu": "GELU_EXACT", "relu": "ReLU"}


class GPT2:
    model_type = "gpt2"

    def __init__(self, checkpoint, dtype=numpy.float16, backend: str = "cupy", progress=None):
        """``checkpoint``: a folder or a ``loading.Checkpoint``; weights go to ``backend`` ("cupy" or "numpy")
        in ``dtype``."""
        ck = checkpoint if isinstance(checkpoint, Checkpoint) else Checkpoint(checkpoint)
        c = ck.config
        if c.get("model_type") != self.model_type:
            raise ValueError(f"{ck.folder}/config.json: model_type {c.get('model_type')!r} is not {self.model_type!r}")
        act = c.get("activation_function", "gelu_new")
        if act not in ACTIVATIONS:
            raise ValueError(f"{ck.folder}/config.json: activation_function {act!r} is not one of {sorted(ACTIVATIONS)}")
        h, self.layers_count = ck.require("n_embd"), ck.require("n_layer")
        self.vocab, self.max_positions, self.backend = ck.require("vocab_size"), ck.require("n_positions"), backend
        inner = c.get("n_inner") or 4 * h
        self.config = ops.InferenceConfig(hidden_size=h, heads=ck.require("n_head"), intermediate_size=inner,
                                          epsilon=c.get("layer_norm_epsilon", 1e-5), mlp_act_func_type=ACTIVATIONS[act],
                                          dtype=dtype)
        p = "transformer." if "transformer.wte.weight" in ck.names else ""
        shapes = {f"{p}wte.weight": (self.vocab, h), f"{p}wpe.weight": (self.max_positions, h),
                  f"{p}ln_f.weight": (h,), f"{p}ln_f.bias": (h,)}
        per_layer = {"ln_1.weight": (h,), "ln_1.bias": (h,), "attn.c_attn.weight": (h, 3 * h), "attn.c_attn.bias": (3 * h,),
                     "attn.c_proj.weight": (h, h), "attn.c_proj.bias": (h,), "ln_2.weight": (h,), "ln_2.bias": (h,),
                     "mlp.c_fc.weight": (h, inner), "mlp.c_fc.bias": (inner,), "mlp.c_proj.weight": (inner, h),
                     "mlp.c_proj.bias": (h,)}
        for i in range(self.layers_count):
            shapes.update({f"{p}h.{i}.{name}": shape for name, shape in per_layer.items()})
        w = ck.load(shapes, dtype, backend, progress)
        self.wte, self.wpe = w[f"{p}wte.weight"], w[f"{p}wpe.weight"]
        self.lnf = (w[f"{p}ln_f.weight"], w[f"{p}ln_f.bias"])
        self.weights = [
            PreLNWeights(*(w[f"{p}h.{i}.{name}"] for name in per_layer)) for i in range(self.layers_count)
        ]
        self.layer = PreLNLayer(self.config)

    def new_cache(self, batch: int, max_tokens: int | None = None) -> KVCache:
        """A KV cache for ``batch`` sequences of up to ``max_tokens`` (at most, and by default, n_positions)."""
        tokens = self.max_positions if max_tokens is None else min(max_tokens, self.max_positions)
        cfg = self.config
        return KVCache(self.layers_count, batch, cfg.num_kv, tokens, cfg.head_size, cfg.dtype, self.backend)

    def forward(self, input_ids, cache: KVCache | None = None, attn_mask=None, position_ids=None):
        """Logits [B, S, vocab] for ``input_ids`` [B, S]; with a ``cache``, the tokens follow what it holds (and
        are added to it). ``attn_mask`` [B, keys] boolean (False = padding), ``position_ids`` [B, S]."""
        xp = numpy if self.backend == "numpy" else import_cupy()
        ids = xp.asarray(input_ids)
        if ids.ndim != 2 or ids.dtype.kind not in "iu" or ids.size == 0:
            raise ValueError(f"input_ids: expected a non-empty [batch, tokens] integer array; got {ids.dtype} {ids.shape}")
        b, s = ids.shape
        if int(ids.min()) < 0 or int(ids.max()) >= self.vocab:
            raise ValueError(f"input_ids: expected token ids in [0, {self.vocab}); got {int(ids.min())}..{int(ids.max())}")
        start = cache.reserve(s) if cache is not None else None
        if position_ids is None:
            first = start if start is not None else numpy.zeros(b, numpy.int64)
            position_ids = first[:, None] + numpy.arange(s)[None, :]
        positions = xp.asarray(position_ids)
        if positions.shape != (b, s) or int(positions.max()) >= self.max_positions or int(positions.min()) < 0:
            if cache is not None:
                cache.set_lengths(start)  # the step did not happen
            raise ValueError(f"position_ids: GPT-2 has {self.max_positions} positions; this call needs "
                             f"{int(positions.max()) + 1} (a prompt or generation longer than the context)")
        compute = numpy.float64 if xp is numpy else numpy.float32
        x = (self.wte[ids].astype(compute) + self.wpe[positions].astype(compute)).astype(self.config.dtype)
        for i, w in enumerate(self.weights):
            x = self.layer(x, w, cache, i, start, attn_mask, positions)
        x = ops.layer_norm(x, *self.lnf, eps=self.config.epsilon)
        return matmul(x, self.wte, True)  # the LM head is wte itself, [vocab, hidden]: [out, in]
