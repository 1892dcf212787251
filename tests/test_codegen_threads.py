"""The CPU team schedule (codegen/llvm.py): every iteration of a shared loop runs exactly once, whatever the trip
count, grain and team size, and each phase sees the writes of the phases before it, across kernels too."""
from __future__ import annotations

import numpy as np
import pytest

from dzc.codegen.builder import KernelBuilder
from dzc.codegen.jit import JitModule
from dzc.codegen.kir import I32, Call, Module, cast, const, load


def _count(grain: int):
    """n[i] += 1 for i < T: a shared loop (tail claims included) must touch each i once."""
    kb = KernelBuilder(f"count{grain}", "test")
    n = kb.buf("n", I32)
    with kb.loop(0, kb.T, parallel=True, grain=grain, name="i") as i:
        kb.store(n, i, load(n, i) + const(1, I32))
    return kb.build()


def _phases():
    """a[i] = i (shared); s = sum(a) (thread 0); b[i] = a[T-1-i] + s (shared); c[i] = b[i] + 1 (shared, in step)."""
    kb = KernelBuilder("phases", "test")
    a, s, b, c = kb.buf("a", I32), kb.buf("s", I32), kb.buf("b", I32), kb.buf("c", I32)
    with kb.loop(0, kb.T, parallel=True, name="i") as i:
        kb.store(a, i, cast(i, I32))
    kb.store(s, 0, const(0, I32))
    with kb.loop(0, kb.T, name="j") as j:
        kb.store(s, 0, load(s, 0) + load(a, j))
    with kb.loop(0, kb.T, parallel=True, name="i") as i:
        kb.store(b, i, load(a, kb.T - 1 - i) + load(s, 0))
    with kb.loop(0, kb.T, parallel=True, name="i") as i:
        kb.store(c, i, load(b, i) + const(1, I32))
    return kb.build()


@pytest.fixture(scope="module")
def team_module() -> JitModule:
    m = Module()
    for grain in (1, 3, 16):
        m.add(_count(grain))
    m.add(_phases())
    # count, then phases reading the counts' neighbour buffers: kernels follow each other within one team
    m.entries["all"] = [Call("count1", [0]), Call("count3", [1]), Call("count16", [2]), Call("phases", [3, 4, 5, 6])]
    return JitModule(m, threads=2)


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_every_iteration_once_and_phases_in_order(team_module, threads):
    team_module.set_threads(threads)
    for T in (0, 1, 2, 5, 31, 64, 257, 4099):
        for _ in range(20):
            counts = [np.zeros(max(1, T), np.int32) for _ in range(3)]
            a, s, b, c = (np.zeros(max(1, T), np.int32) for _ in range(4))
            team_module.run("all", counts + [a, s, b, c], T=T)
            for cnt in counts:
                assert (cnt[:T] == 1).all(), (threads, T, np.flatnonzero(cnt[:T] != 1)[:8])
            want = np.arange(T, dtype=np.int64)[::-1] + T * (T - 1) // 2
            assert (b[:T] == want).all() and (c[:T] == want + 1).all(), (threads, T)
