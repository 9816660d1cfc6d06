"""A memo of the most recently used values per GPU: tensor maps, cuBLASLt plans, small uploads.

Values made for one device are useless on another, so the current device is part of every key. When the memo
holds more than ``size`` values the least recently used goes, through ``drop`` where the value owns
something to release (a cuBLASLt plan's descriptors).
"""

from __future__ import annotations

import collections
from typing import Callable, Hashable

from .arrays import import_cupy


class DeviceLRU:
    def __init__(self, size: int, drop: Callable[[object], None] | None = None):
        self.size, self.drop = size, drop
        self._values: collections.OrderedDict[tuple, object] = collections.OrderedDict()

    def get(self, key: Hashable, make: Callable[[], object]):
        """The value for ``key`` on the current device, made by ``make()`` the first time."""
        full_key = (import_cupy().cuda.runtime.getDevice(), key)
        value = self._values.get(full_key)
        if value is not None:
            self._values.move_to_end(full_key)
            return value
        value = self._values[full_key] = make()
        while len(self._values) > self.size:
            _, old = self._values.popitem(last=False)
            if self.drop is not None:
                self.drop(old)
        return value

    def values(self) -> list:
        return list(self._values.values())

    def __len__(self) -> int:
        return len(self._values)

    def clear(self) -> None:
        while self._values:
            _, old = self._values.popitem(last=False)
            if self.drop is not None:
                self.drop(old)


_UPLOADS = DeviceLRU(16)


def device_int32(host):
    """``host`` (a few integers, e.g. per sequence) as an int32 array on the current GPU, uploaded once per distinct
    content: every layer of a step passes the same positions and key ranges, so one upload serves them all (a
    decode call's two uploads took about a third of its batch-1 kernel's time). The arrays are shared: never
    write them."""
    import numpy

    values = numpy.ascontiguousarray(host, numpy.int32)
    return _UPLOADS.get(values.tobytes(), lambda: import_cupy().asarray(values))
