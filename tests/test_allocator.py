"""admkit.allocator: glibc's thresholds are set through mallopt, and the switch turns it off."""

import ctypes
import sys

import pytest

from admkit import allocator


class FakeLibc:
    def __init__(self):
        self.calls = []

    def mallopt(self, parameter, value):
        self.calls.append((parameter, value))
        return 1


def test_sets_both_thresholds_through_mallopt(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.delenv("ADMKIT_MALLOC_TUNING", raising=False)
    monkeypatch.setattr(ctypes, "CDLL", lambda name: fake)
    assert allocator.keep_freed_memory()
    assert fake.calls == [(-3, 32 * 2**20), (-1, 2**30)]


def test_off_switch_other_platforms_and_other_c_libraries(monkeypatch):
    fake = FakeLibc()
    monkeypatch.setattr(ctypes, "CDLL", lambda name: fake)
    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setenv("ADMKIT_MALLOC_TUNING", "0")
    assert not allocator.keep_freed_memory()
    monkeypatch.delenv("ADMKIT_MALLOC_TUNING")
    monkeypatch.setattr(sys, "platform", "darwin")
    assert not allocator.keep_freed_memory()
    assert fake.calls == []

    def missing(name):
        raise OSError(f"{name}: cannot open shared object file")

    monkeypatch.setattr(sys, "platform", "linux")
    monkeypatch.setattr(ctypes, "CDLL", missing)
    assert not allocator.keep_freed_memory()


@pytest.mark.skipif(sys.platform != "linux", reason="glibc's mallopt")
def test_real_glibc_accepts_the_values():
    # On this project's machines (Linux, glibc) both calls succeed; a value above glibc's limit
    # would make mallopt return 0.
    try:
        has_mallopt = hasattr(ctypes.CDLL("libc.so.6"), "mallopt")
    except OSError:
        has_mallopt = False
    if not has_mallopt:
        pytest.skip("not glibc")
    assert allocator.keep_freed_memory()
