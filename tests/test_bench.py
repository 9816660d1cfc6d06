"""cupy_transformer/bench.py: what the CPU can check of the benchmark models."""

import inspect

from cupy_transformer import bench
from cupy_transformer.loading import Checkpoint


def test_random_weights_take_what_the_loader_passes():
    """The models load through ``Checkpoint.tensor``'s arguments; the random weights stand in for a checkpoint, so
    they must take the same ones (a parameter added to the loader once broke every random model on the GPU)."""
    ours = list(inspect.signature(bench._RandomWeights.tensor).parameters)
    assert ours == list(inspect.signature(Checkpoint.tensor).parameters)
