"""Shared benchmark plumbing: card/date/commit header, copy-bandwidth ceiling, CUDA-event timing, and random
Hugging Face models timed through ``generate`` (torch and transformers imported where used)."""

from __future__ import annotations

import datetime
import os
import statistics
import subprocess
import sys
import time

import cupy

RESULTS = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def card_name() -> str:
    props = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)
    name = props["name"]
    return name.decode() if isinstance(name, bytes) else name


def commit() -> str:
    """The tree a result came from: ``CT_COMMIT`` if set, else git's HEAD as a hash, "-dirty" where tracked files
    differ from it (a copy of a working tree whose git metadata is older than its files says so, not the old
    commit)."""
    if os.environ.get("CT_COMMIT"):
        return os.environ["CT_COMMIT"]
    try:
        done = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=7", "--exclude=*"],
            capture_output=True,
            text=True,
            check=True,
        )
        return done.stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def card_tag(card: str | None = None) -> str:
    """The short name of ``card`` (by default the current GPU's) in result file names: "h100", "h200"."""
    return (card or card_name()).replace("NVIDIA ", "").split()[0].lower()


def header(title: str, card: str | None = None) -> str:
    """A table's title line and the run's card (by default the current GPU), date, commit and versions."""
    today = datetime.date.today().isoformat()
    card = card or card_name()
    return f"# {title}\n\n{card}, {today}, commit {commit()}, CuPy {cupy.__version__}" + _torch_version() + "\n"


def _torch_version() -> str:
    try:
        import torch
    except ImportError:
        return ""
    return f", torch {torch.__version__}"


def free_gpu_memory():
    """Give the pools' cached blocks back (CuPy's, and torch's where it is loaded) before the next size."""
    cupy.get_default_memory_pool().free_all_blocks()
    if "torch" in sys.modules:
        sys.modules["torch"].cuda.empty_cache()


def difference_line(compared: str, diffs) -> str:
    """A table's closing line: ``compared`` and the range of the rows' relative differences."""
    return f"\n{compared}: relative difference {min(diffs):.1e} to {max(diffs):.1e}."


_flush = None


def time_us(fn, args_list, reps: int = 60, warmup: int = 5, flush: str = "read", rounds: int = 2) -> float:
    """GPU time of ``fn(*args)`` in microseconds: the lowest of ``rounds`` medians of ``reps`` calls
    (a clock dip during one round shows as a high median; the lower one is the kernel's own time).

    Before each timed call a pass over a 1 GiB buffer is queued: it evicts L2 and keeps the GPU busy
    (~0.3 ms) while Python enqueues ``fn``, so the events bracket the kernels alone, not the host's
    launch overhead (``host_us`` measures that; a 256 MiB pass is too short to hide host hiccups). The
    default pass reads (a sum), leaving L2 clean; ``"write"`` (a memset, as triton's do_bench does) leaves
    it full of dirty lines whose write-back then competes with ``fn``. ``args_list`` is cycled through as
    well. Events are recorded on the legacy default stream, which CuPy's and torch's default streams both
    are."""
    global _flush
    if _flush is None:
        _flush = cupy.ones(256 << 20, cupy.float32)
    for i in range(warmup):
        fn(*args_list[i % len(args_list)])
    medians = []
    for _ in range(rounds):
        times = []
        for i in range(reps):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            if flush == "read":
                _flush.sum()
            else:
                cupy.cuda.runtime.memsetAsync(_flush.data.ptr, i & 0xFF, _flush.nbytes, 0)
            start.record()
            fn(*args_list[i % len(args_list)])
            end.record()
            end.synchronize()
            times.append(cupy.cuda.get_elapsed_time(start, end) * 1e3)
        medians.append(statistics.median(times))
    return min(medians)


def fastest_in_turn(fns: dict, rounds: int = 3, **kwargs) -> dict:
    """``time_us`` of each of ``fns`` (name -> callable), over ``rounds`` rounds that run them in turn, starting
    one later each round; the lowest of each kept. Clocks drift over seconds of heavy work (an H200 read an
    op 752-819 µs in three such rounds), so what is compared is timed side by side, not one after another.
    A first round is run and dropped: after an idle moment the first of a round ran up to 8% faster at a
    power-bound size (two identical kernels, H200), which favoured whichever came first."""
    items = list(fns.items())
    best = {name: float("inf") for name in fns}
    for r in range(rounds + 1):
        for name, fn in items[r % len(items) :] + items[: r % len(items)]:
            t = time_us(fn, [()], **kwargs)
            if r:
                best[name] = min(best[name], t)
    return best


