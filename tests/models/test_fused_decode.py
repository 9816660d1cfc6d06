"""The decode path's fused products (layers.PreLNLayer.fuses: the norms in the GEMV's prologue, the residual adds in
its epilogue) against the unfused path, on tiny random GPT-2 and LLaMA (grouped-query) models in fp16."""

import numpy
import pytest

from cupy_transformer.models import load_model
from tests.models import test_gpt2, test_llama

STEPS = 32
# The fused residual add rounds once (round(x + (acc + b))) where the unfused one rounds the product first: the two
# residual streams differ by about a rounding a layer, which 32 steps of cached keys and values carry into the
# logits. 1e-2 is about 3x fp16's chained tolerance; a wrong norm or a missing residual is O(1).
TOL = 1e-2
# Greedy tokens must agree wherever the unfused step's best logit leads the second by more than this.
MARGIN = 0.05


@pytest.mark.gpu
@pytest.mark.parametrize("family", ["gpt2", "llama"])
@pytest.mark.parametrize("batch", [2, 12])
def test_gpu_fused_decode_matches_the_unfused_path(tmp_path, rng, monkeypatch, family, batch):
    """Two sequences (12: the GEMV's 16-row kernels) decode 32 steps under graph_choices (as the decode loop's eager
    steps and its graph run them): the fused path runs no norm kernel up to 8 rows (past them the norms run before
    the products, the residual adds still in their epilogues), and its logits, teacher-forced with the unfused
    path's greedy tokens, agree with the unfused path's within TOL, with the same greedy tokens (but for near-ties,
    MARGIN)."""
    from cupy_transformer import layers, ops

    if family == "gpt2":
        test_gpt2.checkpoint(tmp_path, rng, positions=64)
    else:
        test_llama.checkpoint(tmp_path, rng, False)  # 4 heads over 2 kv heads
    model = load_model(tmp_path, "float16", "cupy", progress=False)
    prompt = rng.integers(0, model.vocab, (batch, 5))
    norms = []
    normalize, fuses = layers.normalize, layers.PreLNLayer.fuses

    def counted(*args, **kwargs):
        norms.append(1)
        return normalize(*args, **kwargs)

    monkeypatch.setattr(layers, "normalize", counted)

    def decode(fused, forced=None):
        monkeypatch.setattr(layers.PreLNLayer, "fuses", fuses if fused else lambda self, x: False)
        cache = model.new_cache(batch, 64)
        ids = model.forward(prompt, cache, last_only=True)[:, -1].argmax(-1)  # the prompt: unfused either way
        steps = []
        for step in range(STEPS):
            if forced is not None:
                ids = forced[step]
            norms.clear()
            with ops.graph_choices():
                logits = model.forward(ids[:, None], cache)[:, 0]
            # fused up to 8 rows: the norms are in the products; past them, norm kernels (the residual adds fused)
            assert (len(norms) == 0) == (fused and batch <= 8), (step, len(norms))
            steps.append((ids, logits.astype(numpy.float64).get()))
            ids = logits.argmax(-1)
        return steps

    unfused = decode(False)
    fused = decode(True, forced=[ids for ids, _ in unfused])
    for step, ((_, want), (_, got)) in enumerate(zip(unfused, fused)):
        assert numpy.isfinite(got).all()
        assert numpy.linalg.norm(got - want) / numpy.linalg.norm(want) < TOL, step
        top2 = numpy.sort(want, axis=-1)[:, -2:]
        clear = top2[:, 1] - top2[:, 0] > MARGIN
        assert (got.argmax(-1) == want.argmax(-1))[clear].all(), step
