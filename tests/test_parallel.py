"""Tensor parallelism on the NumPy path: N simulated ranks (one thread and one model each, each model loaded with
only its shards) against the whole model, for GPT-2, LLaMA (grouped-query heads; tied and untied heads) and BERT:
logits or hidden states within 1e-5 relative (fp32: the ranks' partial sums add in another order), identical
greedy tokens over 16 decode steps through ``generation.Decoder``, every rank's sharded weight 1/N of the whole
(the embedding table and the head: ceil(V / N) rows, vocabularies that N does not divide included), the loading
reading only slices; and the refusals."""

import contextlib
import threading

import numpy
import pytest
from safetensors.numpy import load_file

from cupy_transformer import cli, loading, ops, parallel
from cupy_transformer.generation import Decoder, Sampling
from cupy_transformer.models import BERT, GPT2, LLaMA
from cupy_transformer.parallel import Split, VocabParallel, VocabSplit, run_simulated
from tests.conftest import HAVE_GPU
from tests.helpers import rel_error, side_stream
from tests.models import test_bert, test_gpt2, test_llama

STEPS = 16


def gpt2(path, rng):
    test_gpt2.checkpoint(path, rng)
    return GPT2, 50


def llama(path, rng):
    test_llama.checkpoint(path, rng, tied=False)  # 4 query heads, 2 kv heads
    return LLaMA, 40


def llama_gqa4(path, rng):
    test_llama.checkpoint(path, rng, tied=True, heads=8, kv=4)  # 8 query heads over 4 kv heads
    return LLaMA, 40


def llama_untied_101(path, rng):
    test_llama.checkpoint(path, rng, tied=False, heads=8, kv=4, vocab=101)  # 101 ids: 51 + 50, or 26 x 3 + 23
    return LLaMA, 101


def llama_tied_101(path, rng):
    test_llama.checkpoint(path, rng, tied=True, heads=8, kv=4, vocab=101)
    return LLaMA, 101


# GPT-2's 50 ids split 25 + 25 and 13 x 3 + 11 (the last rank's share padded).
CAUSAL = {
    "gpt2": (gpt2, (2, 4)),
    "llama": (llama, (2,)),
    "llama-gqa-8-4": (llama_gqa4, (2, 4)),
    "llama-untied-101": (llama_untied_101, (2, 4)),
    "llama-tied-101": (llama_tied_101, (4,)),
}
CAUSAL_CASES = [(name, n) for name, (_, sizes) in CAUSAL.items() for n in sizes]


def greedy_tokens(model, prompts, sampling=None):
    """The first token and STEPS - 1 decode steps' greedy tokens [STEPS, B] through ``generation.Decoder`` (drawn
    with ``sampling`` where given)."""
    decoder = Decoder(model, len(prompts), max(map(len, prompts)) + STEPS)
    decoder.prefill(prompts, seed=7, sampling=sampling)
    tokens = [decoder.read(0)]
    for step in range(1, STEPS):
        decoder.step()
        tokens.append(decoder.read(step))
    return numpy.array(tokens)


@pytest.mark.parametrize("family, size", CAUSAL_CASES)
def test_causal_ranks_match_the_whole_model(tmp_path, rng, family, size):
    cls, vocab = CAUSAL[family][0](tmp_path, rng)
    ids = rng.integers(0, vocab, (2, 6))
    prompts = [ids[0, :5].tolist(), ids[1, :3].tolist()]  # left-padded: the mask and positions go through too
    whole = cls(tmp_path, "float32", "numpy")
    expected_logits, expected_tokens = whole.forward(ids), greedy_tokens(whole, prompts)

    def rank(comm):
        model = cls(tmp_path, "float32", "numpy", comm=comm)
        return model.forward(ids), greedy_tokens(model, prompts)

    results = run_simulated(size, rank)
    for logits, tokens in results:
        assert rel_error(logits, expected_logits) < 1e-5
        assert tokens.tolist() == expected_tokens.tolist()
    assert all(numpy.array_equal(logits, results[0][0]) for logits, _ in results)  # every rank the same values


