"""The attention KV cache: preallocated keys and values for every layer, owned by the caller.

DeepSpeed keeps one process-global token counter for all layers and sequences (a prompt restarts it, each
decode step adds one) and never checks it against the cache's size: a sequence that outgrows the cache writes
past its end, into the next layer's. Here the positions live in this object: ``lengths[b]`` is how many tokens
sequence ``b`` holds (on the host, so checks need no GPU round trip); a step asks ``reserve`` for room first,
which fails with a ``ValueError`` naming the capacity and the request before anything is written, and
sequences of different lengths share one batch.

``device_lengths`` holds the same counts as int32 in the backend's arrays for steps that run without the host:
a decode step captured into a CUDA graph reads its slots there and advances them itself (one capture serves
every step), while the host counts the same tokens with ``reserve``, which only checks and counts.
``sync_device`` copies ``lengths`` there (after a prompt; ``reset`` and ``set_lengths`` do it too).

Layout: ``keys`` and ``values`` are ``[layers, batch, kv_heads, max_tokens, head_dim]``: one layer's block is
contiguous, and one head's tokens are rows of ``head_dim`` in order (what an attention kernel streams).
Keys are stored after rotary, at ``kv_heads`` (grouped-query models are not expanded to the query heads).
"""

from __future__ import annotations

import numpy

from .runtime.arrays import array_module, as_array, float_dtype, module_of, positive_int, resolve_backend


