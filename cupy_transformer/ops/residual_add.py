"""ResidualAddOp: DeepSpeed's residual combine that ends a layer, with its bias terms and tensor-parallel
pre-division, in one kernel pass (``kernels_cu/residual_add.cu``), fp32 math, one rounding.

With ``P = mp_size``, terms that are partial sums over tensor-parallel ranks are added as they are and
terms replicated on every rank (the residual, all-reduced outputs, biases) are divided by P, so the
caller's all-reduce (sum) of the result counts each once. By arrangement:

- pre-LN, sequential (GPT-2): ``y = hidden + (residual + attention_output + attention_bias + final_bias) / P``.
  DeepSpeed, given neither bias, computes this without them (rounding ``residual + attention_output`` to the
  dtype first); for LLaMA-style layers it then adds the attention output twice, since its RMSNorm MLPGemmOp
  has already added it into ``residual``. Ours does not, so the formula is right for those layers too.
- post-LN (BERT): ``y = hidden + (residual_add + final_bias) / P``, ``residual_add`` (MLPGemmOp's ``xn``)
  replacing ``residual`` when given; the attention terms are already inside it. DeepSpeed does not
  divide by P here, so the all-reduce would count the replicated terms P times: we divide.
- parallel (GPT-J / NeoX): ``y = hidden + attention_output + (residual + final_bias + attention_bias) / P``
  (the attention output is a partial sum there).

``attention_bias`` counts only when ``add_bias`` is true (DeepSpeed ignores ``add_bias`` in the pre-LN
case; its callers pass ``add_bias = attention_bias is not None``, which is the same). The result is a new
array unless ``out`` names one (``out=residual`` gives DeepSpeed's in-place update, explicitly).
"""

from __future__ import annotations

import numpy

from ..runtime.arrays import check_no_overlap, common_kind, deliver, empty_like_kind, module_of, to_caller
from ..runtime.kernels import (
    CTYPES,
    KernelFamily,
    access_width,
    ctype_of,
    elementwise_grid,
    run_variants,
    vector_count,
    whole_rows,
)
from .base import TransformerOp


def _name(dtype: numpy.dtype, vec: int, whole: str) -> str:
    return f"ct::residual_combine<{ctype_of(dtype)}, {vec}, {whole}>"


_KERNELS = KernelFamily("residual_add.cu", [_name(d, v, w) for d in CTYPES for v, w in run_variants(d)])

# The kernel's term slots, in its parameter order: partial sums, replicated rows, biases.
_SLOTS = ("p0", "p1", "r0", "r1", "b0", "b1")


def residual_add_reference(partial, replicated, biases, mp_size: int, dtype) -> numpy.ndarray:
    """``sum(partial) + (sum(replicated) + sum(biases)) / mp_size`` in float64, rounded once."""
    total = sum(p.astype(numpy.float64) for p in partial)
    shared = sum(t.astype(numpy.float64) for t in list(replicated) + list(biases))
    return (total + (shared / mp_size if len(replicated) + len(biases) else 0)).astype(dtype)


def combine(partial: list, replicated: list, biases: list, mp_size: int, out=None):
    """The combine on arrays already checked: 1-2 partial row tensors, 0-2 replicated, 0-2 biases."""
    first = partial[0]
    if module_of(first) is numpy:
        return deliver(residual_add_reference(partial, replicated, biases, mp_size, first.dtype), out)
    if out is None:
        out = empty_like_kind("cupy", tuple(first.shape), first.dtype)
    width = first.shape[-1]
    rows = first.size // width
    vec = access_width(first.dtype, width, *partial, *replicated, *biases, out, any_width=True)
    vectors, tail = divmod(rows * width, vec)
    # Absent terms get a placeholder and a cleared bit in `present` (p0 is always there).
    slots = [*partial, None][:2] + [*replicated, None, None][:2] + [*biases, None, None][:2]
    present = sum(1 << (i - 1) for i, a in enumerate(slots) if i and a is not None)
    terms = {name: first if a is None else a for name, a in zip(_SLOTS, slots)}
    _KERNELS.launch(
        _name(first.dtype, vec, whole_rows(width, vec)),
        elementwise_grid(vectors),
        (256,),
        **terms,
        y=out,
        vectors=vector_count(vectors),
        tail=tail,
        width=width,
        inv_p=1.0 / mp_size,
        present=present,
    )
    return out


class ResidualAddOp(TransformerOp):
    def forward(
        self,
        hidden_state,
        residual,
        add_bias: bool,
        attention_output=None,
        residual_add=None,
        attention_bias=None,
        final_bias=None,
        *,
        out=None,
    ):
        """``hidden_state`` [B, S, H] MLP output, ``residual`` [B, S, H] layer input, ``attention_output``
        [B, S, H], ``residual_add`` [B, S, H] (post-LN: MLPGemmOp's normalised sum), ``attention_bias`` and
        ``final_bias`` [H]. Returns the new residual stream [B, S, H]."""
        cfg = self.config
        kind = common_kind(
            hidden_state=hidden_state,
            residual=residual,
            attention_output=attention_output,
            residual_add=residual_add,
            attention_bias=attention_bias,
            final_bias=final_bias,
            out=out,
        )
        h = self.activations("hidden_state", hidden_state, kind)
        width = h.shape[-1]
        r = self.like("residual", residual, kind, h)
        a = self.like("attention_output", attention_output, kind, h)
        r_add = self.like("residual_add", residual_add, kind, h)
        a_bias = self.vector("attention_bias", attention_bias, kind, width) if add_bias else None
        f_bias = self.vector("final_bias", final_bias, kind, width)
        if r is None:
            raise ValueError("residual: the layer input is needed; got None")
        post_ln = cfg.mlp_after_attn and not cfg.pre_layer_norm
        if a is None and not post_ln:
            raise ValueError("attention_output: needed for pre-LN and parallel layers; got None")
        if post_ln:
            partial, replicated = [h], [r_add if r_add is not None else r]
            biases = [f_bias]
        elif cfg.mlp_after_attn:
            partial, replicated, biases = [h], [r, a], [a_bias, f_bias]
        else:
            partial, replicated, biases = [h, a], [r], [f_bias, a_bias]
        biases = [b for b in biases if b is not None]
        if out is not None:
            out = self.like("out", out, kind, h)
            # In place over residual (or another row input) is fine; over a bias vector it is not.
            check_no_overlap("out", out, **{f"bias {i}": b for i, b in enumerate(biases)})
        return to_caller(combine(partial, replicated, biases, cfg.mp_size, out), kind)
