"""Routed SwiGLU experts (MOE): y[t] = sum_s w[t,s] * down_e(silu(gate_e(x[t])) * up_e(x[t])), e = idx[t,s].

Expert weights are stacked per projection ([E, N, K], one tensor per part), so a kernel indexes experts by id.
Decode (one token): k indexed GEMVs over only the selected experts; gate and up rows are computed in the same
pass (one tile holds both), the SwiGLU is applied in registers, then the down projection adds the k slots into y
in slot order (threads split blocks of output rows, so no atomics; within a block the slot loop is outermost, so
each selected expert's rows stream contiguously). Prefill (T tokens): a routing kernel counts and sorts the
(token, slot) pairs by expert; then, per expert, the tiled GEMM micro-kernel runs over that expert's gathered
rows (gate+up fused, then down with the routing weight, accumulated per output column block by one thread).
"""
from __future__ import annotations

from typing import Optional

from dzc.codegen.builder import KernelBuilder
from dzc.codegen.kir import Buf, E, F32, I32, I64, Operand, bcast, cast, const, exp, load, maximum, minimum, where
from dzc.codegen.kernels.int8_dot import TILE, FakeQuant, QRows, quantize_row, quantize_rows, store_tile, tile_dot
from dzc.codegen.kernels.linear import dot_tile, gemm_block, grain_rows
from dzc.codegen.kernels.weights import WeightAccess


def _expert(idx: E, n_experts: int) -> E:
    """An expert id as i64, clamped into range: a NaN-poisoned router must not read outside the weights."""
    return minimum(maximum(cast(idx, I64), 0), n_experts - 1)


