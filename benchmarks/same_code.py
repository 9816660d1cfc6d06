"""Whether a kernel family's machine code is the same in two source trees, without a GPU: each tree compiles the
family offline with NVRTC (in a process of its own, with an empty kernel cache) for one architecture, and each
kernel's code (its cubin's ``.text.<kernel>`` section) is compared. What shows that a change leaves the kernels it
does not mean to touch as they were (so their timings stand).

    python3 benchmarks/same_code.py [--arch 90] MODULE:FAMILY OLD_TREE NEW_TREE    # FAMILY or NAME[KEY] of a dict

e.g. ``cupy_transformer.ops.gemv:GEMV_KERNELS old/head .`` (a TREE as ``ab_step.py`` takes it).
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile

# What a tree's process runs (in the tree): the family's cubin to a file.
CHILD = """
import importlib, pathlib, sys
from cupy_transformer.runtime import kernels
kernels.kernel_source_dir = lambda: pathlib.Path("kernels_cu").resolve()  # this tree's, not an installed copy's
module, name = sys.argv[1].split(":")
name, _, key = name.partition("[")  # NAME[KEY]: a family of a dict of them
family = getattr(importlib.import_module(module), name)
family = family[int(key.rstrip("]"))] if key else family
open(sys.argv[3], "wb").write(family.compile_offline(sys.argv[2]))
"""


def text_sections(cubin: bytes) -> dict[str, bytes]:
    """The ELF64 cubin's sections named ``.text.*`` (a kernel's code each), by name."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)

    def header(i):  # name offset, type, flags, address, offset, size, ...
        return struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize)

    names = header(names_index)[4]
    out = {}
    for i in range(count):
        h = header(i)
        name = cubin[names + h[0] : cubin.index(b"\0", names + h[0])].decode()
        if name.startswith(".text."):
            out[name[len(".text.") :]] = cubin[h[4] : h[4] + h[5]]
    return out


def compiled(tree: str, family: str, arch: str, out: str) -> dict[str, bytes]:
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), CUPY_CACHE_DIR=tempfile.mkdtemp())
    subprocess.run([sys.executable, "-c", CHILD, family, arch, out], cwd=tree, env=env, check=True)
    with open(out, "rb") as f:
        return text_sections(f.read())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", help="MODULE:FAMILY (a KernelFamily) or MODULE:NAME[KEY] (one of a dict of them)")
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--arch", default="90")
    args = parser.parse_args(argv)
    with tempfile.TemporaryDirectory() as tmp:
        old = compiled(args.old, args.family, args.arch, os.path.join(tmp, "old.cubin"))
        new = compiled(args.new, args.family, args.arch, os.path.join(tmp, "new.cubin"))
    same = [k for k in old if new.get(k) == old[k]]
    print(f"{args.family}, sm_{args.arch}: {len(same)} of {len(old)} kernels the same code ({len(new)} in the new one)")
    for k in sorted(set(old) | set(new)):
        if k not in same:
            print(f"  {'differs' if k in old and k in new else 'only in ' + ('old' if k in old else 'new')}: {k}")


if __name__ == "__main__":
    main()
