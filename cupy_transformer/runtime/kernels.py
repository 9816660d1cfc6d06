"""CUDA kernel families: load a ``.cu`` file, compile it with NVRTC through CuPy, launch its kernels.

A *family* is one file of ``kernels_cu/`` plus the template instantiations (name expressions) that
Python launches, e.g. ``ct::norm_rows<__half, 8, 4>``. It is compiled once per (source, options,
device) into one ``cupy.RawModule``; CuPy's on-disk kernel cache keys on the full source text, so
local ``#include "x.cuh"`` lines are inlined here (a changed header must change the key) with
``#line`` markers that keep file names and line numbers in NVRTC's messages.

Launchers call ``KernelFamily.launch(name, grid, block, **arguments)`` with the kernel's arguments by the
names its signature gives them, in its order: the family reads each kernel's parameter list from the source
(``kernel_parameters``), refuses arguments that do not match it name by name, and converts each scalar to
the parameter's C type with a range check (a silently wrapped ``int`` would be an out-of-bounds access).

``compile_offline`` compiles a family for a named architecture with NVRTC alone (no GPU, no driver),
which is how CI proves that every kernel compiles; its cubins are kept in ``cache_dir()`` too (CuPy's cache
covers only compiles for a GPU), so ``cupy-transformer info`` without a GPU compiles once, not every run.
"""

from __future__ import annotations

import hashlib
import importlib.resources
import os
import re
import time
from pathlib import Path
from typing import Callable, Iterable

import numpy

from . import programmatic
from .arrays import import_cupy

#: The C++ element type a kernel template is instantiated with, and its size in bytes, per dtype name (the
#: names of ``arrays.FLOAT_NAMES``: the kernel lists are built at import, without ml_dtypes' bf16 dtype).
CTYPES = {"float16": "__half", "float32": "float", "bfloat16": "__nv_bfloat16"}
ITEMSIZES = {"float16": 2, "float32": 4, "bfloat16": 2}
HALF_CTYPES = tuple(c for name, c in CTYPES.items() if ITEMSIZES[name] == 2)  # the tensor-core kernels' types


_CTYPE_OF: dict = {}


def ctype_of(dtype) -> str:
    """``CTYPES``'s entry for ``dtype``: a dtype (an array's, at a launch), a NumPy type or a name. Cached by what
    was given: a dtype's ``name`` is computed in Python, microseconds a call."""
    try:
        return _CTYPE_OF[dtype]
    except KeyError:
        name = dtype if isinstance(dtype, str) else numpy.dtype(dtype).name
        _CTYPE_OF[dtype] = CTYPES[name]
        return CTYPES[name]


# `--std=c++17` for `if constexpr`. CuPy adds `-ftz=true` to every RawModule; `compile_offline` adds it
# too, so CI compiles what a GPU compiles.
COMPILE_OPTIONS = ("--std=c++17",)

_INCLUDE = re.compile(r'^\s*#\s*include\s+"([^"]+)"\s*$')


class KernelCompileError(RuntimeError):
    """NVRTC rejected a kernel family: carries the file name and the compiler log."""


class KernelArgumentError(TypeError):
    """A launch whose arguments do not match the kernel's parameters (names, order or count)."""


def kernel_source_dir():
    """The folder holding the ``.cu``/``.cuh`` sources (a Traversable)."""
    try:
        return importlib.resources.files("cupy_transformer.kernels_cu")
    except ModuleNotFoundError:
        # A checkout on PYTHONPATH, not installed: the sources sit beside the package.
        return Path(__file__).resolve().parents[2] / "kernels_cu"


def read_source(filename: str) -> str:
    """The source of ``filename`` with its local includes inlined (each at most once)."""
    root = kernel_source_dir()
    seen: set[str] = set()

    def expand(name: str) -> list[str]:
        if name in seen:
            return []
        seen.add(name)
        path = root / name
        if not path.is_file():
            raise FileNotFoundError(f"kernel source {name!r} not found in {root}")
        out = [f'#line 1 "{name}"']
        for number, line in enumerate(path.read_text().splitlines(), start=1):
            match = _INCLUDE.match(line)
            if match:
                out += expand(match.group(1))
                out.append(f'#line {number + 1} "{name}"')
            else:
                out.append(line)
        return out

    return "\n".join(expand(filename)) + "\n"


