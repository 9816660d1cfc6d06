"""Tensor parallelism (Megatron-style): one model over ``N`` ranks, each holding 1/N of every sharded weight.

Sharding, applied at load (``loading.Checkpoint.load``'s ``shards``: each rank reads only its slices):

- attention: the Q, K and V projections column-parallel by heads (rank r holds heads ``r h/N .. (r+1) h/N`` of
  Q and of K and V; a fused ``[Q | K | V]`` weight, GPT-2's ``c_attn``, is cut in each of its three blocks), the
  out-projection row-parallel (its input features, which are those heads);
- MLP: the up (and gate) projection column-parallel, the down projection row-parallel;
- biases of column-parallel products are cut with them; biases of row-parallel products and the norms are
  replicated (whole on every rank), and so are the position tables (GPT-2's ``wpe``, BERT's position and
  token-type tables: small);
- the token embedding table and the LM head (tied or not) vocab-parallel (``VocabSplit``, ``VocabParallel``):
  rank r holds rows ``r P .. (r + 1) P`` with ``P = ceil(V / N)``, zero rows where the vocabulary ends first
  (the last rank's share padded to P; every rank holds P rows), and the table one zero row more, which the
  lookup of an id outside the rank's rows reads. Each rank embeds its own ids (zeros for the others'), then an
  all-reduce sums them (Megatron's VocabParallelEmbedding); each rank's head gives its P columns of the logits,
  an all-gather joins them and drops the padding, so the logits come out whole and identical on every rank and
  each rank samples the same token from the same seed (nothing is broadcast). A greedy decode step
  (``generation.Decoder``) gathers no logits: inside ``VocabParallel.own_logits`` the head gives the rank's
  columns alone and ``VocabParallel.greedy_tokens`` picks the token from each rank's maximum and its id (one
  all-gather of [B, 2] values instead of [B, V]); sampling with a temperature needs whole rows, gathered.

Each layer then all-reduces (sums) twice: the out-projection's output and the down-projection's output, before
the residual add that follows, which adds the row-parallel bias once, after the sum (``layers``). The ops take
their per-rank head counts from the config's ``mp_size = N``. LLaMA's grouped-query attention needs
``num_key_value_heads`` divisible by N; otherwise loading refuses (replicating K/V heads is not done).

A communicator has ``rank``, ``size``, ``all_reduce(x)`` (the sum over ranks, written into ``x`` and returned),
``all_gather(x)`` (every rank's ``x``, stacked in rank order: a new array ``[size, *x.shape]``) and
``broadcast(x, root)``: ``NcclCommunicator`` on the GPU (NCCL through CuPy, on the current stream, so a
decode step with its all-reduces is captured as one CUDA graph) and ``SimulatedGroup`` for the NumPy path (N
ranks as N threads of one process, each with its own model holding only its shards: ``run_simulated``).
Without a communicator (or with one of size 1) a model is whole and runs as it always did.
"""

from __future__ import annotations

import contextlib
import threading
from dataclasses import dataclass

import numpy

from . import ops
from .runtime.arrays import module_of


@dataclass(frozen=True)
class Split:
    """How one tensor is cut: along ``axis``, in ``blocks`` equal blocks (3 for a fused ``[Q | K | V]``), each
    block in ``size`` equal parts; rank r holds part r of every block, the blocks in order."""

    axis: int
    blocks: int = 1

    def pieces(self, name: str, shape: tuple, rank: int, size: int) -> list[tuple]:
        """The index (a tuple of slices) of each of rank ``rank``'s pieces of a tensor ``name`` of ``shape``."""
        n = shape[self.axis]
        if n % (self.blocks * size):
            blocks = f"{self.blocks} blocks of " if self.blocks > 1 else ""
            raise ValueError(
                f"tensor {name!r}: dimension {self.axis} ({n}) does not split into {blocks}{size} equal parts "
                f"for {size} tensor-parallel ranks"
            )
        block = n // self.blocks
        part = block // size
        out = []
        for b in range(self.blocks):
            index = [slice(None)] * len(shape)
            index[self.axis] = slice(b * block + rank * part, b * block + (rank + 1) * part)
            out.append(tuple(index))
        return out

    def take(self, name: str, view, shape: tuple, rank: int, size: int, xp=numpy):
        """Rank ``rank``'s part of ``view``, a tensor ``name`` of ``shape``: an ``xp`` array, or safetensors'
        ``get_slice`` view, which reads only the slices asked for."""
        parts = [view[index] for index in self.pieces(name, shape, rank, size)]
        return parts[0] if len(parts) == 1 else xp.concatenate(parts, self.axis)


