"""BERT (``BertModel`` checkpoints, e.g. sentence-transformers' all-MiniLM-L6-v2) on the ops.

Embeddings ``LN(word[ids] + position[0..S) + token_type[types])``, ``num_hidden_layers`` post-LN layers
(``layers.PostLNLayer``: bidirectional attention with a padding mask; nn.Linear weights ``[out, in]``, the
Q, K and V projections fused into one ``[3H, H]`` weight at load time), and for sentence embeddings
the pooling that the sentence-transformers files beside the checkpoint name (``sentence_config``).

On the NumPy backend a model runs, by default, its own fast path (``fast=True``): float32 throughout, every
projection one BLAS product over the batch's tokens, the attention as batched products. ``fast=False`` runs the
ops' NumPy path, the float64 reference the tests compare against. The GPU path has no such switch.

With a communicator (``comm``) the model is one rank of a tensor-parallel group (``parallel``: Q, K, V and the
intermediate projection cut by heads and columns, the attention output and output projections by rows, the word
embeddings by vocabulary rows (each rank's rows of ``word[ids]``, zeros for the others' ids, all-reduced before
the position and token-type rows are added, so the sum is the whole model's); the position and token-type tables
and the norms whole); both paths all-reduce after the two row-parallel products.
"""

from __future__ import annotations

import concurrent.futures
import os
import sys
from collections import deque
from dataclasses import dataclass
from pathlib import Path

import numpy

from .. import ops
from ..layers import PostLNLayer, PostLNWeights
from ..loading import read_json, require
from ..ops.bias_act import activation_reference
from ..parallel import BERT_LAYER, TABLE, all_reduce_of, check_divisible, layer_shards, rank_and_size, vocab_parallel_of
from ..runtime.arrays import array_module, resolve_backend
from .base import check_ids, extremes, open_checkpoint, token_ids

ACTIVATIONS = {"gelu": "GELU_EXACT", "gelu_new": "GELU", "gelu_pytorch_tanh": "GELU", "relu": "ReLU"}
CPU_BATCH_TOKENS = 2048
# sentence-transformers' Pooling config keys for the modes we run (one at a time); the others are refused.
POOLING_MODES = {"pooling_mode_mean_tokens": "mean", "pooling_mode_cls_token": "cls", "pooling_mode_max_tokens": "max"}


@dataclass(frozen=True)
class SentenceConfig:
    """How token states become a sentence embedding: texts cut at ``max_seq_length`` tokens (``limit`` says
    where that number comes from), lower-cased first if ``do_lower_case``, pooled by ``pooling`` (mean, cls
    or max over the real tokens), L2-normalised if ``normalize``."""

    max_seq_length: int
    limit: str
    do_lower_case: bool = False
    pooling: str = "mean"
    normalize: bool = True


def _pooling(path: Path) -> str:
    """The one pooling mode of sentence-transformers' ``1_Pooling/config.json`` at ``path``."""
    if not path.is_file():
        raise FileNotFoundError(f"{path} (the Pooling module's config, listed in modules.json) not found")
    config = read_json(path)
    named = config.get("pooling_mode")  # newer files may name the mode outright
    on = [named] if isinstance(named, str) else [k for k, v in config.items() if k.startswith("pooling_mode_") and v]
    on = [POOLING_MODES.get(k, k.removeprefix("pooling_mode_")) for k in on]
    if len(on) != 1 or on[0] not in POOLING_MODES.values():
        raise ValueError(f"{path}: pooling {on or 'none'} is not supported; expected one of mean, cls or max")
    return on[0]


