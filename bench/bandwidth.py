"""Read bandwidth of this machine, measured with a dzc-generated kernel (the decode roofline).

Sums a buffer much larger than the last-level cache with explicit vectors, `threads` threads splitting it
(libgomp, like model kernels). Prints GB/s (1e9 bytes per second), the best of several passes.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from dzc.codegen.builder import KernelBuilder
from dzc.codegen.jit import JitModule
from dzc.codegen.kir import F32, Call, Module, const, load, reduce_add
from dzc.codegen.target import host_target


def read_bandwidth(mbytes: int = 1024, threads: int = 2, passes: int = 5) -> float:
    V = host_target().vector_width
    chunk = 1 << 16                       # floats per work item
    n = (mbytes << 20) // 4 // chunk * chunk
    kb = KernelBuilder("readbw", "bench")
    x, out = kb.buf("x", F32), kb.buf("out", F32)
    with kb.loop(0, n // chunk, parallel=True, name="c") as c:
        accs = [kb.reg(const(0.0, F32.vec(V))) for _ in range(4)]
        with kb.loop(0, chunk, step=4 * V, name="i") as i:
            for j, r in enumerate(accs):
                kb.set(r, load(x, c * chunk + i + j * V, V) + r.v)
        kb.store(out, c, reduce_add(accs[0].v + accs[1].v + accs[2].v + accs[3].v))
    m = Module()
    m.add(kb.build())
    m.entries["bw"] = [Call("readbw", [0, 1])]
    jm = JitModule(m, threads=threads)
    data = np.ones(n, np.float32)
    res = np.zeros(n // chunk, np.float32)
    jm.run("bw", [data, res])
    best = 0.0
    for _ in range(passes):
        t0 = time.perf_counter()
        jm.run("bw", [data, res])
        best = max(best, n * 4 / (time.perf_counter() - t0) / 1e9)
    assert res.sum() == n
    return best


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--mbytes", type=int, default=1024)
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    a = ap.parse_args()
    for t in a.threads:
        print(f"threads {t}: {read_bandwidth(a.mbytes, t):.1f} GB/s")


if __name__ == "__main__":
    main()
