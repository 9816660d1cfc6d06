"""The ``cupy-transformer`` command."""

from __future__ import annotations

import argparse
import sys


def _info(args: argparse.Namespace) -> int:
    import platform

    import numpy

    from . import __version__
    from .runtime import kernels

    print(f"cupy_transformer {__version__}  (Python {platform.python_version()}, NumPy {numpy.__version__})")
    try:
        import cupy
        from cupy.cuda import nvrtc, runtime
    except ImportError as e:
        print(f"CuPy: not installed ({e}); only the NumPy reference path is available")
        return 0
    print(f"CuPy {cupy.__version__}; NVRTC {'.'.join(map(str, nvrtc.getVersion()))}")
    print(f"kernel sources: {kernels.kernel_source_dir()}")
    print(f"compile cache: {kernels.cache_dir()}")
    try:
        count = runtime.getDeviceCount()
    except runtime.CUDARuntimeError as e:
        count, reason = 0, str(e)
    else:
        reason = "no CUDA device"
    if count == 0:
        print(f"GPU: none ({reason})")
        archs = args.arch or ["80", "90"]
        for arch in archs:
            seconds = kernels.compile_all(arch)
            for name, t in seconds.items():
                print(f"  compiled {name} for sm_{arch} with NVRTC alone: {t:.2f} s")
        return 0

    def version(v: int) -> str:
        return f"{v // 1000}.{v % 1000 // 10}"

    print(f"CUDA runtime {version(runtime.runtimeGetVersion())}, driver supports {version(runtime.driverGetVersion())}")
    for i in range(count):
        props = runtime.getDeviceProperties(i)
        name = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        print(
            f"GPU {i}: {name}, sm_{props['major']}{props['minor']}, {props['multiProcessorCount']} SMs, "
            f"{props['totalGlobalMem'] / 2**30:.1f} GiB"
        )
    for name, t in kernels.warmup().items():
        print(f"  kernels {name}: ready in {t:.2f} s (compiled, or loaded from the cache)")
    return 0


def _load(folder, args: argparse.Namespace):
    """The model in ``folder`` on the path ``--device`` names (auto: the GPU when there is one), in ``--dtype``
    (default fp16 on the GPU, fp32 on the NumPy path)."""
    from .models import load_model
    from .runtime.arrays import gpu_available

    backend = {"gpu": "cupy", "cpu": "numpy"}.get(args.device) or ("cupy" if gpu_available() else "numpy")
    dtype = args.dtype or ("fp16" if backend == "cupy" else "fp32")
    return load_model(folder, {"fp16": "float16", "fp32": "float32"}[dtype], backend)


def _embed_texts(args: argparse.Namespace) -> list[str]:
    """The texts to embed, one output line each: the positional TEXTs in order, ``-`` standing for stdin's lines,
    then the lines of ``--input FILE`` (one text a line; empty lines are texts too, so lines stay aligned)."""
    from pathlib import Path

    def lines(name: str, data: bytes) -> list[str]:
        try:
            return data.decode("utf-8").splitlines()
        except UnicodeDecodeError as e:
            raise ValueError(f"{name}: not UTF-8 text (byte {e.start}: {e.reason})") from None

    if args.texts.count("-") > 1:
        raise ValueError("embed: `-` (read stdin) may be given once")
    texts = []
    for i, text in enumerate(args.texts):
        if text == "-":
            texts += lines("stdin", sys.stdin.buffer.read())
            continue
        try:
            text.encode("utf-8")
        except UnicodeEncodeError:  # argv bytes that are not UTF-8 arrive as lone surrogates
            raise ValueError(f"embed: TEXT {i + 1} is not UTF-8 text") from None
        texts.append(text)
    if args.input is not None:
        path = Path(args.input)
        if not path.is_file():
            raise FileNotFoundError(f"--input {path}: no such file")
        texts += lines(f"--input {path}", path.read_bytes())
    if not texts:
        raise ValueError("embed: no texts to embed (give TEXT ..., `-` to read stdin, or --input FILE)")
    return texts


def _embed(args: argparse.Namespace) -> int:
    import json

    import numpy

    from .loading import Checkpoint, default_model_dir

    texts = _embed_texts(args)
    try:
        folder = args.model or default_model_dir()
    except ImportError as e:
        raise SystemExit(f"embed: {e}, or pass --model DIR") from None
    model = _load(folder, args)
    if not hasattr(model, "embed"):
        raise SystemExit(f"embed: {folder} holds a {model.model_type} model, which gives no sentence embeddings")
    # Sorted-by-length batches, cut at the model's sentence-transformers max_seq_length (stderr names cut texts).
    embeddings = model.embed_texts(texts, Checkpoint(folder).tokenizer(), args.batch_size)
    if args.out:
        # numpy.save appends .npy to a name without it: name the file it really writes.
        out = args.out if args.out.endswith(".npy") else args.out + ".npy"
        numpy.save(out, embeddings)
        print(f"{embeddings.shape[0]} embeddings of {embeddings.shape[1]} dims written to {out}")
        return 0
    # One JSON array per text and line (JSON Lines), flushed line by line so that `| head -1` stops us early.
    for row in embeddings:
        print(json.dumps([round(float(v), 7) for v in row]), flush=True)
    return 0


