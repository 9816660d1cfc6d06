"""The ops: NumPy-style functions and op classes over CuPy, NumPy and DLPack arrays."""

from .norm import layer_norm, rms_norm

__all__ = ["layer_norm", "rms_norm"]
