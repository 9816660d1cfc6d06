"""LinearOp: ``y = x @ W (+ bias)``, DeepSpeed's plain projection, which its post-LN models use for the fused QKV
projection.

``ops.matmul`` does the product, with the bias in the epilogue of cuBLASLt or (up to 16 rows, where it timed faster)
of the GEMV kernel. DeepSpeed's ``do_flash_attn`` rearrangement is not offered: its own attention never asks for it.
"""

from __future__ import annotations

from ..runtime.arrays import common_kind, to_caller
from .base import TransformerOp
from .matmul import matmul


class LinearOp(TransformerOp):
    def forward(self, input, weight, bias=None, add_bias: bool = True):
        """``input`` [B, S, in] (or [tokens, in]), ``weight`` [in, out] (``[out, in]`` with
        ``transposed_mode``), ``bias`` [out] added when given and ``add_bias``. Returns [B, S, out]."""
        kind = common_kind(input=input, weight=weight, bias=bias)
        x = self.activations("input", input, kind)
        w, out_features = self.weight("weight", weight, kind, x.shape[-1])
        b = self.vector("bias", bias, kind, out_features)
        return to_caller(matmul(x, w, self.config.transposed_mode, b if add_bias else None), kind)
