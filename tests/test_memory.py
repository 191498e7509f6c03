"""``benchmarks.memory``: glibc's heap settings (asked for, refused, opted out of)."""

from __future__ import annotations

import platform

import pytest


class _FakeLibc:
    def __init__(self, answer: int = 1):
        self.calls: list[tuple[int, int]] = []
        self.answer = answer

        def mallopt(parameter: int, value: int) -> int:
            self.calls.append((parameter, value))
            return self.answer

        self.mallopt = mallopt


def test_keep_freed_memory_sets_glibcs_heap_options(monkeypatch):
    from grcn_bench.benchmarks import memory

    libc = _FakeLibc()
    monkeypatch.setattr(memory.sys, "platform", "linux")
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: libc)
    monkeypatch.delenv(memory.ENV_VARIABLE, raising=False)
    assert memory.can_keep_freed_memory() is True and libc.calls == []  # asking changes nothing
    assert memory.keep_freed_memory() is True
    # No mmap for large blocks (they come from the heap), and freed memory stays in the heap up to 2 GiB.
    assert libc.calls == [(-4, 0), (-1, 2**31 - 1)]

    libc.calls.clear()
    monkeypatch.setenv(memory.ENV_VARIABLE, "system")
    assert memory.keep_freed_memory() is False and libc.calls == []  # the opt-out leaves malloc alone
    assert memory.can_keep_freed_memory() is False

    monkeypatch.delenv(memory.ENV_VARIABLE)
    failing = _FakeLibc(answer=0)
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: failing)
    assert memory.keep_freed_memory() is False  # mallopt refused

    class NoMallopt:  # musl and other C libraries
        pass

    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: NoMallopt())
    assert memory.keep_freed_memory() is False
    monkeypatch.setattr(memory.sys, "platform", "darwin")
    monkeypatch.setattr(memory.ctypes, "CDLL", lambda name: libc)
    assert memory.keep_freed_memory() is False and libc.calls == []


@pytest.mark.skipif(platform.libc_ver()[0] != "glibc", reason="mallopt is glibc's")
def test_keep_freed_memory_takes_effect_on_glibc(monkeypatch):
    from grcn_bench.benchmarks.memory import ENV_VARIABLE, keep_freed_memory

    monkeypatch.delenv(ENV_VARIABLE, raising=False)
    assert keep_freed_memory() is True
