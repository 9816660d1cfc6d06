"""What the DeepSpeed-style op classes share: the config, calling, and the checks of their arguments."""

from __future__ import annotations

from ..runtime.arrays import as_array
from .config import InferenceConfig, NormType
from .matmul import weight_array


class TransformerOp:
    """An op built from an ``InferenceConfig`` and called like a function (``op(...)`` = ``op.forward(...)``).

    Inputs are NumPy arrays (the NumPy reference runs), CuPy arrays, or CUDA tensors through DLPack;
    every array must have ``config.dtype``. Results are fresh arrays in the caller's kind, never views
    of a shared workspace.
    """

    def __init__(self, config: InferenceConfig):
        if not isinstance(config, InferenceConfig):
            raise TypeError(f"config: expected an InferenceConfig; got {type(config).__name__}")
        self.config = config

    def __call__(self, *args, **kwargs):
        return self.forward(*args, **kwargs)

    def activations(self, name: str, value, kind: str):
        """A [batch, tokens, width] (or [tokens, width]) activation tensor with at least one row."""
        x = as_array(name, value, kind, ndim=(2, 3), dtypes=self.config.dtype)
        if x.size == 0:
            raise ValueError(f"{name}: expected at least one token and a non-zero width; got shape {tuple(x.shape)}")
        return x

    def like(self, name: str, value, kind: str, x):
        """An activation tensor of exactly ``x``'s shape."""
        if value is None:
            return None
        return as_array(name, value, kind, dtypes=self.config.dtype, shape=tuple(x.shape))

    def vector(self, name: str, value, kind: str, width: int):
        """A per-column vector (bias, gamma, beta) of ``width`` elements, or None."""
        if value is None:
            return None
        return as_array(name, value, kind, dtypes=self.config.dtype, shape=(width,))

    def weight(self, name: str, value, kind: str, in_features: int):
        """A weight in the config's layout whose in-dimension is ``in_features``; returns (array, out)."""
        return weight_array(name, value, kind, self.config.dtype, in_features, self.config.transposed_mode)

    def norm_params(self, kind: str, gamma, beta, width: int, norm: str):
        """The config's norm for rows of ``width``: returns (``ops.norm`` mode, gamma, beta). ``norm`` names the
        norm in errors. RMSNorm has no shift: a ``beta`` is an error rather than silently unused."""
        if gamma is None:
            raise ValueError(f"gamma: the {norm} needs its scale vector; got None")
        rms = self.config.norm_type == NormType.RMSNorm
        if rms and beta is not None:
            raise ValueError("beta: RMSNorm has no shift; pass None")
        g, b = self.vector("gamma", gamma, kind, width), self.vector("beta", beta, kind, width)
        return self.config.norm_mode(b is not None), g, b

    def mlp_weight_in(self, name: str, value, kind: str, in_features: int):
        """The MLP's first weight: returns (array, its out width, the width after the activation). Gated
        activations take ``[up | gate]`` columns, so the out width must be even and the result is half."""
        w, out_features = self.weight(name, value, kind, in_features)
        if not self.config.mlp_act_func_type.gated:
            return w, out_features, out_features
        if out_features % 2:
            raise ValueError(f"{name}: a gated activation needs [up | gate] columns, an even count; got {out_features}")
        return w, out_features, out_features // 2