def cuda_include_dir() -> str | None:
    """The CUDA headers CuPy itself uses (a CUDA install or the ``cuda-toolkit`` wheels)."""
    from cupy import _environment

    root = _environment.get_cuda_path()
    if root and os.path.isdir(os.path.join(root, "include")):
        return os.path.join(root, "include")
    return None


def compile_options() -> tuple[str, ...]:
    """NVRTC options of every kernel compile: ``COMPILE_OPTIONS`` and the CUDA headers CuPy uses."""
    include = cuda_include_dir()
    return COMPILE_OPTIONS + ((f"-I{include}",) if include else ())


class KernelFamily:
    """The kernels of one ``.cu`` file, compiled together once per device on first use."""

    registry: dict[str, "KernelFamily"] = {}

    def __init__(
        self,
        filename: str,
        name_expressions: Iterable[str],
        arch: str | None = None,
        register: bool = True,
        programmatic: bool = False,
        part: str | None = None,
    ):
        """``arch``: the one architecture the family is built for (e.g. "90a", for instructions only that
        target has); its launcher must run it on that architecture alone. None: the current device's.
        ``register``: list it in ``registry`` (what warmup and the CI compile cover), by file name, or with
        ``part`` as "file (part)": a second family of a file's kernels that few calls need, compiled apart on
        their first use (the GEMV's 9-16-row kernels). ``programmatic``: every
        kernel of the file waits for the kernel before (``follow_previous_kernel``), so inside
        ``programmatic.programmatic_launches()`` its launches may start early (runtime/programmatic.py)."""
        self.filename = filename
        self.name_expressions = tuple(name_expressions)
        self.arch = arch
        self.programmatic = programmatic
        self._module = None
        self._kernels: dict[tuple[int, str], object] = {}
        self._packers: dict[str, object] = {}
        if register:
            KernelFamily.registry[filename if part is None else f"{filename} ({part})"] = self

    def extended(self, name_expressions: Iterable[str]) -> "KernelFamily":
        """A family of the same file with more instantiations (a sweep's geometries), outside the registry, so
        warmup and the CI compile keep to what the launchers run."""
        names = self.name_expressions + tuple(n for n in name_expressions if n not in self.name_expressions)
        return KernelFamily(self.filename, names, self.arch, register=False, programmatic=self.programmatic)

    def parameters(self, name_expression: str) -> tuple[tuple[str, str], ...]:
        """The (C type, name) of each parameter of the kernel that ``name_expression`` instantiates."""
        return kernel_parameters(read_source(self.filename), name_expression)

    def launch(self, name_expression: str, grid, block, shared_mem: int = 0, **arguments) -> None:
        """Launch one instantiation on the current stream with ``arguments`` named and ordered as its
        parameters (``pack``)."""
        values = self.pack(name_expression, arguments)  # checked before the kernel is loaded
        if self.programmatic and programmatic.active():
            programmatic.launch(self.kernel(name_expression), grid, block, shared_mem, values)
        else:
            self.kernel(name_expression)(grid, block, values, shared_mem=shared_mem)

    def pack(self, name_expression: str, arguments: dict) -> tuple:
        """The kernel's argument tuple from a launch's ``arguments`` (name -> value, in the signature's order):
        scalars converted to their C types, range-checked."""
        pack = self._packers.get(name_expression)
        if pack is None:
            pack = self._packer(name_expression, tuple(arguments))
        try:
            return pack(**arguments)
        except TypeError:  # a name the kernel lacks, or one missing: say which
            self._packer(name_expression, tuple(arguments))
            raise

    def _packer(self, name_expression: str, given: tuple[str, ...]):
        """The function that turns a launch's named arguments into the kernel's argument tuple (made once per
        instantiation from its signature; launches are on the hot path, so it is generated code: each scalar
        converted inline, no loop), after checking that ``given`` names the parameters in their order."""
        params = self.parameters(name_expression)
        names = tuple(name for _, name in params)
        if given != names:
            raise KernelArgumentError(
                f"{self.filename}: {name_expression} takes ({', '.join(names)}); the launch gave ({', '.join(given)})"
            )
        items = []
        for ctype, name in params:
            if ctype == "pointer":
                items.append(name)
            else:  # the value's converted scalar from the memo, else made (and range-checked) there
                tag = _SCALARS[ctype]
                items.append(f"(_memo_{tag}[{name}] if {name} in _memo_{tag} else _scalar({tag!r}, {name!r}, {name}))")
        source = f"def pack({', '.join(names)}):\n    return ({', '.join(items)},)\n"
        scope = {"_scalar": _scalar, **{f"_memo_{tag}": memo for tag, memo in _SCALAR_MEMOS.items()}}
        exec(compile(source, f"<launch {name_expression}>", "exec"), scope)
        self._packers[name_expression] = scope["pack"]
        return scope["pack"]

    def module(self):
        """The ``cupy.RawModule``; CuPy compiles (or loads from its cache) per device lazily."""
        if self._module is None:
            cupy = import_cupy()
            # CuPy appends the device's -arch=sm_90 after these options; NVRTC then still builds for sm_90a.
            arch = (f"-arch=sm_{self.arch}",) if self.arch else ()
            self._module = cupy.RawModule(
                code=read_source(self.filename),
                options=compile_options() + arch,
                name_expressions=self.name_expressions,
            )
        return self._module

    def builds_here(self) -> bool:
        """Whether the current device can run this family (any device, unless it has an architecture)."""
        return self.arch is None or self.arch.rstrip("a") == str(compute_capability())

    def kernel(self, name_expression: str):
        """The launchable kernel for one instantiation on the current device."""
        cupy = import_cupy()
        key = (cupy.cuda.runtime.getDevice(), name_expression)
        kernel = self._kernels.get(key)
        if kernel is None:
            if name_expression not in self.name_expressions:
                raise KeyError(f"{self.filename}: {name_expression!r} is not one of its instantiations")
            if not self.builds_here():
                raise RuntimeError(
                    f"{self.filename} is built for sm_{self.arch} alone; this GPU is sm_{compute_capability()}"
                )
            try:
                kernel = self.module().get_function(name_expression)
            except cupy.cuda.compiler.CompileException as e:
                raise KernelCompileError(f"{self.filename}: NVRTC failed:\n{e.get_message()}") from None
            self._kernels[key] = kernel
        return kernel

    def compile_offline(self, arch: str) -> bytes:
        """Compile for ``sm_<arch>`` (the family's own architecture where it has one) with NVRTC alone (no GPU
        needed); returns the cubin, kept in ``offline_cache_path`` so that the next call (any process) reads it."""
        path = self.offline_cache_path(arch)
        if path.is_file():
            return path.read_bytes()
        arch = self.arch or arch
        from cupy.cuda import nvrtc

        source = read_source(self.filename)
        prog = nvrtc.createProgram(source, self.filename, (), ())
        try:
            for name in self.name_expressions:
                nvrtc.addNameExpression(prog, name)
            try:
                nvrtc.compileProgram(prog, list(self._offline_options(arch)))
            except nvrtc.NVRTCError:
                raise KernelCompileError(
                    f"{self.filename} (sm_{arch}): NVRTC failed:\n{nvrtc.getProgramLog(prog)}"
                ) from None
            for name in self.name_expressions:
                nvrtc.getLoweredName(prog, name)  # raises if an instantiation was not emitted
            cubin = nvrtc.getCUBIN(prog)
        finally:
            nvrtc.destroyProgram(prog)
        try:  # written whole, then renamed: a concurrent reader never sees half a file
            path.parent.mkdir(parents=True, exist_ok=True)
            partial = path.with_name(f"{path.name}.{os.getpid()}.tmp")
            partial.write_bytes(cubin)
            os.replace(partial, path)
        except OSError:  # an unwritable cache costs the next run a compile, nothing more
            pass
        return cubin

    def _offline_options(self, arch: str) -> tuple[str, ...]:
        return compile_options() + ("-ftz=true", f"-arch=sm_{arch}")

    def offline_cache_path(self, arch: str) -> Path:
        """Where ``compile_offline`` keeps its cubin for ``sm_<arch>``: in ``cache_dir()``, named by a hash of
        what decides the cubin (the source with its includes, the options, the instantiations, NVRTC's
        version), as CuPy names its own cache files."""
        arch = self.arch or arch
        from cupy.cuda import nvrtc

        import_cupy()
        key = "\0".join(
            (read_source(self.filename), *self._offline_options(arch), *self.name_expressions, str(nvrtc.getVersion()))
        )
        digest = hashlib.sha256(key.encode()).hexdigest()[:32]
        return Path(cache_dir()) / "offline" / f"{Path(self.filename).stem}-sm_{arch}-{digest}.cubin"


