"""The PyTorch custom ops (cupy_transformer.interop.torch_ops) against torch's own functionals, torch.library's
opcheck, torch.compile with no graph break, CUDA graph capture (GPU), and torch staying optional."""

import contextlib
import pathlib
import subprocess
import sys

import numpy
import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from cupy_transformer.interop import torch_ops  # noqa: E402
from cupy_transformer.runtime.arrays import FLOAT_DTYPES  # noqa: E402
from tests.helpers import TOL_CHAINED, TOL_ROUNDED, rel_error  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
# torch dtype -> NumPy's, for the tolerance tables; bf16 through ml_dtypes.
DTYPES = dict(zip((torch.float16, torch.float32, torch.bfloat16), FLOAT_DTYPES))

DEVICES = [
    "cpu",
    pytest.param(
        "cuda", marks=[pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")]
    ),
]
# torch's own activations for the linear op's names; gated ones pair [up | gate] halves of the product.
ACTIVATIONS = {
    None: lambda h: h,
    "GELU": lambda h: F.gelu(h, approximate="tanh"),
    "GELU_EXACT": F.gelu,
    "ReLU": F.relu,
    "GATED_SILU": lambda h: h.chunk(2, dim=-1)[0] * F.silu(h.chunk(2, dim=-1)[1]),
    "GATED_GELU": lambda h: h.chunk(2, dim=-1)[0] * F.gelu(h.chunk(2, dim=-1)[1]),
}


def randn(rng, shape, dtype, device, scale=1.0, offset=0.0):
    values = rng.standard_normal(shape, dtype=numpy.float32) * scale + offset
    return torch.from_numpy(values).to(device=device, dtype=dtype)


def tolerance(table, dtype):
    return table[DTYPES[dtype]]


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 1000), (1, 96)])
@pytest.mark.parametrize("with_beta", [True, False], ids=["beta", "no beta"])
def test_layer_norm_matches_torch(rng, device, dtype, shape, with_beta):
    width = shape[-1]
    x = randn(rng, shape, dtype, device, scale=2.0, offset=0.5)
    gamma = randn(rng, (width,), dtype, device, scale=0.1, offset=1.0)
    beta = randn(rng, (width,), dtype, device, scale=0.1) if with_beta else None
    y = torch_ops.layer_norm(x, gamma, beta, 1e-5)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    assert rel_error(y, F.layer_norm(x, (width,), gamma, beta, 1e-5)) < tolerance(TOL_ROUNDED, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("shape", [(5, 37), (2, 3, 1000), (1, 96)])
def test_rms_norm_matches_torch(rng, device, dtype, shape):
    width = shape[-1]
    x = randn(rng, shape, dtype, device, scale=2.0, offset=0.5)
    gamma = randn(rng, (width,), dtype, device, scale=0.1, offset=1.0)
    y = torch_ops.rms_norm(x, gamma, 1e-6)
    assert y.shape == x.shape and y.dtype == dtype and y.device == x.device
    # Ours rounds the normalised row before the gamma multiply (as Hugging Face's LLaMA); torch's rounds once.
    assert rel_error(y, F.rms_norm(x, (width,), gamma, 1e-6)) < tolerance(TOL_CHAINED, dtype)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("activation", list(ACTIVATIONS))
@pytest.mark.parametrize("rows", [(1,), (3, 7)], ids=["1 row", "3x7 rows"])
@pytest.mark.parametrize("with_bias", [True, False], ids=["bias", "no bias"])
def test_linear_matches_torch(rng, device, dtype, activation, rows, with_bias):
    x = randn(rng, rows + (45,), dtype, device)
    weight = randn(rng, (38, 45), dtype, device, scale=45**-0.5)
    bias = randn(rng, (38,), dtype, device, scale=0.5) if with_bias else None
    y = torch_ops.linear(x, weight, bias, activation)
    width = 19 if activation and activation.startswith("GATED") else 38
    assert y.shape == rows + (width,) and y.dtype == dtype and y.device == x.device
    # The reference in fp32 from the same inputs: torch's low-precision CPU GEMMs are not all fp32-accumulated.
    expected = ACTIVATIONS[activation](F.linear(x.float(), weight.float(), None if bias is None else bias.float()))
    assert rel_error(y, expected) < tolerance(TOL_CHAINED, dtype)


def test_linear_accepts_torch_layouts_and_empty_inputs(rng):
    x = randn(rng, (6, 20), torch.float32, "cpu").t()  # non-contiguous: copied first
    weight = randn(rng, (4, 6), torch.float32, "cpu")
    assert rel_error(torch_ops.linear(x, weight), F.linear(x, weight)) < TOL_CHAINED[numpy.dtype(numpy.float32)]
    assert torch_ops.linear(x[:0], weight, None, "GATED_SILU").shape == (0, 2)


@pytest.mark.parametrize(
    "call, error, message",
    [
        (lambda x, w: torch_ops.linear(x, w[:, :5]), ValueError, r"weight: expected an \[out, in\] weight"),
        (lambda x, w: torch_ops.linear(x, w[:3], None, "GATED_SILU"), ValueError, "weight: a gated activation"),
        (lambda x, w: torch_ops.linear(x, w, None, "SWISH"), ValueError, "activation: expected one of GELU"),
        (lambda x, w: torch_ops.linear(x, w.half()), TypeError, "weight: expected dtype float32; got float16"),
        (lambda x, w: torch_ops.rms_norm(x.double(), w[0].double()), TypeError, "x: expected dtype float16"),
        (lambda x, w: torch_ops.layer_norm(x, w[0, :4]), ValueError, r"gamma: expected shape \(6,\)"),
        (lambda x, w: torch_ops.layer_norm(x, w[0], None, -1.0), ValueError, "eps: expected a finite number"),
        (lambda x, w: torch_ops.rms_norm(x, w[0].to("meta")), ValueError, "gamma: expected a tensor on cpu like x"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(rng, call, error, message):
    x, w = randn(rng, (2, 6), torch.float32, "cpu"), randn(rng, (4, 6), torch.float32, "cpu")
    with pytest.raises(error, match=message):
        call(x, w)


ATTENTION_SHAPES = {  # (B, h, kv, S, d): the kernels' head sizes, and one they do not take (GPU: array operations)
    "4 heads, S 37, d 64": (2, 4, 4, 37, 64),
    "8 heads on 2 kv, S 37, d 64": (2, 8, 2, 37, 64),
    "6 heads on 3 kv, S 300, d 128": (1, 6, 3, 300, 128),
    "4 heads on 2 kv, S 19, d 48": (3, 4, 2, 19, 48),
}


def attention_inputs(rng, shape, dtype, device, layout="contiguous", mask=None):
    """q [B, h, S, d], k and v [B, kv, S, d]: contiguous, or strided views of one [B, S, (h + 2 kv) d] projection
    as a model splits its heads; the key mask: None, or sequence 0 padded on the right and the others on the left
    (their first queries see no key when causal: rows of zeros, in SDPA too)."""
    b, h, kv, s, d = shape
    if layout == "contiguous":
        q, k, v = (randn(rng, (b, n, s, d), dtype, device) for n in (h, kv, kv))
    else:
        qkv = randn(rng, (b, s, (h + 2 * kv) * d), dtype, device)
        q, k, v = (t.view(b, s, -1, d).transpose(1, 2) for t in qkv.split((h * d, kv * d, kv * d), dim=-1))
    key_mask = None
    if mask == "padded":
        key_mask = torch.ones(b, s, dtype=torch.bool, device=device)
        key_mask[0, s - s // 4 :] = False
        key_mask[1:, : s // 5] = False
    return q, k, v, key_mask


def sdpa_reference(q, k, v, causal, scale, key_mask):
    """F.scaled_dot_product_attention in float64 on the CPU, the key mask (and the causal rule) as its attn_mask."""
    s = q.shape[2]
    q, k, v = (t.detach().cpu().double() for t in (q, k, v))
    keep = None if key_mask is None else key_mask.cpu()[:, None, None, :]
    if causal and keep is not None:  # SDPA takes is_causal or an attn_mask, not both
        keep = keep & torch.ones(s, s, dtype=torch.bool).tril()
    causal = causal and keep is None
    return F.scaled_dot_product_attention(q, k, v, keep, is_causal=causal, scale=scale, enable_gqa=True)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(DTYPES), ids=str)
@pytest.mark.parametrize("shape", list(ATTENTION_SHAPES.values()), ids=list(ATTENTION_SHAPES))
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "bidirectional"])
@pytest.mark.parametrize("mask", [None, "padded"], ids=["no mask", "padded"])
@pytest.mark.parametrize("layout", ["contiguous", "fused views"])
def test_attention_matches_sdpa(rng, device, dtype, shape, causal, mask, layout):
    q, k, v, key_mask = attention_inputs(rng, shape, dtype, device, layout, mask)
    scale = None if causal else 0.1  # the default 1 / sqrt(d), and a caller's
    y = torch_ops.attention(q, k, v, causal, scale, key_mask)
    b, h, _, s, d = shape
    assert y.shape == (b, h, s, d) and y.dtype == dtype and y.device == q.device
    # CPU: float64 math rounded once to the dtype. GPU: fp32 math in the array operations (fp32, d 48), or the
    # prefill kernels, which round the probabilities to 16 bits before P V.
    table = TOL_ROUNDED if device == "cpu" else TOL_CHAINED
    assert rel_error(y, sdpa_reference(q, k, v, causal, scale, key_mask)) < tolerance(table, dtype)


def test_attention_rows_with_no_key_are_zeros(rng):
    q, k, v, key_mask = attention_inputs(rng, (2, 4, 2, 10, 16), torch.float32, "cpu", mask="padded")
    y = torch_ops.attention(q, k, v, True, None, key_mask)
    assert torch.equal(y[1, :, :2], torch.zeros(4, 2, 16))  # sequence 1's first two keys are padding
    assert y[1, :, 2:].abs().min() > 0 and y[0].abs().min() > 0


def test_attention_with_no_tokens(rng):
    q, k, v, _ = attention_inputs(rng, (2, 4, 2, 0, 16), torch.float32, "cpu")
    assert torch_ops.attention(q, k, v).shape == (2, 4, 0, 16)


@pytest.mark.parametrize(
    "change, error, message",
    [
        (dict(q=lambda t: t[0]), ValueError, r"q: expected a 4-D \[batch, heads, tokens, head size\] tensor"),
        (dict(v=lambda t: t[..., 0]), ValueError, "v: expected a 4-D"),
        (
            dict(k=lambda t: t[:, :, :5], v=lambda t: t[:, :, :5]),
            ValueError,
            r"k: expected shape \[2, kv heads, 6, 16\]",
        ),
        (dict(v=lambda t: t[:1]), ValueError, r"v: expected k's shape \(2, 2, 6, 16\)"),
        (
            dict(k=lambda t: t[:, :1].expand(2, 3, 6, 16), v=lambda t: t[:, :1].expand(2, 3, 6, 16)),
            ValueError,
            "k: expected a number of kv heads that divides q's 4 heads",
        ),
        (
            dict(q=lambda t: t[..., :12], k=lambda t: t[..., :12], v=lambda t: t[..., :12]),
            ValueError,
            "q: expected a head size that is a multiple of 8 from 8 to 256",
        ),
        (
            dict(q=lambda t: t.double(), k=lambda t: t.double(), v=lambda t: t.double()),
            TypeError,
            "q: expected dtype float16, float32 or bfloat16; got torch.float64",
        ),
        (dict(v=lambda t: t.half()), TypeError, "v: expected dtype torch.float32 like q; got torch.float16"),
        (dict(k=lambda t: t.to("meta")), ValueError, "k: expected a tensor on cpu like q"),
        (dict(key_mask=lambda m: m[:, :5]), ValueError, r"key_mask: expected a boolean \[batch, keys\] = \[2, 6\]"),
        (dict(key_mask=lambda m: m.float()), ValueError, "key_mask: expected a boolean .* got torch.float32"),
        (dict(scale=float("nan")), ValueError, "scale: expected a finite number; got nan"),
    ],
)
@pytest.mark.parametrize("mode", ["eager", "fake"])
def test_attention_bad_input_is_refused_naming_the_argument(rng, change, error, message, mode):
    from torch._subclasses.fake_tensor import FakeTensorMode

    q, k, v, key_mask = attention_inputs(rng, (2, 4, 2, 6, 16), torch.float32, "cpu", mask="padded")
    args = dict(q=q, k=k, v=v, key_mask=key_mask, scale=None)
    args.update({name: f(args[name]) if callable(f) else f for name, f in change.items()})
    fake = FakeTensorMode(allow_non_fake_inputs=False) if mode == "fake" else None
    if fake is not None:  # the fake implementation, as torch.compile runs it, refuses the same
        args = {name: fake.from_tensor(t) if isinstance(t, torch.Tensor) else t for name, t in args.items()}
    with fake or contextlib.nullcontext(), pytest.raises(error, match=message):
        torch_ops.attention(args["q"], args["k"], args["v"], True, args["scale"], args["key_mask"])


def opcheck_cases(rng):
    x = randn(rng, (3, 5, 24), torch.float32, "cpu")
    gamma, beta = randn(rng, (24,), torch.float32, "cpu", 0.1, 1.0), randn(rng, (24,), torch.float32, "cpu")
    weight, bias = randn(rng, (10, 24), torch.float32, "cpu", 0.2), randn(rng, (10,), torch.float32, "cpu")
    return {
        "layer_norm": (torch_ops.layer_norm, (x, gamma, beta, 1e-5)),
        "layer_norm no beta": (torch_ops.layer_norm, (x, gamma, None, 1e-5)),
        "rms_norm": (torch_ops.rms_norm, (x, gamma, 1e-6)),
        "linear": (torch_ops.linear, (x, weight, bias, "GELU")),
        "linear gated": (torch_ops.linear, (x, weight, None, "GATED_SILU")),
        **attention_opcheck_cases(rng),
    }


def attention_opcheck_cases(rng):
    q, k, v, key_mask = attention_inputs(rng, (2, 4, 2, 9, 16), torch.float32, "cpu", "fused views", "padded")
    kv = randn(rng, (2, 4, 9, 16), torch.float32, "cpu")
    return {
        "attention": (torch_ops.attention, (q.contiguous(), kv, kv * 0.5, True, None, key_mask)),
        "attention gqa bidirectional": (
            torch_ops.attention,
            (q.contiguous(), k.contiguous(), v.contiguous(), False, 0.3),
        ),
        "attention views": (torch_ops.attention, (q, k, v, True, None, key_mask)),
    }


OPCHECK_CASES = ["layer_norm", "layer_norm no beta", "rms_norm", "linear", "linear gated"]
OPCHECK_CASES += ["attention", "attention gqa bidirectional", "attention views"]


@pytest.mark.parametrize("case", OPCHECK_CASES)
def test_opcheck(rng, case):
    op, args = opcheck_cases(rng)[case]
    torch.library.opcheck(op, args)  # schema, fake (meta) implementation, aliasing, dispatch registrations


def test_ops_are_registered_under_the_namespace():
    for name in ("layer_norm", "rms_norm", "linear", "attention"):
        assert callable(getattr(torch.ops.cupy_transformer, name))


class Block(torch.nn.Module):
    """Every op once, with torch ops between them."""

    def __init__(self, width, device, dtype):
        super().__init__()
        rng = numpy.random.default_rng(width)
        self.gamma = randn(rng, (width,), dtype, device, 0.1, 1.0)
        self.beta = randn(rng, (width,), dtype, device, 0.1)
        self.w_in = randn(rng, (4 * width, width), dtype, device, width**-0.5)
        self.b_in = randn(rng, (4 * width,), dtype, device, 0.1)
        self.w_out = randn(rng, (width, 2 * width), dtype, device, (2 * width) ** -0.5)

    def forward(self, x):
        h = torch_ops.layer_norm(x, self.gamma, self.beta, 1e-5)
        h = torch_ops.linear(h, self.w_in, self.b_in, "GATED_SILU")
        return torch_ops.rms_norm(x + torch_ops.linear(h * 0.5, self.w_out), self.gamma, 1e-6)

    def reference(self, x):
        h = F.layer_norm(x, x.shape[-1:], self.gamma, self.beta, 1e-5)
        h = ACTIVATIONS["GATED_SILU"](F.linear(h, self.w_in, self.b_in))
        return F.rms_norm(x + F.linear(h * 0.5, self.w_out), x.shape[-1:], self.gamma, 1e-6)


@pytest.mark.parametrize("device", DEVICES)
def test_compiles_with_no_graph_break(rng, device):
    # backend "aot_eager" traces the ops through their fake implementations as inductor does, in a fraction of its
    # compile time; the example test (tests/test_examples.py) compiles with inductor.
    block = Block(40, device, torch.float32)
    x = randn(rng, (2, 5, 40), torch.float32, device)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(x)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    eager = block(x)
    assert rel_error(eager, block.reference(x)) < TOL_CHAINED[numpy.dtype(numpy.float32)]
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x), eager)
    x2 = randn(rng, (2, 5, 40), torch.float32, device)  # new values, same shapes: no recompile, new results
    assert torch.equal(compiled(x2), block(x2)) and not torch.equal(compiled(x2), eager)


def test_dynamic_shapes_compile_once(rng):
    # The fake implementations compute shapes from symbolic sizes: one graph serves every token count.
    from torch._dynamo.testing import CompileCounterWithBackend

    block, counter = Block(40, "cpu", torch.float32), CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=counter, fullgraph=True, dynamic=True)
    for tokens in (3, 5, 9):
        x = randn(rng, (2, tokens, 40), torch.float32, "cpu")
        assert torch.equal(compiled(x), block(x))
    assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")
