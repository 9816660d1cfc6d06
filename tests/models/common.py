"""Shared checks of the causal models."""

import numpy

from tests.helpers import host, rel_error


def check_logits_and_decode(model, ids, reference, prompt):
    """``model``'s logits for ``ids`` [B, S] against ``reference(sequence)`` (float64 logits of one sequence),
    then a ``prompt``-token prefill and one-token decode steps through a cache against the full forward."""
    logits = host(model.forward(ids))
    for b in range(len(ids)):
        assert rel_error(logits[b], reference(ids[b])) < 1e-5
    b, s = ids.shape
    cache = model.new_cache(b, s + 1)
    steps = [host(model.forward(ids[:, :prompt], cache))]
    steps += [host(model.forward(ids[:, t : t + 1], cache)) for t in range(prompt, s)]
    assert rel_error(numpy.concatenate(steps, axis=1), logits) < 1e-5
    assert cache.lengths.tolist() == [s] * b
