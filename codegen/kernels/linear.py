"""x @ W^T for every weight layout: a register-tiled dot-product micro-kernel and the GEMV / GEMM drivers.

The micro-kernel computes an MR x NR tile (MR activation rows, NR weight rows) with MR*NR vector accumulators,
loading each activation vector once per NR rows and decoding each weight vector once per MR rows. Grouped formats
(fp8 blocks, int8/int4 K-groups) scale per group: GEMV (MR=1) accumulates a group unscaled and applies the scale
with one fma; GEMM scales each decoded weight vector once and reuses it MR times. K tails run scalar.

GEMV splits weight rows over threads in tiles of NR; GEMM splits blocks of NB weight rows over threads and walks
the activation rows in blocks of MB that stay in L2 while the block's weight rows are reused from L1/L2.

`gemm_panel` is the faster prefill GEMM where the format allows (f32/bf16/f16/fp8/int8 rows, 32 vector
registers): the outer-product form (weights decoded once into a panel, x broadcast, no horizontal sums).
"""
from __future__ import annotations

from typing import Callable, Sequence

from dzc.codegen.builder import KernelBuilder
from dzc.codegen.kir import BOOL, I64, Buf, E, F32, Operand, bcast, const, fma, lane, load, minimum, reduce_add, where
from dzc.codegen.kernels.weights import WeightAccess

WRow = tuple[WeightAccess, Operand, Operand]      # (weight, expert, row)