def compile_all(arch: str, progress: Callable[[str, float, bool], None] | None = None) -> dict[str, float]:
    """Compile every kernel family for ``sm_<arch>`` without a GPU (or read it from the offline cache: see
    ``compile_offline``); returns seconds per file, and calls ``progress(file, seconds, from_cache)`` after each.

    The families are those the ops registered; importing this module imports the package, and so
    every op, first."""
    seconds = {}
    for filename, family in sorted(KernelFamily.registry.items()):
        cached = family.offline_cache_path(arch).is_file()
        start = time.perf_counter()
        family.compile_offline(arch)
        seconds[filename] = time.perf_counter() - start
        if progress is not None:
            progress(filename, seconds[filename], cached)
    return seconds


def warmup() -> dict[str, float]:
    """Compile (or load from CuPy's cache) every family the current GPU runs; returns seconds per file."""
    seconds = {}
    for filename, family in sorted(KernelFamily.registry.items()):
        if not family.builds_here():
            continue
        start = time.perf_counter()
        for name in family.name_expressions:
            family.kernel(name)
        seconds[filename] = time.perf_counter() - start
    return seconds


def cache_dir() -> str:
    """Where CuPy keeps compiled kernels across processes."""
    return os.environ.get("CUPY_CACHE_DIR", os.path.join(os.path.expanduser("~"), ".cupy", "kernel_cache"))


