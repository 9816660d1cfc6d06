"""The ``cupy-transformer`` command."""

from __future__ import annotations

import argparse
import json
import math
import os
import sys

from .runtime.kernels import KernelArgumentError

PROG = "cupy-transformer"


def _fail(message: str) -> None:
    """A user error: one line on stderr, exit status 2 (argparse's status for a usage error)."""
    print(f"{PROG}: error: {message}", file=sys.stderr)
    raise SystemExit(2)


class _Parser(argparse.ArgumentParser):
    """argparse whose usage errors are one line (no usage text), like every other user error here."""

    def error(self, message: str) -> None:
        _fail(message)


def _int_at_least(low: int, high: int | None = None):
    """An argparse ``type``: an integer in [low, high]."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected an integer; got {text!r}") from None
        if value < low or (high is not None and value > high):
            bound = f">= {low}" if high is None else f"in [{low}, {high}]"
            raise argparse.ArgumentTypeError(f"expected an integer {bound}; got {value}")
        return value

    return parse


def _float_in(low: float, high: float | None, *, low_open: bool = False):
    """An argparse ``type``: a finite number in [low, high] ((low, high] with ``low_open``; no upper bound
    where ``high`` is None)."""

    def parse(text: str) -> float:
        try:
            value = float(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected a number; got {text!r}") from None
        below = value <= low if low_open else value < low
        if not math.isfinite(value) or below or (high is not None and value > high):
            lower = f"({low}" if low_open else f"[{low}"
            raise argparse.ArgumentTypeError(
                f"expected a finite number in {lower}, {'inf)' if high is None else f'{high}]'}; got {text}"
            )
        return value

    return parse


_POSITIVE = _int_at_least(1)


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
            print(f"compiling every kernel family for sm_{arch} (each once; later runs read the cache):", flush=True)

            def progress(name, seconds, cached, arch=arch):
                how = "from the cache" if cached else "compiled"
                print(f"  {name} for sm_{arch} with NVRTC alone: {seconds:.2f} s ({how})", flush=True)

            kernels.compile_all(arch, progress)
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
    from .runtime.arrays import gpu_problem, require_gpu

    if args.device == "gpu":
        try:
            require_gpu("--device gpu")
        except RuntimeError as e:
            _fail(str(e))
        backend = "cupy"
    elif args.device == "cpu":
        backend = "numpy"
    else:
        problem = gpu_problem()
        if problem is not None:
            print(f"{PROG}: no usable CUDA GPU ({problem}); running on the CPU (the NumPy path)", file=sys.stderr)
        backend = "numpy" if problem else "cupy"
    dtype = {"fp16": "float16", "fp32": "float32", None: None}[args.dtype]
    return load_model(folder, dtype, backend)


def _utf8(name: str, data: bytes) -> str:
    """``data`` as text, or a ValueError naming ``name`` and the first byte that is not UTF-8."""
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{name}: not UTF-8 text (byte {e.start}: {e.reason})") from None


def _embed_texts(args: argparse.Namespace) -> list[str]:
    """The texts to embed, one output line each: the positional TEXTs in order, ``-`` standing for stdin's lines,
    then the lines of ``--input FILE`` (one text a line; empty lines are texts too, so lines stay aligned)."""
    from pathlib import Path

    def lines(name: str, data: bytes) -> list[str]:
        return _utf8(name, data).splitlines()

    if args.texts.count("-") > 1:
        raise ValueError("embed: `-` (read stdin) may be given once")
    texts = []
    for text in args.texts:  # main() has checked that each is UTF-8
        texts += lines("stdin", sys.stdin.buffer.read()) if text == "-" else [text]
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
    out = None
    if args.out:  # numpy.save appends .npy to a name without it: name the file it really writes
        out = args.out if args.out.endswith(".npy") else args.out + ".npy"
        out_folder = os.path.dirname(os.path.abspath(out))
        if not os.path.isdir(out_folder):  # before the model loads and the texts run
            raise FileNotFoundError(f"--out {out}: no folder {out_folder} to write it in")
    try:
        folder = args.model or default_model_dir()
    except ImportError as e:
        raise SystemExit(f"embed: {e}, or pass --model DIR") from None
    model = _load(folder, args)
    if not hasattr(model, "embed"):
        raise SystemExit(f"embed: {folder} holds a {model.model_type} model, which gives no sentence embeddings")
    # Sorted-by-length batches, cut at the model's sentence-transformers max_seq_length (stderr names cut texts).
    embeddings = model.embed_texts(texts, Checkpoint(folder).tokenizer(), args.batch_size)
    if out:
        try:
            numpy.save(out, embeddings)
        except OSError as e:
            raise OSError(f"--out {out}: {e.strerror or e}") from None
        print(f"{embeddings.shape[0]} embeddings of {embeddings.shape[1]} dims written to {out}")
        return 0
    # One JSON array per text and line (JSON Lines), flushed line by line so that `| head -1` stops us early.
    for row in embeddings:
        print(json.dumps([round(float(v), 7) for v in row]), flush=True)
    return 0


def _generate(args: argparse.Namespace) -> int:
    if args.tp > 1:
        if args.prompt == "-":
            _fail(f"--prompt -: prompts from stdin run in one process (--tp 1); got --tp {args.tp}")
        return _generate_tp(args)
    _generate_with(_load(args.model, args), args)
    return 0


def _generate_tp(args: argparse.Namespace) -> int:
    """``generate --tp N``: one process per GPU (``parallel.launch``), each loading its shards; rank 0 prints.
    The arguments are checked here, before any process starts."""
    import random

    from . import parallel

    if args.device == "cpu":
        _fail(f"--tp {args.tp}: tensor parallelism runs on GPUs over NCCL; --device cpu runs one process (--tp 1)")
    gpus = _gpu_count()
    if args.tp > gpus:
        _fail(f"--tp {args.tp}: one process per GPU needs {args.tp} GPUs; {gpus} found")
    if args.seed is None:  # every rank draws from the same seed, so all sample the same tokens
        args.seed = random.getrandbits(64)
    try:
        parallel.launch(args.tp, _generate_rank, (args,))
    except parallel.RankError as e:
        if isinstance(e.error, (*_USER_ERRORS, SystemExit)) and not args.debug:
            _fail(str(e))
        raise
    return 0


def _gpu_count() -> int:
    """How many CUDA GPUs CuPy sees (0 without CuPy, a driver or a GPU)."""
    try:
        import cupy

        return cupy.cuda.runtime.getDeviceCount()
    except Exception:  # no CuPy, no driver, no device: none usable
        return 0


def _generate_rank(comm, args: argparse.Namespace) -> None:
    """One rank of ``generate --tp``: its shards of the model on its GPU, the same generation as every rank."""
    from .models import load_model

    dtype = {"fp16": "float16", "fp32": "float32", None: "float16"}[args.dtype]
    model = load_model(args.model, dtype, "cupy", progress=False if comm.rank else None, comm=comm)
    _generate_with(model, args, show=comm.rank == 0)


def _stdin_prompts():
    """``--prompt -``: stdin's lines as they come (a line a prompt, its line break dropped; blank lines skipped)."""
    got = False
    for number, raw in enumerate(sys.stdin.buffer, 1):
        line = _utf8(f"--prompt -: stdin line {number}", raw).rstrip("\r\n")
        if line.strip():
            got = True
            yield line
    if not got:
        raise ValueError("--prompt -: stdin held no prompt (one a line; blank lines are skipped)")