@dataclass(frozen=True)
class VocabSplit:
    """A ``[vocab, hidden]`` table cut by rows: rank r's ``VocabParallel.part`` rows from ``VocabParallel.first``,
    zero rows after the vocabulary's end (so every rank holds ``part`` rows), then ``zero_rows`` zero rows more
    (the embedding table's row for ids outside the rank's rows)."""

    zero_rows: int = 0

    def take(self, name: str, view, shape: tuple, rank: int, size: int, xp=numpy):
        """As ``Split.take``: only the rank's rows of ``view`` are read."""
        shard = VocabParallel(shape[0], rank, size)
        padding = (shard.part - shard.rows + self.zero_rows,) + tuple(shape[1:])
        if not shard.rows:  # a rank past the vocabulary's end (a tiny one): nothing to read (safetensors refuses
            return xp.zeros(padding, numpy.float32)  # an empty slice); float32 zeros, cast to the model's dtype
        rows = view[shard.first : shard.first + shard.rows]
        return xp.concatenate([rows, xp.zeros(padding, rows.dtype)]) if padding[0] else rows


class VocabParallel:
    """Rank ``rank`` of ``size``'s share of a vocabulary of ``vocab`` ids: ``part = ceil(vocab / size)`` rows of
    the table and the head, of which ``rows`` (from id ``first``) are real, the rest padding. With a
    communicator ``comm`` (the model's), ``embed`` and ``logits`` run the vocab-parallel lookup and LM head."""

    def __init__(self, vocab: int, rank: int, size: int, comm=None):
        self.vocab, self.rank, self.size, self.comm = vocab, rank, size, comm
        self.part = -(-vocab // size)
        self.first = min(rank * self.part, vocab)
        self.rows = min(self.part, vocab - self.first)  # 0 for a rank past the end of a tiny vocabulary
        self._own = False  # ``own_logits``

    def tied_head(self, table):
        """The LM head tied to this rank's embedding ``table``: its ``part`` rows, without the zero row (a view)."""
        return table[: self.part]

    def local_ids(self, ids):
        """``ids`` as rows of this rank's table: ``id - first`` for ids among its rows, else ``part`` (its zero
        row). A few elementwise operations on the [B, S] ids (NumPy or CuPy, as ``ids``): the embedding kernel
        then looks the rows up as it does for a whole table."""
        local = ids - self.first
        return module_of(ids).where((local >= 0) & (local < self.rows), local, self.part)

    def embed(self, ids, table, positions=None, position_table=None):
        """The token embeddings of ``ids`` (``ops.embed``'s arguments; ``table`` this rank's, zero row included),
        summed over the ranks: each rank looks up its own ids (zeros for the others') and rank 0 alone adds the
        positions in the same kernel. Every sum then has one non-zero token term and the position, so it
        rounds once, as the whole model's fused sum does: the whole model's values (but for the sign of a zero,
        and an fp32 or bf16 subnormal position row that the GPU kernel's -ftz flushes where the token is not
        rank 0's)."""
        local = self.local_ids(ids)
        if self.rank == 0 and positions is not None:
            x = ops.embed(local, table, positions, position_table)
        else:
            x = ops.embed(local, table)
        return self.comm.all_reduce(x)

    def rows_of(self, ids, table):
        """``table[ids]`` of the whole table from this rank's share (``table``, zero row included): each rank's
        rows, summed over the ranks (exact: one non-zero term each)."""
        return self.comm.all_reduce(table[self.local_ids(ids)])

    def logits(self, x, head):
        """The whole logits ``[..., vocab]`` from this rank's ``head`` rows [part, hidden]: its ``part`` columns
        (``ops.lm_logits``), gathered from every rank, the padding columns dropped. Identical on every rank."""
        ours = ops.lm_logits(x, head)
        if self._own:
            return ours
        gathered = self.comm.all_gather(ours)
        # [N, ..., part] to [..., N part] in one copy; the padding (the last ranks' zero rows) is at the end, dropped
        # with a second copy where there is any. Copies, not cupy.concatenate: above 8 arrays that uploads a table
        # of pointers, which a CUDA graph capture must not do.
        xp = module_of(ours)
        whole = xp.ascontiguousarray(xp.moveaxis(gathered, 0, -2)).reshape(ours.shape[:-1] + (self.size * self.part,))
        return whole if self.size * self.part == self.vocab else xp.ascontiguousarray(whole[..., : self.vocab])

    @contextlib.contextmanager
    def own_logits(self):
        """Inside, ``logits`` gives this rank's ``part`` columns [..., part] (padding included), not gathered: for
        ``greedy_tokens``, which needs no other rank's logits."""
        self._own = True
        try:
            yield
        finally:
            self._own = False

    def greedy_tokens(self, logits, tokens, seed_step):
        """The whole model's greedy tokens (``ops.sample_tokens`` at temperature 0: the first index of the maximum,
        so the smallest id among equal maxima) from this rank's columns ``logits`` [B, part] (``own_logits``),
        written into ``tokens`` (int32 [B]) identically on every rank, and returned. Each rank takes the first
        index of its real columns' maximum (``ops.sample_tokens``; the padding columns are not looked at), then
        one all-gather of every rank's (value, id) pairs [B, 2] in float64 (exact for every logit dtype and any
        id below 2^53), and each rank picks the largest value, the smallest id among equal ones: 2 values a row
        move instead of V. ``seed_step``: the sampler's (not used at temperature 0). Device work only, nothing
        read by the host, so it is captured in a decode step's CUDA graph."""
        xp = module_of(logits)
        batch = logits.shape[0]
        pairs = xp.empty((batch, 2), numpy.float64)
        if self.rows:
            local = xp.empty(batch, numpy.int32)
            ops.sample_tokens(logits[:, : self.rows], local, seed_step)
            pairs[:, 0] = logits[xp.arange(batch), local]
            pairs[:, 1] = local
            pairs[:, 1] += self.first
        else:  # a rank past the end of a tiny vocabulary: -inf never beats a real rank's value, nor its smaller id
            pairs[:, 0], pairs[:, 1] = -numpy.inf, self.vocab
        gathered = self.comm.all_gather(pairs)  # [N, B, 2], in rank order on every rank
        values, ids = gathered[..., 0], gathered[..., 1]
        tied = values == values.max(axis=0)
        tokens[...] = xp.where(tied, ids, numpy.inf).min(axis=0).astype(numpy.int32)
        return tokens


def vocab_parallel_of(comm, vocab: int) -> VocabParallel | None:
    """The model's ``VocabParallel`` for this rank of ``comm``, or None for a whole model (no communicator, or
    one rank): then the embedding and the head run exactly as they always did."""
    rank, size = rank_and_size(comm)
    return VocabParallel(vocab, rank, size, comm) if size > 1 else None


# The token embedding table (its zero row after the rank's rows) and an untied LM head, cut by vocabulary rows.
TABLE, HEAD = VocabSplit(zero_rows=1), VocabSplit()

# [in, out] weights (GPT-2's Conv1D): column-parallel cuts axis 1, row-parallel axis 0. [out, in] (nn.Linear):
# column-parallel axis 0, row-parallel axis 1. A column-parallel bias is cut on its only axis.
COLUMN_IN_OUT, ROW_IN_OUT = Split(1), Split(0)
COLUMN_OUT_IN, ROW_OUT_IN = Split(0), Split(1)
COLUMN_BIAS = Split(0)

# Per layer, by the tensor's name after the layer's prefix; tensors not named here are replicated.
GPT2_LAYER = {
    "attn.c_attn.weight": Split(1, blocks=3),
    "attn.c_attn.bias": Split(0, blocks=3),
    "attn.c_proj.weight": ROW_IN_OUT,
    "mlp.c_fc.weight": COLUMN_IN_OUT,
    "mlp.c_fc.bias": COLUMN_BIAS,
    "mlp.c_proj.weight": ROW_IN_OUT,
}
LLAMA_LAYER = {
    "self_attn.q_proj.weight": COLUMN_OUT_IN,
    "self_attn.k_proj.weight": COLUMN_OUT_IN,
    "self_attn.v_proj.weight": COLUMN_OUT_IN,
    "self_attn.o_proj.weight": ROW_OUT_IN,
    "mlp.up_proj.weight": COLUMN_OUT_IN,
    "mlp.gate_proj.weight": COLUMN_OUT_IN,
    "mlp.down_proj.weight": ROW_OUT_IN,
}
BERT_LAYER = {
    **{f"attention.self.{n}.{p}": COLUMN_OUT_IN for n in ("query", "key", "value") for p in ("weight", "bias")},
    "attention.output.dense.weight": ROW_OUT_IN,
    "intermediate.dense.weight": COLUMN_OUT_IN,
    "intermediate.dense.bias": COLUMN_BIAS,
    "output.dense.weight": ROW_OUT_IN,
}


def layer_shards(spec: dict, prefix: str, layers: int) -> dict:
    """``spec`` (a family's per-layer splits) for every layer: full tensor name -> Split, layer i's names
    ``prefix.format(i) + name``."""
    return {prefix.format(i) + name: split for i in range(layers) for name, split in spec.items()}


def rank_and_size(comm) -> tuple[int, int]:
    """``(rank, size)`` of a communicator (None: the whole model, ``(0, 1)``), checked."""
    if comm is None:
        return 0, 1
    rank, size = comm.rank, comm.size
    if not (isinstance(size, int) and size >= 1 and isinstance(rank, int) and 0 <= rank < size):
        raise ValueError(f"comm: expected 0 <= rank < size; got rank {rank!r}, size {size!r}")
    return rank, size


def all_reduce_of(comm):
    """The all-reduce a layer calls (the communicator's), or None where there is nothing to reduce (no
    communicator, or one rank): then the layers run exactly as a whole model's."""
    return comm.all_reduce if comm is not None and comm.size > 1 else None


def check_divisible(where: str, sizes: dict, size: int) -> None:
    """Each of ``sizes`` (a config field's name -> its value) must split evenly over ``size`` ranks; else a
    ValueError naming the field, its value and the rank count (before anything is read)."""
    if size == 1:
        return
    for field, value in sizes.items():
        if value % size:
            raise ValueError(
                f"{where}: {field} {value} is not divisible by the {size} tensor-parallel ranks (each rank takes "
                f"an equal share; choose a rank count that divides it)"
            )


class SimulatedGroup:
    """``size`` ranks in one process for the NumPy path: rank r's communicator is ``communicator(r)``, used from
    its own thread (``run_simulated``). A collective waits for every rank (a barrier), then each rank computes
    the same result from all ranks' arrays, summed in rank order, so every rank gets identical values as with
    NCCL. ``timeout`` (seconds) bounds a wait, so a rank that never comes fails the others instead of hanging."""

    def __init__(self, size: int, timeout: float = 120.0):
        self.size = size
        self._barrier = threading.Barrier(size, timeout=timeout)
        self._slots: list = [None] * size

    def communicator(self, rank: int) -> SimulatedCommunicator:
        return SimulatedCommunicator(self, rank)

    def abort(self) -> None:
        """Wake every rank waiting in a collective with ``threading.BrokenBarrierError`` (a rank failed)."""
        self._barrier.abort()

    def _exchange(self, rank: int, array) -> list:
        """Every rank's ``array``, once all have arrived; the caller must ``_done()`` after reading them."""
        self._slots[rank] = array
        self._barrier.wait()
        return list(self._slots)

    def _done(self) -> None:
        self._barrier.wait()  # no rank writes its array (or the next call's slot) before all have read


class SimulatedCommunicator:
    def __init__(self, group: SimulatedGroup, rank: int):
        self.group, self.rank, self.size = group, rank, group.size

    def all_reduce(self, x):
        """The sum of every rank's ``x`` (in rank order, in ``x``'s dtype as NCCL sums), written into ``x``."""
        arrays = self.group._exchange(self.rank, x)
        total = arrays[0].copy()
        for a in arrays[1:]:
            total += a
        self.group._done()
        x[...] = total
        return x

    def all_gather(self, x):
        """Every rank's ``x`` in rank order, stacked: a new array ``[size, *x.shape]``."""
        gathered = numpy.stack(self.group._exchange(self.rank, x))
        self.group._done()
        return gathered

    def broadcast(self, x, root: int = 0):
        """Rank ``root``'s ``x``, written into every rank's ``x``."""
        source = self.group._exchange(self.rank, x)[root].copy()
        self.group._done()
        x[...] = source
        return x


def run_simulated(size: int, fn, timeout: float = 120.0) -> list:
    """``fn(comm)`` on ``size`` simulated ranks, one thread each (NumPy releases the GIL in its products);
    returns each rank's result in rank order. A rank's exception stops the others (at their next collective)
    and is raised here: the first rank's own error, not the others' broken waits."""
    group = SimulatedGroup(size, timeout)
    results: list = [None] * size
    errors: list = [None] * size

    def body(rank: int) -> None:
        try:
            results[rank] = fn(group.communicator(rank))
        except BaseException as e:  # handed to the caller below
            errors[rank] = e
            group.abort()

    threads = [threading.Thread(target=body, args=(r,), name=f"rank {r}") for r in range(size)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    own = [e for e in errors if e is not None and not isinstance(e, threading.BrokenBarrierError)]
    if own or any(errors):
        raise (own or [e for e in errors if e is not None])[0]
    return results


class NcclCommunicator:
    """A rank of an NCCL communicator over ``size`` GPUs (``cupy.cuda.nccl``): every rank creates it with the
    same ``unique_id`` (``NcclCommunicator.unique_id()`` on rank 0, passed to the others) on its own GPU (the
    current device). Collectives run on CuPy's current stream, in place, on contiguous CuPy arrays, so they are
    captured into a CUDA graph with the kernels around them."""

    def __init__(self, size: int, rank: int, unique_id):
        nccl = _nccl()
        self.rank, self.size = rank, size
        self._nccl = nccl
        self._comm = nccl.NcclCommunicator(size, unique_id, rank)

    @staticmethod
    def unique_id():
        """A new rendezvous id (on rank 0; a tuple that pickles, for the other ranks)."""
        return _nccl().get_unique_id()

    def _call(self, x):
        import cupy

        if not isinstance(x, cupy.ndarray) or not x.flags.c_contiguous:
            raise TypeError(f"NCCL collectives take contiguous CuPy arrays; got {type(x).__name__}")
        types = {
            numpy.dtype(numpy.float16): self._nccl.NCCL_FLOAT16,
            numpy.dtype(numpy.float32): self._nccl.NCCL_FLOAT32,
            numpy.dtype(numpy.float64): self._nccl.NCCL_FLOAT64,
            numpy.dtype(numpy.int32): self._nccl.NCCL_INT32,
            numpy.dtype(numpy.int64): self._nccl.NCCL_INT64,
        }
        if x.dtype.name == "bfloat16":
            return self._nccl.NCCL_BFLOAT16, cupy.cuda.get_current_stream().ptr
        if x.dtype not in types:
            raise TypeError(f"NCCL collectives: dtype {x.dtype} is not supported")
        return types[x.dtype], cupy.cuda.get_current_stream().ptr

    def all_reduce(self, x):
        """The sum over ranks of ``x``, in place (``x`` returned)."""
        kind, stream = self._call(x)
        self._comm.allReduce(x.data.ptr, x.data.ptr, x.size, kind, self._nccl.NCCL_SUM, stream)
        return x

    def all_gather(self, x):
        """Every rank's ``x`` in rank order, stacked: a new array ``[size, *x.shape]`` (NCCL's allGather, on the
        current stream, so capturable as the all-reduce is)."""
        import cupy

        kind, stream = self._call(x)
        out = cupy.empty((self.size,) + x.shape, x.dtype)
        self._comm.allGather(x.data.ptr, out.data.ptr, x.size, kind, stream)
        return out

    def broadcast(self, x, root: int = 0):
        """Rank ``root``'s ``x`` into every rank's ``x``."""
        kind, stream = self._call(x)
        self._comm.bcast(x.data.ptr, x.size, kind, root, stream)
        return x

    def close(self) -> None:
        """Abort the communicator (a rank failing: the others' pending collectives return)."""
        self._comm.abort()


def _nccl():
    """``cupy.cuda.nccl``, or a RuntimeError saying how to get the library."""
    from .runtime.arrays import import_cupy

    import_cupy()
    from cupy.cuda import nccl

    if not getattr(nccl, "available", True):
        raise RuntimeError(
            "tensor parallelism on GPUs needs NCCL, which CuPy could not load: install it with the tp-cuda13 extra "
            "(`pip install cupy-transformer[cuda13,tp-cuda13]`; tp-cuda12 with cuda12), or nvidia-nccl-cu13 itself"
        )
    return nccl


class RankError(RuntimeError):
    """A rank of ``launch`` failed: ``rank`` and its exception ``error`` (the message says both)."""

    def __init__(self, rank: int, error: BaseException):
        super().__init__(f"rank {rank}: {error}")
        self.rank, self.error = rank, error


def launch(size: int, target, args: tuple = (), timeout: float = 600.0) -> list:
    """``target(comm, *args)`` in ``size`` processes, one per GPU (``multiprocessing`` spawn: a fresh interpreter
    each, CUDA initialised in none but them): rank r runs on device r with an ``NcclCommunicator`` whose unique id
    rank 0 makes and passes to the others. Returns each rank's result (it must pickle) in rank order. The first
    rank to fail stops all ranks (the others are terminated, even mid-collective) and is raised as a
    ``RankError`` holding its exception. ``timeout``: seconds to wait for the rendezvous id."""
    import multiprocessing
    import queue

    ctx = multiprocessing.get_context("spawn")
    ids, results = ctx.Queue(), ctx.Queue()
    processes = [
        ctx.Process(target=_rank_main, args=(r, size, ids, results, target, args, timeout), name=f"rank {r}")
        for r in range(size)
    ]
    for p in processes:
        p.start()
    done: dict = {}
    try:
        while len(done) < size:
            try:
                rank, ok, value = results.get(timeout=1.0)
            except queue.Empty:
                for r, p in enumerate(processes):  # a rank that died without a word (a crash, a kill)
                    if r not in done and p.exitcode is not None and results.empty():
                        raise RankError(r, RuntimeError(f"exited with status {p.exitcode}")) from None
                continue
            if not ok:
                raise RankError(rank, value)
            done[rank] = value
    finally:
        for p in processes:
            if p.is_alive() and len(done) < size:
                p.terminate()
        for p in processes:
            p.join()
    return [done[r] for r in range(size)]


def _rank_main(rank, size, ids, results, target, args, timeout) -> None:
    """One ``launch`` rank: its GPU, the rendezvous, ``target``; reports ``(rank, ok, result or exception)``."""
    try:
        from .runtime.arrays import import_cupy

        import_cupy().cuda.Device(rank).use()
        if rank == 0:
            unique_id = NcclCommunicator.unique_id()
            for _ in range(size - 1):
                ids.put(unique_id)
        else:
            unique_id = ids.get(timeout=timeout)
        value = target(NcclCommunicator(size, rank, unique_id), *args)
        results.put((rank, True, value))
    except BaseException as e:  # every failure goes to the launcher, which stops the other ranks
        try:
            import pickle

            pickle.dumps(e)
        except Exception:
            e = RuntimeError(f"{type(e).__name__}: {e}")
        results.put((rank, False, e))
