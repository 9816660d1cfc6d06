"""BERT (``BertModel`` checkpoints, e.g. sentence-transformers' all-MiniLM-L6-v2) on the ops.

Embeddings ``LN(word[ids] + position[0..S) + token_type[types])``, ``num_hidden_layers`` post-LN layers
(``layers.PostLNLayer``: bidirectional attention with a padding mask; nn.Linear weights ``[out, in]``, the
Q, K and V projections fused into one ``[3H, H]`` weight at load time), and for sentence embeddings
sentence-transformers' mean pooling over the real tokens followed by L2 normalisation.
"""

from __future__ import annotations

import numpy

from .. import ops
from ..layers import PostLNLayer, PostLNWeights
from ..runtime.arrays import array_module, resolve_backend
from .base import check_ids, extremes, open_checkpoint, token_ids

ACTIVATIONS = {"gelu": "GELU_EXACT", "gelu_new": "GELU", "gelu_pytorch_tanh": "GELU", "relu": "ReLU"}


class BERT:
    model_type = "bert"

    def __init__(self, checkpoint, dtype=numpy.float16, backend: str | None = None, progress=None):
        backend = resolve_backend("backend", backend)  # None: the GPU where one is usable, else NumPy
        ck = open_checkpoint(checkpoint, self.model_type)
        c = ck.config
        act = c.get("hidden_act", "gelu")
        if act not in ACTIVATIONS:
            raise ValueError(f"{ck.folder}/config.json: hidden_act {act!r} is not one of {sorted(ACTIVATIONS)}")
        h, inner, layers = ck.require("hidden_size"), ck.require("intermediate_size"), ck.require("num_hidden_layers")
        self.vocab, self.max_positions = ck.require("vocab_size"), ck.require("max_position_embeddings")
        self.backend = backend
        self.pad_id = c.get("pad_token_id", 0)
        self.config = ops.InferenceConfig(
            hidden_size=h,
            heads=ck.require("num_attention_heads"),
            intermediate_size=inner,
            epsilon=c.get("layer_norm_eps", 1e-12),
            pre_layer_norm=False,
            mlp_act_func_type=ACTIVATIONS[act],
            dtype=dtype,
            transposed_mode=True,
            triangular_masking=False,
        )
        p = "bert." if "bert.embeddings.word_embeddings.weight" in ck.names else ""
        e = f"{p}embeddings."
        shapes = {
            f"{e}word_embeddings.weight": (self.vocab, h),
            f"{e}position_embeddings.weight": (self.max_positions, h),
            f"{e}token_type_embeddings.weight": (c.get("type_vocab_size", 2), h),
            f"{e}LayerNorm.weight": (h,),
            f"{e}LayerNorm.bias": (h,),
        }
        per_layer = {
            "attention.self.query.weight": (h, h),
            "attention.self.key.weight": (h, h),
            "attention.self.value.weight": (h, h),
            "attention.self.query.bias": (h,),
            "attention.self.key.bias": (h,),
            "attention.self.value.bias": (h,),
            "attention.output.dense.weight": (h, h),
            "attention.output.dense.bias": (h,),
            "attention.output.LayerNorm.weight": (h,),
            "attention.output.LayerNorm.bias": (h,),
            "intermediate.dense.weight": (inner, h),
            "intermediate.dense.bias": (inner,),
            "output.dense.weight": (h, inner),
            "output.dense.bias": (h,),
            "output.LayerNorm.weight": (h,),
            "output.LayerNorm.bias": (h,),
        }
        for i in range(layers):
            shapes.update({f"{p}encoder.layer.{i}.{name}": shape for name, shape in per_layer.items()})
        w = ck.load(shapes, dtype, backend, progress)
        xp = array_module(backend)
        self.word, self.position, self.token_type = (
            w[f"{e}{n}_embeddings.weight"] for n in ("word", "position", "token_type")
        )
        self.embedding_norm = (w[f"{e}LayerNorm.weight"], w[f"{e}LayerNorm.bias"])
        self.weights = []
        for i in range(layers):
            t = {name: w.pop(f"{p}encoder.layer.{i}.{name}") for name in per_layer}
            qkv = [f"attention.self.{n}" for n in ("query", "key", "value")]
            self.weights.append(
                PostLNWeights(
                    w_qkv=xp.concatenate([t[n + ".weight"] for n in qkv]),
                    b_qkv=xp.concatenate([t[n + ".bias"] for n in qkv]),
                    w_o=t["attention.output.dense.weight"],
                    b_o=t["attention.output.dense.bias"],
                    ln_attn_gamma=t["attention.output.LayerNorm.weight"],
                    ln_attn_beta=t["attention.output.LayerNorm.bias"],
                    w1=t["intermediate.dense.weight"],
                    b1=t["intermediate.dense.bias"],
                    w2=t["output.dense.weight"],
                    b2=t["output.dense.bias"],
                    ln_out_gamma=t["output.LayerNorm.weight"],
                    ln_out_beta=t["output.LayerNorm.bias"],
                )
            )
        self.layer = PostLNLayer(self.config)

    def forward(self, input_ids, attention_mask=None, token_type_ids=None):
        """The last hidden states [B, S, H] for ``input_ids`` [B, S] (right-padded), ``attention_mask`` [B, S]
        (1 or True = a real token), ``token_type_ids`` [B, S] (default 0)."""
        xp = array_module(self.backend)
        ids = token_ids(xp, input_ids)
        check_ids(*extremes(xp, ids), self.vocab)
        b, s = ids.shape
        if s > self.max_positions:
            raise ValueError(f"input_ids: {s} tokens exceed the model's {self.max_positions} positions")
        keep = None
        if attention_mask is not None:
            keep = xp.asarray(attention_mask)
            if keep.shape != (b, s):
                raise ValueError(f"attention_mask: expected shape {(b, s)}; got {keep.shape}")
            keep = keep.astype(bool)
        types = xp.zeros((b, s), numpy.int64) if token_type_ids is None else xp.asarray(token_type_ids)
        compute = numpy.float64 if xp is numpy else numpy.float32
        x = (
            self.word[ids].astype(compute)
            + self.position[xp.arange(s)].astype(compute)
            + self.token_type[types].astype(compute)
        ).astype(self.config.dtype)
        x = ops.layer_norm(x, *self.embedding_norm, eps=self.config.epsilon)
        for w in self.weights:
            x = self.layer(x, w, attn_mask=keep)
        return x

    def embed(self, input_ids, attention_mask=None):
        """Sentence embeddings [B, H] (float32): the mean of the real tokens' last hidden states, L2-normalised
        (sentence-transformers' Pooling(mean) + Normalize)."""
        xp = array_module(self.backend)
        hidden = self.forward(input_ids, attention_mask).astype(numpy.float32)
        if attention_mask is None:
            mask = xp.ones(hidden.shape[:2], numpy.float32)
        else:
            mask = xp.asarray(attention_mask, numpy.float32)
        pooled = (hidden * mask[..., None]).sum(1) / xp.maximum(mask.sum(1, keepdims=True), 1e-9)
        return pooled / xp.maximum(xp.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)