def _generate_with(model, args: argparse.Namespace, show: bool = True) -> None:
    """Generate from ``args.prompt`` with ``model`` (``-``: from each line of stdin in turn, one model and one kept
    decoder for all); ``show``: print the text (rank 0 of several)."""
    from . import generation
    from .loading import Checkpoint

    if not hasattr(model, "new_cache"):
        raise SystemExit(f"generate: {args.model} holds a {model.model_type} model, which does not generate text")
    checkpoint = Checkpoint(args.model)
    tokenizer, defaults = checkpoint.tokenizer(), generation.generation_defaults(checkpoint)

    def stream(_, piece):
        print(piece, end="", flush=True)

    for prompt in _stdin_prompts() if args.prompt == "-" else [args.prompt]:
        # Flags not given (None) take the checkpoint's generation_config.json (or config.json) values, as
        # transformers does: generation.resolve_settings.
        text = generation.generate(
            model,
            tokenizer,
            [prompt],
            max_new_tokens=args.max_new_tokens,
            temperature=args.temperature,
            top_k=args.top_k,
            top_p=args.top_p,
            seed=args.seed,
            stop=args.stop or (),
            stream=stream if args.stream and show else None,
            cuda_graph=not args.no_cuda_graph,
            defaults=defaults,
        )[0]
        if show:
            print(flush=True) if args.stream else print(text, flush=True)


def _bench(args: argparse.Namespace) -> int:
    from . import bench
    from .runtime.arrays import require_gpu

    try:
        require_gpu("bench")
    except RuntimeError as e:
        _fail(str(e))
    print(bench.report(args.shape, args.batch_size, args.prompt_tokens, args.new_tokens, not args.no_cuda_graph))
    return 0


