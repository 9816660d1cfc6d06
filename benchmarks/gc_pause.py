"""What one full collection of Python's garbage collector costs as a process grows: with ``cupy_transformer``
imported, then torch and transformers, then a GPT-2 XL module tree (on the meta device: no weights), then after
``gc.freeze()``. No GPU needed. A collection that falls inside a prompt pass adds its time to the pass
(``benchmarks/notes/decode_loop.md``; ``first_pass.py --beside-hf`` measures that on a GPU).

    python3 benchmarks/gc_pause.py
"""

import gc
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def report(label: str) -> None:
    begin = time.perf_counter()
    gc.collect()
    ms = (time.perf_counter() - begin) * 1e3
    print(f"{label}: {len(gc.get_objects())} tracked objects, a full collection {ms:.1f} ms", flush=True)


def main() -> None:
    print(f"Python {sys.version.split()[0]}, thresholds {gc.get_threshold()}")
    report("bare")
    from cupy_transformer import bench, generation  # noqa: F401

    report("cupy_transformer imported")
    import torch
    import transformers

    report("torch and transformers imported")
    config, _ = bench.shape_config("gpt2-xl")
    config = dict(config)
    config.pop("model_type")
    with torch.device("meta"):
        model = transformers.AutoModelForCausalLM.from_config(transformers.GPT2Config(**config))
    report("and a GPT-2 XL module tree")
    gc.freeze()
    report("after gc.freeze()")
    del model


if __name__ == "__main__":
    main()