@pytest.mark.parametrize("fast", [True, False], ids=["fast", "reference"])
@pytest.mark.parametrize("size", [2, 4])
def test_bert_ranks_match_the_whole_model(tmp_path, rng, size, fast):
    test_bert.checkpoint(tmp_path, rng)
    ids = rng.integers(1, test_bert.VOCAB, (3, 7))
    mask = numpy.ones(ids.shape, bool)
    mask[1, 5:], mask[2, 2:] = False, False
    expected = BERT(tmp_path, "float32", "numpy").forward(ids, mask, fast=fast)
    model = lambda comm: BERT(tmp_path, "float32", "numpy", comm=comm)
    results = run_simulated(size, lambda comm: model(comm).forward(ids, mask, fast=fast))
    for hidden in results:
        assert rel_error(hidden[mask], expected[mask]) < 1e-5


def layer_arrays(model):
    """Every per-layer weight of ``model`` by field name and layer: ``{(field, layer): array}``."""
    return {(k, i): v for i, w in enumerate(model.weights) for k, v in vars(w).items() if v is not None}


SHARDED = {"w_qkv", "b_qkv", "w_o", "w1", "b1", "w2"}  # the rest (norms, row-parallel biases) is replicated


def model_class(family, path, rng):
    """The model class of ``family`` (a ``CAUSAL`` key or "bert"), its random checkpoint written in ``path``."""
    if family == "bert":
        test_bert.checkpoint(path, rng)
        return BERT
    return CAUSAL[family][0](path, rng)[0]


@pytest.mark.parametrize("family", ["gpt2", "llama-gqa-8-4", "bert"])
def test_each_rank_holds_a_quarter_of_each_sharded_weight(tmp_path, rng, family):
    cls = model_class(family, tmp_path, rng)
    whole = layer_arrays(cls(tmp_path, "float32", "numpy"))
    ranks = [layer_arrays(m) for m in run_simulated(4, lambda comm: cls(tmp_path, "float32", "numpy", comm=comm))]
    for key, full in whole.items():
        for arrays in ranks:
            assert arrays[key].size * (4 if key[0] in SHARDED else 1) == full.size, key
    # The ranks' row-parallel parts, side by side, are the whole weight: columns of [out, in] (every family's
    # layout once loaded; GPT-2's Conv1D [in, out] is cut by rows in the file, then transposed).
    for layer in range(2):  # both layers of the tiny models
        parts = [arrays[("w_o", layer)] for arrays in ranks]
        assert numpy.array_equal(numpy.concatenate(parts, 1), whole[("w_o", layer)])


TABLES = {"gpt2": "wte", "llama-untied-101": "embed_tokens", "llama-tied-101": "embed_tokens", "bert": "word"}