def sentence_config(folder, max_positions: int) -> SentenceConfig:
    """sentence-transformers' files beside a checkpoint in ``folder``, as ``SentenceConfig``:
    ``modules.json`` lists the modules (a Transformer, a Pooling module whose ``config.json`` gives the mode, a
    Normalize module or none; any other module is refused), ``sentence_bert_config.json`` (in the Transformer
    module's folder) gives max_seq_length and do_lower_case. Without modules.json: mean pooling, normalised;
    without sentence_bert_config.json: texts cut at the model's ``max_positions``. A max_seq_length above the
    positions is cut to them."""
    folder = Path(folder)
    limit, transformer, pooling, normalize = "max_position_embeddings in config.json", folder, "mean", True
    modules_path = folder / "modules.json"
    if modules_path.is_file():
        modules = read_json(modules_path, list)
        if not all(isinstance(m, dict) and "type" in m for m in modules):
            raise ValueError(f"{modules_path}: expected a list of modules, each with a 'type'")
        kinds = {m["type"].rsplit(".", 1)[-1]: m for m in modules}
        unknown = sorted(set(kinds) - {"Transformer", "Pooling", "Normalize"})
        if unknown:
            raise ValueError(
                f"{modules_path}: modules {unknown} are not supported (only Transformer, Pooling, Normalize)"
            )
        if "Pooling" not in kinds:
            raise ValueError(f"{modules_path}: no Pooling module; a sentence embedding needs one")
        transformer = folder / kinds.get("Transformer", {}).get("path", "")
        pooling = _pooling(folder / kinds["Pooling"].get("path", "") / "config.json")
        normalize = "Normalize" in kinds
    max_length, lower = max_positions, False
    st_path = transformer / "sentence_bert_config.json"
    if st_path.is_file():
        st = read_json(st_path)
        lower = bool(st.get("do_lower_case", False))
        if st.get("max_seq_length") is not None:
            if not isinstance(st["max_seq_length"], int) or st["max_seq_length"] < 1:
                raise ValueError(f"{st_path}: max_seq_length must be a positive integer; got {st['max_seq_length']!r}")
            if st["max_seq_length"] <= max_positions:
                max_length, limit = st["max_seq_length"], f"max_seq_length in {st_path.name}"
    return SentenceConfig(max_length, limit, lower, pooling, normalize)


def _cores() -> int:
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


_CORES = _cores()
_BLOCK = 1 << 17  # elements a block (512 KB of float32): its passes stay in a core's L2, not in memory
_THREADS = None