def _kernel_name(name_expression: str) -> str:
    """``ct::norm_rows<__half, 8, 4>`` -> ``norm_rows``."""
    return name_expression.split("<", 1)[0].rsplit("::", 1)[-1].strip()


def _split_top_level(text: str) -> list[str]:
    """``text`` split at the commas outside (), <> and []."""
    pieces, depth, current = [], 0, []
    for ch in text:
        if ch in "(<[":
            depth += 1
        elif ch in ")>]":
            depth -= 1
        if ch == "," and depth == 0:
            pieces.append("".join(current))
            current = []
        else:
            current.append(ch)
    pieces.append("".join(current))
    return [p.strip() for p in pieces if p.strip()]


def kernel_parameters(source: str, name_expression: str) -> tuple[tuple[str, str], ...]:
    """The (C type, name) of each parameter of the ``__global__`` function that ``name_expression`` names,
    read from ``source`` (includes inlined). The C type is "pointer" for any pointer, else the scalar type
    ("int", "unsigned", "long long", "float"). A parameter list that is one macro is expanded."""
    name = _kernel_name(name_expression)
    head = re.search(r"__global__\s+void\s+(?:__launch_bounds__\s*\([^)]*\)\s*)?" + re.escape(name) + r"\s*\(", source)
    if head is None:
        raise KernelArgumentError(f"no __global__ function {name!r} found for {name_expression}")
    depth, at = 1, head.end()
    while depth:
        depth += {"(": 1, ")": -1}.get(source[at], 0)
        at += 1
    text = re.sub(r"//[^\n]*|/\*.*?\*/", " ", source[head.end() : at - 1], flags=re.S).strip()
    if re.fullmatch(r"[A-Za-z_]\w*", text):  # a macro: #define NAME <list>, with line continuations
        macro = re.search(r"#\s*define\s+" + text + r"\b((?:[^\n\\]|\\\n|\\)*)", source)
        if macro is None:
            raise KernelArgumentError(f"{name_expression}: parameter list {text} is no macro found in the source")
        text = macro.group(1).replace("\\\n", " ")
    params = []
    for piece in _split_top_level(text):
        piece = piece.split("=", 1)[0].strip()
        words = re.findall(r"[A-Za-z_]\w*|\*", piece)
        pname = words[-1]
        if "*" in words:
            ctype = "pointer"
        else:
            ctype = " ".join(w for w in words[:-1] if w not in ("const", "__restrict__", "signed"))
            ctype = {
                "unsigned int": "unsigned",
                "int32_t": "int",
                "uint32_t": "unsigned",
                "int64_t": "long long",
                "long long int": "long long",
            }.get(ctype, ctype)
            if ctype not in _SCALARS:
                raise KernelArgumentError(
                    f"{name_expression}: parameter {pname} has type {ctype!r}, which launches "
                    f"do not convert (one of {', '.join(_SCALARS)})"
                )
        params.append((ctype, pname))
    return tuple(params)


