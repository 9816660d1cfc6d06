"""Our ops inside a torch module, as PyTorch custom ops: eagerly and under ``torch.compile`` (no graph break), compared
with the same module in plain torch. On the GPU where torch sees one, else on the CPU (our NumPy reference path).

A LLaMA-style block without rotary: grouped-query self-attention, ``x + o(attention(q, k, v))`` on ``rms_norm(x)``
with q, k and v views of one QKV projection; then the MLP, ``x + down(up * silu(gate))`` on ``rms_norm(x)``, the up and
gate projections stacked in one ``nn.Linear`` whose product ``linear(..., activation="GATED_SILU")`` pairs into
``up * silu(gate)``.
"""

import torch
import torch.nn.functional as F

from cupy_transformer.interop import torch_ops  # registers torch.ops.cupy_transformer.*


class Block(torch.nn.Module):
    def __init__(self, width: int, hidden: int, heads: int, kv_heads: int, eps: float = 1e-6):
        super().__init__()
        self.head_size = width // heads
        self.split = (width, kv_heads * self.head_size, kv_heads * self.head_size)  # rows [q | k | v]
        self.attention_norm = torch.nn.Parameter(1 + 0.1 * torch.randn(width))
        self.qkv = torch.nn.Linear(width, sum(self.split), bias=False)
        self.o = torch.nn.Linear(width, width, bias=False)
        self.mlp_norm = torch.nn.Parameter(1 + 0.1 * torch.randn(width))
        self.up_gate = torch.nn.Linear(width, 2 * hidden)  # rows [up | gate]
        self.down = torch.nn.Linear(hidden, width)
        self.eps = eps

    def heads(self, h):
        """[B, S, width] -> q [B, heads, S, d], k and v [B, kv heads, S, d]: views, as SDPA takes them."""
        return (t.unflatten(-1, (-1, self.head_size)).transpose(1, 2) for t in h.split(self.split, dim=-1))

    def forward(self, x):
        h = torch_ops.rms_norm(x, self.attention_norm, self.eps)
        q, k, v = self.heads(torch_ops.linear(h, self.qkv.weight))
        x = x + torch_ops.linear(torch_ops.attention(q, k, v, causal=True).transpose(1, 2).flatten(2), self.o.weight)
        h = torch_ops.rms_norm(x, self.mlp_norm, self.eps)
        h = torch_ops.linear(h, self.up_gate.weight, self.up_gate.bias, "GATED_SILU")
        return x + torch_ops.linear(h, self.down.weight, self.down.bias)

    def reference(self, x):
        """The same block in plain torch."""
        q, k, v = self.heads(self.qkv(F.rms_norm(x, (x.shape[-1],), self.attention_norm, self.eps)))
        x = x + self.o(
            F.scaled_dot_product_attention(q, k, v, is_causal=True, enable_gqa=True).transpose(1, 2).flatten(2)
        )
        up, gate = self.up_gate(F.rms_norm(x, (x.shape[-1],), self.mlp_norm, self.eps)).chunk(2, dim=-1)
        return x + self.down(up * F.silu(gate))


def main(backend: str = "inductor") -> dict:
    """Runs the block eagerly and compiled with ``backend``; returns each one's largest difference from plain torch."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    block = Block(width=96, hidden=160, heads=6, kv_heads=2).to(device)
    x = torch.randn(2, 7, 96, device=device)
    with torch.no_grad():  # inference only: the custom ops have no backward
        expected = block.reference(x)
        explanation = torch._dynamo.explain(block)(x)
        results = {"eager": block(x), f"compiled ({backend})": torch.compile(block, backend=backend)(x)}
    print(f"on {device}: {explanation.graph_count} graph(s), {explanation.graph_break_count} graph break(s)")
    differences = {name: (y - expected).abs().max().item() for name, y in results.items()}
    for name, difference in differences.items():
        print(f"{name:>20}: largest difference from plain torch {difference:.1e}")
    return differences


if __name__ == "__main__":
    main()
