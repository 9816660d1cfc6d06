"""Rotary position embedding, as DeepSpeed-Inference's SoftmaxContextOp applies it to queries and keys (config
``rotary_dim``, ``rotate_half`` / ``rotate_every_two``, ``rope_theta``), on ``[batch, heads, tokens, head_dim]``
arrays. The GPU path of the op turns them inside ``kernels_cu/rotary_append.cu`` (``ops/rotary_append.py``).

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

from ..runtime.arrays import module_of

STYLES = ("half", "every_two")


_INV_FREQ: dict = {}


def inverse_frequencies(rotary_dim: int, theta: float, xp):
    """``theta ** (-2p / rotary_dim)`` for the ``rotary_dim / 2`` pairs: float64 NumPy, or float32 on the
    current GPU (kept per device, dims and theta: a model asks for the same one every layer and step)."""
    if xp is numpy:
        return theta ** (-numpy.arange(0, rotary_dim, 2, dtype=numpy.float64) / rotary_dim)
    key = (xp.cuda.runtime.getDevice(), rotary_dim, float(theta))
    if key not in _INV_FREQ:
        _INV_FREQ[key] = theta ** (-xp.arange(0, rotary_dim, 2, dtype=numpy.float32) / rotary_dim)
    return _INV_FREQ[key]


def rotary_angles(positions, rotary_dim: int, theta: float):
    """``[batch, tokens, rotary_dim / 2]`` angles for integer ``positions`` [batch, tokens]."""
    xp = module_of(positions)
    inv_freq = inverse_frequencies(rotary_dim, theta, xp)
    return positions.astype(inv_freq.dtype)[..., None] * inv_freq


def apply_rotary(x, positions, rotary_dim: int, theta: float, style: str):
    """``x`` [batch, heads, tokens, head_dim] turned at ``positions`` [batch, tokens] (same backend); a new
    array of ``x``'s dtype. Arguments are checked by the caller (``SoftmaxContextOp``)."""
    angle = rotary_angles(positions, rotary_dim, theta)[:, None]  # [batch, 1, tokens, rotary_dim / 2]
    xp = module_of(x)
    cos, sin = xp.cos(angle), xp.sin(angle)
    out = x.astype(angle.dtype)
    r = out[..., :rotary_dim]
    if style == "half":
        first, second = r[..., : rotary_dim // 2].copy(), r[..., rotary_dim // 2 :].copy()
        r[..., : rotary_dim // 2] = first * cos - second * sin
        r[..., rotary_dim // 2 :] = second * cos + first * sin
    else:
        first, second = r[..., 0::2].copy(), r[..., 1::2].copy()
        r[..., 0::2] = first * cos - second * sin
        r[..., 1::2] = first * sin + second * cos
    return out.astype(x.dtype)
