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


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="cupy-transformer", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    info = sub.add_parser("info", help="versions, GPU, compile cache, and which kernels compile")
    info.add_argument("--arch", action="append", help="without a GPU: compile for sm_ARCH (repeatable; default 80 and 90)")
    info.set_defaults(func=_info)
    args = parser.parse_args(argv)
    return args.func(args)


if __name__ == "__main__":
    sys.exit(main())
