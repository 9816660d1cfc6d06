"""``x @ W`` for the projection ops: cuBLAS through ``cupy.matmul`` (fp32 accumulation, result rounded to
the dtype), or the NumPy reference (float64, rounded once). Weights are ``[in, out]`` (DeepSpeed's
default, GPT-2's Conv1D) or, with ``transposed_mode``, ``[out, in]`` (``nn.Linear``)."""

from __future__ import annotations

import numpy

from ..runtime.arrays import as_array


def weight_array(name: str, weight, kind: str, dtype: numpy.dtype, in_features: int, transposed: bool):
    """Check a weight against the input width it multiplies; returns (array, out_features)."""
    w = as_array(name, weight, kind, ndim=2, dtypes=dtype)
    rows, cols = w.shape
    w_in, w_out = (cols, rows) if transposed else (rows, cols)
    if w_in != in_features:
        layout = "[out, in] (transposed_mode)" if transposed else "[in, out]"
        raise ValueError(
            f"{name}: expected a {layout} weight whose in-dimension matches the input width {in_features}; "
            f"got shape {tuple(w.shape)}"
        )
    return w, w_out


def matmul(x, w, transposed: bool):
    """``x[..., in] @ W`` → ``[..., out]`` on arrays already checked."""
    out_features = w.shape[0] if transposed else w.shape[1]
    shape = tuple(x.shape[:-1]) + (out_features,)
    if isinstance(x, numpy.ndarray):
        wf = w.astype(numpy.float64)
        y = x.reshape(-1, x.shape[-1]).astype(numpy.float64) @ (wf.T if transposed else wf)
        return y.astype(x.dtype).reshape(shape)
    import cupy

    return cupy.matmul(x.reshape(-1, x.shape[-1]), w.T if transposed else w).reshape(shape)