@pytest.mark.parametrize("tokens", [1, 40], ids=["decode row", "40 rows"])
def test_cuda_graph_capture_and_replay(rng, tokens):
    block = Block(256, "cuda", torch.float16)
    x = randn(rng, (1, tokens, 256), torch.float16, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture stream: per-stream workspaces exist before capture
        block(x)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y = block(x)
    for _ in range(3):
        x.copy_(randn(rng, tuple(x.shape), torch.float16, "cuda"))
        graph.replay()
        torch.cuda.synchronize()
        assert rel_error(y, block.reference(x)) < 4 * TOL_CHAINED[numpy.dtype(numpy.float16)]


class AttentionBlock(torch.nn.Module):
    """Self-attention as a model writes it: one QKV projection split into grouped heads (strided views), the
    attention op on them, the output projection."""

    def __init__(self, heads, kv_heads, head_size, device, dtype):
        super().__init__()
        rng = numpy.random.default_rng(heads * head_size)
        width = heads * head_size
        self.sizes = (heads, kv_heads, head_size)
        self.w_qkv = randn(rng, ((heads + 2 * kv_heads) * head_size, width), dtype, device, width**-0.5)
        self.w_out = randn(rng, (width, width), dtype, device, width**-0.5)

    def heads(self, x):
        h, kv, d = self.sizes
        qkv = F.linear(x, self.w_qkv.to(x.dtype))
        return (t.unflatten(-1, (-1, d)).transpose(1, 2) for t in qkv.split((h * d, kv * d, kv * d), dim=-1))

    def forward(self, x, key_mask):
        context = torch_ops.attention(*self.heads(x), True, None, key_mask)
        return F.linear(context.transpose(1, 2).flatten(2), self.w_out)

    def reference(self, x, key_mask):
        """The same block with SDPA, in x's dtype (the weights cast to it)."""
        s = x.shape[1]
        keep = key_mask[:, None, None, :] & torch.ones(s, s, dtype=torch.bool, device=x.device).tril()
        context = F.scaled_dot_product_attention(*self.heads(x), keep, enable_gqa=True)
        return F.linear(context.transpose(1, 2).flatten(2), self.w_out.to(x.dtype))


def right_padded(lengths, tokens, device):
    """A [B, tokens] key mask keeping each sequence's first ``lengths[b]`` keys (every causal query sees a key)."""
    return torch.arange(tokens, device=device)[None, :] < torch.tensor(lengths, device=device)[:, None]


@pytest.mark.parametrize("device", DEVICES)
def test_attention_compiles_with_no_graph_break(rng, device):
    block = AttentionBlock(8, 2, 32, device, torch.float32)
    x, key_mask = randn(rng, (2, 11, 256), torch.float32, device), right_padded([11, 7], 11, device)
    torch._dynamo.reset()
    explanation = torch._dynamo.explain(block)(x, key_mask)
    assert explanation.graph_break_count == 0 and explanation.graph_count == 1
    eager = block(x, key_mask)
    assert rel_error(eager, block.reference(x, key_mask)) < TOL_CHAINED[numpy.dtype(numpy.float32)]
    compiled = torch.compile(block, backend="aot_eager", fullgraph=True)
    assert torch.equal(compiled(x, key_mask), eager)
    x2 = randn(rng, (2, 11, 256), torch.float32, device)  # new values, same shapes: no recompile, new results
    assert torch.equal(compiled(x2, key_mask), block(x2, key_mask)) and not torch.equal(compiled(x2, key_mask), eager)


def test_attention_dynamic_shapes_compile_once(rng):
    from torch._dynamo.testing import CompileCounterWithBackend

    block, counter = AttentionBlock(4, 2, 16, "cpu", torch.float32), CompileCounterWithBackend("aot_eager")
    torch._dynamo.reset()
    compiled = torch.compile(block, backend=counter, fullgraph=True, dynamic=True)
    for tokens in (3, 5, 9):
        x, key_mask = randn(rng, (2, tokens, 64), torch.float32, "cpu"), right_padded([tokens, 2], tokens, "cpu")
        assert torch.equal(compiled(x, key_mask), block(x, key_mask))
    assert counter.frame_count == 1


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16], ids=str)
def test_attention_cuda_graph_capture_and_replay(rng, dtype):
    # The prefill kernel (fp16/bf16, head size 64) on strided views of a projection made inside the graph.
    block = AttentionBlock(8, 2, 64, "cuda", dtype)
    x, key_mask = randn(rng, (2, 100, 512), dtype, "cuda"), right_padded([100, 61], 100, "cuda")
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):  # warm-up on the capture stream, as the module docstring asks
        block(x, key_mask)
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, stream=stream):
        y = block(x, key_mask)
    for _ in range(3):
        x.copy_(randn(rng, tuple(x.shape), dtype, "cuda"))
        graph.replay()
        torch.cuda.synchronize()
        # Against the block in fp32 with SDPA: our fp16/bf16 projections and probabilities round, its don't.
        assert rel_error(y, block.reference(x.float(), key_mask)) < 4 * tolerance(TOL_CHAINED, dtype)


