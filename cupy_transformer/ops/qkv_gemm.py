"""QKVGemmOp: DeepSpeed's input norm fused before the QKV projection, for pre-norm models.

``xn = LayerNorm(x; gamma, beta)`` or ``RMSNorm(x; gamma)`` (config ``norm_type``, ``epsilon``), then
``qkv = xn @ W (+ bias)``. Returns ``(qkv, xn)``. The norm is ``ops.norm``'s kernel (its rounding
decisions hold here: RMSNorm rounds like Hugging Face, not like DeepSpeed); the product and bias are
``ops.matmul``'s (the bias in the GEMM's epilogue). DeepSpeed ignores ``beta`` for RMSNorm; here a ``beta`` with
RMSNorm is an error rather than silently unused. Rows of any width (DeepSpeed: at most 16384).
"""

from __future__ import annotations

from ..runtime.arrays import common_kind, to_caller
from .base import TransformerOp
from .matmul import matmul
from .norm import normalize


class QKVGemmOp(TransformerOp):
    def forward(self, input, weight, bias=None, gamma=None, beta=None):
        """``input`` [B, S, H], ``weight`` [H, out] (``[out, H]`` transposed), ``bias`` [out] or None,
        ``gamma`` [H], ``beta`` [H] (LayerNorm; None for no shift). Returns ``(qkv [B, S, out], xn [B, S, H])``."""
        kind = common_kind(input=input, weight=weight, bias=bias, gamma=gamma, beta=beta)
        x = self.activations("input", input, kind)
        width = x.shape[-1]
        mode, g, b = self.norm_params(kind, gamma, beta, width, "input norm")
        w, out_features = self.weight("weight", weight, kind, width)
        qkv_bias = self.vector("bias", bias, kind, out_features)
        xn = normalize(mode, x, g, b, self.config.epsilon)
        qkv = matmul(xn, w, self.config.transposed_mode, qkv_bias)
        return to_caller(qkv, kind), to_caller(xn, kind)