def main(argv: list[str] | None = None) -> int:
    from . import __version__

    parser = _Parser(prog=PROG, description=__doc__)
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    parser.add_argument("--debug", action="store_true", help="a traceback with every error (for bug reports)")
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
    embed.add_argument("--batch-size", type=_POSITIVE, default=64)
    embed.set_defaults(func=_embed)
    gen = sub.add_parser("generate", help="continue a prompt with a GPT-2 or LLaMA-style checkpoint")
    gen.add_argument("--model", required=True, help="checkpoint folder (config.json, safetensors, tokenizer.json)")
    gen.add_argument(
        "--prompt",
        required=True,
        help="the text to continue; `-`: each line of stdin in turn (one model and decoder; blank lines skipped)",
    )
    given = "default: the checkpoint's generation_config.json (or config.json)"
    gen.add_argument("--max-new-tokens", type=_POSITIVE, help=f"{given} max_new_tokens or max_length - prompt, else 20")
    gen.add_argument(
        "--temperature", type=_float_in(0.0, None), help=f"0: greedy; {given} do_sample and temperature, else greedy"
    )
    gen.add_argument("--top-k", type=_int_at_least(0), help=f"0: all tokens; {given} top_k, else 50 (as transformers)")
    gen.add_argument("--top-p", type=_float_in(0.0, 1.0, low_open=True), help=f"1: no cut; {given} top_p, else 1")
    gen.add_argument("--seed", type=_int_at_least(0, 2**64 - 1))
    gen.add_argument("--stop", action="append", help="stop before this text (repeatable)")
    gen.add_argument("--dtype", choices=["fp16", "fp32"], help="default: fp16 on a GPU, fp32 on the CPU")
    gen.add_argument("--device", choices=["auto", "gpu", "cpu"], default="auto", help="cpu: the NumPy path")
    gen.add_argument("--stream", action="store_true", help="print tokens as they come")
    gen.add_argument(
        "--no-cuda-graph", action="store_true", help="run every decode step eagerly (for debugging; same tokens)"
    )
    gen.add_argument(
        "--tp", type=_POSITIVE, default=1, help="tensor parallelism: the model's shards over N GPUs, one process each"
    )
    gen.set_defaults(func=_generate)
    from .bench import SHAPES

    ben = sub.add_parser("bench", help="time generation on the GPU with random weights of a named model shape")
    ben.add_argument("--shape", choices=list(SHAPES), default="gpt2-small")
    ben.add_argument("--batch-size", type=_POSITIVE, default=1)
    ben.add_argument("--prompt-tokens", type=_POSITIVE, default=128)
    ben.add_argument("--new-tokens", type=_POSITIVE, default=128)
    ben.add_argument("--no-cuda-graph", action="store_true", help="run every decode step eagerly")
    ben.set_defaults(func=_bench)
    for command in sub.choices.values():  # --debug after the command too (SUPPRESS: it never resets the global one)
        command.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    _check_utf8(sub.choices[args.command], args)
    try:
        status = args.func(args)
        sys.stdout.flush()  # here, where a closed pipe is caught, not at exit
        return status
    except KeyboardInterrupt:  # Ctrl-C (how an interactive `generate --prompt -` ends): no traceback, status 130
        if args.debug:
            raise
        print(file=sys.stderr)
        return 130
    except BrokenPipeError:
        # The reader went away (`... | head`): drop what is still buffered for stdout and end quietly.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
    except SystemExit as e:
        if isinstance(e.code, str):  # raise SystemExit("...") in a command: a user error
            _fail(e.code)
        raise
    except _USER_ERRORS as e:
        if args.debug or isinstance(e, KernelArgumentError):  # the latter is a TypeError, but ours: a bug
            raise
        _fail(str(e))


def _user_errors() -> tuple[type, ...]:
    """What the library raises for bad input (a named argument, file or tensor), printed as one line: anything
    else is a bug and keeps its traceback."""
    from safetensors import SafetensorError

    return (ValueError, TypeError, OSError, UnicodeError, json.JSONDecodeError, SafetensorError)


_USER_ERRORS = _user_errors()


def _check_utf8(command: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    """Text arguments must be UTF-8: Python keeps undecodable bytes of the command line as lone surrogates,
    which would fail later, deep in the tokenizer."""
    for action in command._actions:
        values = getattr(args, action.dest, None)
        for value in values if isinstance(values, list) else [values]:
            if not isinstance(value, str):
                continue
            try:
                value.encode("utf-8")
            except UnicodeEncodeError as e:
                name = "/".join(action.option_strings) or action.metavar or action.dest
                raw = value.encode("utf-8", "surrogateescape")[e.start : e.start + 1]
                _fail(f"argument {name}: not valid UTF-8 (byte 0x{raw.hex()} at character {e.start})")


if __name__ == "__main__":
    sys.exit(main())