def test_importing_the_package_does_not_import_torch():
    code = (
        "import sys, cupy_transformer, cupy_transformer.interop\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import cupy_transformer.interop.torch_ops\n"
        "assert 'torch' in sys.modules and hasattr(sys.modules['torch'].ops.cupy_transformer, 'linear')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="torch without CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.float32, torch.int32, torch.int64, torch.bool, torch.bfloat16])
def test_gpu_tensors_on_torchs_stream_are_viewed_in_place(rng, dtype):
    """On torch's stream (``_torch_stream``) a CUDA tensor becomes a CuPy view made directly (no DLPack): a strided
    slice at an offset into its storage keeps its shape, strides, address and values, and writes through the view
    show in the tensor; bf16 (and anything off torch's stream) still crosses through DLPack, with the same result."""
    import cupy

    full = torch.from_numpy(rng.standard_normal((6, 40)).astype(numpy.float32) * 50).to("cuda")
    full = full > 0 if dtype == torch.bool else full.to(dtype)
    tensor = full[1:5, 3:35:2]  # strided, at an offset into its storage
    with torch_ops._torch_stream(tensor.device):
        view = torch_ops._as_backend("x", tensor)
        direct = torch_ops._cuda_view(tensor)
    assert (direct is None) == (dtype == torch.bfloat16)
    assert isinstance(view, cupy.ndarray) and view.shape == tuple(tensor.shape)
    assert view.data.ptr == tensor.data_ptr()
    assert view.strides == tuple(s * tensor.element_size() for s in tensor.stride())
    got = torch.from_dlpack(view.copy()) if dtype != torch.bfloat16 else torch.from_dlpack(view)
    assert torch.equal(got.to(tensor.dtype), tensor)
    if dtype != torch.bfloat16:
        with torch_ops._torch_stream(tensor.device):
            view[0, 0] = view[1, 1]
        torch.cuda.synchronize()
        assert tensor[0, 0] == tensor[1, 1] and full[1, 3] == full[2, 5]
    assert torch_ops._cuda_view(tensor) is None  # off torch's stream: DLPack's handshake orders the streams
