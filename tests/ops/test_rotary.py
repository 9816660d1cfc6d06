"""ops.rotary against rotation written as complex multiplication: pair (a, b) -> (a + ib) e^(i angle), and against
Hugging Face's LLaMA (rotate-half) and GPT-J (every-two) rotary."""

import numpy
import pytest

from cupy_transformer.ops.rotary import apply_rotary
from cupy_transformer.runtime.arrays import FLOAT_DTYPES
from tests.helpers import TOL_CHAINED, random, rel_error


def turned(x, positions, rotary_dim, theta, style):
    """float64: [batch, heads, tokens, d] rotated pairwise at positions [batch, tokens]."""
    x = x.astype(numpy.float64).copy()
    m = rotary_dim // 2
    angle = positions[:, None, :, None] * theta ** (-2.0 * numpy.arange(m) / rotary_dim)
    pairs = numpy.arange(m)
    first, second = (pairs, pairs + m) if style == "half" else (2 * pairs, 2 * pairs + 1)
    z = (x[..., first] + 1j * x[..., second]) * numpy.exp(1j * angle)
    x[..., first], x[..., second] = z.real, z.imag
    return x


@pytest.mark.parametrize("dtype", FLOAT_DTYPES, ids=str)
@pytest.mark.parametrize("style", ["half", "every_two"])
@pytest.mark.parametrize("rotary_dim", [64, 24])  # the whole head, and a leading part (GPT-J's 64 of 256 style)
def test_matches_complex_rotation(rng, dtype, style, rotary_dim):
    x = random(rng, (2, 3, 5, 64), dtype)
    positions = numpy.array([[0, 1, 2, 3, 4], [7, 8, 9, 1000, 4095]])
    y = apply_rotary(x, positions, rotary_dim, 10000.0, style)
    exact = turned(x, positions, rotary_dim, 10000.0, style)
    assert y.dtype == dtype and y.shape == x.shape
    assert rel_error(y, exact) < TOL_CHAINED[numpy.dtype(dtype)]
    assert (y[..., rotary_dim:] == x[..., rotary_dim:]).all()  # dims past rotary_dim untouched
    assert rel_error(y[0, :, 0], x[0, :, 0]) < TOL_CHAINED[numpy.dtype(dtype)] / 2  # position 0 (sequence 0): no turn


@pytest.mark.gpu
@pytest.mark.parametrize("style", ["half", "every_two"])
def test_gpu_matches_complex_rotation(rng, style):
    import cupy

    x = random(rng, (2, 4, 7, 128), numpy.float16)
    positions = rng.integers(0, 8192, (2, 7))
    y = apply_rotary(cupy.asarray(x), cupy.asarray(positions), 128, 500000.0, style)
    assert rel_error(y, turned(x, positions, 128, 500000.0, style)) < TOL_CHAINED[numpy.dtype(numpy.float16)]


@pytest.mark.gpu
def test_gpu_matches_hugging_face_llama_rotary(rng):
    """rotate_half is HF LLaMA's apply_rotary_pos_emb with its rotary embedding's cos/sin."""
    import cupy
    import torch

    x = random(rng, (1, 2, 6, 64), numpy.float32)
    positions = numpy.array([[3, 4, 5, 6, 7, 8]])
    inv_freq = 1.0 / (10000.0 ** (torch.arange(0, 64, 2, dtype=torch.int64).float() / 64))
    freqs = torch.from_numpy(positions).float()[..., None] * inv_freq
    emb = torch.cat((freqs, freqs), dim=-1)
    cos, sin = emb.cos()[:, None], emb.sin()[:, None]
    t = torch.from_numpy(x)
    rotated_half = torch.cat((-t[..., 32:], t[..., :32]), dim=-1)
    ref = t * cos + rotated_half * sin
    y = apply_rotary(cupy.asarray(x), cupy.asarray(positions), 64, 10000.0, "half")
    assert rel_error(y, ref) < 1e-5


def test_rotate_half_matches_hugging_face_llama(rng):
    """HF LLaMA's apply_rotary_pos_emb with LlamaRotaryEmbedding's cos/sin (rope_theta 500000, GQA heads), at
    positions from 5 and from 300. 1e-5: HF's angles are fp32 (errors ~ position x 2^-24; 2e-6 seen)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers import LlamaConfig
    from transformers.models.llama import modeling_llama as llama

    config = LlamaConfig(hidden_size=2 * 64, num_attention_heads=2, num_key_value_heads=1, rope_theta=500000.0)
    q, k = random(rng, (2, 2, 6, 64), numpy.float32), random(rng, (2, 1, 6, 64), numpy.float32)
    positions = numpy.array([[5, 6, 7, 8, 9, 10], [300, 301, 302, 303, 304, 305]])
    cos, sin = llama.LlamaRotaryEmbedding(config=config)(torch.from_numpy(q), torch.from_numpy(positions))
    ref_q, ref_k = llama.apply_rotary_pos_emb(torch.from_numpy(q), torch.from_numpy(k), cos, sin)
    assert rel_error(apply_rotary(q, positions, 64, 500000.0, "half"), ref_q) < 1e-5
    assert rel_error(apply_rotary(k, positions, 64, 500000.0, "half"), ref_k) < 1e-5


def test_every_two_matches_hugging_face_gptj(rng):
    """HF GPT-J's rotary on the first 16 of 48 dims (its sinusoid table rows at the positions, split into sin
    and cos; apply_rotary_pos_emb on [B, S, heads, rotary_dim] and the rest passed, as GPTJAttention does), a
    left-padded sequence's positions included. 1e-6: fp32 rounding (positions < 8)."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    from transformers.models.gptj import modeling_gptj as gptj

    x = random(rng, (2, 3, 6, 48), numpy.float32)
    positions = numpy.array([[2, 3, 4, 5, 6, 7], [0, 0, 1, 2, 3, 4]])
    sincos = gptj.create_sinusoidal_positions(64, 16)[torch.from_numpy(positions)]
    sin, cos = torch.split(sincos, sincos.shape[-1] // 2, dim=-1)
    t = torch.from_numpy(x).transpose(1, 2)  # GPT-J's [B, S, heads, d]
    ref = torch.cat([gptj.apply_rotary_pos_emb(t[..., :16], sin, cos), t[..., 16:]], dim=-1).transpose(1, 2)
    y = apply_rotary(x, positions, 16, 10000.0, "every_two")
    assert rel_error(y, ref) < 1e-6
    assert (y[..., 16:] == x[..., 16:]).all()