def _on_cores(fn, *arrays) -> None:
    """``fn(*blocks)`` on blocks of ``arrays``' rows (axis 0) of about ``_BLOCK`` elements, on every core. NumPy's
    element-wise passes run on one core and release the GIL, each a pass over memory; the fast path's GELU (two
    dozen passes) was a quarter of its time on two cores and the softmax another tenth, while its products use
    every core (BLAS). Each block's result is what the whole array's would be, to the bit."""
    global _THREADS
    rows = len(arrays[0])
    step = max(1, _BLOCK * rows // max(1, arrays[0].size))
    blocks = [[a[i : i + step] for a in arrays] for i in range(0, rows, step)]
    if _CORES < 2 or len(blocks) < 2:
        for block in blocks:
            fn(*block)
        return
    if _THREADS is None:
        _THREADS = concurrent.futures.ThreadPoolExecutor(_CORES, thread_name_prefix="ct-cpu")
    for _ in _THREADS.map(lambda block: fn(*block), blocks):  # each result in turn: raises what a block raised
        pass


def _activate(act, x: numpy.ndarray) -> None:
    x[...] = act(x)


def _softmax(scores: numpy.ndarray, mask: numpy.ndarray | None = None) -> None:
    """Rows of ``scores`` (+ ``mask``) softmaxed in place."""
    if mask is not None:
        scores += mask
    scores -= scores.max(-1, keepdims=True)
    numpy.exp(scores, out=scores)
    scores /= scores.sum(-1, keepdims=True)


def _fast_layer_norm(x: numpy.ndarray, gamma: numpy.ndarray, beta: numpy.ndarray, eps: float) -> numpy.ndarray:
    x = x - x.mean(-1, keepdims=True)
    x *= 1 / numpy.sqrt((x * x).mean(-1, keepdims=True) + numpy.float32(eps))
    x *= gamma
    x += beta
    return x


def _fast_activation(act):
    """The MLP's activation on float32 rows: ``ops``' reference in float32 (the exact GELU through its rational
    erf), the formula generation's float32 passes use too."""
    return lambda x: activation_reference(x, act)


def inference_config(config: dict, dtype, source: str, mp_size: int = 1) -> ops.InferenceConfig:
    """The post-LN layers' ``InferenceConfig`` for a BERT config (config.json's fields as a dict) in ``dtype``;
    errors name ``source``, where the fields came from. Shared by the checkpoint loader and Hugging Face model
    injection (``interop.bert_inject``), so both accept and refuse the same configs. ``mp_size``: tensor-parallel
    ranks."""

    act = config.get("hidden_act", "gelu")
    if not isinstance(act, str) or act not in ACTIVATIONS:
        raise ValueError(f"{source}: hidden_act {act!r} is not one of {sorted(ACTIVATIONS)}")
    h, heads = require(config, "hidden_size", source), require(config, "num_attention_heads", source)
    inner = require(config, "intermediate_size", source)
    check_divisible(source, {"num_attention_heads": heads, "intermediate_size": inner}, mp_size)
    return ops.InferenceConfig(
        hidden_size=h,
        heads=heads,
        intermediate_size=inner,
        mp_size=mp_size,
        epsilon=config.get("layer_norm_eps", 1e-12),
        pre_layer_norm=False,
        mlp_act_func_type=ACTIVATIONS[act],
        dtype=dtype,
        transposed_mode=True,
        triangular_masking=False,
    )


class BERT:
    model_type = "bert"

    def __init__(self, checkpoint, dtype=numpy.float16, backend: str | None = None, progress=None, comm=None):
        """As ``GPT2``'s: ``comm`` this rank's communicator, None for the whole model."""
        backend = resolve_backend("backend", backend)  # None: the GPU where one is usable, else NumPy
        rank, size = rank_and_size(comm)
        ck = open_checkpoint(checkpoint, self.model_type)
        c = ck.config
        config = inference_config(c, dtype, f"{ck.folder}/config.json", size)
        h, inner, layers = config.hidden_size, config.intermediate_size, ck.require("num_hidden_layers")
        self.vocab, self.max_positions = ck.require("vocab_size"), ck.require("max_position_embeddings")
        self.backend = backend
        self.folder = ck.folder
        self.pad_id = c.get("pad_token_id", 0)
        self.sentence = sentence_config(ck.folder, self.max_positions)
        self.config = config
        p = "bert." if "bert.embeddings.word_embeddings.weight" in ck.names else ""
        e = f"{p}embeddings."
        shapes = {
            f"{e}word_embeddings.weight": (self.vocab, h),
            f"{e}position_embeddings.weight": (self.max_positions, h),
            f"{e}token_type_embeddings.weight": (c.get("type_vocab_size", 2), h),
            f"{e}LayerNorm.weight": (h,),
            f"{e}LayerNorm.bias": (h,),
        }
        per_layer = {
            "attention.self.query.weight": (h, h),
            "attention.self.key.weight": (h, h),
            "attention.self.value.weight": (h, h),
            "attention.self.query.bias": (h,),
            "attention.self.key.bias": (h,),
            "attention.self.value.bias": (h,),
            "attention.output.dense.weight": (h, h),
            "attention.output.dense.bias": (h,),
            "attention.output.LayerNorm.weight": (h,),
            "attention.output.LayerNorm.bias": (h,),
            "intermediate.dense.weight": (inner, h),
            "intermediate.dense.bias": (inner,),
            "output.dense.weight": (h, inner),
            "output.dense.bias": (h,),
            "output.LayerNorm.weight": (h,),
            "output.LayerNorm.bias": (h,),
        }
        for i in range(layers):
            shapes.update({f"{p}encoder.layer.{i}.{name}": shape for name, shape in per_layer.items()})
        self.vocab_parallel = vocab_parallel_of(comm, self.vocab)
        shards = {**layer_shards(BERT_LAYER, f"{p}encoder.layer.{{}}.", layers), f"{e}word_embeddings.weight": TABLE}
        w = ck.load(shapes, dtype, backend, progress, shards if size > 1 else None, rank, size)
        xp = array_module(backend)
        self.word, self.position, self.token_type = (
            w[f"{e}{n}_embeddings.weight"] for n in ("word", "position", "token_type")
        )
        self.embedding_norm = (w[f"{e}LayerNorm.weight"], w[f"{e}LayerNorm.bias"])
        self.weights = []
        for i in range(layers):
            t = {name: w.pop(f"{p}encoder.layer.{i}.{name}") for name in per_layer}
            qkv = [f"attention.self.{n}" for n in ("query", "key", "value")]
            self.weights.append(
                PostLNWeights(
                    w_qkv=xp.concatenate([t[n + ".weight"] for n in qkv]),
                    b_qkv=xp.concatenate([t[n + ".bias"] for n in qkv]),
                    w_o=t["attention.output.dense.weight"],
                    b_o=t["attention.output.dense.bias"],
                    ln_attn_gamma=t["attention.output.LayerNorm.weight"],
                    ln_attn_beta=t["attention.output.LayerNorm.bias"],
                    w1=t["intermediate.dense.weight"],
                    b1=t["intermediate.dense.bias"],
                    w2=t["output.dense.weight"],
                    b2=t["output.dense.bias"],
                    ln_out_gamma=t["output.LayerNorm.weight"],
                    ln_out_beta=t["output.LayerNorm.bias"],
                )
            )
        self.layer = PostLNLayer(self.config, all_reduce_of(comm))
        self._fast_weights = None

    def forward(self, input_ids, attention_mask=None, token_type_ids=None, fast: bool = True):
        """The last hidden states [B, S, H] for ``input_ids`` [B, S] (right-padded), ``attention_mask`` [B, S]
        (1 or True = a real token), ``token_type_ids`` [B, S] (default 0). On the NumPy backend ``fast`` runs
        the float32 fast path (the module docstring); False, the ops' float64 reference."""
        return deque(self.hidden_states(input_ids, attention_mask, token_type_ids, fast), maxlen=1)[0]

    def hidden_states(self, input_ids, attention_mask=None, token_type_ids=None, fast: bool = True):
        """Yields the embeddings' output, then each layer's output ([B, S, H]); ``forward``'s arguments."""
        xp = array_module(self.backend)
        ids = token_ids(xp, input_ids)
        check_ids(*extremes(xp, ids), self.vocab)
        b, s = ids.shape
        if s > self.max_positions:
            raise ValueError(f"input_ids: {s} tokens exceed the model's {self.max_positions} positions")
        keep = None
        if attention_mask is not None:
            keep = xp.asarray(attention_mask)
            if keep.shape != (b, s):
                raise ValueError(f"attention_mask: expected shape {(b, s)}; got {keep.shape}")
            keep = keep.astype(bool)
        types = xp.zeros((b, s), numpy.int64) if token_type_ids is None else xp.asarray(token_type_ids)
        if fast and xp is numpy:
            yield from self._fast_hidden_states(ids, keep, types)
            return
        compute = numpy.float64 if xp is numpy else numpy.float32
        x = (
            self.word_rows(ids).astype(compute)
            + self.position[xp.arange(s)].astype(compute)
            + self.token_type[types].astype(compute)
        ).astype(self.config.dtype)
        x = ops.layer_norm(x, *self.embedding_norm, eps=self.config.epsilon)
        yield x
        for w in self.weights:
            x = self.layer(x, w, attn_mask=keep)
            yield x

    def word_rows(self, ids):
        """``word[ids]``; a vocab-parallel rank's: its rows, summed over the ranks (``parallel.VocabParallel``)."""
        return self.word[ids] if self.vocab_parallel is None else self.vocab_parallel.rows_of(ids, self.word)

    def _fast_hidden_states(self, ids, keep, types):
        """``hidden_states`` on the NumPy backend in float32: ``layers.PostLNLayer``'s math with the tokens of
        the whole batch as the rows of each product (one BLAS call) and the heads as a batch of products."""
        f32 = numpy.float32
        if self._fast_weights is None:  # float32 copies only where the model holds another dtype
            self._fast_weights = [
                PostLNWeights(**{k: v.astype(f32, copy=False) for k, v in vars(w).items()}) for w in self.weights
            ]
        cfg = self.config
        b, s = ids.shape
        heads, h = cfg.heads // cfg.mp_size, cfg.hidden_size  # this rank's heads
        d, eps, act = cfg.head_size, cfg.epsilon, _fast_activation(cfg.mlp_act_func_type)
        reduce = self.layer.reduce  # the tensor-parallel sum of the row-parallel products' partial sums
        x = self.word_rows(ids).astype(f32) + self.position[:s].astype(f32) + self.token_type[types].astype(f32)
        x = _fast_layer_norm(x.reshape(b * s, h), *(a.astype(f32) for a in self.embedding_norm), eps)
        yield x.reshape(b, s, h)
        # Padding keys get float32's lowest score, as Hugging Face's additive mask: exp() makes them 0. Per
        # (sequence, head), as the softmax's blocks take it.
        mask = None
        if keep is not None:
            mask = numpy.where(keep, f32(0), numpy.finfo(f32).min)[:, None, None, :]
            mask = numpy.broadcast_to(mask, (b, heads, 1, s)).reshape(b * heads, 1, s)
        for w in self._fast_weights:
            qkv = x @ w.w_qkv.T
            qkv += w.b_qkv
            q, k, v = qkv.reshape(b, s, 3, heads, d).transpose(2, 0, 3, 1, 4)  # each [B, heads, S, d]
            scores = (q * f32(d**-0.5)) @ k.transpose(0, 1, 3, 2)
            _on_cores(_softmax, scores.reshape(b * heads, s, s), *([] if mask is None else [mask]))
            context = (scores @ v).transpose(0, 2, 1, 3).reshape(b * s, heads * d)
            a = reduce(context @ w.w_o.T)
            a += x
            a += w.b_o
            h1 = _fast_layer_norm(a, w.ln_attn_gamma, w.ln_attn_beta, eps)
            inner = h1 @ w.w1.T
            inner += w.b1
            _on_cores(lambda rows: _activate(act, rows), inner)
            m = reduce(inner @ w.w2.T)
            m += h1
            m += w.b2
            x = _fast_layer_norm(m, w.ln_out_gamma, w.ln_out_beta, eps)
            yield x.reshape(b, s, h)

    def embed(self, input_ids, attention_mask=None, fast: bool = True):
        """Sentence embeddings [B, H] (float32) of token ids [B, S] (right-padded; ``attention_mask`` 1 = a real
        token): the last hidden states pooled and normalised as ``self.sentence`` says (sentence-transformers'
        files; without them the mean of the real tokens, L2-normalised). ``fast`` as ``forward``. Non-finite
        results are a ValueError naming the first layer whose output holds them (the result is read once to
        check; only then are the layers run again one by one)."""
        xp = array_module(self.backend)
        mask = None if attention_mask is None else xp.asarray(attention_mask)
        with numpy.errstate(all="ignore"):  # non-finite values are checked once, below, and named
            pooled = self._pool(self.forward(input_ids, mask, fast=fast), mask)
        if not bool(xp.isfinite(pooled).all()):
            raise ValueError(self._non_finite(input_ids, mask, fast))
        return pooled

    def _pool(self, hidden, attention_mask):
        xp = array_module(self.backend)
        hidden = hidden.astype(numpy.float32)
        if attention_mask is None:
            mask = xp.ones(hidden.shape[:2], numpy.float32)
        else:
            mask = xp.asarray(attention_mask, numpy.float32)
        if self.sentence.pooling == "cls":
            pooled = hidden[:, 0]
        elif self.sentence.pooling == "max":  # padding as sentence-transformers sets it: -1e9
            pooled = xp.where(mask[..., None] > 0, hidden, numpy.float32(-1e9)).max(1)
        else:
            pooled = (hidden * mask[..., None]).sum(1) / xp.maximum(mask.sum(1, keepdims=True), 1e-9)
        if not self.sentence.normalize:
            return pooled
        return pooled / xp.maximum(xp.linalg.norm(pooled, axis=1, keepdims=True), 1e-12)

    def _non_finite(self, input_ids, attention_mask, fast) -> str:
        """Where non-finite values first appear for these inputs: the message of ``embed``'s error."""
        xp = array_module(self.backend)
        with numpy.errstate(all="ignore"):
            finite = [bool(xp.isfinite(x).all()) for x in self.hidden_states(input_ids, attention_mask, fast=fast)]
        for i, ok in enumerate(finite):
            if not ok:
                where = "the embeddings' output (word, position, token-type sums and their LayerNorm)"
                if i > 0:
                    where = f"the output of layer {i - 1} (encoder.layer.{i - 1} of {len(self.weights)} layers)"
                return f"{self.folder}: non-finite values in the embeddings; they first appear in {where}"
        return f"{self.folder}: non-finite values in the embeddings, from the {self.sentence.pooling} pooling"

    def embed_texts(self, texts, tokenizer=None, batch_size: int = 64, fast: bool = True, progress=None):
        """Sentence embeddings [len(texts), H] (float32 NumPy) of ``texts`` (strings), tokenized by
        ``tokenizer`` (a ``tokenizers.Tokenizer``; default: the checkpoint folder's tokenizer.json), cut at
        ``self.sentence.max_seq_length`` tokens, in batches of up to ``batch_size`` texts of similar length
        (sorted by length, each padded to its longest; on the NumPy backend also at most CPU_BATCH_TOKENS
        padded tokens). Texts that were cut are listed on stderr, one line per
        call; ``progress``: a progress bar on stderr (default: when stderr is a terminal and there is more than
        one batch)."""
        from tokenizers import Tokenizer
        from tqdm import tqdm

        if isinstance(texts, str) or not all(isinstance(t, str) for t in texts):
            raise TypeError("texts: expected a list of strings")
        if not isinstance(batch_size, int) or batch_size < 1:
            raise ValueError(f"batch_size: expected a positive integer; got {batch_size!r}")
        if tokenizer is None:
            from ..loading import Checkpoint

            if not self.folder.is_dir():
                raise ValueError(f"tokenizer: {self.folder} is no folder to read tokenizer.json from; pass one")
            tokenizer = Checkpoint(self.folder).tokenizer()
        tokenizer = Tokenizer.from_str(tokenizer.to_str())  # a copy: its padding and truncation are ours to set
        tokenizer.no_padding()
        limit = self.sentence.max_seq_length
        tokenizer.enable_truncation(max_length=limit)
        if self.sentence.do_lower_case:
            texts = [t.lower() for t in texts]
        encoded = tokenizer.encode_batch(texts)
        self._report_cut(tokenizer, texts, [i for i, e in enumerate(encoded) if e.overflowing])
        lengths = numpy.array([len(e.ids) for e in encoded])
        order = numpy.argsort(-lengths, kind="stable")
        out = numpy.empty((len(texts), self.config.hidden_size), numpy.float32)
        show = sys.stderr.isatty() and len(texts) > batch_size if progress is None else progress
        with tqdm(total=len(texts), desc="embedding", unit="text", disable=not show) as bar:
            first = 0
            while first < len(texts):
                rows = order[first : first + self._batch_rows(batch_size, lengths[order[first]])]
                first += len(rows)
                ids = numpy.full((len(rows), max(lengths[rows[0]], 1)), self.pad_id, numpy.int64)
                mask = numpy.zeros(ids.shape, numpy.int64)
                for j, r in enumerate(rows):
                    ids[j, : lengths[r]], mask[j, : lengths[r]] = encoded[r].ids, 1
                e = self.embed(ids, mask, fast=fast)
                out[rows] = e.get() if hasattr(e, "get") else e
                bar.update(len(rows))
        return out

    def _batch_rows(self, batch_size: int, longest: int) -> int:
        """Texts in a batch whose longest has ``longest`` tokens: ``batch_size``, and on the NumPy backend no more
        than CPU_BATCH_TOKENS padded tokens (smaller batches keep the attention scores in cache: faster there)."""
        if self.backend != "numpy":
            return batch_size
        return max(1, min(batch_size, CPU_BATCH_TOKENS // max(longest, 1)))

    def _report_cut(self, tokenizer, texts, cut: list) -> None:
        """One stderr line naming the texts (counted from 1) cut at the limit, and their full token counts."""
        if not cut:
            return
        tokenizer.no_truncation()
        counts = [len(e.ids) for e in tokenizer.encode_batch([texts[i] for i in cut[:10]])]
        listed = ", ".join(f"text {i + 1} ({n} tokens)" for i, n in zip(cut, counts))
        more = f" and {len(cut) - 10} more" if len(cut) > 10 else ""
        print(
            f"embed: {len(cut)} of {len(texts)} texts cut to {self.sentence.max_seq_length} tokens "
            f"({self.sentence.limit}): {listed}{more}",
            file=sys.stderr,
        )
