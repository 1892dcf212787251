"""int8 activations x int8/int4 weights (WeightFormat.act = 8): the input quantizer and the VNNI micro-kernel.

`quantize_row` rounds one input row per 32 elements exactly as ir/quant.quantize_activations does (same float32
operations in the same order, so the interpreter and every target agree): either back to float32 (`FakeQuant`,
for targets without integer dot products, which then run the float kernels), or into `QRows`: the int8 values,
each group's scale and `offset * sum(values)` for the micro-kernel.

`tile_dot` is the micro-kernel over row-tiled weights (codegen/layout.py, tile 16): for MR input rows and NT
weight tiles it keeps MR x NT f32 accumulators of 16 lanes (one lane per weight row). Per 32 input elements,
each tile's bytes are loaded once and feed MR vpdpbusd chains (8 per 32 elements for i8; for i4 4 loads, each
masked into low nibbles and into high nibbles left in place, x16, which sum in a second chain) against broadcast
quads of input bytes; the chain's i32 sum minus the offset correction is converted once and scaled by weight
scale x input scale. Weights are offset-binary (u8) because vpdpbusd multiplies unsigned by signed bytes:
sum((w + o) x) = sum(w x) + o sum(x).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional, Sequence

from dzc.codegen.builder import KernelBuilder
from dzc.codegen.kir import (
    Buf, E, F32, I8, I32, Operand, bcast, bitcast, cast, const, dot4, fma, lane, load, maximum, reduce_add,
    reduce_max, round_even, where)
from dzc.codegen.kernels.weights import WeightAccess
from dzc.codegen.layout import VNNI_TILE as TILE        # weight rows per tile = i32 lanes of one vpdpbusd
from dzc.ir.quant import ACT_GROUP as QG                 # input elements per activation scale


def padded(K: int) -> int:
    return -(-K // QG) * QG


@dataclass(frozen=True)
class QRows:
    """Quantized input rows in scratch buffers: q i8[rows, Kp], scale f32[rows, Kp/32], corr i32[rows, Kp/32]."""

    q: Buf
    scale: Buf
    corr: Buf
    Kp: int
    offset: int          # the weights' offset-binary bias (128 for i8, 8 for i4)

    @property
    def quads(self) -> Buf:
        """The same bytes read four at a time (a broadcast operand of vpdpbusd)."""
        return Buf(self.q.name, I32, self.q.local)


@dataclass(frozen=True)
class FakeQuant:
    """Write the rounded row back as float32 to `buf` at `offset`."""

    buf: Buf
    offset: E


def weight_offset(wa: WeightAccess) -> int:
    return 128 if wa.pk.kind == "i8" else 8


def quantize_row(kb: KernelBuilder, V: int, src: Buf, soff: Operand, K: int, out, row: Operand = 0) -> None:
    """Round src[soff : soff+K] per 32 elements into `out` (FakeQuant, or row `row` of a QRows)."""
    ng, rem = K // QG, K % QG
    if ng:
        with kb.loop(0, ng, name="g") as g:
            vs = [kb.let(load(src, soff + g * QG + c * V, V), "x") for c in range(QG // V)]
            mags = [maximum(v, -v) for v in vs]
            m = mags[0]
            for x in mags[1:]:
                m = maximum(m, x)
            _group(kb, V, reduce_max(m), vs, g, out, row)
    if rem:
        amax = kb.reg(const(0.0, F32), "amax")
        with kb.loop(ng * QG, K, name="k") as k:
            x = kb.let(load(src, soff + k), "x")
            kb.set(amax, maximum(amax.v, maximum(x, -x)))
        _group(kb, 1, amax.v, [load(src, soff + ng * QG + j) for j in range(rem)], ng, out, row)
    if isinstance(out, QRows) and out.Kp > K:
        for k in range(K, out.Kp):
            kb.store(out.q, row * out.Kp + k, const(0, I8))


def _group(kb: KernelBuilder, V: int, amax: E, vs: Sequence[E], g: Operand, out, row: Operand) -> None:
    """Round one group's values `vs` (vectors of V lanes, in order) given its max magnitude."""
    amax = kb.let(amax, "amax")
    inv = kb.let(where(amax > const(0.0, F32), const(127.0, F32) / amax, const(0.0, F32)), "inv")
    d = kb.let(amax / const(127.0, F32), "d")
    qs = [kb.let(round_even(v * (bcast(inv, V) if V > 1 else inv)), "q") for v in vs]
    if isinstance(out, FakeQuant):
        for c, q in enumerate(qs):
            kb.store(out.buf, out.offset + g * QG + c * V, q * (bcast(d, V) if V > 1 else d))
        return
    total: Optional[E] = None
    for c, q in enumerate(qs):
        qi = kb.let(cast(q, I32.vec(V)), "qi")
        kb.store(out.q, row * out.Kp + g * QG + c * V, cast(qi, I8.vec(V)))
        part = reduce_add(qi)
        total = part if total is None else total + part
    G = out.Kp // QG
    kb.store(out.scale, row * G + g, d)
    kb.store(out.corr, row * G + g, total * const(out.offset, I32))