def _generate(args: argparse.Namespace) -> int:
    from . import generation
    from .loading import Checkpoint

    model = _load(args.model, args)
    if not hasattr(model, "new_cache"):
        raise SystemExit(f"generate: {args.model} holds a {model.model_type} model, which does not generate text")
    checkpoint = Checkpoint(args.model)
    eos = checkpoint.config.get("eos_token_id")

    def stream(_, piece):
        print(piece, end="", flush=True)

    text = generation.generate(
        model,
        checkpoint.tokenizer(),
        [args.prompt],
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        top_k=args.top_k,
        top_p=args.top_p,
        seed=args.seed,
        eos_token_id=eos if isinstance(eos, (int, list)) else None,
        stop=args.stop or (),
        stream=stream if args.stream else None,
        cuda_graph=not args.no_cuda_graph,
    )[0]
    print() if args.stream else print(text)
    return 0


def _bench(args: argparse.Namespace) -> int:
    from . import bench
    from .runtime.arrays import gpu_available

    if not gpu_available():
        raise SystemExit("bench: needs a CUDA GPU (and CuPy); none is usable here")
    print(bench.report(args.shape, args.batch_size, args.prompt_tokens, args.new_tokens, not args.no_cuda_graph))
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cupy-transformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, GPU, compile cache, and which kernels compile")
    info.add_argument(
        "--arch", action="append", help="without a GPU: compile for sm_ARCH (repeatable; default 80 and 90)"
    )
    info.set_defaults(func=_info)
    embed = sub.add_parser(
        "embed",
        help="sentence embeddings (default model: all-MiniLM-L6-v2): one JSON array per text and line, or .npy",
        description="Print each text's sentence embedding as a JSON array of numbers, one line per text in input "
        "order (JSON Lines), or write them all to a .npy file with --out.",
    )
    embed.add_argument("texts", nargs="*", metavar="TEXT", help="texts to embed; `-` reads stdin, one text a line")
    embed.add_argument("--input", metavar="FILE", help="read texts from FILE (UTF-8, one text a line), after TEXTs")
    embed.add_argument("--model", help="a BERT checkpoint folder (config.json, model.safetensors, tokenizer.json)")
    embed.add_argument("--dtype", choices=["fp16", "fp32"], help="default: fp16 on a GPU, fp32 on the CPU")
    embed.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto", help="cpu: the NumPy path")
    embed.add_argument(
        "--out", metavar="FILE", help="write the embeddings [texts, dims] to FILE (.npy appended if missing)"
    )
    embed.add_argument("--batch-size", type=int, default=64)
    embed.set_defaults(func=_embed)
    gen = sub.add_parser("generate", help="continue a prompt with a GPT-2 or LLaMA-style checkpoint")
    gen.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer.json)")
    gen.add_argument("--prompt", required=True)
    gen.add_argument("--max-new-tokens", type=int, default=20)
    gen.add_argument("--temperature", type=float, default=0.0, help="0: greedy")
    gen.add_argument("--top-k", type=int, default=0)
    gen.add_argument("--top-p", type=float, default=1.0)
    gen.add_argument("--seed", type=int)
    gen.add_argument("--stop", action="append", help="stop before this text (repeatable)")
    gen.add_argument("--dtype", choices=["fp16", "fp32"], help="default: fp16 on a GPU, fp32 on the CPU")
    gen.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto", help="cpu: the NumPy path")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come")
    gen.add_argument(
        "--no-cuda-graph", action="store_true", help="run every decode step eagerly (for debugging; same tokens)"
    )
    gen.set_defaults(func=_generate)
    from .bench import SHAPES

    ben = sub.add_parser("bench", help="time generation on the GPU with random weights of a named model shape")
    ben.add_argument("--shape", choices=list(SHAPES), default="gpt2-small")
    ben.add_argument("--batch-size", type=int, default=1)
    ben.add_argument("--prompt-tokens", type=int, default=128)
    ben.add_argument("--new-tokens", type=int, default=128)
    ben.add_argument("--no-cuda-graph", action="store_true", help="run every decode step eagerly")
    ben.set_defaults(func=_bench)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