def _next_in_slots(kb: KernelBuilder, ib: Buf, io: E, n_experts: int, k: int, t: E, per_slot: int) -> tuple[E, E]:
    """(expert, index in its slot) of the work item after t in a region of k slots x per_slot items (threads take
    contiguous runs of items, so it is what this thread streams next; past the end, the last slot's first)."""
    nxt = kb.let(t + 1, "tn")
    return (kb.let(_expert(load(ib, io + minimum(nxt // per_slot, k - 1)), n_experts), "en"),
            kb.let(nxt % per_slot, "jn"))


def _next_in_block(kb: KernelBuilder, ib: Buf, io: E, n_experts: int, k: int, b: E, s: E, j: E,
                   per_block: int) -> tuple[E, E, E]:
    """(expert, block, index) of the item after (slot s, item j) of down block b, visited slots outer and items
    inner; after the last slot, the first slot of block b + 1 (the thread's next block)."""
    nxt = kb.let(s * per_block + j + 1, "nx")
    wrap = kb.let(nxt >= k * per_block, "wrap")
    s2 = where(wrap, const(0, I64), nxt // per_block)
    return (kb.let(_expert(load(ib, io + s2), n_experts), "en"), kb.let(where(wrap, b + 1, b), "bn"),
            kb.let(nxt % per_block, "jn"))


def _silu_mul(g: E, u: E) -> E:
    return (g * (const(1.0, F32) / (const(1.0, F32) + exp(-g)))) * u


def moe_decode(kb: KernelBuilder, V: int, x: tuple[Buf, E], idx: tuple[Buf, E], w: tuple[Buf, E],
               gate: WeightAccess, up: WeightAccess, down: WeightAccess, H: int, I: int, k: int,
               out: tuple[Buf, E], hbuf: Buf, rounded: Optional[Buf] = None, NR: int = 2, NR2: int = 4) -> None:
    """With `rounded` (a scratch row of H), the experts' inputs are int8-rounded first (WeightFormat.act = 8):
    the token into `rounded`, each slot's h in place. NR: gate (and up) rows per tile; NR2: down rows per tile."""
    xb, xo = x
    ib, io = idx
    wb, wo = w
    ob, oo = out
    if rounded is not None:
        quantize_row(kb, V, xb, xo, H, FakeQuant(rounded, const(0, I64)))
        xb, xo = rounded, const(0, I64)
    NR = NR if I % NR == 0 else 1
    tiles = I // NR
    with kb.loop(0, k * tiles, parallel=True, grain=grain_rows(2 * NR, H, gate.pk.bytes_per_weight), name="t") as t:
        s = kb.let(t // tiles, "s")
        j0 = kb.let((t % tiles) * NR, "j")
        e = kb.let(_expert(load(ib, io + s), gate.E), "e")
        e2, j2 = _next_in_slots(kb, ib, io, gate.E, k, t, tiles)
        res = dot_tile(kb, V, [(xb, xo)], [(gate, e, j0 + r) for r in range(NR)] + [(up, e, j0 + r) for r in range(NR)], H,
                       prefetch=[(w, e2, j2 * NR + r) for w in (gate, up) for r in range(NR)])
        for r in range(NR):
            kb.store(hbuf, s * I + j0 + r, _silu_mul(res[0][r], res[0][NR + r]))
    if rounded is not None:
        for s in range(k):
            quantize_row(kb, V, hbuf, s * I, I, FakeQuant(hbuf, const(s * I, I64)))
    # Down rows in blocks of RB: per slot a block reads RB contiguous rows of that expert (one long stream; tiles
    # that loop over the slots inside would interleave k short ones), adding into y in slot order (bit-identical).
    RB = NR2 * 8
    blocks, tiles2 = H // RB, H // NR2
    if blocks:
        with kb.loop(0, blocks, parallel=True, name="b") as b:
            with kb.loop(0, k, name="s") as s:
                e = kb.let(_expert(load(ib, io + s), gate.E), "e")
                ws = kb.let(load(wb, wo + s), "ws")
                with kb.loop(0, RB // NR2, name="t") as t:
                    n0 = kb.let(b * RB + t * NR2, "n")
                    e2, b2, t2 = _next_in_block(kb, ib, io, gate.E, k, b, s, t, RB // NR2)
                    res = dot_tile(kb, V, [(hbuf, s * I)], [(down, e, n0 + r) for r in range(NR2)], I,
                                   prefetch=[(down, e2, b2 * RB + t2 * NR2 + r) for r in range(NR2)])
                    for r in range(NR2):
                        y = kb.let(res[0][r] * ws, "y")
                        kb.store(ob, oo + n0 + r, where(s.eq(0), y, load(ob, oo + n0 + r) + y))
    if tiles2 > blocks * (RB // NR2):
        with kb.loop(blocks * (RB // NR2), tiles2, parallel=True, name="t") as t:
            n0 = kb.let(t * NR2, "n")
            accs = [kb.reg(const(0.0, F32), "y") for _ in range(NR2)]
            with kb.loop(0, k, name="s") as s:
                e = kb.let(_expert(load(ib, io + s), gate.E), "e")
                ws = kb.let(load(wb, wo + s), "ws")
                res = dot_tile(kb, V, [(hbuf, s * I)], [(down, e, n0 + r) for r in range(NR2)], I,
                               prefetch=[(down, e, n0 + NR2 + r) for r in range(NR2)])
                for r in range(NR2):
                    kb.set(accs[r], accs[r].v + res[0][r] * ws)
            for r in range(NR2):
                kb.store(ob, oo + n0 + r, accs[r].v)
    if H % NR2:
        with kb.loop(tiles2 * NR2, H, name="n") as n:
            acc = kb.reg(const(0.0, F32), "y")
            with kb.loop(0, k, name="s") as s:
                e = kb.let(_expert(load(ib, io + s), gate.E), "e")
                res = dot_tile(kb, V, [(hbuf, s * I)], [(down, e, n)], I)
                kb.set(acc, acc.v + res[0][0] * load(wb, wo + s))
            kb.store(ob, oo + n, acc.v)


def moe_route(kb: KernelBuilder, idx: tuple[Buf, E, E], T: E, k: int, E_: int, counts: Buf, offs: Buf,
              pairs: Buf, out: tuple[Buf, E, E], H: int) -> None:
    """Sort (token, slot) pairs by expert: offs[e]..offs[e+1] index pairs[] (= t*k + s). Zero the output rows."""
    sort_by_expert(kb, idx, T, k, E_, counts, offs, pairs)
    ob, oo, ostride = out
    with kb.loop(0, T, name="t") as t:
        with kb.loop(0, H, name="d") as d:
            kb.store(ob, oo + t * ostride + d, const(0.0, F32))


def grouped_gate_up(kb: KernelBuilder, V: int, offs: Buf, xrow, gate: WeightAccess, up: WeightAccess, E_: int,
                    H: int, I: int, hbuf: Buf, MR: int, NR: int, NB: int = 32, MB: int = 32) -> None:
    """h[m, :] = silu(x_m @ gate_e^T) * (x_m @ up_e^T) for every sorted row m of every expert e (rows
    offs[e]..offs[e+1]); threads split the I columns, so each expert's gate/up rows are read once."""
    NB = max(NR, NB // NR * NR)
    with kb.loop(0, -(-I // NB), parallel=True, name="b") as b:
        with kb.loop(0, E_, name="e") as e:
            lo = kb.let(cast(load(offs, e), I64), "lo")
            hi = kb.let(cast(load(offs, e + 1), I64), "hi")
            with kb.if_(lo < hi):
                gemm_block(kb, V, b * NB, minimum(b * NB + NB, I), lo, hi, xrow,
                           lambda n: [(gate, e, n), (up, e, n)], H,
                           lambda m, n, vs: kb.store(hbuf, m * I + n, _silu_mul(vs[0], vs[1])), MR, NR, MB)


def grouped_down(kb: KernelBuilder, V: int, offs: Buf, down: WeightAccess, E_: int, Hout: int, I: int, hbuf: Buf,
                 store, MR: int, NR: int, NB: int = 32, MB: int = 32) -> None:
    """store(m, n, h_m . down_e[n]) for every sorted row m of expert e; threads split the output columns."""
    NB = max(NR, NB // NR * NR)
    with kb.loop(0, -(-Hout // NB), parallel=True, name="b") as b:
        with kb.loop(0, E_, name="e") as e:
            lo = kb.let(cast(load(offs, e), I64), "lo")
            hi = kb.let(cast(load(offs, e + 1), I64), "hi")
            with kb.if_(lo < hi):
                gemm_block(kb, V, b * NB, minimum(b * NB + NB, Hout), lo, hi, lambda m: (hbuf, m * I),
                           lambda n: [(down, e, n)], I, lambda m, n, vs: store(m, n, vs[0]), MR, NR, MB)


def moe_gate_up(kb: KernelBuilder, V: int, x: tuple[Buf, E, E], offs: Buf, pairs: Buf, gate: WeightAccess,
                up: WeightAccess, E_: int, H: int, I: int, k: int, hbuf: Buf, MR: int, NR: int) -> None:
    xb, xo, xs = x
    grouped_gate_up(kb, V, offs, lambda m: (xb, xo + (cast(load(pairs, m), I64) // k) * xs), gate, up, E_, H, I,
                    hbuf, MR, NR)


def moe_down(kb: KernelBuilder, V: int, offs: Buf, pairs: Buf, wts: tuple[Buf, E, E], down: WeightAccess,
             E_: int, H: int, I: int, k: int, hbuf: Buf, out: tuple[Buf, E, E], MR: int, NR: int) -> None:
    wb, wo, ws = wts
    ob, oo, os_ = out

    def store(m, n, v):
        pair = cast(load(pairs, m), I64)
        t, s = pair // k, pair % k
        addr = oo + t * os_ + n
        kb.store(ob, addr, load(ob, addr) + v * load(wb, wo + t * ws + s))
    grouped_down(kb, V, offs, down, E_, H, I, hbuf, store, MR, NR)


def sort_by_expert(kb: KernelBuilder, idx: tuple[Buf, E, E], T: E, k: int, E_: int, counts: Buf, offs: Buf,
                   pairs) -> None:
    """Stable counting sort of the flat slots t*k+s by expert; offs[e] = first sorted row of expert e."""
    ib, io, istride = idx
    with kb.loop(0, E_, name="e") as e:
        kb.store(counts, e, const(0, I32))
    with kb.loop(0, T, name="t") as t:
        for s in range(k):
            e = kb.let(_expert(load(ib, io + t * istride + s), E_), "e")
            kb.store(counts, e, load(counts, e) + const(1, I32))
    kb.store(offs, 0, const(0, I32))
    with kb.loop(0, E_, name="e") as e:
        kb.store(offs, e + 1, load(offs, e) + load(counts, e))
        kb.store(counts, e, load(offs, e))
    if pairs is not None:
        with kb.loop(0, T, name="t") as t:
            for s in range(k):
                e = kb.let(_expert(load(ib, io + t * istride + s), E_), "e")
                c = kb.let(load(counts, e), "c")
                kb.store(pairs, cast(c, I64), cast(t * k + s, I32))
                kb.store(counts, e, c + const(1, I32))


def moe_decode_int8(kb: KernelBuilder, V: int, x: tuple[Buf, E], idx: tuple[Buf, E], w: tuple[Buf, E],
                    gate: WeightAccess, up: WeightAccess, down: WeightAccess, H: int, I: int, k: int,
                    out: tuple[Buf, E], hbuf: Buf, xq: QRows, hq: QRows) -> None:
    """moe_decode over row-tiled int8/int4 experts: the token is quantized once, each selected expert's gate and
    up tiles run as integer dot products, h (padded to whole tiles) is quantized per slot, then the down tiles."""
    xb, xo = x
    ib, io = idx
    wb, wo = w
    ob, oo = out
    quantize_row(kb, V, xb, xo, H, xq)
    ti = gate.pk.tiles(I)
    Ip = ti * TILE
    with kb.loop(0, k * ti, parallel=True, grain=max(1, (1 << 15) // (2 * TILE * H)), name="t") as t:
        s = kb.let(t // ti, "s")
        j = kb.let(t % ti, "j")
        e = kb.let(_expert(load(ib, io + s), gate.E), "e")
        e2, j2 = _next_in_slots(kb, ib, io, gate.E, k, t, ti)
        res = tile_dot(kb, [(xq, 0)], [(gate, e, j), (up, e, j)], H, prefetch=[(gate, e2, j2), (up, e2, j2)])
        kb.store(hbuf, s * Ip + j * TILE, _silu_mul(res[0][0], res[0][1]))
    for s in range(k):
        quantize_row(kb, V, hbuf, s * Ip, I, hq, s)

    def down_tile(t: Operand) -> E:
        acc = kb.reg(const(0.0, F32.vec(TILE)), "y")
        with kb.loop(0, k, name="s") as s:
            e = kb.let(_expert(load(ib, io + s), gate.E), "e")
            res = tile_dot(kb, [(hq, s)], [(down, e, t)], I)
            kb.set(acc, acc.v + res[0][0] * bcast(load(wb, wo + s), TILE))
        return acc.v

    # Blocks of 4 tiles, slots outside the tiles: each slot's expert rows stream contiguously (as in moe_decode).
    full, BT = H // TILE, 4
    blocks = full // BT
    if blocks:
        with kb.loop(0, blocks, parallel=True, name="b") as b:
            with kb.loop(0, k, name="s") as s:
                e = kb.let(_expert(load(ib, io + s), gate.E), "e")
                ws = kb.let(bcast(load(wb, wo + s), TILE), "ws")
                with kb.loop(0, BT, name="t") as j:
                    t = kb.let(b * BT + j, "t")
                    e2, b2, j2 = _next_in_block(kb, ib, io, gate.E, k, b, s, j, BT)
                    y = kb.let(tile_dot(kb, [(hq, s)], [(down, e, t)], I, prefetch=[(down, e2, b2 * BT + j2)])[0][0] * ws,
                               "y")
                    kb.store(ob, oo + t * TILE, where(s.eq(0), y, load(ob, oo + t * TILE, TILE) + y))
    if full > blocks * BT:
        with kb.loop(blocks * BT, full, parallel=True, name="t") as t:
            kb.store(ob, oo + t * TILE, down_tile(t))
    if H % TILE:
        store_tile(kb, full * TILE, down_tile(full), H % TILE, lambda n, v: kb.store(ob, oo + n, v))


def grouped_int8(kb: KernelBuilder, offs: Buf, E_: int, N: int, K: int, xrow, wtiles, store, MR: int = 4) -> None:
    """For every expert e and its sorted rows m in offs[e]..offs[e+1]: store(m, n0, results, valid) with the
    f32x16 results of row m against tiles wtiles(e, t) (row-tiled int8/int4 weights, output rows n0..n0+15 of
    which `valid` exist). Threads split the full tiles; a ragged last tile runs after them."""
    def tile(t: Operand, valid: int) -> None:
        with kb.loop(0, E_, name="e") as e:
            lo = kb.let(cast(load(offs, e), I64), "lo")
            hi = kb.let(cast(load(offs, e + 1), I64), "hi")
            with kb.if_(lo < hi):
                mfull = kb.let(lo + (hi - lo) // MR * MR, "mfull")
                for a, b, mr in ((lo, mfull, MR), (mfull, hi, 1)):
                    with kb.loop(a, b, step=mr, name="m") as m:
                        res = tile_dot(kb, [xrow(m + i) for i in range(mr)], wtiles(e, t), K)
                        for i in range(mr):
                            store(m + i, t * TILE, res[i], valid)

    full = N // TILE
    if full:
        with kb.loop(0, full, parallel=True, name="t") as t:
            tile(t, TILE)
    if N % TILE:
        tile(full, N % TILE)


def moe_int8(kb: KernelBuilder, V: int, offs: Buf, E_: int, rows: E, xrow, gate: WeightAccess, up: WeightAccess,
             down: WeightAccess, H: int, I: int, Hout: int, hbuf: Buf, xq: QRows, hq: QRows, store) -> None:
    """Prefill experts over row-tiled int8/int4 weights for `rows` sorted rows (row m's input is xrow(m) =
    (buffer, offset)): quantize the inputs, gate/up tiles -> h (rows padded to whole tiles in hbuf), quantize h,
    down tiles -> store(m, n0, f32x16, valid)."""
    Ip = gate.pk.tiles(I) * TILE
    quantize_rows(kb, V, rows, xrow, H, lambda m: (xq, m))

    def h_store(m, n0, res, valid):
        kb.store(hbuf, m * Ip + n0, _silu_mul(res[0], res[1]))
    grouped_int8(kb, offs, E_, Ip, H, lambda m: (xq, m), lambda e, t: [(gate, e, t), (up, e, t)], h_store)
    quantize_rows(kb, V, rows, lambda m: (hbuf, m * Ip), I, lambda m: (hq, m))
    grouped_int8(kb, offs, E_, Hout, I, lambda m: (hq, m), lambda e, t: [(down, e, t)],
                 lambda m, n0, res, valid: store_tile(kb, n0, res[0], valid, lambda n, v: store(m, n, v)))
