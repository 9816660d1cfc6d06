"""Transformer layers composed of the ops as DeepSpeed's ``DeepSpeedTransformerInference`` layer composes them,
but holding no hidden state (DeepSpeed's keeps layer ids, the token counter and the KV cache process-global): the
KV cache, the positions and the masks are the caller's.

``PostLNLayer`` is the post-LN arrangement (BERT), weights ``[out, in]`` (``transposed_mode``)::

    a = VectorMatMulOp(SoftmaxContextOp(LinearOp(x; W_qkv, b_qkv)), W_o)   # bidirectional attention
    (m, h1) = MLPGemmOp(a, x; b_o, LN_attn, W1, b1, W2)   # h1 = LN_attn(x + a + b_o), m = MLP(h1)
    y = LayerNorm(ResidualAddOp(m, x, residual_add=h1, final_bias=b2); LN_out)

``PreLNLayer`` is the pre-LN sequential arrangement (GPT-2, OPT, GPT-Neo)::

    (qkv, xn) = QKVGemmOp(x; LN1, W_qkv, b_qkv)
    a = VectorMatMulOp(SoftmaxContextOp(qkv), W_o)
    h = MLPGemmOp(a, x; b_o, LN2, W1, b1, W2)          # MLP(LN2(x + a + b_o))
    y = ResidualAddOp(h, x, a, b_o, b2)                # x + a + b_o + MLP(...) + b2

``PreLNLayer.stack`` runs the sequential arrangement for a model's stack of layers with the residual adds moved
into the norms that follow them (the norm kernel's pre-add), one kernel a layer fewer than the ops above::

    qkv = xn @ W_qkv + b_qkv                            # xn = LN1(x), from the layer before
    a = SoftmaxContextOp(qkv) @ W_o
    (xn2, z) = norm2(a + x + b_o), with z written       # z = round(x + a + b_o)
    h = MLP(xn2)
    (xn', y) = next_norm(h + z + b2), with y written    # the next layer's LN1 (the final norm after the last)

so the residual stream is rounded where Hugging Face rounds it (after the attention block, after the MLP) and a
layer hands the next both its output and that output normalised.

On the decode path (a whole model's fp16/bf16 step of up to 16 rows whose products run as in a CUDA graph:
``PreLNLayer.fuses``) the norms go into the GEMV products instead (``ops.matmul``'s ``norm=`` and ``residual=``; the
norms up to 8 rows and where the rows fit the prologue, else a norm kernel before the product), four kernels a layer
and attention's::

    qkv = LN1(x) @ W_qkv + b_qkv                        # the norm as the GEMV's prologue
    z = round(x + (SoftmaxContextOp(qkv) @ W_o + b_o))  # the residual add as its epilogue
    h = MLP-up(LN2(z))
    y = round(z + (h @ W_2 + b_2))                       # the next product normalises y

where a product cannot take its norm (its rows do not fit the prologue's shared memory) the norm runs before it,
and where one cannot take the residual the unfused form runs. The fused residual add rounds once, ``round(x + (acc +
b_o))``, where the unfused form gives ``round(x + round(acc) + b_o)``: the two paths agree to a rounding, not bit.

With ``mlp_after_attn=False`` in its config the same layer is the parallel arrangement (GPT-J, GPT-NeoX):
MLPGemmOp then normalises the layer input with LN2 (GPT-J: pass LN1's weights again) and ResidualAddOp
takes its parallel formula, so ``y = x + a + b_o + MLP(LN2(x)) + b2``. LLaMA-style layers are this class
with an RMSNorm config, gated SiLU, rotary and grouped-query heads (``models.llama``).

Tensor parallelism (``parallel``): with ``mp_size = N`` in the config and an ``all_reduce`` (a communicator's sum
over the ranks), each rank holds its heads' part of ``W_qkv`` and ``W_1`` (column-parallel) and the matching rows
of ``W_o`` and ``W_2`` (row-parallel), so ``a`` and the MLP's output are partial sums. They are all-reduced right
after ``@ W_o`` and after ``@ W_2``, before the residual add that follows, so the row-parallel biases ``b_o`` and
``b_2`` (whole on every rank) are added once, after the sum, by the norm's pre-add in ``stack``. In the op form
(``__call__``) ResidualAddOp divides the replicated terms by N and the layer's output is all-reduced instead.
Without ``all_reduce`` nothing is called: a whole model's layers are unchanged.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy

from . import ops
from .ops.gemv import GEMV_MAX_ROWS, GemvNorm
from .ops.matmul import fused_fits, fusing, graph_products, matmul
from .ops.norm import normalize
from .ops.softmax import key_mask
from .runtime.arrays import common_kind, module_of


@dataclass
class PreLNWeights:
    """One layer's weights in the config's layout (``[in, out]`` unless ``transposed_mode``)."""

    ln1_gamma: object
    ln1_beta: object
    w_qkv: object
    b_qkv: object
    w_o: object
    b_o: object
    ln2_gamma: object
    ln2_beta: object
    w1: object
    b1: object
    w2: object
    b2: object


class PreLNLayer:
    def __init__(self, config: ops.InferenceConfig, all_reduce=None):
        """``all_reduce``: the tensor-parallel sum over ranks (the module docstring), None for a whole model."""
        self.config = config
        self.all_reduce = all_reduce
        self.qkv = ops.QKVGemmOp(config)
        self.attention = ops.SoftmaxContextOp(config)
        self.out_proj = ops.VectorMatMulOp(config)
        self.mlp = ops.MLPGemmOp(config)
        self.residual = ops.ResidualAddOp(config)

    def __call__(self, x, w: PreLNWeights, cache=None, layer_id=0, start=None, attn_mask=None, position_ids=None):
        """``x`` [B, S, H] → [B, S, H]; ``cache``/``start``/``attn_mask``/``position_ids`` as SoftmaxContextOp
        takes them."""
        qkv, _ = self.qkv(x, w.w_qkv, bias=w.b_qkv, gamma=w.ln1_gamma, beta=w.ln1_beta)
        context, _, _ = self.attention(
            qkv, attn_mask=attn_mask, cache=cache, layer_id=layer_id, start=start, position_ids=position_ids
        )
        a = self.reduce(self.out_proj(context, w.w_o))
        h, _ = self.mlp(a, x, w.w1, w.w2, input_bias=w.b_o, bias=w.b1, gamma=w.ln2_gamma, beta=w.ln2_beta)
        return self.reduce(
            self.residual(h, x, add_bias=True, attention_output=a, attention_bias=w.b_o, final_bias=w.b2)
        )

    def reduce(self, x):
        """The sum of ``x`` over the tensor-parallel ranks (``x`` itself for a whole model)."""
        return x if self.all_reduce is None else self.all_reduce(x)

    def norm(self, x, gamma, beta=None, *, residual=None, bias=None):
        """The config's norm of ``x`` (with ``residual``: of ``round(x + residual [+ bias])``, returned too as
        ``(normalised, sum)``) on a model's own arrays, checked when the model was loaded."""
        cfg = self.config
        mode = cfg.norm_mode(beta is not None)
        if residual is None:
            return normalize(mode, x, gamma, beta, cfg.epsilon)
        return normalize(mode, x, gamma, beta, cfg.epsilon, residual=residual, add_bias=bias, want_sum=True)

    def norm_spec(self, gamma, beta=None) -> GemvNorm:
        """The config's norm with these weights, as a fused product takes it (``ops.matmul``'s ``norm``)."""
        cfg = self.config
        return GemvNorm(cfg.norm_mode(beta is not None), gamma, beta, cfg.epsilon)

    def fuses(self, x) -> bool:
        """Whether this step's products may take the norms and residual adds (the module docstring's decode form):
        a whole model (tensor parallelism sums between the product and the add), GPU fp16/bf16 arrays of up to
        16 rows, products that run as in a CUDA graph (``ops.matmul.graph_products``: all of them on the GEMV), and
        fusions not turned off (``ops.matmul.fused_decode``)."""
        return (
            self.all_reduce is None
            and module_of(x) is not numpy
            and x.dtype.itemsize == 2
            and x.size // x.shape[-1] <= GEMV_MAX_ROWS
            and graph_products()
            and fusing()
        )

    def normed_product(self, x, xn, w, bias, act, norm: GemvNorm):
        """``act(norm(x) @ w + bias)``: from ``xn`` (x normalised) where given, else with the norm in the GEMV's
        prologue where it fits, else after a norm kernel."""
        t = self.config.transposed_mode
        if xn is None:
            if fused_fits(_rows(x), w, t, bias, act, norm=norm):
                return matmul(x, w, t, bias, act, norm=norm)
            xn = self.norm(x, norm.gamma, norm.beta)
        return matmul(xn, w, t, bias, act)

    def attention_mask(self, attn_mask, x, keys: int):
        """A caller's ``attn_mask`` (``SoftmaxContextOp``'s: [B, key slots] boolean or additive, or [B, 1|h, S|1,
        key slots]) checked once for a stack of layers over ``x`` [B, S, H] attending ``keys`` key slots
        (``ops.softmax_context.key_count``), as ``stack`` takes it; None stays None."""
        cfg = self.config
        b, s = x.shape[0], x.shape[1]
        kind = common_kind(x=x, attn_mask=attn_mask)
        return key_mask(attn_mask, kind, cfg.dtype, b, cfg.heads // cfg.mp_size, s, keys, wider=True)

    def stack(self, x, xn, w: PreLNWeights, next_norm, cache=None, layer_id=0, start=None, attn_mask=None,
              position_ids=None, lazy_norm=False):  # fmt: skip
        """The layer as a model's stack runs it (the module docstring's second form): ``x`` the residual stream,
        ``xn`` its LN1 (None: not made; the QKV product normalises x), ``next_norm`` (gamma, beta) of the norm after
        this layer. Returns ``(y, next_norm(y))``; with ``lazy_norm`` on the decode path (``fuses``) ``(y, None)``
        where the product after the layer is to normalise y (the caller's: the next layer's ``stack``, or
        ``norm_spec`` for the LM head). The attention takes checked arguments (``SoftmaxContextOp.attend``):
        ``attn_mask`` from ``attention_mask``, ``start`` from ``cache.reserve`` or the cache's device lengths (None
        without a cache), int32 ``position_ids``."""
        cfg = self.config
        if not cfg.mlp_after_attn:
            raise ValueError("config: PreLNLayer.stack runs the sequential arrangement (mlp_after_attn=True)")
        t = cfg.transposed_mode
        fuse = self.fuses(x)
        qkv = self.normed_product(x, xn, w.w_qkv, w.b_qkv, None, self.norm_spec(w.ln1_gamma, w.ln1_beta))
        context, _, _ = self.attention.attend(qkv, cache, layer_id, start, position_ids, attn_mask)
        ln2 = self.norm_spec(w.ln2_gamma, w.ln2_beta)
        if fuse and fused_fits(_rows(context), w.w_o, t, w.b_o, residual=_rows(x)):
            z = matmul(context, w.w_o, t, w.b_o, residual=x)
            h = self.normed_product(z, None, w.w1, w.b1, cfg.mlp_act_func_type, ln2)
        else:
            a = self.reduce(matmul(context, w.w_o, t))
            xn2, z = self.norm(a, ln2.gamma, ln2.beta, residual=x, bias=w.b_o)
            h = matmul(xn2, w.w1, t, w.b1, cfg.mlp_act_func_type)
        if lazy_norm and fuse and fused_fits(_rows(h), w.w2, t, w.b2, residual=_rows(z)):
            return matmul(h, w.w2, t, w.b2, residual=z), None
        xn_next, y = self.norm(self.reduce(matmul(h, w.w2, t)), *next_norm, residual=z, bias=w.b2)
        return y, xn_next


def _rows(a):
    """``a`` as [rows, width] (a view)."""
    return a.reshape(-1, a.shape[-1])


@dataclass
class PostLNWeights:
    """One post-LN layer's weights (``[out, in]``: ``transposed_mode``)."""

    w_qkv: object
    b_qkv: object
    w_o: object
    b_o: object
    ln_attn_gamma: object
    ln_attn_beta: object
    w1: object
    b1: object
    w2: object
    b2: object
    ln_out_gamma: object
    ln_out_beta: object


class PostLNLayer:
    def __init__(self, config: ops.InferenceConfig, all_reduce=None):
        if config.pre_layer_norm or config.triangular_masking or not config.transposed_mode:
            raise ValueError(
                "config: a post-LN layer needs pre_layer_norm=False, triangular_masking=False (BERT "
                "attends both ways) and transposed_mode=True ([out, in] weights)"
            )
        self.config = config
        self.all_reduce = all_reduce  # as PreLNLayer's
        self.qkv = ops.LinearOp(config)
        self.attention = ops.SoftmaxContextOp(config)
        self.out_proj = ops.VectorMatMulOp(config)
        self.mlp = ops.MLPGemmOp(config)
        self.residual = ops.ResidualAddOp(config)

    def __call__(self, x, w: PostLNWeights, attn_mask=None):
        """``x`` [B, S, H] → [B, S, H]; ``attn_mask`` [B, S] boolean (False = padding) or None."""
        qkv = self.qkv(x, w.w_qkv, bias=w.b_qkv)
        context, _, _ = self.attention(qkv, attn_mask=attn_mask)
        a = self.reduce(self.out_proj(context, w.w_o))
        m, h1 = self.mlp(a, x, w.w1, w.w2, input_bias=w.b_o, bias=w.b1, gamma=w.ln_attn_gamma, beta=w.ln_attn_beta)
        # m is a partial sum; ResidualAddOp divides h1 + b2 by mp_size, so the sum over ranks counts them once.
        y = self.reduce(self.residual(m, x, add_bias=False, residual_add=h1, final_bias=w.b2))
        return ops.layer_norm(y, w.ln_out_gamma, w.ln_out_beta, eps=self.config.epsilon)

    reduce = PreLNLayer.reduce
