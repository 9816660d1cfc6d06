"""Whether a kernel family's machine code is the same in two source trees, without a GPU: each tree compiles the
family offline with NVRTC (in a process of its own, with an empty kernel cache) for one architecture, and each
kernel's code (its cubin's ``.text.<kernel>`` section) is compared. What shows that a change leaves the kernels it
does not mean to touch as they were (so their timings stand); for those it changes, each one's registers a thread and
stack bytes (spills) before and after, from the cubin's ``.nv.info`` (what ptxas -v reports, with no GPU).

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


def _c_string(data: bytes, at: int) -> str:
    return data[at : data.index(b"\0", at)].decode()


def sections(cubin: bytes) -> list[tuple[str, tuple]]:
    """The ELF64 cubin's sections in order: (name, header: name offset, type, flags, address, offset, size, link,
    ...)."""
    shoff = struct.unpack_from("<Q", cubin, 0x28)[0]
    entsize, count, names_index = struct.unpack_from("<HHH", cubin, 0x3A)
    headers = [struct.unpack_from("<IIQQQQIIQQ", cubin, shoff + i * entsize) for i in range(count)]
    names = headers[names_index][4]
    return [(_c_string(cubin, names + h[0]), h) for h in headers]


def text_sections(cubin: bytes) -> dict[str, bytes]:
    """The cubin's sections named ``.text.*`` (a kernel's code each), by kernel name."""
    return {n[len(".text.") :]: cubin[h[4] : h[4] + h[5]] for n, h in sections(cubin) if n.startswith(".text.")}


# .nv.info records: a format byte, an attribute byte, then a 2-byte size and that many bytes (EIFMT_SVAL, 4) or a
# value within 4 bytes in all (the other formats). These two hold (symbol index, value) as two 32-bit words.
_SVAL, _REGCOUNT, _FRAME_SIZE = 4, 0x2F, 0x11


def resources(cubin: bytes) -> dict[str, tuple[int, int]]:
    """Each kernel's registers a thread and stack frame bytes (local memory: spilled registers or local arrays;
    0 in a kernel that spills nothing), from the cubin's ``.nv.info`` records, by kernel name."""
    listed = sections(cubin)
    table = dict(listed)
    symtab = next(h for _, h in listed if h[1] == 2)  # SHT_SYMTAB; its names in the section its sh_link names
    names_at = listed[symtab[6]][1][4]
    symbols = [
        _c_string(cubin, names_at + struct.unpack_from("<I", cubin, symtab[4] + 24 * i)[0])
        for i in range(symtab[5] // 24)
    ]
    out: dict[str, list[int]] = {}
    info = table[".nv.info"]
    at, end = info[4], info[4] + info[5]
    while at < end:
        form, attribute = cubin[at], cubin[at + 1]
        if form != _SVAL:
            at += 4
            continue
        size = struct.unpack_from("<H", cubin, at + 2)[0]
        if attribute in (_REGCOUNT, _FRAME_SIZE):
            symbol, value = struct.unpack_from("<II", cubin, at + 4)
            out.setdefault(symbols[symbol], [0, 0])[attribute == _FRAME_SIZE] = value
        at += 4 + size
    return {name: (r, f) for name, (r, f) in out.items() if f".text.{name}" in table}  # kernels, not subroutines


def compiled(tree: str, family: str, arch: str, out: str) -> bytes:
    """The family's cubin as ``tree``'s sources compile it."""
    env = dict(os.environ, PYTHONPATH=os.path.abspath(tree), CUPY_CACHE_DIR=tempfile.mkdtemp())
    subprocess.run([sys.executable, "-c", CHILD, family, arch, out], cwd=tree, env=env, check=True)
    with open(out, "rb") as f:
        return f.read()


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("family", help="MODULE:FAMILY (a KernelFamily) or MODULE:NAME[KEY] (one of a dict of them)")
    parser.add_argument("old")
    parser.add_argument("new")
    parser.add_argument("--arch", default="90")
    args = parser.parse_args(argv)
    trees = (args.old, args.new)
    with tempfile.TemporaryDirectory() as tmp:
        cubins = [compiled(t, args.family, args.arch, os.path.join(tmp, f"{i}.cubin")) for i, t in enumerate(trees)]
    (old, new), (old_use, new_use) = ([f(c) for c in cubins] for f in (text_sections, resources))
    same = [k for k in old if new.get(k) == old[k]]
    print(f"{args.family}, sm_{args.arch}: {len(same)} of {len(old)} kernels the same code ({len(new)} in the new one)")
    use = lambda r: f"{r[0]} registers, {r[1]} B of stack" if r else "?"  # noqa: E731
    for k in sorted(set(old) | set(new)):
        if k in same:
            continue
        if k in old and k in new:
            print(f"  differs: {k} ({use(old_use.get(k))} -> {use(new_use.get(k))})")
        else:
            print(f"  only in {'old' if k in old else 'new'}: {k} ({use((old_use if k in old else new_use).get(k))})")


if __name__ == "__main__":
    main()
