"""Our ops inside a torch module, as PyTorch custom ops: eagerly and under ``torch.compile`` (no graph break), compared
with the same module in plain torch. On the GPU where torch sees one, else on the CPU (our NumPy reference path).

A LLaMA-style MLP block: ``x + down(up * silu(gate))`` on ``rms_norm(x)``, the up and gate projections stacked in one
``nn.Linear`` whose product ``linear(..., activation="GATED_SILU")`` pairs into ``up * silu(gate)``.
"""

import torch
import torch.nn.functional as F

from cupy_transformer.interop import torch_ops  # registers torch.ops.cupy_transformer.*


class MLPBlock(torch.nn.Module):
    def __init__(self, width: int, hidden: int, eps: float = 1e-6):
        super().__init__()
        self.norm_weight = torch.nn.Parameter(1 + 0.1 * torch.randn(width))
        self.up_gate = torch.nn.Linear(width, 2 * hidden)  # rows [up | gate]
        self.down = torch.nn.Linear(hidden, width)
        self.eps = eps

    def forward(self, x):
        h = torch_ops.rms_norm(x, self.norm_weight, self.eps)
        h = torch_ops.linear(h, self.up_gate.weight, self.up_gate.bias, "GATED_SILU")
        return x + torch_ops.linear(h, self.down.weight, self.down.bias)

    def reference(self, x):
        """The same block in plain torch."""
        h = F.rms_norm(x, (x.shape[-1],), self.norm_weight, self.eps)
        up, gate = self.up_gate(h).chunk(2, dim=-1)
        return x + self.down(up * F.silu(gate))


def main(backend: str = "inductor") -> dict:
    """Runs the block eagerly and compiled with ``backend``; returns each one's largest difference from plain torch."""
    torch.manual_seed(0)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    block = MLPBlock(width=96, hidden=160).to(device)
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
