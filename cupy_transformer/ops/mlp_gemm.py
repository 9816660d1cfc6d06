"""MLPGemmOp: DeepSpeed's MLP block in one call: the norm, first GEMM, bias + activation, second GEMM.

Math, with ``act`` the config's ``mlp_act_func_type`` and ``MLP(z) = act(z @ W1 + bias) @ W2``:

- ``mlp_after_attn`` (sequential, GPT-2 / BERT / LLaMA): ``z = round(input + residual + input_bias)``
  (``input`` = attention output, ``residual`` = layer input), ``xn = norm(z)``, ``out = MLP(xn)``.
- parallel (``mlp_after_attn=False``, GPT-J / NeoX): ``xn = norm(residual)``; ``input`` is not used.

The add and the norm are one kernel (``ops.norm``'s pre-add); the products are ``ops.matmul``'s (bias and
activation in the GEMM's epilogue where it has one; gated activations always take the ``bias_act`` pass, which
pairs the two halves). Returns ``(out, residual_add)``; ``residual_add`` is what DeepSpeed returns: ``xn`` for
LayerNorm, the normalised sum ``z`` for RMSNorm (``residual`` itself when parallel).

Where DeepSpeed's behaviour looks unintended, this op does what the math means:

- Gated activations (``[up | gate]`` columns in ``W1``, ``2 * intermediate`` wide) work with LayerNorm
  too, and every activation takes the intermediate ``bias``: DeepSpeed's LayerNorm path applies bias and
  activation for GELU and ReLU alone (other types get neither), and its RMSNorm path takes no intermediate bias.
- No argument is updated in place: DeepSpeed's RMSNorm path adds ``input_bias`` into ``input`` and the
  sum into ``residual``, which then made ResidualAddOp count the attention output twice. Here
  ``residual_add`` is a new array and ``residual`` keeps the layer input, so ResidualAddOp's formula is
  right for LLaMA-style layers.
"""

from __future__ import annotations

from ..runtime.arrays import common_kind, to_caller
from .base import TransformerOp
from .matmul import matmul
from .norm import normalize


class MLPGemmOp(TransformerOp):
    def forward(self, input, residual, weight_interm, weight_out, input_bias=None, bias=None, gamma=None, beta=None):
        """``input`` [B, S, H] attention output (ignored when parallel), ``residual`` [B, S, H] layer input,
        ``weight_interm`` [H, I'] (I' = I, or 2I for gated activations), ``weight_out`` [I, H] (both
        ``[out, in]`` with ``transposed_mode``), ``input_bias`` [H] attention-output bias, ``bias`` [I']
        intermediate bias, ``gamma``/``beta`` [H] the MLP norm. Returns ``(out [B, S, H], residual_add)``."""
        cfg = self.config
        kind = common_kind(
            input=input,
            residual=residual,
            weight_interm=weight_interm,
            weight_out=weight_out,
            input_bias=input_bias,
            bias=bias,
            gamma=gamma,
            beta=beta,
        )
        r = self.activations("residual", residual, kind)
        width = r.shape[-1]
        x = self.like("input", input, kind, r) if cfg.mlp_after_attn else None
        if cfg.mlp_after_attn and x is None:
            raise ValueError("input: the attention output is needed when mlp_after_attn; got None")
        mode, g, b = self.norm_params(kind, gamma, beta, width, "MLP norm")
        in_bias = self.vector("input_bias", input_bias, kind, width)
        w1, inter, act_width = self.mlp_weight_in("weight_interm", weight_interm, kind, width)
        act = cfg.mlp_act_func_type
        inter_bias = self.vector("bias", bias, kind, inter)
        w2, out_features = self.weight("weight_out", weight_out, kind, act_width)
        if out_features != width:
            raise ValueError(f"weight_out: expected an out-dimension of the hidden width {width}; got {out_features}")

        rms = mode == "rms_norm"
        if x is not None and rms:  # the sum z is returned: written by the norm kernel
            xn, z = normalize(mode, x, g, b, cfg.epsilon, residual=r, add_bias=in_bias, want_sum=True)
        elif x is not None:  # LayerNorm returns xn: z stays in registers
            xn = z = normalize(mode, x, g, b, cfg.epsilon, residual=r, add_bias=in_bias)
        else:
            xn, z = normalize(mode, r, g, b, cfg.epsilon), r
        h = matmul(xn, w1, cfg.transposed_mode, inter_bias, act)
        out = matmul(h, w2, cfg.transposed_mode)
        residual_add = z if rms else xn
        return to_caller(out, kind), to_caller(residual_add, kind)
