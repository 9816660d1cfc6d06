"""VectorMatMulOp (``ops-spec.md`` §2): ``y = x @ W`` without bias (the attention output projection)."""

from __future__ import annotations

from ..runtime.arrays import common_kind, to_caller
from .base import TransformerOp
from .matmul import matmul


class VectorMatMulOp(TransformerOp):
    def forward(self, input, weight):
        """``input`` [B, S, in], ``weight`` [in, out] (``[out, in]`` with ``transposed_mode``) → [B, S, out].

        DeepSpeed's ``async_op`` (a side stream) is not offered: run the call under a ``cupy.cuda.Stream``."""
        kind = common_kind(input=input, weight=weight)
        x = self.activations("input", input, kind)
        w, _ = self.weight("weight", weight, kind, x.shape[-1])
        return to_caller(matmul(x, w, self.config.transposed_mode), kind)