def _prefetch(kb: KernelBuilder, rows: Sequence[WRow], k: E, elems: int) -> None:
    """Prefetch the `elems` weights at k of each of `rows`, the rows this thread streams next, into L2
    (kir.Prefetch). Where decoding keeps the core busy (fp8, bf16) the hardware prefetcher falls behind: into L1
    this lookahead made decode 1.1x (bf16) to 1.3x (fp8) faster, into L2 1.2x and 1.6x more (Zen 4). The
    row-tiled int8/int4 kernel does the same per tile (int8_dot.tile_dot)."""
    for wa, e, n in rows:
        width = 0.5 if wa.pk.kind == "i4" else wa.pk.data_dt.itemsize
        nbytes = elems * width
        per_line = max(1, int(64 / width))
        for i in range(max(1, int(nbytes // 64))):
            kk = k + i * per_line
            kb.prefetch(wa.data, wa.at(e, n, kk))


def dot_tile(kb: KernelBuilder, V: int, xrows: Sequence[tuple[Buf, E]], wrows: Sequence[WRow], K: int,
             prefetch: Sequence[WRow] = ()) -> list[list[E]]:
    """Emit the K loop for len(xrows) x len(wrows) dot products; returns [m][n] scalar results (read them before
    emitting anything that reassigns the accumulators). GEMV callers pass in `prefetch` the weight rows they
    stream next (their next tile, the next expert's rows), which are prefetched alongside."""
    MR, NR = len(xrows), len(wrows)
    wa0 = wrows[0][0]
    zero = const(0.0, F32.vec(V))
    acc = [[kb.reg(zero, "acc") for _ in range(NR)] for _ in range(MR)]
    tail = None

    def xv(m: int, k: Operand, lanes: int = V) -> E:
        buf, off = xrows[m]
        return load(buf, off + k, lanes)

    def add_tail(k0: Operand, k1: Operand, scaled: bool, g: Operand = None) -> None:
        nonlocal tail
        if tail is None:
            tail = [[kb.reg(const(0.0, F32), "t") for _ in range(NR)] for _ in range(MR)]
        with kb.loop(k0, k1, name="k") as k:
            ws = [kb.let(wa.scalar(e, n, k) if scaled else wa.raw_scalar(e, n, k), "w") for wa, e, n in wrows]
            for m in range(MR):
                x = kb.let(xv(m, k, 1), "x")
                for r in range(NR):
                    kb.set(tail[m][r], fma(x, ws[r], tail[m][r].v))

    G = wa0.group
    # fp8 GEMV rows decoded by integer ops are value * 2^-120 (weights.py): x * 2^56 keeps the products normal and
    # the sums * 2^56 undo both (powers of two: results equal the f16 route's)
    fp8_bits = bool(G) and MR == 1 and all(wa.fp8_bits for wa, _, _ in wrows)
    if not G:
        C = wa0.chunk(V)                # elements decoded together (paired bf16: two vectors per load)
        assert all(wa.chunk(V) == C for wa, _, _ in wrows)
        Kv = K // C * C
        if Kv:
            with kb.loop(0, Kv, step=C, name="k") as k:
                if MR == 1:
                    _prefetch(kb, prefetch, k, C)
                xs = [[kb.let(xv(m, k + j), "xv") for j in range(0, C, V)] for m in range(MR)]
                ws = [[kb.let(w, "wv") for w in wa.raw_vecs(e, n, k, V)] for wa, e, n in wrows]
                for j in range(C // V):
                    for m in range(MR):
                        for r in range(NR):
                            kb.set(acc[m][r], fma(xs[m][j], ws[r][j], acc[m][r].v))
        if Kv < K:
            add_tail(Kv, K, scaled=False)
    else:
        ng, rem = K // G, K % G

        def chunks(gi: Operand, count: int, scales: list[E]) -> None:
            """Vector chunks 0..count-1 of group gi, accumulated into acc (scaled)."""
            if MR == 1:
                gacc = [kb.reg(zero, "g") for _ in range(NR)]
            for c in range(count):
                k = gi * G + c * V
                x = [kb.let(xv(m, k) * 2.0 ** 56 if fp8_bits else xv(m, k), "xv") for m in range(MR)]
                ws = []
                for r, (wa, e, n) in enumerate(wrows):
                    if fp8_bits:
                        w = wa.fp8_bits_vec(e, n, k, V)
                    elif wa.pk.kind == "i4":
                        off = c * V
                        w = wa.raw_vec_i4(e, n, gi, (off // 32) * 16 + off % 16, (off % 32) // 16, V)
                    else:
                        w = wa.raw_vec(e, n, k, V)
                    ws.append(kb.let(w if MR == 1 else w * bcast(scales[r], V), "wv"))
                for m in range(MR):
                    for r in range(NR):
                        if MR == 1:
                            kb.set(gacc[r], fma(x[m], ws[r], gacc[r].v))
                        else:
                            kb.set(acc[m][r], fma(x[m], ws[r], acc[m][r].v))
            if MR == 1 and count:
                for r in range(NR):
                    kb.set(acc[0][r], fma(gacc[r].v, bcast(scales[r], V), acc[0][r].v))

        if ng:
            with kb.loop(0, ng, name="g") as g:
                if MR == 1:
                    _prefetch(kb, prefetch, g * G, G)
                scales = [kb.let(wa.scale(e, n, g), "s") for wa, e, n in wrows]
                chunks(g, G // V, scales)
                if G % V:
                    add_tail(g * G + G // V * V, g * G + G, scaled=True)
        if rem:
            scales = [kb.let(wa.scale(e, n, ng), "s") for wa, e, n in wrows]
            chunks(ng, rem // V, scales)
            if rem % V:
                add_tail(ng * G + rem // V * V, K, scaled=True)
    out = []
    for m in range(MR):
        row = []
        for r in range(NR):
            v = reduce_add(acc[m][r].v)
            if fp8_bits:
                v = v * 2.0 ** 56
            row.append(v + tail[m][r].v if tail is not None else v)
        out.append(row)
    return out


def grain_rows(rows_per_item: int, K: int, bytes_per_weight: float, min_bytes: int = 1 << 16) -> int:
    return max(1, int(min_bytes // max(1.0, rows_per_item * K * bytes_per_weight)))


def gemv(kb: KernelBuilder, V: int, x: tuple[Buf, E], wa: WeightAccess, N: int, K: int,
         store: Callable[[Operand, E], None], NR: int = 4, e: Operand = 0) -> None:
    """y[n] = dot(W[e, n], x) for n < N; `store(n, value)` writes one result."""
    ntiles = N // NR
    if ntiles:
        with kb.loop(0, ntiles, parallel=True, grain=grain_rows(NR, K, wa.pk.bytes_per_weight), name="t") as t:
            n0 = t * NR
            res = dot_tile(kb, V, [x], [(wa, e, n0 + r) for r in range(NR)], K,
                           prefetch=[(wa, e, n0 + NR + r) for r in range(NR)])
            for r in range(NR):
                store(n0 + r, res[0][r])
    if N % NR:
        with kb.loop(ntiles * NR, N, name="n") as n:
            res = dot_tile(kb, V, [x], [(wa, e, n)], K)
            store(n, res[0][0])


def batched_gemv(kb: KernelBuilder, V: int, M: Operand, x: Callable[[E, E], tuple[Buf, E]], wa: WeightAccess,
                 N: int, K: int, store: Callable[[E, E, Operand, E], None], NR: int = 4) -> None:
    """y[b, m, n] = dot(W[b, n], x(b, m)) for the wa.E matrices W[b] [N, K], m < M, n < N: work items are (matrix,
    NR rows), so one region streams every matrix's rows like one GEMV; the M rows (1 in decode) run against an
    item's rows while they sit in L1. `store(b, m, n, value)` writes one result."""
    NR = max(1, min(NR, N))
    tiles, rem = N // NR, N % NR
    with kb.loop(0, wa.E * tiles, parallel=True, grain=grain_rows(NR, K, wa.pk.bytes_per_weight), name="t") as t:
        b = kb.let(t // tiles, "b")
        n0 = kb.let(t % tiles * NR, "n")
        with kb.loop(0, M, name="m") as m:
            res = dot_tile(kb, V, [x(b, m)], [(wa, b, n0 + r) for r in range(NR)], K,
                           prefetch=[(wa, b, n0 + NR + r) for r in range(NR)])
            for r in range(NR):
                store(b, m, n0 + r, res[0][r])
    if rem:
        with kb.loop(0, wa.E * rem, parallel=True, name="t") as t:
            b = kb.let(t // rem, "b")
            n = kb.let(tiles * NR + t % rem, "n")
            with kb.loop(0, M, name="m") as m:
                store(b, m, n, dot_tile(kb, V, [x(b, m)], [(wa, b, n)], K)[0][0])


def gemm(kb: KernelBuilder, V: int, M: E, xrow: Callable[[E], tuple[Buf, E]], wrow: Callable[[E], list[WRow]],
         N: int, K: int, store: Callable[[E, E, list[E]], None], MR: int = 4, NR: int = 4, NB: int = 64,
         MB: int = 64, grain: int = 1, m_start: Operand = 0) -> None:
    """Tiled y[m, n] for m in [m_start, M), n < N. `wrow(n)` gives the weight rows of output column n (one row,
    or several fused ones, e.g. gate and up); `store(m, n, values)` receives one value per row wrow returned."""
    NB = max(NR, NB // NR * NR)
    with kb.loop(0, -(-N // NB), parallel=True, grain=grain, name="b") as b:
        gemm_block(kb, V, b * NB, minimum(b * NB + NB, N), m_start, M, xrow, wrow, K, store, MR, NR, MB)


def gemm_block(kb: KernelBuilder, V: int, nlo: E, nhi: E, mlo: Operand, mhi: Operand, xrow, wrow, K: int, store,
               MR: int, NR: int, MB: int) -> None:
    """Output columns [nlo, nhi) for rows [mlo, mhi): rows in blocks of MB, tiles of MR x NR, then edges."""
    nhi = kb.let(nhi, "nhi")
    nfull = kb.let(nlo + (nhi - nlo) // NR * NR, "nfull")
    with kb.loop(mlo, mhi, step=MB, name="mb") as mb:
        mend = kb.let(minimum(mb + MB, mhi), "mhi")
        mfull = kb.let(mb + (mend - mb) // MR * MR, "mfull")
        with kb.loop(nlo, nfull, step=NR, name="n") as n0:
            _tile(kb, V, MR, NR, mb, mfull, n0, xrow, wrow, K, store)
            _tile(kb, V, 1, NR, mfull, mend, n0, xrow, wrow, K, store)
        with kb.loop(nfull, nhi, name="n") as n:
            _tile(kb, V, 1, 1, mb, mend, n, xrow, wrow, K, store)


def _tile(kb, V, MR, NR, mlo, mhi, n0, xrow, wrow, K, store) -> None:
    with kb.loop(mlo, mhi, step=MR, name="m") as m0:
        rows = [wrow(n0 + r) for r in range(NR)]
        flat = [w for ws in rows for w in ws]
        res = dot_tile(kb, V, [xrow(m0 + i) for i in range(MR)], flat, K)
        per = len(rows[0])
        for i in range(MR):
            for r in range(NR):
                store(m0 + i, n0 + r, res[i][r * per:(r + 1) * per])


XW_AHEAD = 16       # rows of lookahead in xw_row's passes (8 and 16 both streamed ~1.2x faster than none)


def xw_row(kb: KernelBuilder, V: int, a: Callable[[E], E], wa: WeightAccess, e: Operand, Kd: int, N: int,
           store: Callable[[int, E], None], chunk: int = 8) -> None:
    """y[n] = sum_k a(k) * W[e, k, n] (x @ W, W's rows are k): columns in register chunks of `chunk` vectors, one
    pass over k per chunk (each pass reads a contiguous piece of every row: make it long, DRAM streams short
    strided pieces at a fraction of its speed), scalar columns at the tail. `store(n, value)` gets a V-lane
    vector for columns n..n+V-1, or a scalar."""
    from dzc.codegen.kernels.weights import raw_at
    G = wa.group or N
    starts = []
    c = 0
    while c + V <= N:
        if (c // G) != ((c + V - 1) // G):      # a vector must not straddle scale groups
            break
        starts.append(c)
        c += V
    vec_end = c
    passes = -(-len(starts) // chunk)
    per = -(-len(starts) // passes) if passes else 0        # equal passes: 32 vectors in chunks of 16 = 2 x 16
    for i in range(0, len(starts), max(1, per)):
        group = starts[i:i + per]
        accs = [kb.reg(const(0.0, F32.vec(V)), "acc") for _ in group]
        with kb.loop(0, Kd, name="k") as k:
            if wa.pk.kind != "i4":      # this pass's columns XW_AHEAD rows on (1.2x on MLA-shaped weights)
                for j in range(group[0], group[-1] + V, max(1, 64 // wa.pk.data_dt.itemsize)):
                    kb.prefetch(wa.data, wa.at(e, k + XW_AHEAD, j - j % wa.chunk(V)))
            ak = kb.let(a(k), "a")
            scaled: dict[int, E] = {}      # per scale group: a(k) * scale, so no vector multiply per weight vector
            for r, c0 in zip(accs, group):
                g = c0 // G
                if g not in scaled:
                    scaled[g] = kb.let(bcast(ak * wa.scale(e, k, g) if wa.group else ak, V), "as")
                kb.set(r, fma(scaled[g], raw_at(wa, e, k, c0, V), r.v))
        for r, c0 in zip(accs, group):
            store(c0, r.v)
    for n in range(vec_end, N):
        acc = kb.reg(const(0.0, F32), "acc")
        with kb.loop(0, Kd, name="k") as k:
            kb.set(acc, fma(a(k), wa.scalar(e, k, n), acc.v))
        store(n, acc.v)


PANEL_K = 256       # K elements per packed panel: NT*V rows x 256 f32 = 32 KB for 2 x 16 lanes (L1/L2-resident)


def panel_formats(wa: WeightAccess, V: int) -> bool:
    """Whether gemm_panel can decode this weight V elements at a time (grouped formats: groups of whole vectors)."""
    return wa.pk.kind in ("f32", "bf16", "f16", "fp8", "i8") and not wa.pk.tile and (
        not wa.group or (wa.group % V == 0 and PANEL_K % wa.group == 0 or wa.group % PANEL_K == 0))


def gemm_panel(kb: KernelBuilder, V: int, M: E, xrow: Callable[[E], tuple[Buf, E]], wa: WeightAccess, N: int,
               K: int, y: tuple[Buf, Callable[[E], E]], MR: int = 8, NT: int = 2) -> None:
    """y[m, n] = x_m . W[n] for m < M, n < N, in the outer-product form of BLIS-style GEMMs: threads split blocks
    of NT*V weight rows; per PANEL_K slice of K a thread decodes its rows once into a stack panel [k][NT*V] (f32,
    all formats), then every MR rows of x run MR x NT vector accumulators with, per k, NT panel loads, MR
    broadcasts of x[m, k] and MR*NT fmas: no horizontal sums, weights decoded once per block instead of once per
    MR rows. Partial sums of a K slice are added into y (`y` = (buffer, row offset of row m); columns contiguous)."""
    yb, yrow = y
    NB = NT * V
    nkb, ktail = K // PANEL_K, K % PANEL_K

    def pack(panel: Buf, n0: E, k0: E, KB: int) -> None:
        with kb.loop(0, NB, name="r") as r:
            n = kb.let(minimum(n0 + r, N - 1), "n")           # rows past N repeat the last one; never stored
            C = wa.chunk(V)
            kv = KB // C * C
            if kv:
                with kb.loop(0, kv, step=C, name="kk") as kk:
                    for j, w in enumerate(wa.raw_vecs(0, n, k0 + kk, V)):
                        if wa.group:
                            w = w * bcast(wa.scale(0, n, (k0 + kk) // wa.group), V)
                        w = kb.let(w, "w")
                        for i in range(V):
                            kb.store(panel, (kk + j * V + i) * NB + r, lane(w, i))
            for kk in range(kv, KB):
                kb.store(panel, kk * NB + r, wa.scalar(0, n, k0 + kk))

    def rows(panel: Buf, n0: E, k0: E, KB: int, first: E, valid: int) -> None:
        mfull = kb.let(M // MR * MR, "mfull")
        for lo, hi, mr in ((0, mfull, MR), (mfull, M, 1)):
            with kb.loop(lo, hi, step=mr, name="m") as m:
                xs = [xrow(m + i) for i in range(mr)]
                acc = [[kb.reg(const(0.0, F32.vec(V)), "acc") for _ in range(NT)] for _ in range(mr)]
                with kb.loop(0, KB, name="k") as k:
                    ws = [kb.let(load(panel, k * NB + t * V, V), "wv") for t in range(NT)]
                    for i, (xb, xo) in enumerate(xs):
                        xv = kb.let(bcast(load(xb, xo + k0 + k), V), "xv")
                        for t in range(NT):
                            kb.set(acc[i][t], fma(xv, ws[t], acc[i][t].v))
                for i in range(mr):
                    base = kb.let(yrow(m + i) + n0, "y")
                    for t in range(NT):
                        lanes = max(0, min(V, valid - t * V))
                        parts = [(base + t * V, acc[i][t].v, V)] if lanes == V else [
                            (base + t * V + j, lane(acc[i][t].v, j), 1) for j in range(lanes)]
                        for addr, value, n in parts:
                            kb.store(yb, addr, where(first, value, value + load(yb, addr, n)))

    def blocks(j0: E, j1: E, valid: int) -> None:
        """Row blocks j0..j1-1 (of NB rows; `valid` rows in each), K slice by K slice: a slice of x stays in L2
        while the blocks reuse it."""
        panel = kb.local(F32, PANEL_K * NB, "panel")
        if nkb:
            with kb.loop(0, nkb, name="kb") as kbi:
                with kb.loop(j0, j1, name="j") as j:
                    pack(panel, j * NB, kbi * PANEL_K, PANEL_K)
                    rows(panel, j * NB, kbi * PANEL_K, PANEL_K, kbi.eq(0), valid)
        if ktail:
            k0 = const(nkb * PANEL_K, I64)
            with kb.loop(j0, j1, name="j") as j:
                pack(panel, j * NB, k0, ktail)
                rows(panel, j * NB, k0, ktail, const(nkb == 0, BOOL), valid)

    full = N // NB
    if full:
        SB = max(1, min(8, full // 4))            # blocks per thread work item (x reuse vs load balance)
        with kb.loop(0, -(-full // SB), parallel=True, name="sb") as sb:
            blocks(sb * SB, minimum(sb * SB + SB, full), NB)
    if N % NB:
        blocks(const(full, I64), const(full + 1, I64), N % NB)
