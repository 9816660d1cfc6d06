"""The one configuration every op reads from: DeepSpeed's inference config, validated on construction.

Field names follow DeepSpeed's ``DeepSpeedInferenceConfig`` where it has them; every op reads only what it
needs. Sizes are the *whole-model* sizes; with tensor parallelism (``mp_size`` = P) the
ops see per-rank shards (``heads / P`` heads, ``intermediate_size / P`` columns), as in DeepSpeed.

Dropped from DeepSpeed's choices: dtype int8 (int8 weights with per-group scales, fp16 activations; DeepSpeed's
LinearOp does not take them, and its VectorMatMulOp and GELUGemmOp ask for int8 kernels its extension does not
export, so they fall back to PyTorch), a TypeError here like any dtype but fp16, bf16 (through ml_dtypes) and
fp32; and norm type GroupNorm, which neither norm-fused op (QKVGemmOp, MLPGemmOp) implements in DeepSpeed, a
ValueError, as is either enum's UNKNOWN (0). Every norm type works with every activation:
MLPGemmOp applies the gated ones after LayerNorm too (DeepSpeed's LayerNorm MLP silently dropped their bias and
activation), so no norm and activation pair is refused.
"""

from __future__ import annotations

import dataclasses
import enum

import numpy

from ..runtime.arrays import float_dtype, positive_int


class NormType(enum.IntEnum):
    LayerNorm = 1
    RMSNorm = 3


class ActivationType(enum.IntEnum):
    """DeepSpeed's enum values, plus GELU_EXACT (the erf form BERT uses) which DeepSpeed lacks."""

    GELU = 1  # tanh approximation: GPT-2's "gelu_new", DeepSpeed's GELU
    ReLU = 2
    GATED_GELU = 3  # up * gelu_erf(gate)
    GATED_SILU = 4  # up * silu(gate)
    GELU_EXACT = 5  # 0.5 x (1 + erf(x / sqrt 2)): BERT's "gelu"

    @property
    def gated(self) -> bool:
        return self in (ActivationType.GATED_GELU, ActivationType.GATED_SILU)


def parse_enum(cls, name: str, value):
    """An enum member from itself, its name (any case) or its value; ValueError naming the field."""
    if isinstance(value, cls):
        return value
    if isinstance(value, str):
        for member in cls:
            if member.name.lower() == value.lower():
                return member
    elif isinstance(value, int) and not isinstance(value, bool) and value in set(cls):
        return cls(value)
    raise ValueError(f"{name}: expected one of {', '.join(m.name for m in cls)}; got {value!r}")


@dataclasses.dataclass
class InferenceConfig:
    hidden_size: int
    heads: int
    intermediate_size: int = -1  # -1: 4 * hidden_size
    num_kv: int = -1  # key/value heads; -1: heads (multi-head attention)
    epsilon: float = 1e-12  # DeepSpeed's layer_norm_eps default
    norm_type: NormType | str = NormType.LayerNorm
    pre_layer_norm: bool = True
    mlp_after_attn: bool = True  # False: parallel attention and MLP (GPT-J, GPT-NeoX)
    mlp_act_func_type: ActivationType | str = ActivationType.GELU
    dtype: object = numpy.float16
    transposed_mode: bool = False  # weights [out, in] (nn.Linear) instead of [in, out]
    mp_size: int = 1
    # Attention (SoftmaxContextOp):
    rotary_dim: int = -1  # leading dims of each head that rotary turns; <= 0: no rotary
    rotate_half: bool = False  # rotary pairs (p, p + rotary_dim / 2): GPT-NeoX, LLaMA
    rotate_every_two: bool = True  # rotary pairs (2p, 2p + 1): GPT-J
    rope_theta: float = 10000.0
    triangular_masking: bool = True  # causal; False: bidirectional (encoders such as BERT)
    local_attention: bool = False  # keep only the last window_size keys (GPT-Neo's local layers)
    window_size: int = 1

    def __post_init__(self):
        for name in ("hidden_size", "heads", "mp_size"):
            setattr(self, name, positive_int(name, getattr(self, name)))
        if self.intermediate_size == -1:
            self.intermediate_size = 4 * self.hidden_size
        if self.num_kv == -1:
            self.num_kv = self.heads
        for name in ("intermediate_size", "num_kv"):
            setattr(self, name, positive_int(name, getattr(self, name), alternative="-1 for the default"))
        if self.hidden_size % self.heads:
            raise ValueError(f"heads: expected a divisor of hidden_size {self.hidden_size}; got {self.heads}")
        if self.heads % self.num_kv:
            raise ValueError(f"num_kv: expected a divisor of heads {self.heads}; got {self.num_kv}")
        for name in ("heads", "num_kv", "intermediate_size"):
            size = getattr(self, name)
            if size % self.mp_size:
                raise ValueError(f"mp_size: expected a divisor of {name} {size}; got {self.mp_size}")
        if not (isinstance(self.epsilon, (int, float)) and not isinstance(self.epsilon, bool) and self.epsilon >= 0):
            raise ValueError(f"epsilon: expected a number >= 0; got {self.epsilon!r}")
        self.norm_type = parse_enum(NormType, "norm_type", self.norm_type)
        self.mlp_act_func_type = parse_enum(ActivationType, "mlp_act_func_type", self.mlp_act_func_type)
        self.dtype = float_dtype("dtype", self.dtype)
        if self.rotary_dim > 0:
            if self.rotary_dim % 2 or self.rotary_dim > self.head_size:
                raise ValueError(
                    f"rotary_dim: expected an even number up to the head size {self.head_size}; got {self.rotary_dim}"
                )
            if self.rotate_half == self.rotate_every_two:
                raise ValueError(
                    "rotate_half, rotate_every_two: set exactly one with rotary_dim > 0 (DeepSpeed "
                    f"applies both when both are set); got {self.rotate_half}, {self.rotate_every_two}"
                )
        theta = self.rope_theta
        if not (isinstance(theta, (int, float)) and not isinstance(theta, bool) and theta > 0):
            raise ValueError(f"rope_theta: expected a positive number; got {self.rope_theta!r}")
        self.window_size = positive_int("window_size", self.window_size)

    @property
    def head_size(self) -> int:
        return self.hidden_size // self.heads

    def norm_mode(self, has_shift: bool) -> str:
        """``ops.norm``'s mode for this config's norm: RMSNorm, or LayerNorm with a shift (beta) or without."""
        if self.norm_type == NormType.RMSNorm:
            return "rms_norm"
        return "layer_norm" if has_shift else "layer_norm_no_beta"

    @property
    def rotary_style(self) -> str | None:
        """``ops.rotary``'s pairing for this config, or None without rotary."""
        if self.rotary_dim <= 0:
            return None
        return "half" if self.rotate_half else "every_two"