class KVCache:
    def __init__(self, layers, batch, kv_heads, max_tokens, head_dim, dtype=numpy.float16, backend=None):
        """Zeroed ``keys``/``values`` of ``[layers, batch, kv_heads, max_tokens, head_dim]`` in ``dtype``, as
        CuPy arrays (``backend="cupy"``) or NumPy arrays (``"numpy"``: the reference path); None: CuPy where a
        GPU is usable, else NumPy."""
        shape = tuple(
            positive_int(n, v)
            for n, v in (
                ("layers", layers),
                ("batch", batch),
                ("kv_heads", kv_heads),
                ("max_tokens", max_tokens),
                ("head_dim", head_dim),
            )
        )
        self.dtype = float_dtype("dtype", dtype)
        self.backend = resolve_backend("backend", backend)
        xp = array_module(self.backend)
        self._adopt(xp.zeros(shape, self.dtype), xp.zeros(shape, self.dtype))
        # Made now: a first use inside a CUDA-graph capture would make it (zeroed) in every replay.
        self._device_lengths = xp.zeros(self.batch, numpy.int32)

    @classmethod
    def over(cls, keys, values) -> KVCache:
        """A cache over existing ``keys`` and ``values`` (NumPy or CuPy arrays of one shape ``[layers, batch,
        kv_heads, max_tokens, head_dim]`` and float dtype, C-contiguous), sharing their memory: what the ops write
        lands in them (e.g. a view over another framework's cache tensors). ``lengths`` start at zero."""
        xp = module_of(keys)
        if module_of(values) is not xp:
            raise TypeError(f"values: expected a {xp.__name__} array like keys; got {type(values).__name__}")
        if keys.ndim != 5 or values.shape != keys.shape or values.dtype != keys.dtype:
            raise ValueError(
                "keys, values: expected [layers, batch, kv_heads, max_tokens, head_dim] arrays of one shape and "
                f"dtype; got {keys.dtype} {tuple(keys.shape)} and {values.dtype} {tuple(values.shape)}"
            )
        for name, array in (("keys", keys), ("values", values)):
            if not array.flags.c_contiguous or 0 in array.shape:
                raise ValueError(f"{name}: expected a non-empty C-contiguous array (the kernels' layout)")
        float_dtype("keys", keys.dtype)
        cache = cls.__new__(cls)
        cache.dtype, cache.backend = keys.dtype, "numpy" if xp is numpy else "cupy"
        cache._adopt(keys, values)
        return cache

    def _adopt(self, keys, values) -> None:
        """Hold ``keys`` and ``values`` (of this cache's dtype and backend) with every sequence empty."""
        self.keys, self.values = keys, values
        self.layers, self.batch, self.kv_heads, self.max_tokens, self.head_dim = keys.shape
        self.lengths = numpy.zeros(self.batch, numpy.int64)
        self._device_lengths = None  # made on first use by a cache ``over`` another framework's tensors (an
        # injected layer makes one every step and never uses it); at once by one of its own (__init__)
        self._longest = 0  # lengths.max(), kept by the methods that change lengths

    @property
    def device_lengths(self):
        """The int32 counts on the backend (zeros until ``sync_device`` or a device step sets them)."""
        if self._device_lengths is None:
            xp = array_module(self.backend)
            if xp is not numpy and xp.cuda.get_current_stream().is_capturing():
                raise RuntimeError(
                    "cache.device_lengths: first asked for inside a CUDA-graph capture, which would make it anew "
                    "(zeroed) in every replay; call cache.sync_device() before capturing"
                )
            self._device_lengths = xp.zeros(self.batch, numpy.int32)
        return self._device_lengths

    def check_room(self, tokens: int) -> int:
        """A ValueError naming the capacity and the request unless every sequence has room for ``tokens``
        more; returns ``tokens``."""
        tokens = positive_int("tokens", tokens)
        if self._longest + tokens <= self.max_tokens:  # every step asks: the common case without array work
            return tokens
        full = numpy.flatnonzero(self.lengths + tokens > self.max_tokens)
        if full.size:
            b = int(full[0])
            raise ValueError(
                f"KV cache full: sequence {b} holds {int(self.lengths[b])} of {self.max_tokens} "
                f"tokens and cannot take {tokens} more (reset it, or build a larger cache)"
            )
        return tokens

    def reserve(self, tokens: int) -> numpy.ndarray:
        """Room for ``tokens`` more tokens in every sequence: returns where they start (each sequence's
        length before the call) and counts them in ``lengths``. Nothing changes if any sequence lacks room."""
        start = self.lengths.copy()
        self.advance(tokens)
        return start

    def advance(self, tokens: int) -> None:
        """``reserve`` without the starts (a decoder's step, whose slots are on the device): room checked, then
        ``tokens`` more counted in every sequence."""
        tokens = self.check_room(tokens)
        self.lengths += tokens
        self._longest += tokens

    def set_lengths(self, lengths) -> None:
        """Set how many tokens each sequence holds, e.g. to drop a right-padded prompt's padding or undo
        tokens; later writes go after these."""
        new = numpy.asarray(lengths)
        if new.shape != (self.batch,) or new.dtype.kind not in "iu":
            raise ValueError(f"lengths: expected {self.batch} integers; got {new.dtype} of shape {new.shape}")
        if (new < 0).any() or (new > self.max_tokens).any():
            raise ValueError(f"lengths: expected values in [0, {self.max_tokens}]; got {new.tolist()}")
        self.lengths[:] = new
        self.sync_device()

    def reset(self) -> None:
        """Every sequence empty (the stored values stay until overwritten; nothing reads past ``lengths``)."""
        self.lengths[:] = 0
        self.sync_device()

    def sync_device(self) -> None:
        """``device_lengths`` = ``lengths`` (an upload, ordered on the current stream)."""
        self.device_lengths[...] = array_module(self.backend).asarray(self.lengths.astype(numpy.int32))
        self._longest = int(self.lengths.max())

    def check_layer(self, layer: int) -> int:
        if isinstance(layer, bool) or not isinstance(layer, (int, numpy.integer)) or not 0 <= layer < self.layers:
            raise ValueError(f"layer: expected an integer in [0, {self.layers - 1}]; got {layer!r}")
        return int(layer)

    def check_write(self, layer: int, tokens: int, start) -> numpy.ndarray:
        """What ``write`` checks before writing ``tokens`` per sequence of ``layer`` at ``start`` (also for
        kernels that write the cache themselves); returns ``start`` as an array."""
        self.check_layer(layer)
        start = numpy.asarray(start)
        if start.shape != (self.batch,) or start.dtype.kind not in "iu":
            raise ValueError(
                f"start: expected {self.batch} integer positions; got {start.dtype} of shape {start.shape}"
            )
        if (start < 0).any() or (start + tokens > self.max_tokens).any():
            raise ValueError(f"start: {tokens} tokens from {start.tolist()} do not fit {self.max_tokens} positions")
        return start

    def write(self, layer: int, k, v, start) -> None:
        """One layer's new keys and values, ``[batch, kv_heads, S, head_dim]`` each, at positions
        ``start[b] .. start[b] + S - 1`` of sequence ``b`` (``start`` as ``reserve`` returned it)."""
        shape = (self.batch, self.kv_heads, -1, self.head_dim)
        k = as_array("k", k, self.backend, ndim=4, dtypes=self.dtype, shape=shape)
        v = as_array("v", v, self.backend, ndim=4, dtypes=self.dtype, shape=tuple(k.shape))
        tokens = k.shape[2]
        start = self.check_write(layer, tokens, start)
        if (start == start[0]).all():
            at = slice(int(start[0]), int(start[0]) + tokens)
            self.keys[layer, :, :, at] = k
            self.values[layer, :, :, at] = v
            return
        for b, s in enumerate(start.tolist()):
            self.keys[layer, b, :, s : s + tokens] = k[b]
            self.values[layer, b, :, s : s + tokens] = v[b]