def tile_dot(kb: KernelBuilder, xs: Sequence[tuple[QRows, Operand]], ws: Sequence[tuple[WeightAccess, Operand, Operand]],
             K: int, prefetch: Sequence[tuple[WeightAccess, Operand, Operand]] = ()) -> list[list[E]]:
    """[m][t] f32x16: input row xs[m] (QRows, row) against the 16 weight rows of tile ws[t] = (weight, expert,
    tile index). Read the results before emitting anything that reassigns the accumulators. GEMV callers pass
    in `prefetch` the tiles (weight, expert, tile index) they stream next, prefetched alongside (into L2, as
    linear._prefetch)."""
    wa0 = ws[0][0]
    pk = wa0.pk
    Kp = pk.scale_cols(K) * pk.group
    nb, per_group = Kp // QG, pk.group // QG          # input groups of 32, and per weight scale
    zero = const(0.0, F32.vec(TILE))
    acc = [[kb.reg(zero, "acc") for _ in ws] for _ in xs]
    tile_bytes = TILE * pk.row_elems(K)

    def tile_index(wa: WeightAccess, e: Operand, t: Operand) -> E:
        return e * wa.pk.tiles(wa.N) + t

    bases = [kb.let(tile_index(wa, e, t) * tile_bytes, "wt") for wa, e, t in ws]
    sbases = [kb.let(tile_index(wa, e, t) * (pk.scale_cols(K) * TILE), "st") for wa, e, t in ws]
    xbases = [kb.let(r * (Kp // 4), "xq") for _, r in xs]
    ahead = [(wa.data, kb.let(tile_index(wa, e, t) * tile_bytes, "pf")) for wa, e, t in prefetch]
    with kb.loop(0, nb, name="b") as b:
        isum: list[list[Optional[E]]] = [[None] * len(ws) for _ in xs]

        def quad(m: int, j: int) -> E:
            qr = xs[m][0]
            return bitcast(bcast(load(qr.quads, xbases[m] + b * 8 + j), TILE), I8.vec(4 * TILE))

        def feed(sums: list[list[Optional[E]]], wvecs: list[E], j: int) -> None:
            for m in range(len(xs)):
                xq = kb.let(quad(m, j), "xb")
                for t, w in enumerate(wvecs):
                    prev = sums[m][t] if sums[m][t] is not None else const(0, I32.vec(TILE))
                    sums[m][t] = dot4(prev, w, xq)

        per_b = QG * TILE // (1 if pk.kind == "i8" else 2)          # bytes of one tile per 32 input elements
        for buf, base in ahead:
            for i in range(per_b // 64):
                kb.prefetch(buf, base + b * per_b + i * 64)
        if pk.kind == "i8":
            for j in range(8):
                raw = [kb.let(load(wa.data, bases[t] + (b * 8 + j) * 64, 64), "w") for t, (wa, _, _) in enumerate(ws)]
                feed(isum, raw, j)
        else:
            # High nibbles stay in place (x16, one AND instead of a byte shift, which x86 lacks) and sum in their own
            # chain; every product is a multiple of 16, so one exact arithmetic shift per 32 inputs undoes it.
            hsum: list[list[Optional[E]]] = [[None] * len(ws) for _ in xs]
            for o in range(4):
                raw = [kb.let(load(wa.data, bases[t] + (b * 4 + o) * 64, 64), "w") for t, (wa, _, _) in enumerate(ws)]
                feed(isum, [kb.let(r & const(0x0F, raw[0].dtype.scalar), "lo") for r in raw], 2 * o)
                feed(hsum, [kb.let(r & const(0xF0, raw[0].dtype.scalar), "hi") for r in raw], 2 * o + 1)
            isum = [[lo + (hi >> const(4, I32)) for lo, hi in zip(los, his)] for los, his in zip(isum, hsum)]
        g = b // per_group if per_group > 1 else b
        scales = [kb.let(cast(load(wa.scale_buf, sbases[t] + g * TILE, TILE), F32.vec(TILE)), "s")
                  for t, (wa, _, _) in enumerate(ws)]
        for m, (qr, r) in enumerate(xs):
            d = kb.let(load(qr.scale, r * nb + b), "dx")
            c = kb.let(load(qr.corr, r * nb + b), "cx")
            for t in range(len(ws)):
                exact = cast(isum[m][t] - bcast(c, TILE), F32.vec(TILE))
                kb.set(acc[m][t], fma(exact, scales[t] * bcast(d, TILE), acc[m][t].v))
    return [[a.v for a in row] for row in acc]


def store_tile(kb: KernelBuilder, n0: Operand, vec: E, valid: int, store: Callable[[Operand, E], None]) -> None:
    """Store a tile's 16 results at n0.. (all of them, or lane by lane for the `valid` rows of a ragged last tile)."""
    if valid == TILE:
        store(n0, vec)
        return
    for i in range(valid):
        store(n0 + i, lane(vec, i))


def gemv(kb: KernelBuilder, x: tuple[QRows, Operand], wa: WeightAccess, N: int, K: int,
         store: Callable[[Operand, E], None], e: Operand = 0) -> None:
    """y[n] = dot(W[e, n], x) for n < N over the tiled weight; `store(n, value)` gets 16 lanes or one value.
    Each thread streams NT tiles at once (more streams in flight; i4's nibble split needs the registers)."""
    NT = 4 if wa.pk.kind == "i8" else 2
    full = N // TILE
    groups = full // NT
    if groups:
        grain = max(1, (1 << 16) // (NT * TILE * K))
        with kb.loop(0, groups, parallel=True, grain=grain, name="t") as t:
            res = tile_dot(kb, [x], [(wa, e, t * NT + j) for j in range(NT)], K,
                           prefetch=[(wa, e, t * NT + NT + j) for j in range(NT)])
            for j in range(NT):
                store((t * NT + j) * TILE, res[0][j])
    for t in range(groups * NT, wa.pk.tiles(N)):
        res = tile_dot(kb, [x], [(wa, e, t)], K)
        store_tile(kb, t * TILE, res[0][0], min(TILE, N - t * TILE), store)


def batched_gemv(kb: KernelBuilder, M: Operand, x: Callable[[E, E], tuple[QRows, E]], wa: WeightAccess, N: int,
                 K: int, store: Callable[[E, E, Operand, E], None]) -> None:
    """y[b, m, n] = dot(W[b, n], x(b, m)) for the wa.E matrices W[b] [N, K] (N whole tiles, see
    layout.for_target), m < M: work items are (matrix, NT tiles), the M rows (1 in decode) run against an item's
    tiles while they sit in L1. `store(b, m, n, value)` gets the 16 results of rows n.."""
    tiles = N // TILE
    NT = next(nt for nt in ((4, 2, 1) if wa.pk.kind == "i8" else (2, 1)) if tiles % nt == 0)
    groups = tiles // NT
    with kb.loop(0, wa.E * groups, parallel=True, grain=max(1, (1 << 16) // (NT * TILE * K)), name="t") as t:
        b = kb.let(t // groups, "b")
        j0 = kb.let(t % groups * NT, "j")
        with kb.loop(0, M, name="m") as m:
            res = tile_dot(kb, [x(b, m)], [(wa, b, j0 + j) for j in range(NT)], K,
                           prefetch=[(wa, b, j0 + NT + j) for j in range(NT)])
            for j in range(NT):
                store(b, m, (j0 + j) * TILE, res[0][j])


def gemm(kb: KernelBuilder, M: E, x: Callable[[E], tuple[QRows, E]], wa: WeightAccess, N: int, K: int,
         store: Callable[[E, Operand, E], None], MR: int = 4, NT: int = 2) -> None:
    """y[m, n] for m < M, n < N; threads split groups of NT weight tiles, each walks all rows MR at a time while
    its tiles stay in L1/L2. `store(m, n, value)` gets 16 lanes or one value."""
    full = N // TILE
    groups = full // NT

    def rows(t0: Operand, nt: int, valid: int) -> None:
        mfull = kb.let(M // MR * MR, "mfull")
        for lo, hi, mr in ((0, mfull, MR), (mfull, M, 1)):
            with kb.loop(lo, hi, step=mr, name="m") as m:
                res = tile_dot(kb, [x(m + i) for i in range(mr)], [(wa, 0, t0 + j) for j in range(nt)], K)
                for i in range(mr):
                    for j in range(nt):
                        store_tile(kb, (t0 + j) * TILE, res[i][j], valid, lambda n, v, i=i: store(m + i, n, v))

    if groups:
        with kb.loop(0, groups, parallel=True, name="t") as t:
            rows(t * NT, NT, TILE)
    for t in range(groups * NT, wa.pk.tiles(N)):
        rows(t, 1, min(TILE, N - t * TILE))


def quantize_rows(kb: KernelBuilder, V: int, rows: E, row: Callable[[E], tuple[Buf, E]], K: int, out) -> None:
    """Round rows 0..rows-1 (`row(m)` = (buffer, offset)) into `out(m)` (a FakeQuant, or (QRows, m)); threads
    split the rows."""
    with kb.loop(0, rows, parallel=True, grain=max(1, 4096 // K), name="r") as m:
        buf, off = row(m)
        dest = out(m)
        if isinstance(dest, FakeQuant):
            quantize_row(kb, V, buf, off, K, dest)
        else:
            quantize_row(kb, V, buf, off, K, dest[0], dest[1])
