"""A new decoder's first prompt pass (each ``generate`` call's) against its variants, on a random model: the
decoder's own new memory pool (as it runs), the default pool, a warm pool of an earlier decoder; each decoder's
second pass (the capture) and third (the replay); an eager-only decoder's repeated pass; then the host's time and
the stream's at the ends of layers (an event after each layer) in that decoder's pass, which tell a host-bound pass
from one that waits for the device. Host / stream ms.

With ``--beside-hf``: as ``e2e.py`` runs it instead, our model over transformers' tensors in a process holding
transformers' model (after one of its generations): a new decoder's first pass after a warm-up decoder's (as
``bench.time_generation`` measures it), with the garbage collector's pauses inside it (``gc.callbacks``); then the
same after ``gc.collect(); gc.freeze()`` (the objects alive then no longer scanned), and (still frozen) on a random
model of the shape.

    python3 benchmarks/first_pass.py gpt2-xl 16 128 [--beside-hf]
"""

import gc
import os
import sys
import threading
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import cupy  # noqa: E402

from benchmarks.profile_prefill import timed  # noqa: E402
from cupy_transformer import bench, layers  # noqa: E402
from cupy_transformer.generation import Decoder  # noqa: E402


def layer_ends(decoder, prompts) -> tuple[list[float], list[float]]:
    """Host ms and stream ms from a pass's start to each layer's end."""
    marks, stack = [], layers.PreLNLayer.stack

    def marked(self, *args, **kwargs):
        out = stack(self, *args, **kwargs)
        event = cupy.cuda.Event()
        event.record()
        marks.append((time.perf_counter(), event))
        return out

    layers.PreLNLayer.stack = marked
    try:
        decoder.stream.synchronize()
        begin, start = time.perf_counter(), cupy.cuda.Event()
        start.record(decoder.stream)
        decoder.prefill(prompts)
        decoder.stream.synchronize()
    finally:
        layers.PreLNLayer.stack = stack
    return [(t - begin) * 1e3 for t, _ in marks], [cupy.cuda.get_elapsed_time(start, e) for _, e in marks]


def beside_hf(shape: str, batch: int, prompt: int) -> None:
    from benchmarks.common import hf_model, hf_times
    from benchmarks.e2e import ours_from

    hf, dtype = hf_model(shape)
    ours = ours_from(hf, dtype)
    ids = bench.prompts_for(ours.vocab, batch, prompt)
    hf_times(hf, ids, 4)
    pauses, started = [], {}

    def on_gc(phase, info):
        if phase == "start":
            started["t"] = time.perf_counter()
        else:
            pauses.append((info["generation"], (time.perf_counter() - started["t"]) * 1e3))

    random = None
    for label in ["over HF's tensors"] * 3 + ["gc frozen"] * 3 + ["random"] * 2:
        if label == "gc frozen" and not gc.get_freeze_count():
            gc.collect()
            gc.freeze()
        if label == "random" and random is None:
            random = bench.random_model(shape)
        model = random if label == "random" else ours
        Decoder(model, batch, prompt + 8).prefill(ids.tolist())  # the warm-up decoder, let go before the next
        decoder = Decoder(model, batch, prompt + 8)
        pauses.clear()
        gc.callbacks.append(on_gc)
        try:
            host, stream = timed(decoder, ids.tolist())
        finally:
            gc.callbacks.remove(on_gc)
        collected = ", ".join(f"gen {g} {ms:.1f}" for g, ms in pauses) or "none"
        print(f"{shape} B{batch} first pass, {label}: host {host:.2f} ms, stream {stream:.2f} ms; gc: {collected}")


def main(shape: str, batch: int, prompt: int) -> None:
    model = bench.random_model(shape)
    prompts = [list(range(1, prompt + 1))] * batch
    Decoder(model, batch, prompt + 8).prefill(prompts)  # compiles, chooses the products
    gc.collect()
    results, warm = {}, None
    for variant in ("own", "default", "recycled") * 3:
        decoder = Decoder(model, batch, prompt + 8)
        if variant == "default":
            decoder._pool = cupy.get_default_memory_pool()
        elif variant == "recycled" and warm is not None:
            decoder._pool = warm
        runs = [timed(decoder, prompts) for _ in range(3)]  # eager, captured, replayed
        results.setdefault(variant, []).append(runs)
        if variant == "own":
            warm = decoder._pool
        del decoder
        gc.collect()
    for variant, runs in results.items():
        print(
            variant,
            " | ".join(
                f"first {a[0]:.2f}/{a[1]:.2f}; capture {b[0]:.2f}/{b[1]:.2f}; replay {c[0]:.2f}/{c[1]:.2f}"
                for a, b, c in runs
            ),
        )
    eager = Decoder(model, batch, prompt + 8, cuda_graph=False)
    for _ in range(3):
        eager.prefill(prompts)
    print("eager repeated", " ".join(f"{h:.2f}/{g:.2f}" for h, g in (timed(eager, prompts) for _ in range(5))))
    print("threads", [t.name for t in threading.enumerate()])
    for _ in range(3):
        hosts, streams = layer_ends(eager, prompts)
        every = range(0, len(hosts), max(1, len(hosts) // 8))
        print(f"{len(hosts)} layers, host at layer ends: " + " ".join(f"{hosts[i]:.1f}" for i in every))
        print(f"{len(hosts)} layers, stream at layer ends: " + " ".join(f"{streams[i]:.1f}" for i in every))


if __name__ == "__main__":
    (beside_hf if "--beside-hf" in sys.argv else main)(sys.argv[1], int(sys.argv[2]), int(sys.argv[3]))
