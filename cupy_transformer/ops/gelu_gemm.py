"""GELUGemmOp: DeepSpeed's MLP without a norm of its own (GPT-J reuses the attention's
normalised input): ``y = act(x @ W1 + b1) @ W2``, no output bias (ResidualAddOp adds it).

``act`` is the config's ``mlp_act_func_type`` (GELU, the tanh form, by default, as DeepSpeed always
uses); gated types take ``[up | gate]`` columns in ``W1``. ``transposed_mode`` applies to both weights
(DeepSpeed's fallback ignored it).

int8 is not supported. DeepSpeed's int8 (int8 weights with a per-group fp32 ``weight.scale``, dequantised to
fp16 before each GEMM) asks for an int8 kernel that is not exported, so it never ran a dequantising kernel.
``InferenceConfig`` takes fp16, bf16 and fp32 only and arrays carry no scales: dequantise quantised weights to
the config's dtype first.
"""

from __future__ import annotations

from ..runtime.arrays import common_kind, to_caller
from .base import TransformerOp
from .matmul import matmul


class GELUGemmOp(TransformerOp):
    def forward(self, input, weight, bias, weight_out):
        """``input`` [B, S, H], ``weight`` [H, I'] (I' = 2I gated), ``bias`` [I'] or None, ``weight_out``
        [I, H] (both ``[out, in]`` with ``transposed_mode``). Returns [B, S, H'] (H' = weight_out's out)."""
        cfg = self.config
        kind = common_kind(input=input, weight=weight, bias=bias, weight_out=weight_out)
        x = self.activations("input", input, kind)
        w1, inter, act_width = self.mlp_weight_in("weight", weight, kind, x.shape[-1])
        act = cfg.mlp_act_func_type
        b1 = self.vector("bias", bias, kind, inter)
        w2, _ = self.weight("weight_out", weight_out, kind, act_width)
        h = matmul(x, w1, cfg.transposed_mode, b1, act)
        return to_caller(matmul(h, w2, cfg.transposed_mode), kind)
