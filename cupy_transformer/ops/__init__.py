"""The ops: NumPy-style functions and DeepSpeed's op classes over CuPy, NumPy and DLPack arrays.

``create_op(name, config)`` builds an op of the registry ``TRANSFORMER_OPS`` by name.
"""

from .bias_act import bias_act
from .config import ActivationType, InferenceConfig, NormType
from .decode_state import end_step
from .embedding import embed
from .gelu_gemm import GELUGemmOp
from .linear import LinearOp
from .matmul import fused_decode, graph_choices, lm_logits
from .mlp_gemm import MLPGemmOp
from .norm import layer_norm, rms_norm
from .qkv_gemm import QKVGemmOp
from .residual_add import ResidualAddOp
from .sampling import sample_tokens
from .softmax import SoftmaxOp
from .softmax_context import SoftmaxContextOp
from .vector_matmul import VectorMatMulOp

TRANSFORMER_OPS = {
    "linear": LinearOp,
    "vector_matmul": VectorMatMulOp,
    "qkv_gemm": QKVGemmOp,
    "mlp_gemm": MLPGemmOp,
    "gelu_gemm": GELUGemmOp,
    "residual_add": ResidualAddOp,
    "softmax": SoftmaxOp,
    "softmax_context": SoftmaxContextOp,
}


def create_op(name: str, config: InferenceConfig):
    """An op of ``TRANSFORMER_OPS`` by name, built from ``config``."""
    try:
        cls = TRANSFORMER_OPS[name]
    except KeyError:
        raise ValueError(f"name: expected one of {', '.join(sorted(TRANSFORMER_OPS))}; got {name!r}") from None
    return cls(config)


__all__ = [
    "TRANSFORMER_OPS",
    "ActivationType",
    "GELUGemmOp",
    "InferenceConfig",
    "LinearOp",
    "MLPGemmOp",
    "NormType",
    "QKVGemmOp",
    "ResidualAddOp",
    "SoftmaxContextOp",
    "SoftmaxOp",
    "VectorMatMulOp",
    "bias_act",
    "create_op",
    "embed",
    "end_step",
    "fused_decode",
    "graph_choices",
    "layer_norm",
    "lm_logits",
    "rms_norm",
    "sample_tokens",
]