# The NumPy type a launch converts each scalar parameter to (pointers go as they are: CuPy arrays or pointers).
_SCALARS = {"int": "int32", "unsigned": "uint32", "long long": "int64", "float": "float32"}
_RANGES = {"int32": (-(2**31), 2**31), "uint32": (0, 2**32), "int64": (-(2**63), 2**63)}
# Converted scalars by value: a launch's sizes and flags repeat, and making a NumPy scalar costs more than
# finding one (a decode step launches ~150 kernels of ~10 scalars each). Bounded: past it, values are made.
_SCALAR_MEMOS: dict[str, dict] = {tag: {} for tag in _SCALARS.values()}
_MEMO_SIZE = 1 << 16


def _scalar(tag: str, name: str, value):
    """``value`` as the NumPy scalar of ``tag`` (a kernel parameter's C type), range-checked."""
    if tag in _RANGES:
        low, high = _RANGES[tag]
        if not low <= value < high:
            raise ValueError(f"{name}: {value} does not fit the kernel's {tag} argument")
    converted = getattr(numpy, tag)(value)
    memo = _SCALAR_MEMOS[tag]
    if len(memo) < _MEMO_SIZE:
        memo[value] = converted
    return converted


def vector_width(dtype: numpy.dtype | str) -> int:
    """Elements of ``dtype`` (a dtype or its name) in one 16-byte access (8 fp16/bf16, 4 fp32)."""
    return 16 // (ITEMSIZES[dtype] if isinstance(dtype, str) else numpy.dtype(dtype).itemsize)


def access_width(dtype: numpy.dtype, width: int, *arrays, any_width: bool = False) -> int:
    """Elements per access for an elementwise kernel over rows of ``width``: 16 bytes when every array (None
    skipped) is 16-byte aligned and the rows are whole vectors, or at any width for a kernel that runs over
    the flat tensor with a tail (``any_width``, elementwise.cuh); else one element."""
    vec = vector_width(dtype)
    aligned = all(a.data.ptr % 16 == 0 for a in arrays if a is not None)
    return vec if aligned and (any_width or width % vec == 0) else 1


def run_variants(dtype: numpy.dtype | str) -> tuple[tuple[int, str], ...]:
    """The (VEC, WHOLE) template arguments an elementwise.cuh kernel is built with for ``dtype``: 16-byte runs
    over rows of whole vectors or of any width, and single elements (whose rows are always whole)."""
    vec = vector_width(dtype)
    return (vec, "true"), (vec, "false"), (1, "true")


def whole_rows(width: int, vec: int) -> str:
    """The WHOLE template argument (a C++ bool) for rows of ``width`` elements walked in runs of ``vec``."""
    return "true" if width % vec == 0 else "false"


_SM_COUNTS: dict[int, int] = {}


def _per_kernel(memo: dict, kernel, extra, compute):
    """``compute()`` once per (kernel, ``extra``). A kernel object belongs to one device. The memo holds the
    kernel with its value: keyed by ``id`` alone, a freed kernel (a sweep's own module) could pass its id and
    entry to a new kernel."""
    key = (id(kernel), extra)
    hit = memo.get(key)
    if hit is None:
        hit = memo[key] = (compute(), kernel)
    return hit[0]


_WORKSPACES: dict[tuple[int, int], tuple] = {}


def split_workspace(partial_floats: int, counters: int):
    """fp32 partials and zeroed counters for kernels that split work across blocks and let the last block
    finish it (``last_block_done`` in common.cuh): one set per (device, stream), shared by every such
    launch, since launches on one stream run in order and each leaves its counters at zero. An outgrown
    array is kept, not freed: a CUDA graph captured on the stream before holds it and writes it when
    replayed. Sizes at least double, so the kept ones together stay smaller than the newest. Growing while the
    stream is being captured raises ``RuntimeError`` (warm the step up first)."""
    cupy = import_cupy()
    key = (cupy.cuda.runtime.getDevice(), cupy.cuda.get_current_stream().ptr)
    if key not in _WORKSPACES:
        _WORKSPACES[key] = (cupy.empty(0, cupy.float32), cupy.empty(0, cupy.int32), [])
    partials, zeroed, outgrown = _WORKSPACES[key]
    grow_partials, grow_counters = partials.size < max(partial_floats, 1), zeroed.size < max(counters, 1)
    if not (grow_partials or grow_counters):
        return partials, zeroed
    if cupy.cuda.get_current_stream().is_capturing():  # a captured memset would zero the counters only at replay
        raise RuntimeError(
            f"split workspace: this launch needs more ({partial_floats} partial floats, {counters} "
            "counters) than the stream has, and it cannot be made while the stream is being "
            "captured; run the step once on this stream before capturing it"
        )
    if grow_partials:
        outgrown.append(partials)
        partials = cupy.empty(max(partial_floats, 2 * partials.size, 1 << 16), cupy.float32)
    if grow_counters:
        outgrown.append(zeroed)
        zeroed = cupy.zeros(max(counters, 2 * zeroed.size, 1024), cupy.int32)
    _WORKSPACES[key] = (partials, zeroed, outgrown)
    return partials, zeroed


