"""Token embeddings in one kernel (``kernels_cu/embedding.cu``): the rows of an embedding table for token ids, plus
the rows of a position table for their positions where the model has one (GPT-2's ``wte[ids] + wpe[positions]``;
LLaMA's ``embed_tokens[ids]``).

``out[b, s] = round(float(table[ids[b, s]]) + float(position_table[positions[b, s]]))`` in the table's dtype: on
the GPU an fp32 sum rounded once, on the NumPy path (``embedding_reference``) a float64 sum rounded once. The two
agree exactly: the sum of two values of p significant bits, rounded to q >= 2p + 2 bits and then to p, is the exact
sum rounded to p (fp16 and bf16 through fp32, fp32 through float64), except where -ftz flushes an fp32 or bf16
subnormal on the GPU. Without positions the rows are copied as they are.

Ids and positions are the caller's to check (below the tables' lengths; the models check them once a step): the
kernel reads what they index. Any integer dtype is taken; int32 and int64 C-contiguous arrays are read as they are,
others are copied to int64 first. One pass over the output, 16-byte accesses where the hidden size is whole vectors
(8 fp16 / bf16 or 4 fp32 elements) and every row is 16-byte aligned, one element an access otherwise; a grid-stride
loop of 256-thread blocks, enough to fill the GPU.
"""

from __future__ import annotations

import numpy

from ..runtime.arrays import (
    as_array,
    backend_of,
    check_no_overlap,
    common_kind,
    deliver,
    from_dlpack,
    import_cupy,
    kind_of,
    module_of,
    to_caller,
)
from ..runtime.kernels import CTYPES, KernelFamily, access_width, ctype_of, elementwise_grid, vector_count, vector_width

INDEX_DTYPES = (numpy.dtype(numpy.int32), numpy.dtype(numpy.int64))


def _name(dtype, vec: int) -> str:
    return f"ct::embed_tokens<{ctype_of(dtype)}, {vec}>"


_KERNELS = KernelFamily("embedding.cu", [_name(d, v) for d in CTYPES for v in (vector_width(d), 1)], programmatic=True)


def embedding_reference(ids, table, positions=None, position_table=None) -> numpy.ndarray:
    """``table[ids]``, or ``table[ids] + position_table[positions]`` summed in float64 and rounded once to the
    table's dtype (NumPy arrays)."""
    if positions is None:
        return table[ids]
    return (table[ids].astype(numpy.float64) + position_table[positions].astype(numpy.float64)).astype(table.dtype)


def _indices(name: str, value, kind: str, shape):
    """``value`` (ids or positions) as a C-contiguous int32 or int64 array of the backend for ``kind``: another
    integer dtype is copied to int64 first, a strided int32 / int64 view to a contiguous one; then ``as_array``'s
    checks."""
    array = from_dlpack(name, value) if kind_of(name, value) in ("torch", "dlpack") else value
    if backend_of(kind_of(name, array)) == backend_of(kind) and array.dtype.kind in "iu":
        xp = module_of(array)
        here = xp is numpy or array.data.device_id == xp.cuda.runtime.getDevice()  # else as_array says where
        if here and (array.dtype not in INDEX_DTYPES or not array.flags.c_contiguous):
            array = xp.ascontiguousarray(array, array.dtype if array.dtype in INDEX_DTYPES else numpy.int64)
    return as_array(name, array, kind, dtypes=INDEX_DTYPES, shape=shape)


def embed(ids, table, positions=None, position_table=None, out=None):
    """The embeddings [B, S, H] of token ids [B, S] from ``table`` [V, H] (fp16, bf16 or fp32), plus the rows of
    ``position_table`` [P, H] (the table's dtype) for ``positions`` [B, S] where both are given, as the module
    docstring says; into ``out`` [B, S, H] (the table's dtype, not overlapping the inputs) where given. CuPy (or
    DLPack producers such as torch tensors) runs the kernel; NumPy runs ``embedding_reference``."""
    kind = common_kind(ids=ids, table=table, positions=positions, position_table=position_table, out=out)
    if (positions is None) != (position_table is None):
        given, missing = ("positions", "position_table") if position_table is None else ("position_table", "positions")
        raise ValueError(f"{missing}: needed with {given} (both or neither); got None")
    table = as_array("table", table, kind, ndim=2)
    h = table.shape[1]
    ids = _indices("ids", ids, kind, (-1, -1))
    b, s = ids.shape
    if positions is not None:
        positions = _indices("positions", positions, kind, (b, s))
        position_table = as_array("position_table", position_table, kind, dtypes=table.dtype, shape=(-1, h))
    if out is not None:
        out = as_array("out", out, kind, dtypes=table.dtype, shape=(b, s, h))
        check_no_overlap("out", out, ids=ids, table=table, positions=positions, position_table=position_table)
    if module_of(table) is numpy:
        return deliver(embedding_reference(ids, table, positions, position_table), out)
    if out is None:
        out = import_cupy().empty((b, s, h), table.dtype)
    if b * s and h:
        vec = access_width(table.dtype, h, table, position_table, out)
        vectors = b * s * h // vec
        position_bytes = 0 if positions is None else positions.itemsize
        if positions is None:  # placeholders, unread
            positions, position_table = ids, table
        _KERNELS.launch(
            _name(table.dtype, vec),
            elementwise_grid(vectors),
            (256,),
            ids=ids,
            id_bytes=ids.itemsize,
            table=table,
            positions=positions,
            position_bytes=position_bytes,
            position_table=position_table,
            out=out,
            width=h // vec,
            vectors=vector_count(vectors),
        )
    return to_caller(out, kind)
