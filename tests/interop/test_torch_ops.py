"""The PyTorch custom ops (cupy_transformer.interop.torch_ops) against torch's own functionals, torch.library's
opcheck, torch.compile with no graph break, CUDA graph capture (GPU), and torch staying optional."""

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
        (lambda x, w: torch_ops.layer_norm(x, w[0, :4]), ValueError, r"gamma: expected shape \(6\)"),
        (lambda x, w: torch_ops.layer_norm(x, w[0], None, -1.0), ValueError, "eps: expected a finite number"),
        (lambda x, w: torch_ops.rms_norm(x, w[0].to("meta")), ValueError, "gamma: expected a tensor on cpu like x"),
    ],
)
def test_bad_input_is_refused_naming_the_argument(rng, call, error, message):
    x, w = randn(rng, (2, 6), torch.float32, "cpu"), randn(rng, (4, 6), torch.float32, "cpu")
    with pytest.raises(error, match=message):
        call(x, w)


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
    }


@pytest.mark.parametrize("case", ["layer_norm", "layer_norm no beta", "rms_norm", "linear", "linear gated"])
def test_opcheck(rng, case):
    op, args = opcheck_cases(rng)[case]
    torch.library.opcheck(op, args)  # schema, fake (meta) implementation, aliasing, dispatch registrations


def test_ops_are_registered_under_the_namespace():
    for name in ("layer_norm", "rms_norm", "linear"):
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


def test_importing_the_package_does_not_import_torch():
    code = (
        "import sys, cupy_transformer, cupy_transformer.interop\n"
        "assert 'torch' not in sys.modules, 'torch was imported'\n"
        "import cupy_transformer.interop.torch_ops\n"
        "assert 'torch' in sys.modules and hasattr(sys.modules['torch'].ops.cupy_transformer, 'linear')\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)