_SHARED_OPT_IN: dict[tuple, tuple] = {}


def dynamic_shared(kernel, size: int) -> int:
    """``size`` bytes of dynamic shared memory for ``kernel``, opting in (once per kernel and size) where it
    passes what the kernel allows now (by default 48 KB less its static shared memory); returns ``size`` for the
    launch's ``shared_mem``. The limit is only ever raised: a kernel launched at several sizes (the GEMV's norm
    prologue) failed its larger launches once a smaller one had lowered it."""

    def opt_in():
        if size > kernel.max_dynamic_shared_size_bytes:
            kernel.max_dynamic_shared_size_bytes = size
        return size

    return _per_kernel(_SHARED_OPT_IN, kernel, size, opt_in)


def compute_capability() -> int:
    """The current GPU's compute capability as an integer, e.g. 90 for 9.0."""
    cupy = import_cupy()
    return int(cupy.cuda.Device().compute_capability)


def resident_blocks(kernel, threads: int, dynamic: int = 0) -> int:
    """How many blocks of ``threads`` threads of ``kernel`` one multiprocessor holds at once: the tightest of
    its registers (allocated per warp, 256 at a time, each sub-partition's file apart), its static shared
    memory plus the ``dynamic`` bytes a launch asks for (plus the 1 KB the runtime reserves per block) and the
    thread limit."""
    cupy = import_cupy()
    attrs = cupy.cuda.Device().attributes
    warps = -(-threads // 32)
    per_warp = -(-kernel.num_regs * 32 // 256) * 256
    by_regs = 4 * (attrs["MaxRegistersPerMultiprocessor"] // 4 // per_warp) // warps
    by_shared = attrs["MaxSharedMemoryPerMultiprocessor"] // (kernel.shared_size_bytes + dynamic + 1024)
    by_threads = attrs["MaxThreadsPerMultiProcessor"] // threads
    return max(1, min(by_regs, by_shared, by_threads))


_WAVES: dict[tuple, tuple] = {}


def wave_blocks(kernel, threads: int, dynamic: int = 0) -> int:
    """Blocks of ``threads`` threads of ``kernel`` the whole GPU runs at once (``resident_blocks`` on every
    multiprocessor): the grid of one wave. Kept per (kernel, threads, dynamic): reading the device's and the
    kernel's attributes on every launch costs host time on a hot path (a model's every layer)."""
    return _per_kernel(
        _WAVES, kernel, (threads, dynamic), lambda: resident_blocks(kernel, threads, dynamic) * sm_count()
    )


def sm_count() -> int:
    """Multiprocessors of the current GPU (sizes grid-stride launches)."""
    cupy = import_cupy()
    device = cupy.cuda.runtime.getDevice()
    if device not in _SM_COUNTS:
        _SM_COUNTS[device] = cupy.cuda.Device(device).attributes["MultiProcessorCount"]
    return _SM_COUNTS[device]


def vector_count(vectors: int) -> numpy.uint32:
    """The item count of a grid-stride kernel, which indexes in 32 bits (below 2^31, so the stride never wraps)."""
    if vectors >= 1 << 31:
        raise ValueError(f"{vectors} vectors exceed one launch's 2^31 (split the batch)")
    return numpy.uint32(vectors)


def elementwise_grid(vectors: int, threads: int = 256, blocks_per_sm: int = 8) -> tuple[int]:
    """Grid for a grid-stride loop over ``vectors`` items: enough blocks to fill the GPU, no more."""
    return (max(1, min((vectors + threads - 1) // threads, sm_count() * blocks_per_sm)),)
