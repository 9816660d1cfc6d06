"""InferenceConfig validation, the op registry, and what every op refuses alike."""

import re

import numpy
import pytest

from cupy_transformer import ops
from cupy_transformer.ops import ActivationType, InferenceConfig, NormType


def test_defaults_follow_deepspeed():
    cfg = InferenceConfig(hidden_size=768, heads=12)
    assert cfg.intermediate_size == 3072 and cfg.num_kv == 12 and cfg.head_size == 64
    assert cfg.norm_type is NormType.LayerNorm and cfg.mlp_act_func_type is ActivationType.GELU
    assert cfg.dtype == numpy.float16 and cfg.mp_size == 1 and cfg.pre_layer_norm and cfg.mlp_after_attn


def test_enums_by_name_or_value():
    cfg = InferenceConfig(hidden_size=64, heads=4, norm_type="rmsnorm", mlp_act_func_type=4, dtype="float32")
    assert cfg.norm_type is NormType.RMSNorm and cfg.mlp_act_func_type is ActivationType.GATED_SILU
    assert cfg.dtype == numpy.float32


@pytest.mark.parametrize(
    "kwargs, error, message",
    [
        ({"hidden_size": 0}, ValueError, r"hidden_size: expected a positive integer; got 0"),
        ({"heads": 5}, ValueError, r"heads: expected a divisor of hidden_size 64; got 5"),
        ({"num_kv": 3}, ValueError, r"num_kv: expected a divisor of heads 4; got 3"),
        ({"mp_size": 3}, ValueError, r"mp_size: expected a divisor of heads 4; got 3"),
        (
            {"intermediate_size": 101, "mp_size": 2, "num_kv": 2},
            ValueError,
            r"mp_size: expected a divisor of intermediate_size 101",
        ),
        ({"norm_type": "GroupNorm"}, ValueError, r"norm_type: expected one of LayerNorm, RMSNorm; got 'GroupNorm'"),
        ({"norm_type": 2}, ValueError, r"norm_type: expected one of LayerNorm, RMSNorm; got 2"),
        ({"mlp_act_func_type": 0}, ValueError, r"mlp_act_func_type: expected one of GELU, .*; got 0"),
        ({"mlp_act_func_type": "swish"}, ValueError, r"mlp_act_func_type: expected one of GELU, ReLU"),
        ({"dtype": numpy.int8}, TypeError, r"dtype: expected one of float16, float32"),
        ({"epsilon": -1.0}, ValueError, r"epsilon: expected a number >= 0"),
    ],
)
def test_bad_config(kwargs, error, message):
    with pytest.raises(error, match=message):
        InferenceConfig(**{"hidden_size": 64, "heads": 4, **kwargs})


def test_registry_creates_ops_by_name():
    cfg = InferenceConfig(hidden_size=64, heads=4)
    assert set(ops.TRANSFORMER_OPS) == {
        "linear",
        "vector_matmul",
        "qkv_gemm",
        "mlp_gemm",
        "gelu_gemm",
        "residual_add",
        "softmax",
        "softmax_context",
    }
    for name, cls in ops.TRANSFORMER_OPS.items():
        op = ops.create_op(name, cfg)
        assert isinstance(op, cls) and op.config is cfg
    with pytest.raises(ValueError, match=r"name: expected one of gelu_gemm, linear, .*; got 'softmax_ctx'"):
        ops.create_op("softmax_ctx", cfg)
    with pytest.raises(TypeError, match=r"config: expected an InferenceConfig; got dict"):
        ops.LinearOp({"hidden_size": 64})


@pytest.mark.parametrize(
    "name, first",
    [
        ("linear", "input"),
        ("vector_matmul", "input"),
        ("qkv_gemm", "input"),
        ("mlp_gemm", "residual"),
        ("gelu_gemm", "input"),
    ],
)
@pytest.mark.parametrize("shape", [(0, 64), (0, 3, 64), (2, 0, 64)], ids=str)
def test_empty_batch_is_refused(name, first, shape):
    # Named after the first activation checked (MLPGemmOp: residual; its input is unused when parallel).
    cfg = InferenceConfig(hidden_size=64, heads=4, intermediate_size=64, dtype=numpy.float32)
    x, w, v = numpy.ones(shape, numpy.float32), numpy.ones((64, 64), numpy.float32), numpy.ones(64, numpy.float32)
    args = {
        "linear": (x, w, v),
        "vector_matmul": (x, w),
        "qkv_gemm": (x, w, v, v, v),
        "mlp_gemm": (x, x, w, w, v, v, v, v),
        "gelu_gemm": (x, w, v, w),
    }[name]
    message = f"{first}: expected at least one token and a non-zero width; got shape {shape}"
    with pytest.raises(ValueError, match=re.escape(message)):
        ops.create_op(name, cfg)(*args)
