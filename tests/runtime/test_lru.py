"""The per-device memo: values per (device, key), the least recently used dropped past its size."""

from types import SimpleNamespace

from cupy_transformer.runtime import lru


def test_device_lru_keeps_the_most_recent_per_device(monkeypatch):
    device = [0]
    fake = SimpleNamespace(cuda=SimpleNamespace(runtime=SimpleNamespace(getDevice=lambda: device[0])))
    monkeypatch.setattr(lru, "import_cupy", lambda: fake)
    dropped, made = [], []
    memo = lru.DeviceLRU(2, drop=dropped.append)

    def make(value):
        return lambda: made.append(value) or value

    assert memo.get("a", make("a0")) == "a0"
    device[0] = 1
    assert memo.get("a", make("a1")) == "a1"  # another device: its own value
    device[0] = 0
    assert memo.get("a", make("never")) == "a0" and made == ["a0", "a1"]
    assert memo.get("b", make("b0")) == "b0"  # a third entry: the least recent (device 1's "a") goes
    assert dropped == ["a1"] and len(memo) == 2
    memo.clear()
    assert sorted(dropped) == ["a0", "a1", "b0"] and len(memo) == 0
