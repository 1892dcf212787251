"""Causal attention kernels with a block-wise online softmax (no [heads, queries, keys] score buffer).

ATTENTION: one work item per (query, head); keys in blocks of B: scores into a stack array, one max/rescale per
block, then the value rows accumulate into a stack accumulator (a few vectors of it at a time, in registers
across the whole key block). MLA_ATTENTION (absorbed MLA over the latent
cache): one work item per (query, block of HB heads), heads inside the key block so each block of latent rows is
read from memory once and reused from cache by all HB heads. Key j is visible to query i iff j <= positions[i].
"""
from __future__ import annotations

from typing import Callable

from dzc.codegen.builder import KernelBuilder
from dzc.codegen.kir import Buf, E, F32, I64, bcast, cast, const, exp, fma, load, maximum, minimum, reduce_add

NEG_INF = float("-inf")


def vdot(V: int, a: Buf, aoff: E, b: Buf, boff: E, D: int, chains: int = 4) -> E:
    """dot(a[aoff:aoff+D], b[boff:boff+D]) as one expression: V-lane chunks unrolled into `chains` independent
    accumulators (one chain of D/V fmas waits on the fma latency at every step), scalar tail."""
    accs: list[E] = []
    for c in range(D // V):
        prod, other = load(a, aoff + c * V, V), load(b, boff + c * V, V)
        if c < chains:
            accs.append(prod * other)
        else:
            accs[c % chains] = fma(prod, other, accs[c % chains])
    while len(accs) > 1:      # pairwise: (0+2)+(1+3)
        half = (len(accs) + 1) // 2
        accs = [accs[i] + accs[i + half] if i + half < len(accs) else accs[i] for i in range(half)]
    out = reduce_add(accs[0]) if accs else const(0.0, F32)
    for d in range(D // V * V, D):
        out = fma(load(a, aoff + d), load(b, boff + d), out)
    return out


def attention(kb: KernelBuilder, V: int, q: tuple[Buf, E, E, E], k: tuple[Buf, E, E, E],
              v: tuple[Buf, E, E, E], pos: tuple[Buf, E], out: tuple[Buf, E], N: E, H: int, Hk: int, S: E, D: int, Dv: int,
              scale: float, B: int = 32) -> None:
    """q/k/v = (buffer, offset, stride of axis 0, stride of axis 1) with unit stride on the last axis."""
    qb, qo, qs0, qs1 = q
    kbuf, ko, ks0, ks1 = k
    vb, vo, vs0, vs1 = v
    pb, po = pos
    out, oo = out
    with kb.loop(0, N * H, parallel=True, name="it") as it:
        n = kb.let(it // H, "n")
        h = kb.let(it % H, "h")
        kh = h if Hk == H else 0
        qoff = kb.let(qo + n * qs0 + h * qs1, "qo")
        limit = kb.let(minimum(cast(load(pb, po + n), I64) + 1, S), "lim")
        m = kb.reg(const(NEG_INF, F32), "m")
        l = kb.reg(const(0.0, F32), "l")
        acc = kb.local(F32, Dv, "acc")
        sc = kb.local(F32, B, "sc")
        with kb.loop(0, Dv, name="d") as d:
            kb.store(acc, d, const(0.0, F32))
        with kb.loop(0, limit, step=B, name="j") as j0:
            jn = kb.let(minimum(B, limit - j0), "jn")
            bm = kb.reg(const(NEG_INF, F32), "bm")
            with kb.loop(0, jn, name="jj") as jj:
                koff = kb.let(ko + (j0 + jj) * ks0 + kh * ks1, "ko")
                s = kb.let(vdot(V, qb, qoff, kbuf, koff, D) * const(scale, F32), "s")
                kb.store(sc, jj, s)
                kb.set(bm, maximum(bm.v, s))
            mnew = kb.let(maximum(m.v, bm.v), "mn")
            corr = kb.let(exp(m.v - mnew), "corr")
            kb.set(l, l.v * corr)
            with kb.loop(0, jn, name="jj") as jj:
                p = kb.let(exp(load(sc, jj) - mnew), "p")
                kb.store(sc, jj, p)
                kb.set(l, l.v + p)
            _accumulate_rows(kb, V, acc, const(0, I64), Dv, corr, sc, jn,
                             lambda jj: vo + (j0 + jj) * vs0 + kh * vs1, vb)
            kb.set(m, mnew)
        inv = kb.let(const(1.0, F32) / l.v, "inv")
        obase = kb.let(oo + (n * H + h) * Dv, "ob")
        for c in range(Dv // V):
            kb.store(out, obase + c * V, load(acc, c * V, V) * inv)
        for d in range(Dv // V * V, Dv):
            kb.store(out, obase + d, load(acc, d) * inv)


def mla_attention(kb: KernelBuilder, V: int, q_lat: tuple[Buf, E, E, E], q_pe: tuple[Buf, E, E, E],
                  lat: tuple[Buf, E, E], kpe: tuple[Buf, E, E], pos: tuple[Buf, E], out: tuple[Buf, E], N: E, H: int,
                  S: E, C: int, R: int, scale: float, B: int = 8, HB: int = 0) -> None:
    """q_lat/q_pe = (buffer, offset, stride axis 0, stride axis 1); lat/kpe = (buffer, offset, row stride)."""
    qb, qo, qs0, qs1 = q_lat
    pb_, po_, ps0, ps1 = q_pe
    lb, lo, ls = lat
    kb_, ko, ks = kpe
    posb, poso = pos
    out, oo = out
    if HB <= 0:   # heads per work item: their accumulators fit in L1/L2, and decode still has >= 2 items
        HB = max(1, min(H, 8192 // max(1, C), -(-H // 2)))
    nhb = -(-H // HB)
    with kb.loop(0, N * nhb, parallel=True, name="it") as it:
        n = kb.let(it // nhb, "n")
        h0 = kb.let((it % nhb) * HB, "h0")
        hcount = kb.let(minimum(HB, H - h0), "hc")
        limit = kb.let(minimum(cast(load(posb, poso + n), I64) + 1, S), "lim")
        m = kb.local(F32, HB, "m")
        l = kb.local(F32, HB, "l")
        acc = kb.local(F32, HB * C, "acc")
        sc = kb.local(F32, B, "sc")
        with kb.loop(0, HB, name="hh") as hh:
            kb.store(m, hh, const(NEG_INF, F32))
            kb.store(l, hh, const(0.0, F32))
        with kb.loop(0, HB * C, name="d") as d:
            kb.store(acc, d, const(0.0, F32))
        with kb.loop(0, limit, step=B, name="j") as j0:
            jn = kb.let(minimum(B, limit - j0), "jn")
            with kb.loop(0, hcount, name="hh") as hh:
                h = kb.let(h0 + hh, "h")
                qoff = kb.let(qo + n * qs0 + h * qs1, "qo")
                poff = kb.let(po_ + n * ps0 + h * ps1, "po")
                bm = kb.reg(const(NEG_INF, F32), "bm")
                with kb.loop(0, jn, name="jj") as jj:
                    j = j0 + jj
                    s = vdot(V, qb, qoff, lb, lo + j * ls, C) + vdot(V, pb_, poff, kb_, ko + j * ks, R)
                    s = kb.let(s * const(scale, F32), "s")
                    kb.store(sc, jj, s)
                    kb.set(bm, maximum(bm.v, s))
                mold = kb.let(load(m, hh), "mo")
                mnew = kb.let(maximum(mold, bm.v), "mn")
                corr = kb.let(exp(mold - mnew), "corr")
                lacc = kb.reg(load(l, hh) * corr, "l")
                with kb.loop(0, jn, name="jj") as jj:
                    p = kb.let(exp(load(sc, jj) - mnew), "p")
                    kb.store(sc, jj, p)
                    kb.set(lacc, lacc.v + p)
                _accumulate_rows(kb, V, acc, hh * C, C, corr, sc, jn, lambda jj: lo + (j0 + jj) * ls, lb)
                kb.store(l, hh, lacc.v)
                kb.store(m, hh, mnew)
        with kb.loop(0, hcount, name="hh") as hh:
            inv = kb.let(const(1.0, F32) / load(l, hh), "inv")
            obase = kb.let(oo + (n * H + h0 + hh) * C, "ob")
            aoff = kb.let(hh * C, "ao")
            for c in range(C // V):
                kb.store(out, obase + c * V, load(acc, aoff + c * V, V) * inv)
            for d in range(C // V * V, C):
                kb.store(out, obase + d, load(acc, aoff + d) * inv)


def _accumulate_rows(kb: KernelBuilder, V: int, acc: Buf, aoff: E, C: int, corr: E, p: Buf, jn: E,
                     row: Callable[[E], E], rows: Buf, U: int = 4) -> None:
    """acc[aoff + c] = acc[aoff + c] * corr + sum_{jj < jn} p[jj] * rows[row(jj) + c] for c < C: U vectors of the
    accumulator stay in registers across the whole key block (one load and store per block, not per key)."""
    nvec = C // V
    for lo, hi, u in ((0, nvec // U * U, U), (nvec // U * U, nvec, 1)):
        if hi <= lo:
            continue
        with kb.loop(lo, hi, step=u, name="cv") as cv:
            base = kb.let(cv * V, "c")
            regs = [kb.reg(load(acc, aoff + base + i * V, V) * corr, "a") for i in range(u)]
            with kb.loop(0, jn, name="jj") as jj:
                pj = kb.let(bcast(load(p, jj), V), "p")
                r0 = kb.let(row(jj) + base, "r")
                for i, r in enumerate(regs):
                    kb.set(r, fma(load(rows, r0 + i * V, V), pj, r.v))
            for i, r in enumerate(regs):
                kb.store(acc, aoff + base + i * V, r.v)
    for d in range(nvec * V, C):
        r = kb.reg(load(acc, aoff + d) * corr, "a")
        with kb.loop(0, jn, name="jj") as jj:
            kb.set(r, fma(load(rows, row(jj) + d), load(p, jj), r.v))
        kb.store(acc, aoff + d, r.v)