@pytest.mark.parametrize("family, size", [("gpt2", 4), ("llama-untied-101", 4), ("llama-tied-101", 2), ("bert", 4)])
def test_each_rank_holds_its_rows_of_the_embedding_table_and_the_head(tmp_path, rng, family, size):
    cls = model_class(family, tmp_path, rng)
    whole = cls(tmp_path, "float32", "numpy")
    ranks = run_simulated(size, lambda comm: cls(tmp_path, "float32", "numpy", comm=comm))
    vocab, hidden = getattr(whole, TABLES[family]).shape
    part = -(-vocab // size)  # ceil(V / N) rows a rank; GPT-2's 50 ids over 4 ranks: 13, the last 11 and padding
    tables = [getattr(m, TABLES[family]) for m in ranks]
    assert all(t.shape == (part + 1, hidden) for t in tables)  # its rows, then the zero row other ranks' ids read
    rows = numpy.concatenate([t[:part] for t in tables])
    assert numpy.array_equal(rows[:vocab], getattr(whole, TABLES[family]))
    assert not rows[vocab:].any() and not any(t[part:].any() for t in tables)  # the padding and the zero rows
    if family == "bert":
        return
    heads = [m.head_weight for m in ranks]
    assert all(head.shape == (part, hidden) for head in heads)
    assert numpy.array_equal(numpy.concatenate(heads)[:vocab], whole.head_weight)
    tied = whole.head_weight is getattr(whole, TABLES[family])
    assert tied == (family != "llama-untied-101")
    assert all(numpy.shares_memory(head, t) == tied for head, t in zip(heads, tables))  # tied: a view, no copy


def test_one_rank_is_the_whole_model_unchanged(tmp_path, rng):
    test_gpt2.checkpoint(tmp_path, rng)
    [model] = run_simulated(1, lambda comm: GPT2(tmp_path, "float32", "numpy", comm=comm))
    whole = GPT2(tmp_path, "float32", "numpy")
    assert model.vocab_parallel is None and model.head_weight is model.wte  # the plain lookup and head
    assert numpy.array_equal(model.wte, whole.wte)


@contextlib.contextmanager
def recorded_reads(monkeypatch):
    """Every safetensors read by the loader: ``get_tensor`` calls by name and the sliced elements by name."""
    whole, sliced = [], {}
    lock = threading.Lock()
    original = loading._open_weights

    class View:
        def __init__(self, view, name):
            self.view, self.name = view, name

        def get_shape(self):
            return self.view.get_shape()

        def get_dtype(self):
            return self.view.get_dtype()

        def __getitem__(self, index):
            part = self.view[index]
            with lock:
                sliced[self.name] = sliced.get(self.name, 0) + part.size
            return part

    class File:
        def __init__(self, f):
            self.f = f

        def keys(self):
            return self.f.keys()

        def get_slice(self, name):
            return View(self.f.get_slice(name), name)

        def get_tensor(self, name):
            with lock:
                whole.append(name)
            return self.f.get_tensor(name)

    @contextlib.contextmanager
    def opened(path):
        with original(path) as f:
            yield File(f)

    monkeypatch.setattr(loading, "_open_weights", opened)
    yield whole, sliced


SHARDED_NAMES = {
    "gpt2": set(parallel.layer_shards(parallel.GPT2_LAYER, "transformer.h.{}.", test_gpt2.LAYERS))
    | {"transformer.wte.weight"},
    "llama-untied-101": set(parallel.layer_shards(parallel.LLAMA_LAYER, "model.layers.{}.", test_llama.LAYERS))
    | {"model.embed_tokens.weight", "lm_head.weight"},
}


@pytest.mark.parametrize("family, size", [("gpt2", 2), ("llama-untied-101", 4)])
def test_sharded_loading_reads_only_the_rank_slices(tmp_path, rng, monkeypatch, family, size):
    cls = model_class(family, tmp_path, rng)
    stored = load_file(tmp_path / "model.safetensors")
    shards = SHARDED_NAMES[family]
    with recorded_reads(monkeypatch) as (whole, sliced):
        run_simulated(size, lambda comm: cls(tmp_path, "float32", "numpy", comm=comm))
    assert set(sliced) == shards and not set(whole) & shards
    for name, elements in sliced.items():  # each rank its part (its rows only, not the padding): read once in all
        assert elements == stored[name].size, name
    assert sorted(whole) == sorted(size * [n for n in stored if n not in shards])


def planted_logits(rng, vocab: int, dtype) -> numpy.ndarray:
    """[8, vocab] logits whose greedy token is decided by planted ties: across ranks, within a rank and a later
    one, at the last id, all equal, all -inf, all negative (a padding column's 0 would win), and one random row."""
    rows = rng.standard_normal((8, vocab)).astype(dtype)
    top = rows.max() + 1
    for row, ids in enumerate([[1, vocab // 2 + 1, vocab - 1], [vocab - 3, vocab - 2, vocab - 1], [vocab - 1]]):
        rows[row, ids] = top
    rows[3] = 2  # every id the maximum: id 0
    rows[4] = -numpy.inf  # every id -inf: id 0, as the whole greedy gives it
    rows[5] = -numpy.abs(rows[5]) - 1  # all negative: the padding columns (0 in a model, poisoned here) must not win
    rows[6, [0, vocab - 1]] = top  # the first id and the last
    return rows


def own_columns(whole, rank: int, size: int, poison) -> numpy.ndarray:
    """Rank ``rank``'s ``ceil(V / size)`` columns of ``whole`` [B, V], its padding columns filled with ``poison``."""
    shard = VocabParallel(whole.shape[1], rank, size)
    out = numpy.full((whole.shape[0], shard.part), poison, whole.dtype)
    out[:, : shard.rows] = whole[:, shard.first : shard.first + shard.rows]
    return out


class Recording:
    """A communicator that records the shape of each array it all-gathers."""

    def __init__(self, comm):
        self.comm, self.rank, self.size, self.gathered = comm, comm.rank, comm.size, []

    def all_reduce(self, x):
        return self.comm.all_reduce(x)

    def all_gather(self, x):
        self.gathered.append(x.shape)
        return self.comm.all_gather(x)


@pytest.mark.parametrize("dtype", ["float32", "float16"])
@pytest.mark.parametrize("vocab, size", [(101, 2), (101, 4), (100, 4), (5, 4)])  # 5 over 4: 2, 2, 1 and 0 rows
def test_vocab_parallel_greedy_is_the_whole_greedy_on_planted_ties(rng, dtype, vocab, size):
    whole = planted_logits(rng, vocab, dtype)
    expected = numpy.argmax(whole, axis=1)
    assert expected[:7].tolist() == [1, vocab - 3, vocab - 1, 0, 0, expected[5], 0]
    assert (expected == ops.sample_tokens(whole, numpy.zeros(8, numpy.int32), numpy.zeros(2, numpy.uint64))).all()

    def rank(comm):
        comm = Recording(comm)
        shard = VocabParallel(vocab, comm.rank, comm.size, comm)
        tokens = numpy.full(8, -1, numpy.int32)
        out = shard.greedy_tokens(own_columns(whole, comm.rank, size, numpy.inf), tokens, numpy.zeros(2, numpy.uint64))
        assert out is tokens
        return tokens, comm.gathered

    for tokens, gathered in run_simulated(size, rank):
        assert tokens.tolist() == expected.tolist()
        assert gathered == [(8, 2)]  # the (value, id) pairs: no logits


def test_greedy_steps_gather_pairs_and_sampling_gathers_logits(tmp_path, rng):
    cls, vocab = llama_untied_101(tmp_path, rng)
    prompts = [rng.integers(0, vocab, 5).tolist(), rng.integers(0, vocab, 3).tolist()]
    sampling = Sampling(0.8, 20, 0.9)
    whole = cls(tmp_path, "float32", "numpy")
    expected = [greedy_tokens(whole, prompts), greedy_tokens(whole, prompts, sampling)]

    def rank(comm):
        comm = Recording(comm)
        model = cls(tmp_path, "float32", "numpy", comm=comm)
        greedy = greedy_tokens(model, prompts)
        gathered, comm.gathered = comm.gathered, []
        return greedy, gathered, greedy_tokens(model, prompts, sampling), comm.gathered

    for greedy, gathered, sampled, sampled_gathered in run_simulated(4, rank):
        assert greedy.tolist() == expected[0].tolist() and sampled.tolist() == expected[1].tolist()
        # The prompt pass gathers its logits (26 columns a rank), each greedy decode step (value, id) pairs only.
        assert gathered == [(2, 1, 26)] + [(2, 2)] * (STEPS - 1)
        assert sampled_gathered == [(2, 1, 26)] * STEPS


def test_vocab_split_pads_the_last_shares_and_sends_other_ranks_ids_to_the_zero_row():
    table = numpy.arange(1, 11, dtype=numpy.float32).reshape(5, 2)  # 5 ids over 4 ranks: 2, 2, 1 and 0 rows
    parts = [VocabSplit(zero_rows=1).take("t", table, table.shape, r, 4) for r in range(4)]
    zero = [0.0, 0.0]
    assert [p.tolist() for p in parts] == [
        [[1, 2], [3, 4], zero],
        [[5, 6], [7, 8], zero],
        [[9, 10], zero, zero],
        [zero, zero, zero],
    ]
    ids = numpy.array([[0, 1, 2, 3, 4]])
    local = [VocabParallel(5, r, 4).local_ids(ids) for r in range(4)]
    assert [x.tolist() for x in local] == [[[0, 1, 2, 2, 2]], [[2, 2, 0, 1, 2]], [[2, 2, 2, 2, 0]], [[2] * 5]]
    assert numpy.array_equal(sum(p[x] for p, x in zip(parts, local)), table[ids])  # one rank's row, others' zeros


def test_fused_qkv_split_takes_each_rank_heads_from_q_k_and_v():
    # GPT-2's c_attn [in, 3 * 8]: Q columns 0-7, K 8-15, V 16-23; rank 1 of 2 holds columns 4-7, 12-15, 20-23.
    w = numpy.arange(2 * 24).reshape(2, 24)
    part = Split(1, blocks=3).take("c_attn", w, w.shape, 1, 2)
    assert part.tolist() == w[:, [4, 5, 6, 7, 12, 13, 14, 15, 20, 21, 22, 23]].tolist()
    with pytest.raises(ValueError, match=r"'c_attn': dimension 1 \(24\) does not split into 3 blocks of 3"):
        Split(1, blocks=3).pieces("c_attn", w.shape, 0, 3)


def test_refusals_name_the_field_and_the_rank_count(tmp_path, rng, monkeypatch):
    for name in ("llama", "gpt2"):
        (tmp_path / name).mkdir()
    test_llama.checkpoint(tmp_path / "llama", rng, tied=False)  # 2 kv heads
    test_gpt2.checkpoint(tmp_path / "gpt2", rng)  # 4 heads
    with recorded_reads(monkeypatch) as (whole, sliced):
        with pytest.raises(ValueError, match="num_key_value_heads 2 is not divisible by the 4 tensor-parallel ranks"):
            run_simulated(4, lambda comm: LLaMA(tmp_path / "llama", "float32", "numpy", comm=comm))
        with pytest.raises(ValueError, match="n_head 4 is not divisible by the 3 tensor-parallel ranks"):
            run_simulated(3, lambda comm: GPT2(tmp_path / "gpt2", "float32", "numpy", comm=comm))
    assert not whole and not sliced  # refused before any weight was read


def test_simulated_collectives_and_a_failing_rank():
    def body(comm):
        x = numpy.full(3, comm.rank + 1.0)
        comm.all_reduce(x)
        y = numpy.full(2, float(comm.rank))
        gathered = comm.all_gather(y)
        comm.broadcast(y, root=2)
        return x.tolist(), y.tolist(), gathered.tolist()

    assert run_simulated(3, body) == [([6.0] * 3, [2.0] * 2, [[0.0] * 2, [1.0] * 2, [2.0] * 2])] * 3

    def failing(comm):
        if comm.rank == 1:
            raise RuntimeError("rank 1 broke")
        comm.all_reduce(numpy.zeros(1))  # would wait for rank 1 for ever: the group is aborted instead

    with pytest.raises(RuntimeError, match="rank 1 broke"):
        run_simulated(2, failing)


def fail_if_called(*args, **kwargs):
    raise AssertionError("a process was started")


@pytest.mark.parametrize(
    "args, gpus, expected",
    [
        (["--tp", "0"], 8, "argument --tp: expected an integer >= 1; got 0"),
        (["--tp", "2", "--device", "cpu"], 8, "--tp 2: tensor parallelism runs on GPUs over NCCL; --device cpu"),
        (["--tp", "4"], 2, "--tp 4: one process per GPU needs 4 GPUs; 2 found"),
        (["--tp", "2"], None, "--tp 2: one process per GPU needs 2 GPUs; 0 found"),  # this machine's count: none
    ],
)
def test_generate_tp_argument_errors_before_any_process_starts(tmp_path, monkeypatch, capsys, args, gpus, expected):
    monkeypatch.setattr(parallel, "launch", fail_if_called)
    if gpus is not None:
        monkeypatch.setattr(cli, "_gpu_count", lambda: gpus)
    elif HAVE_GPU:
        pytest.skip("counts this machine's GPUs: none expected")
    with pytest.raises(SystemExit) as exit:
        cli.main(["generate", "--model", str(tmp_path), "--prompt", "hi", *args])
    assert exit.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith(f"cupy-transformer: error: {expected}") and err.count("\n") == 1


def test_generate_tp_launches_one_rank_per_gpu_with_one_seed(tmp_path, monkeypatch):
    calls = []
    monkeypatch.setattr(cli, "_gpu_count", lambda: 4)
    monkeypatch.setattr(parallel, "launch", lambda size, target, args: calls.append((size, target, args)))
    assert cli.main(["generate", "--model", str(tmp_path), "--prompt", "hi", "--tp", "2"]) == 0
    [(size, target, (args,))] = calls
    assert size == 2 and target is cli._generate_rank and args.tp == 2
    assert isinstance(args.seed, int)  # chosen once, before the ranks start: every rank samples the same tokens


def test_a_rank_error_stops_every_rank_with_its_message(capsys, monkeypatch):
    # No GPU here (or no CuPy): each spawned rank fails choosing its device; the launcher names the rank and
    # raises its error, and every process has ended. On a GPU machine the ranks fail in the target instead.
    with pytest.raises(parallel.RankError, match=r"^rank [01]: ") as failed:
        parallel.launch(2, failing_rank)
    if HAVE_GPU:
        assert "rank 1 broke" in str(failed.value)
    monkeypatch.setattr(parallel, "launch", lambda *a: (_ for _ in ()).throw(parallel.RankError(1, ValueError("x y"))))
    monkeypatch.setattr(cli, "_gpu_count", lambda: 2)
    with pytest.raises(SystemExit) as exit:
        cli.main(["generate", "--model", "m", "--prompt", "hi", "--tp", "2"])
    assert exit.value.code == 2 and capsys.readouterr().err == "cupy-transformer: error: rank 1: x y\n"


def failing_rank(comm):
    """A ``launch`` target (module level: spawned processes import it): rank 1 fails, rank 0 waits in a
    collective that rank 1 never joins (the launcher must stop it)."""
    import cupy

    if comm.rank == 1:
        raise ValueError("rank 1 broke")
    comm.all_reduce(cupy.zeros(4, cupy.float32))
    cupy.cuda.Device().synchronize()


def gpu_count() -> int:
    return cli._gpu_count() if HAVE_GPU else 0


def gpu_rank_run(comm, folder, dtype, ids, prompts):
    """A ``launch`` target: this rank's shards of the model in ``folder`` on its GPU; returns the logits of ``ids``
    (host float32) and the greedy tokens of ``prompts`` through ``Decoder`` (its decode steps captured as CUDA
    graphs, the all-reduces with them)."""
    model = LLaMA(folder, dtype, "cupy", progress=False, comm=comm)
    return model.forward(ids).get().astype(numpy.float32), greedy_tokens(model, prompts)


@pytest.mark.gpu
@pytest.mark.parametrize("size", [1, 2, 4])
def test_gpu_ranks_give_the_one_gpu_tokens_and_logits(tmp_path, rng, size):
    """1, 2 and 4 GPUs (NCCL, one process each): fp32 greedy tokens identical to one GPU's and logits within 1e-5;
    fp16 logits within 3e-2 relative of one GPU's fp32 logits, the parity tests' fp16 bound (each rank rounds
    its partial sums to fp16 before NCCL adds them). A tied LLaMA of 101 ids: the vocab-parallel lookup and
    head with the last rank's share padded (51 + 50 rows; 26 x 3 + 23); the prompt pass gathers its logits, the
    captured greedy decode steps each rank's (value, id) pairs (``VocabParallel.greedy_tokens``)."""
    if gpu_count() < size:
        pytest.skip(f"multi_gpu: needs {size} GPUs; {gpu_count()} found")
    _, vocab = llama_tied_101(tmp_path, rng)
    ids = rng.integers(0, vocab, (2, 6))
    prompts = [ids[0, :5].tolist(), ids[1, :3].tolist()]
    # The one-GPU run in a spawned process too (one communicator of size 1: the whole model, no all-reduce).
    [(logits_1, tokens_1)] = parallel.launch(1, gpu_rank_run, (tmp_path, "float32", ids, prompts))
    for logits, tokens in parallel.launch(size, gpu_rank_run, (tmp_path, "float32", ids, prompts)):
        assert tokens.tolist() == tokens_1.tolist()
        assert rel_error(logits, logits_1) < 1e-5
    for logits, _ in parallel.launch(size, gpu_rank_run, (tmp_path, "float16", ids, prompts)):
        assert rel_error(logits, logits_1) < 3e-2


def gpu_greedy_rank(comm, whole, vocab):
    """A ``launch`` target: ``VocabParallel.greedy_tokens`` of this rank's columns of ``whole`` (host [B, V], the
    padding columns poisoned with +inf) over NCCL, run eagerly and then captured as a CUDA graph and replayed
    (each into tokens poisoned with -1), and ``ops.sample_tokens``' greedy of the whole logits on this GPU."""
    import cupy

    size = comm.size
    shard = VocabParallel(vocab, comm.rank, size, comm)
    local = cupy.asarray(own_columns(whole, comm.rank, size, numpy.inf))
    seed_step = cupy.zeros(2, numpy.uint64)
    stream = side_stream()
    with stream:
        eager = shard.greedy_tokens(local, cupy.full(len(whole), -1, numpy.int32), seed_step).get()
        tokens = cupy.full(len(whole), -1, numpy.int32)
        stream.begin_capture()
        shard.greedy_tokens(local, tokens, seed_step)
        graph = stream.end_capture()
        graph.launch(stream)
        stream.synchronize()
        one_gpu = ops.sample_tokens(cupy.asarray(whole), cupy.full(len(whole), -1, numpy.int32), seed_step)
        return eager, tokens.get(), one_gpu.get()


@pytest.mark.gpu
@pytest.mark.parametrize("size", [2, 4])
@pytest.mark.parametrize("dtype", ["float16", "float32"])
def test_gpu_vocab_parallel_greedy_is_the_one_gpu_greedy_on_planted_ties(rng, size, dtype):
    """2 and 4 GPUs (NCCL): the vocab-parallel greedy of planted ties (``planted_logits``: 101 ids, the last rank's
    share padded with +inf columns that must not win), eager and captured, gives the first index of each row's
    maximum, as the one-GPU greedy kernel does (checked here too: the smallest id on ties)."""
    if gpu_count() < size:
        pytest.skip(f"multi_gpu: needs {size} GPUs; {gpu_count()} found")
    whole = planted_logits(rng, 101, dtype)
    expected = numpy.argmax(whole, axis=1).tolist()
    for eager, captured, one_gpu in parallel.launch(size, gpu_greedy_rank, (whole, 101)):
        assert eager.tolist() == captured.tolist() == one_gpu.tolist() == expected


def gpu_one_rank_collectives(comm):
    """A ``launch`` target: each NCCL collective of a one-rank communicator on random arrays of every dtype the
    binding maps (a sum over one rank is the array itself), eagerly, then the all-reduce captured in a CUDA graph
    between two kernels and replayed on new values."""
    import cupy
    from ml_dtypes import bfloat16

    rng = numpy.random.default_rng(7)
    checked = []
    for dtype in (numpy.float16, bfloat16, numpy.float32, numpy.float64, numpy.int32, numpy.int64):
        host = (rng.standard_normal(37) * 100).astype(dtype)
        x = cupy.asarray(host)
        assert comm.all_reduce(x) is x and bool((x.get() == host).all())
        gathered = comm.all_gather(x)
        assert gathered.shape == (1, 37) and bool((gathered[0].get() == host).all())
        assert bool((comm.broadcast(x).get() == host).all())
        checked.append(numpy.dtype(dtype).name)
    x = cupy.asarray(rng.standard_normal(1000).astype(numpy.float32))
    y = cupy.empty_like(x)
    stream = side_stream()
    with stream:
        stream.begin_capture()
        x *= 2
        comm.all_reduce(x)
        cupy.add(x, 1, out=y)
        graph = stream.end_capture()
        new = rng.standard_normal(1000).astype(numpy.float32)
        x[...] = cupy.asarray(new)
        graph.launch(stream)
        stream.synchronize()
    return checked, y.get(), new * 2 + 1


@pytest.mark.gpu
def test_gpu_one_rank_nccl_collectives_run_eagerly_and_captured():
    """NCCL through the launcher on one GPU (one rank): every collective ``NcclCommunicator`` makes, for each dtype
    it maps, returns what a sum, gather or broadcast over one rank must, and an all-reduce captured in a CUDA graph
    replays (what a decode step does with two or more GPUs, which this checks the calls of on any one-GPU machine)."""
    [(checked, y, want)] = parallel.launch(1, gpu_one_rank_collectives)
    assert checked == ["float16", "bfloat16", "float32", "float64", "int32", "int64"]
    assert numpy.array_equal(y, want)
