"""Rotary position embedding (``ops-spec.md`` §5) on ``[batch, heads, tokens, head_dim]`` queries or keys.

For pair ``p < rotary_dim / 2`` the angle is ``position * rope_theta ** (-2p / rotary_dim)`` and the pair is
turned by it; dims from ``rotary_dim`` on are untouched. Two pairings:

- ``"half"`` (GPT-NeoX, LLaMA; DeepSpeed's ``rotate_half``): pair ``(p, p + rotary_dim / 2)``;
- ``"every_two"`` (GPT-J; ``rotate_every_two``): pair ``(2p, 2p + 1)``.

Positions are explicit, per sequence and token (``[batch, tokens]``), so left padding does not shift them
(DeepSpeed derives them from a token counter and gets padded batches wrong). The angle is computed in
float64 on the host for NumPy arrays and in float32 (as Hugging Face does) for CuPy arrays; the rotation in
float64 / float32, rounded once to the dtype. DeepSpeed's fp32 every-two kernel rotates the second element
with the already-rotated first (suspect): here both use the inputs.
"""

from __future__ import annotations

import numpy

from ..runtime.arrays import import_cupy

STYLES = ("half", "every_two")


def rotary_angles(positions, rotary_dim: int, theta: float):
    """``[batch, tokens, rotary_dim / 2]`` angles for integer ``positions`` [batch, tokens]."""
    xp = numpy if isinstance(positions, numpy.ndarray) else import_cupy()
    compute = numpy.float64 if xp is numpy else numpy.float32
    inv_freq = theta ** (-xp.arange(0, rotary_dim, 2, dtype=compute) / rotary_dim)
    return positions.astype(compute)[..., None] * inv_freq.astype(compute)


def apply_rotary(x, positions, rotary_dim: int, theta: float, style: str):
    """``x`` [batch, heads, tokens, head_dim] turned at ``positions`` [batch, tokens] (same backend); a new
    array of ``x``'s dtype. Arguments are checked by the caller (``SoftmaxContextOp``)."""
    angle = rotary_angles(positions, rotary_dim, theta)[:, None]  # [batch, 1, tokens, rotary_dim / 2]
    xp = numpy if isinstance(x, numpy.ndarray) else import_cupy()
    cos, sin = xp.cos(angle), xp.sin(angle)
    out = x.astype(angle.dtype)
    r = out[..., :rotary_dim]
    if style == "half":
        first, second = r[..., : rotary_dim // 2].copy(), r[..., rotary_dim // 2:].copy()
        r[..., : rotary_dim // 2] = first * cos - second * sin
        r[..., rotary_dim // 2:] = second * cos + first * sin
    else:
        first, second = r[..., 0::2].copy(), r[..., 1::2].copy()
        r[..., 0::2] = first * cos - second * sin
        r[..., 1::2] = first * sin + second * cos
    return out.astype(x.dtype)