def spin_up(seconds: float = 1.0) -> None:
    """Keep the GPU busy for a while so the first measurements do not run at idle clocks."""
    import time

    a = cupy.ones((4096, 4096), cupy.float16)
    end = time.perf_counter() + seconds
    while time.perf_counter() < end:
        for _ in range(10):
            a @ a
        cupy.cuda.Device().synchronize()


def host_us(fn, args, calls: int = 2000) -> float:
    """Host time per call of ``fn(*args)`` (validation, dispatch, launch) when the GPU keeps up."""
    import time

    for _ in range(20):
        fn(*args)
    cupy.cuda.Device().synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn(*args)
    elapsed = time.perf_counter() - start
    cupy.cuda.Device().synchronize()
    return elapsed / calls * 1e6


def copies_for(nbytes: int, l2_multiple: int = 4) -> int:
    """How many input sets to rotate through so the set is several times the L2 cache."""
    l2 = cupy.cuda.runtime.getDeviceProperties(cupy.cuda.Device().id)["l2CacheSize"]
    return max(1, min(16, -(-l2_multiple * l2 // max(nbytes, 1))))


def memcpy_us(nbytes: int, reps: int = 60) -> float:
    """GPU time of a device-to-device memcpy of ``nbytes`` (read, and as many written), timed like ``time_us``:
    the 'same-size copy' a pass that moves those bytes is compared with."""
    src = cupy.empty(nbytes, cupy.uint8)
    src[...] = 1
    dst = cupy.empty_like(src)

    def copy():
        cupy.cuda.runtime.memcpyAsync(dst.data.ptr, src.data.ptr, nbytes, cupy.cuda.runtime.memcpyDeviceToDevice, 0)

    return time_us(copy, [()], reps=reps)


def copy_bandwidth_gbs(nbytes: int = 1 << 30) -> float:
    """Device-to-device copy rate, counting bytes read plus bytes written (the memory ceiling)."""
    return 2 * nbytes / memcpy_us(nbytes, reps=20) / 1e3


_READ = None


def read_launch(array):
    """A call that reads ``array``'s bytes once and nothing else (a grid-stride loop of 16-byte loads, four in
    flight per thread): the floor for a kernel that streams those bytes."""
    global _READ
    if _READ is None:
        _READ = cupy.RawKernel(
            r"""
        extern "C" __global__ void read_all(const uint4* p, long long n, unsigned* sink) {
            unsigned acc = 0;
            const long long stride = (long long)gridDim.x * blockDim.x;
            long long i = blockIdx.x * (long long)blockDim.x + threadIdx.x;
            for (; i + 3 * stride < n; i += 4 * stride) {
                const uint4 a = p[i], b = p[i + stride], c = p[i + 2 * stride], d = p[i + 3 * stride];
                acc ^= a.x ^ b.y ^ c.z ^ d.w;
            }
            for (; i < n; i += stride) acc ^= p[i].x;
            if (acc == 0x12345678u) *sink = acc;  // keeps the loads
        }""",
            "read_all",
        )
    sink = cupy.zeros(1, cupy.uint32)
    sms = cupy.cuda.Device().attributes["MultiProcessorCount"]
    n = cupy.int64(array.nbytes // 16)
    return lambda: _READ((sms * 8,), (256,), (array, n, sink))


def read_floor_us(array) -> float:
    """GPU time of ``read_launch(array)``, timed like ``time_us``."""
    return time_us(read_launch(array), [()], reps=30)


def write_table(stem: str, lines: list[str], card: str | None = None) -> str:
    """Write a benchmark's Markdown to $OUT (on the device machine) or benchmarks/results/, named by ``card`` (by
    default the current GPU)."""
    folder = os.environ.get("OUT", RESULTS)
    os.makedirs(folder, exist_ok=True)
    path = os.path.join(folder, f"{stem}-{card_tag(card)}.md")
    with open(path, "w") as f:
        f.write("\n".join(lines) + "\n")
    print(f"written to {path}")
    return path


def side_stream():
    """A non-blocking stream to capture on that first waits for the null stream's work so far (the inputs, made
    there): a non-blocking stream waits for no other stream by itself."""
    stream = cupy.cuda.Stream(non_blocking=True)
    stream.wait_event(cupy.cuda.Stream.null.record())
    return stream


def graph_node_us(launch, nodes: int, rounds: int = 3) -> float:
    """µs a node of a CUDA graph of ``nodes`` calls ``launch(i)`` (captured once after one eager call that compiles
    and allocates), the best of ``rounds`` replays."""
    stream = side_stream()
    with stream:
        launch(0)
        stream.begin_capture()
        for i in range(nodes):
            launch(i)
        graph = stream.end_capture()
        graph.launch(stream)
        best = float("inf")
        for _ in range(rounds):
            start, end = cupy.cuda.Event(), cupy.cuda.Event()
            start.record(stream)
            graph.launch(stream)
            end.record(stream)
            end.synchronize()
            best = min(best, cupy.cuda.get_elapsed_time(start, end) * 1e3)
    return best / nodes


def l2_flush_in_graphs(nbytes: int = 64 << 20):
    """(flush, its µs as a graph node): a copy of ``nbytes`` to put before each timed launch in a graph (a decode
    step's weights evict what the launch would find in L2), whose own time is taken off."""
    src = cupy.ones(nbytes, cupy.uint8)
    dst = cupy.empty_like(src)

    def flush():
        dst[...] = src

    return flush, graph_node_us(lambda i: flush(), 30)


def hf_model_from(config: dict, dtype: str, device: str = "cuda"):
    """transformers' GPT-2 or LLaMA model of ``config`` (config.json entries with ``model_type``) in ``dtype``
    ("float16", "bfloat16", "float32") with its own random initialisation (seed 0: the same weights each call), on
    ``device``, eval mode."""
    import torch
    import transformers

    config = dict(config)
    model_type = config.pop("model_type")
    config = (transformers.GPT2Config if model_type == "gpt2" else transformers.LlamaConfig)(**config)
    torch.manual_seed(0)
    with torch.device(device):
        model = transformers.AutoModelForCausalLM.from_config(
            config, dtype=getattr(torch, dtype), attn_implementation="sdpa"
        )
    return model.eval()


def hf_model(shape: str, device: str = "cuda"):
    """(transformers' model of ``cupy_transformer.bench`` shape ``shape`` from ``hf_model_from``, its dtype)."""
    from cupy_transformer import bench

    config, dtype = bench.shape_config(shape)
    return hf_model_from(config, dtype, device), dtype


def hf_times(hf, prompts, new_tokens: int, static: bool = False) -> dict:
    """Prefill ms and decode ms/token of ``hf.generate`` (greedy) on ``prompts`` [B, S] (a NumPy array of token
    ids), each the best of a few after a warm-up, and the new tokens [B, new_tokens + 1]. A decode ms/token is
    (time of N + 1 new tokens - time of 1) / N, the prefill the time of one new token. ``static``: transformers'
    static cache, whose decoding step it compiles itself (on CUDA, unless the model's generation config says
    ``disable_compile``)."""
    import torch

    ids = torch.from_numpy(prompts).to(hf.device)
    prompt = ids.shape[1]
    # No eos: every run makes exactly its tokens (random weights draw eos at random), without the min-length
    # processor, so an injected model's generate is served by our decode loop (interop.causal_lm).
    kwargs = dict(attention_mask=torch.ones_like(ids), do_sample=False, pad_token_id=0, eos_token_id=None)
    if static:
        kwargs["cache_implementation"] = "static"
    synchronize = torch.cuda.synchronize if ids.device.type == "cuda" else (lambda: None)

    def generate(n):
        synchronize()
        start = time.perf_counter()
        out = hf.generate(ids, max_new_tokens=n, **kwargs)
        synchronize()
        return time.perf_counter() - start, out

    with torch.inference_mode():
        generate(2)
        generate(new_tokens + 1)  # a static cache compiles on its first calls
        one = min(generate(1)[0] for _ in range(3))
        runs = [generate(new_tokens + 1) for _ in range(2)]
    full, tokens = min(runs, key=lambda r: r[0])
    return {"prefill_ms": one * 1e3, "decode_ms": (full - one) / new_tokens * 1e3, "tokens": tokens[:, prompt:]}
