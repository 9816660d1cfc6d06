"""VectorMatMulOp: ``y = x @ W`` without bias, DeepSpeed's attention output projection.

int8 is not supported. In DeepSpeed int8 means int8 *weights* in ``[out, in]`` layout with fp16 activations,
dequantised with a per-group fp32 ``weight.scale`` (``w = scale[group] * q``) just before an fp16 GEMM, and that
path looks broken there: the int8 kernel its constructor asks for is not exported, so int8 lands in the
``torch.matmul`` fallback, which never applies the scale. Here ``InferenceConfig`` takes fp16, bf16 and fp32
only, and a NumPy/CuPy array has no ``.scale`` to carry the per-group scales: quantised weights must be
dequantised to the config's dtype before the call.
"""

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
