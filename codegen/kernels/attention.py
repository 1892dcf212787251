"""Causal attention kernels with a block-wise online softmax (no [heads, queries, keys] score buffer).

ATTENTION: one work item per (query, head); keys in blocks of B: scores into a stack array, one max/rescale per
block, then the value rows accumulate into a stack accumulator (a few vectors of it at a time, in registers
across the whole key block). MLA_ATTENTION (absorbed MLA over the latent cache): one work item per (query, block
of HB heads); per key block, scores and the value sum are register-tiled small GEMMs over the HB heads, so each
block of latent rows is read from memory once and each loaded vector feeds several heads. Key j is visible to
query i iff j <= positions[i].
"""
from __future__ import annotations

from typing import Callable

from dzc.codegen.builder import KernelBuilder
from dzc.codegen.kir import (
    Buf, E, F32, I32, I64, bcast, bitcast, cast, const, exp, fma, lane, load, maximum, minimum, reduce_add, reduce_max,
    round_even, where)

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
            _accumulate_heads(kb, V, acc, [const(0, I64)], Dv, [corr], sc, [0], jn,
                              lambda jj: vo + (j0 + jj) * vs0 + kh * vs1, vb)
            kb.set(m, mnew)
        inv = kb.let(const(1.0, F32) / l.v, "inv")
        obase = kb.let(oo + (n * H + h) * Dv, "ob")
        for c in range(Dv // V):
            kb.store(out, obase + c * V, load(acc, c * V, V) * inv)
        for d in range(Dv // V * V, Dv):
            kb.store(out, obase + d, load(acc, d) * inv)


def exp_poly(x: E) -> E:
    """exp of an f32 vector from fmas and integer ops (x = n ln2 + f, e^f by a degree-6 polynomial, 2^n in the
    exponent bits): within 2.7 ulp of exp for x in [-87, 88] (measured on 2^20 points), 0 below -87, NaN for NaN.
    A scalar libm exp costs a call per lane and spills every vector register around it; this keeps attention's
    softmax inside the vector loop."""
    lanes = x.dtype.count
    xc = minimum(maximum(x, const(-87.0, F32)), const(88.0, F32))
    n = round_even(xc * const(1.4426950408889634, F32))
    f = fma(n, const(-0.693145751953125, F32), xc)               # ln 2 in two parts: n * hi is exact
    f = fma(n, const(-1.428606765330187e-06, F32), f)
    p = const(1.0 / 720, F32)
    for coef in (1.0 / 120, 1.0 / 24, 1.0 / 6, 0.5, 1.0, 1.0):
        p = fma(p, f, const(coef, F32))
    bits = (cast(n, I32.vec(lanes)) + const(127, I32)) << const(23, I32)
    y = where(x < const(-87.0, F32), const(0.0, F32), p * bitcast(bits, x.dtype))
    return where(x.ne(x), x, y)            # min/max above drop NaNs


def _divisor_at_most(n: int, cap: int) -> int:
    return max(d for d in range(1, max(1, min(n, cap)) + 1) if n % d == 0)


def mla_attention(kb: KernelBuilder, V: int, q_lat: tuple[Buf, E, E, E], q_pe: tuple[Buf, E, E, E],
                  lat: tuple[Buf, E, E], kpe: tuple[Buf, E, E], pos: tuple[Buf, E], out: tuple[Buf, E], N: E, H: int,
                  S: E, C: int, R: int, scale: float, HB: int = 0) -> None:
    """q_lat/q_pe = (buffer, offset, stride axis 0, stride axis 1); lat/kpe = (buffer, offset, row stride).

    The absorbed form is two small GEMMs per key block with the HB heads of a work item as rows: scores
    [HB, B] = q . [latent | k_pe] and acc [HB, C] += p . latent. Both run as register tiles of MH heads x 4
    (keys, or vectors of C), so every latent vector loaded feeds MH heads and every query vector 4 keys; the
    softmax runs on whole vectors of a head's B scores (exp_poly)."""
    qb, qo, qs0, qs1 = q_lat
    pb_, po_, ps0, ps1 = q_pe
    lb, lo, ls = lat
    posb, poso = pos
    out, oo = out
    if HB <= 0:   # heads per work item (a divisor of H): accumulators fit in L1/L2, decode still has >= 2 items
        HB = _divisor_at_most(H, min(8192 // max(1, C), -(-H // 2)))
    MH, NK, U = 4, 4, 4                      # heads per tile, keys per score tile, accumulator vectors per head
    B = max(16, V)                           # keys per block: whole vectors of scores (32 or 64: no faster)
    htiles = [(h, min(MH, HB - h)) for h in range(0, HB, MH)]
    nhb = H // HB
    with kb.loop(0, N * nhb, parallel=True, name="it") as it:
        n = kb.let(it // nhb, "n")
        h0 = kb.let((it % nhb) * HB, "h0")
        limit = kb.let(minimum(cast(load(posb, poso + n), I64) + 1, S), "lim")
        m = kb.local(F32, HB, "m")
        l = kb.local(F32, HB, "l")
        corr = kb.local(F32, HB, "corr")
        acc = kb.local(F32, HB * C, "acc")
        sc = kb.local(F32, HB * B, "sc")
        with kb.loop(0, HB, name="hh") as hh:
            kb.store(m, hh, const(NEG_INF, F32))
            kb.store(l, hh, const(0.0, F32))
        with kb.loop(0, HB * C, name="d") as d:
            kb.store(acc, d, const(0.0, F32))
        qrow = [kb.let(qo + n * qs0 + (h0 + hh) * qs1, "qo") for hh in range(HB)]
        prow = [kb.let(po_ + n * ps0 + (h0 + hh) * ps1, "po") for hh in range(HB)]
        with kb.loop(0, limit, step=B, name="j") as j0:
            jn = kb.let(minimum(B, limit - j0), "jn")
            full = kb.let(jn // NK * NK, "jf")
            for ht, mh in htiles:
                parts = [(qb, qrow[ht:ht + mh], lat), (pb_, prow[ht:ht + mh], kpe)]
                rows = [(ht + i) * B for i in range(mh)]
                with kb.loop(0, full, step=NK, name="jj") as jj:
                    _score_tile(kb, V, parts, [j0 + jj + t for t in range(NK)], (C, R), scale, sc, rows, jj,
                                ahead=B if ht == 0 else 0)
                with kb.loop(full, jn, name="jj") as jj:
                    _score_tile(kb, V, parts, [j0 + jj], (C, R), scale, sc, rows, jj)
            with kb.loop(0, HB, name="hh") as hh:
                _softmax_block(kb, V, sc, hh * B, B, jn, m, l, corr, hh)
            for ht, mh in htiles:
                fs = [kb.let(load(corr, ht + i), "cf") for i in range(mh)]
                _accumulate_heads(kb, V, acc, [(ht + i) * C for i in range(mh)], C, fs, sc,
                                  [(ht + i) * B for i in range(mh)], jn, lambda jj: lo + (j0 + jj) * ls, lb, U)
        with kb.loop(0, HB, name="hh") as hh:
            inv = kb.let(const(1.0, F32) / load(l, hh), "inv")
            obase = kb.let(oo + (n * H + h0 + hh) * C, "ob")
            aoff = kb.let(hh * C, "ao")
            for c in range(C // V):
                kb.store(out, obase + c * V, load(acc, aoff + c * V, V) * inv)
            for d in range(C // V * V, C):
                kb.store(out, obase + d, load(acc, aoff + d) * inv)


def _score_tile(kb: KernelBuilder, V: int, parts: list[tuple[Buf, list[E], tuple[Buf, E, E]]], keys: list[E],
                dims: tuple[int, ...], scale: float, sc: Buf, sc_rows: list[int], col: E, ahead: int = 0) -> None:
    """sc[sc_rows[i] + col + t] = scale * sum over parts (q buffer, head row offsets, (key buffer, offset, row
    stride)) of q[i] . key[keys[t]], each part `dims` long (latent, then k_pe), for a tile of heads x len(keys)
    keys: one accumulator vector per pair, each loaded vector used by the whole tile.
    `ahead` > 0 prefetches the rows of keys + ahead (the next block's), a line per row per vector: rows are a few
    KB apart, too short for the hardware prefetcher to ramp up on each."""
    zero = const(0.0, F32.vec(V))
    heads = len(parts[0][1])
    accs = [[kb.reg(zero, "s") for _ in keys] for _ in range(heads)]
    tails = [[const(0.0, F32) for _ in keys] for _ in range(heads)]
    for (qbuf, qs, (kbuf, koff, kstride)), D in zip(parts, dims):
        krows = [kb.let(koff + key * kstride, "kr") for key in keys]
        if D // V:
            with kb.loop(0, D // V * V, step=V, name="c") as c:
                if ahead:
                    for r in krows:
                        kb.prefetch(kbuf, r + ahead * kstride + c)
                qv = [kb.let(load(qbuf, q + c, V), "q") for q in qs]
                kv = [kb.let(load(kbuf, r + c, V), "k") for r in krows]
                for i, q in enumerate(qv):
                    for t, k in enumerate(kv):
                        kb.set(accs[i][t], fma(q, k, accs[i][t].v))
        for d in range(D // V * V, D):
            for i, q in enumerate(qs):
                for t, r in enumerate(krows):
                    tails[i][t] = fma(load(qbuf, q + d), load(kbuf, r + d), tails[i][t])
    for i in range(heads):
        for t in range(len(keys)):
            kb.store(sc, sc_rows[i] + col + t, (reduce_add(accs[i][t].v) + tails[i][t]) * const(scale, F32))


def _softmax_block(kb: KernelBuilder, V: int, sc: Buf, row: E, B: int, jn: E, m: Buf, l: Buf, corr: Buf,
                   hh: E) -> None:
    """Online softmax step for one head: the block's jn scores at sc[row:] become probabilities (0 past jn) against
    the running max m[hh]; l[hh] and the accumulator's rescale factor corr[hh] follow."""
    with kb.loop(jn, B, name="jt") as jt:
        kb.store(sc, row + jt, const(NEG_INF, F32))
    vecs = [kb.let(load(sc, row + c, V), "sv") for c in range(0, B, V)]
    bm = vecs[0]
    for v in vecs[1:]:
        bm = maximum(bm, v)
    mold = kb.let(load(m, hh), "mo")
    mnew = kb.let(maximum(mold, reduce_max(bm)), "mn")
    f = kb.let(lane(exp_poly(bcast(mold - mnew, V)), 0), "corr")     # a libm call would spill every register
    total = None
    for c, v in zip(range(0, B, V), vecs):
        p = kb.let(exp_poly(v - bcast(mnew, V)), "p")
        kb.store(sc, row + c, p)
        total = p if total is None else total + p
    kb.store(l, hh, load(l, hh) * f + reduce_add(total))
    kb.store(corr, hh, f)
    kb.store(m, hh, mnew)


def _accumulate_heads(kb: KernelBuilder, V: int, acc: Buf, arows: list, C: int, fs: list[E], p: Buf, prows: list,
                      jn: E, row: Callable[[E], E], rows: Buf, U: int = 4) -> None:
    """acc[arows[i] + c] = acc[arows[i] + c] * fs[i] + sum_{jj < jn} p[prows[i] + jj] * rows[row(jj) + c] for
    c < C: a tile of len(fs) heads x U vectors of C in registers across the whole key block (one load and store
    per block, not per key), each value row vector loaded once for all heads of the tile."""
    nvec = C // V
    for lo_, hi, u in ((0, nvec // U * U, U), (nvec // U * U, nvec, 1)):
        if hi <= lo_:
            continue
        with kb.loop(lo_, hi, step=u, name="cv") as cv:
            base = kb.let(cv * V, "c")
            regs = [[kb.reg(load(acc, a + base + k * V, V) * bcast(f, V), "a") for k in range(u)]
                    for a, f in zip(arows, fs)]
            with kb.loop(0, jn, name="jj") as jj:
                r0 = kb.let(row(jj) + base, "r")
                lv = [kb.let(load(rows, r0 + k * V, V), "lv") for k in range(u)]
                for i, pr in enumerate(prows):
                    pj = kb.let(bcast(load(p, pr + jj), V), "p")
                    for k in range(u):
                        kb.set(regs[i][k], fma(lv[k], pj, regs[i][k].v))
            for a, rs in zip(arows, regs):
                for k, r in enumerate(rs):
                    kb.store(acc, a + base + k * V, r.v)
    for d in range(nvec * V, C):
        for a, f, pr in zip(arows, fs, prows):
            r = kb.reg(load(acc, a + d) * f, "a")
            with kb.loop(0, jn, name="jj") as jj:
                kb.set(r, fma(load(rows, row(jj) + d), load(p, pr + jj), r.v))
            kb.store(acc, a + d, r.v)
