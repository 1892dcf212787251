"""Handlers for ops that emit kernels: reductions, topk, matmul, linear, moe, norms, softmax, attention, fused bodies."""
from __future__ import annotations

import math

from contextlib import ExitStack

from dzc.codegen import kir
from dzc.codegen.kir import F32, I32, I64, cast, const, load
from dzc.codegen.kernels import attention as attn
from dzc.codegen.kernels import int8_dot
from dzc.codegen.kernels import moe as moe_k
from dzc.codegen.kernels.int8_dot import FakeQuant, QRows, quantize_row, weight_offset
from dzc.codegen.kernels.linear import batched_gemv, gemm, gemm_panel, gemv, panel_formats
from dzc.codegen.kernels.weights import WeightAccess
from dzc.codegen.layout import for_target, gemv_rows, packed_format
from dzc.codegen.lower import KC, Lowerer, elementwise, expand, handles, permute, reshape, shape_of, slice_
from dzc.codegen.poly import Poly
from dzc.codegen.values import Lazy, View, WeightVal, broadcast_index, kdt
from dzc.ir.dtypes import DType
from dzc.ir.node import Node
from dzc.ir.ops import Op

NEG_INF = float("-inf")


def _loops(kb, stack: ExitStack, dims, parallel_first: bool = True, grain: int = 1) -> list:
    idx = []
    for i, d in enumerate(dims):
        idx.append(stack.enter_context(kb.loop(0, d.expr(), parallel=(parallel_first and i == 0), grain=grain)))
    return idx


def _static_inner(dims) -> int:
    n = 1
    for d in dims:
        n *= d.value() if d.is_const else 64
    return n


# ---- reductions ------------------------------------------------------------------------------------------------------
@handles(Op.SUM, Op.RMAX)
def _reduce(low: Lowerer, node: Node):
    x = low.val(node.src[0])
    axis = node.arg % node.src[0].ndim
    dest = low.out_view(node)
    kc = KC("reduce")
    kb = kc.kb
    dt = kdt(node.dtype)
    outer = [d for i, d in enumerate(x.shape) if i != axis]
    with ExitStack() as st:
        idx = _loops(kb, st, outer, grain=max(1, 16384 // max(1, _static_inner(outer[1:]) * _static_inner([x.shape[axis]]))))
        if node.op == Op.SUM:
            init = const(0, dt)
        else:
            init = const(NEG_INF, dt) if dt.is_float else const(-(2 ** 31), dt)
        acc = kb.reg(init, "acc")
        with kb.loop(0, x.shape[axis].expr(), name="r") as r:
            full = idx[:axis] + [r] + idx[axis:]
            v = low.load(kc, x, full)
            kb.set(acc, acc.v + v if node.op == Op.SUM else kir.maximum(acc.v, v))
        out_idx = idx[:axis] + [kir.i64(0)] + idx[axis:]
        kb.store(kc.buf(dest.slot), dest.index(out_idx), acc.v)
    low.emit(kc)
    return dest


# ---- topk -------------------------------------------------------------------------------------------------------------------
@handles(Op.TOPK)
def _topk(low: Lowerer, node: Node):
    x = low.as_view(low.val(node.src[0]))
    k = node.arg
    n = x.shape[-1]
    dest = low.out_view(node)
    kc = KC("topk")
    kb = kc.kb
    with ExitStack() as st:
        idx = _loops(kb, st, x.shape[:-1], grain=max(1, 4096 // max(1, n.value() * k)))
        pv = kb.reg(const(float("inf"), F32), "pv")
        pi = kb.reg(const(-1, I64), "pi")
        with kb.loop(0, k, name="s") as s:
            bv = kb.reg(const(NEG_INF, F32), "bv")
            bi = kb.reg(const(-1, I64), "bi")
            with kb.loop(0, n.expr(), name="j") as j:
                v = kb.let(low.load(kc, x, idx + [j]), "v")
                elig = (v < pv.v) | (v.eq(pv.v) & (j > pi.v))
                better = (bi.v < 0) | (v > bv.v)
                take = kb.let(elig & better, "take")
                kb.set(bv, kir.where(take, v, bv.v))
                kb.set(bi, kir.where(take, j, bi.v))
            kb.store(kc.buf(dest.slot), dest.index(idx + [s]), cast(kir.maximum(bi.v, 0), I32))   # NaN rows: 0
            kb.set(pv, bv.v)
            kb.set(pi, bi.v)
    low.emit(kc)
    return dest


# ---- matmul (activations, or a weight operand) --------------------------------------------------------------------------------
@handles(Op.MATMUL)
def _matmul(low: Lowerer, node: Node):
    a, b = low.val(node.src[0]), low.val(node.src[1])
    if isinstance(a, Lazy):
        a = low.as_view(a)
    if isinstance(b, Lazy):
        b = low.as_view(b)
    if isinstance(b, WeightVal) and len(b.shape) >= 2:
        return _matmul_weight(low, node, a, b)
    dest = low.out_view(node)
    shape = shape_of(node)
    batch = shape[:-2]
    M, N = shape[-2], shape[-1]
    Kd = a.shape[-1]
    kc = KC("matmul")
    kb = kc.kb
    V = low.V
    unit_k = (isinstance(a, View) and a.strides[-1] == 1 and isinstance(b, View) and b.strides[-2] == 1
              and Kd.is_const and Kd.value() >= V)
    with ExitStack() as st:
        idx = _loops(kb, st, batch + (M,), grain=max(1, 8192 // max(1, _static_inner([N, Kd]))))
        bidx, i = idx[:-1], idx[-1]
        a_b = broadcast_index(bidx, batch, a.shape[:-2])
        b_b = broadcast_index(bidx, batch, b.shape[:-2])
        ob = kc.buf(dest.slot)
        if unit_k:
            K = Kd.value()
            abuf, bbuf = kc.buf(a.slot), kc.buf(b.slot)
            aoff = kb.let(a.index(a_b + [i, kir.i64(0)]), "ao")
            with kb.loop(0, N.expr(), name="j") as j:
                boff = kb.let(b.index(b_b + [kir.i64(0), j]), "bo")
                kb.store(ob, dest.index(bidx + [i, j]), attn.vdot(V, abuf, aoff, bbuf, boff, K))
        else:
            with kb.loop(0, N.expr(), name="j") as j:
                kb.store(ob, dest.index(bidx + [i, j]), const(0.0, F32))
            with kb.loop(0, Kd.expr(), name="k") as kk:
                aik = kb.let(low.load(kc, a, a_b + [i, kk]), "a")
                with kb.loop(0, N.expr(), name="j") as j:
                    addr = dest.index(bidx + [i, j])
                    kb.store(ob, addr, kir.fma(aik, low.load(kc, b, b_b + [kk, j]), load(ob, addr)))
    low.emit(kc)
    return dest


def _matmul_weight(low: Lowerer, node: Node, a, w: WeightVal):
    """a[..., m, k] @ W[..., k, n] with W a weight (the reduction runs over W's rows): vectorised over n."""
    from dzc.codegen.kernels.linear import xw_row
    dest = low.out_view(node)
    shape = shape_of(node)
    batch, M = shape[:-2], shape[-2]
    wshape = [d.value() for d in w.shape]
    wbatch = tuple(Poly.of(d) for d in wshape[:-2])
    Kd, N = wshape[-2], wshape[-1]
    kc = KC("matmul_w")
    kb = kc.kb
    wa = WeightAccess(w.packed, *(_wbufs(low, kc, w)), Kd, N)
    ob = kc.buf(dest.slot)
    with ExitStack() as st:
        idx = _loops(kb, st, batch + (M,), grain=max(1, 2048 // max(1, Kd * N // 64)))
        bidx, i = idx[:-1], idx[-1]
        a_b = broadcast_index(bidx, batch, a.shape[:-2])
        wb = broadcast_index(bidx, batch, wbatch)
        e = kir.i64(0)
        for j, d in zip(wb, wbatch):
            e = e * d.value() + j
        e = kb.let(e, "e")
        obase = kb.let(dest.index(bidx + [i, kir.i64(0)]), "ob")
        xw_row(kb, low.V, lambda k: low.load(kc, a, a_b + [i, k]), wa, e, Kd, N,
               lambda n, v: kb.store(ob, obase + n, v), chunk=16 if low.target.vector_regs >= 32 else 8)
    low.emit(kc)
    return dest


def _wbufs(low: Lowerer, kc: KC, w: WeightVal):
    from dzc.codegen.lower import weight_slots
    slots = weight_slots(low, w)
    return kc.buf(slots["data"]), (kc.buf(slots["scale"]) if "scale" in slots else None)


# ---- linear -----------------------------------------------------------------------------------------------------------------
def tile_shape(low: Lowerer) -> tuple[int, int]:
    return (4, 4) if low.target.vector_regs >= 32 else (4, 2)


@handles(Op.LINEAR)
def _linear(low: Lowerer, node: Node):
    if node.src[1].ndim == 3:
        return _batched_linear(low, node)
    x, M, xs = low.as_rows(low.val(node.src[0]))
    w = low.val(node.src[1])
    N, K = int(node.src[1].shape[0]), int(node.src[1].shape[1])
    dest = low.out_view(node)
    kc = KC("linear")
    kb = kc.kb
    wa = low.weight_access(kc, w)
    xb, yb = kc.buf(x.slot), kc.buf(dest.slot)
    xo, yo, xse = x.offset.expr(), dest.offset.expr(), xs.expr()
    V = low.V
    if w.ref.fmt.act and wa.pk.tile:
        qr = act_rows(low, kc, M, K, weight_offset(wa), "xq")
        if M == 1:
            quantize_row(kb, V, xb, xo, K, qr)
            int8_dot.gemv(kb, (qr, 0), wa, N, K, lambda n, v: kb.store(yb, yo + n, v))
        else:
            int8_dot.quantize_rows(kb, V, M.expr(), lambda m: (xb, xo + m * xse), K, lambda m: (qr, m))
            int8_dot.gemm(kb, M.expr(), lambda m: (qr, m), wa, N, K, lambda m, n, v: kb.store(yb, yo + m * N + n, v))
        low.emit(kc)
        return dest
    if w.ref.fmt.act:
        xb, xo, xse = kc.buf(round_rows(low, kc, M, K, lambda m: (xb, xo + m * xse), "x_a8").slot), kir.i64(0), kir.i64(K)
    if M == 1:
        # 8 weight rows per tile where 32 vector registers hold them: more streams in flight (bf16 decode +15%)
        gemv(kb, V, (xb, xo), wa, N, K, lambda n, v: kb.store(yb, yo + n, v), NR=gemv_rows(low.target))
    elif panel_formats(wa, V) and low.target.name == "cpu" and low.target.vector_regs >= 32:
        gemm_panel(kb, V, M.expr(), lambda m: (xb, xo + m * xse), wa, N, K, (yb, lambda m: yo + m * N))
    else:
        MR, NR = tile_shape(low)
        MB = max(MR, min(64, (1 << 19) // (4 * K)) // MR * MR)
        NB = max(NR, min(64, N // 8 // NR * NR))
        gemm(kb, V, M.expr(), lambda m: (xb, xo + m * xse), lambda n: [(wa, 0, n)], N, K,
             lambda m, n, vs: kb.store(yb, yo + m * N + n, vs[0]), MR=MR, NR=NR, NB=NB, MB=MB)
    low.emit(kc)
    return dest


def _batched_linear(low: Lowerer, node: Node):
    """LINEAR(x[B, M, K], W[B, N, K]) (MLA's absorbed W_UK / W_UV per head): one GEMV-shaped region over all B
    matrices, their rows contiguous (int8 activations and VNNI tiles as in _linear where the format says so)."""
    x = _unit_last(low, low.val(node.src[0]))
    w = low.val(node.src[1])
    B, N, K = (int(d) for d in node.src[1].shape)
    M = x.shape[1]
    dest = low.out_view(node)
    kc = KC("linear")
    kb = kc.kb
    wa = low.weight_access(kc, w)
    xb, yb = kc.buf(x.slot), kc.buf(dest.slot)
    xo, sb, sm = x.offset.expr(), x.strides[0].expr(), x.strides[1].expr()
    Me = M.expr()

    def store(b, m, n, v):
        kb.store(yb, dest.index([b, m, kir.i64(0)]) + n, v)

    def row(r):          # activation row r = b * M + m
        return xb, xo + r // Me * sb + r % Me * sm
    if w.ref.fmt.act and wa.pk.tile:
        qr = act_rows(low, kc, M * B, K, weight_offset(wa), "xq")
        int8_dot.quantize_rows(kb, low.V, (M * B).expr(), row, K, lambda r: (qr, r))
        int8_dot.batched_gemv(kb, Me, lambda b, m: (qr, b * Me + m), wa, N, K, store)
        low.emit(kc)
        return dest
    if w.ref.fmt.act:
        rows = round_rows(low, kc, M * B, K, row, "x_a8")
        xb, xo, sb, sm = kc.buf(rows.slot), kir.i64(0), Me * K, kir.i64(K)
    batched_gemv(kb, low.V, Me, lambda b, m: (xb, xo + b * sb + m * sm), wa, N, K, store,
                 NR=gemv_rows(low.target))
    low.emit(kc)
    return dest


def act_rows(low: Lowerer, kc: KC, rows, K: int, offset: int, what: str) -> QRows:
    """Scratch for `rows` int8-quantized input rows of length K, bound to kernel `kc`."""
    Kp = int8_dot.padded(K)
    rows = Poly.of(rows)
    G = Kp // int8_dot.QG
    return QRows(kc.buf(low.scratch(kir.I8, rows * Kp, what)), kc.buf(low.scratch(F32, rows * G, what + "_d")),
                 kc.buf(low.scratch(I32, rows * G, what + "_c")), Kp, offset)


def round_rows(low: Lowerer, kc: KC, rows, K: int, row, what: str) -> View:
    """Rows 0..rows-1 (`row(m)` = (buffer, offset)) int8-rounded by kernel `kc` into a fresh f32 [rows, K]
    scratch (WeightFormat.act on targets without integer dot products)."""
    slot = low.scratch(F32, Poly.of(rows) * K, what)
    out = kc.buf(slot)
    int8_dot.quantize_rows(kc.kb, low.V, Poly.of(rows).expr(), row, K, lambda m: FakeQuant(out, m * K))
    return View.contiguous(slot, (Poly.of(rows), Poly.of(K)), DType.F32)


# ---- moe --------------------------------------------------------------------------------------------------------------------
def stacked_weight(low: Lowerer, nodes: list[Node], proj: str) -> tuple[WeightVal, int, int]:
    refs = [n.arg for n in nodes]
    enc = low.store.encoded(refs[0].name) if hasattr(low.store, "encoded") else None
    N, K = int(nodes[0].shape[0]), int(nodes[0].shape[1])
    pk = for_target(packed_format(enc[0] if enc else refs[0].fmt, enc[1] if enc else None), low.target,
                    refs[0].fmt.act, (N, K))
    E = len(refs)
    key = f"experts[{refs[0].name}..{refs[-1].name}]"
    info = dict(stack=[r.name for r in refs], shape=[E, N, K], packed=pk.to_json())
    slots = {"data": low.slots.get("weight", key + ":data", pk.data_dt, Poly.of(E * math.prod(pk.data_shape(N, K))),
                                   part="data", **info)}
    if pk.group:
        slots["scale"] = low.slots.get("weight", key + ":scale", pk.scale_dt,
                                       Poly.of(E * math.prod(pk.scale_shape(N, K))), part="scale", **info)
    wv = WeightVal(refs[0], (Poly.of(N), Poly.of(K)), pk, slots)
    return wv, N, K


@handles(Op.MOE)
def _moe(low: Lowerer, node: Node):
    n_exp = node.arg
    x, T, xs = low.as_rows(low.val(node.src[0]))
    idx, _, is_ = low.as_rows(low.val(node.src[1]))
    wts, _, ws = low.as_rows(low.val(node.src[2]))
    experts = node.src[3:]
    gate, I, H = stacked_weight(low, [experts[3 * e] for e in range(n_exp)], "gate")
    up, _, _ = stacked_weight(low, [experts[3 * e + 1] for e in range(n_exp)], "up")
    down, _, _ = stacked_weight(low, [experts[3 * e + 2] for e in range(n_exp)], "down")
    k = int(node.src[1].shape[-1])
    dest = low.out_view(node)
    V = low.V
    act, tiled = gate.ref.fmt.act, bool(gate.packed.tile)
    if T == 1:
        kc = KC("moe_decode")
        args = (kc.kb, V, (kc.buf(x.slot), x.offset.expr()), (kc.buf(idx.slot), idx.offset.expr()),
                (kc.buf(wts.slot), wts.offset.expr()), low.weight_access(kc, gate), low.weight_access(kc, up),
                low.weight_access(kc, down), H, I, k, (kc.buf(dest.slot), dest.offset.expr()))
        if tiled:
            off = weight_offset(args[5])
            hs = kc.buf(low.scratch(F32, k * gate.packed.tiles(I) * int8_dot.TILE, "moe_h"))
            moe_k.moe_decode_int8(*args, hs, act_rows(low, kc, 1, H, off, "moe_xq"),
                                  act_rows(low, kc, k, I, off, "moe_hq"))
        else:
            rounded = kc.buf(low.scratch(F32, H, "moe_x_a8")) if act else None
            rows = gemv_rows(low.target)       # striped gate/up: a tile reads a whole stripe of each
            moe_k.moe_decode(*args, kc.buf(low.scratch(F32, k * I, "moe_h")), rounded,
                             gate.packed.stripe or rows // 2, rows)
        low.emit(kc)
        return dest
    Te = T.expr()
    counts = low.scratch(I32, n_exp, "moe_counts")
    offs = low.scratch(I32, n_exp + 1, "moe_offs")
    pairs = low.scratch(I32, T * k, "moe_pairs")
    hs = low.scratch(F32, T * k * I, "moe_h")
    kc = KC("moe_route")
    moe_k.moe_route(kc.kb, (kc.buf(idx.slot), idx.offset.expr(), is_.expr()), Te, k, n_exp, kc.buf(counts),
                    kc.buf(offs), kc.buf(pairs), (kc.buf(dest.slot), dest.offset.expr(), Poly.of(H).expr()), H)
    low.emit(kc)
    if tiled:
        kc = KC("moe_experts")
        kb = kc.kb
        xb, xo, xse, pb = kc.buf(x.slot), x.offset.expr(), xs.expr(), kc.buf(pairs)
        ob, oo, wb, wo, wse = kc.buf(dest.slot), dest.offset.expr(), kc.buf(wts.slot), wts.offset.expr(), ws.expr()
        wg, wu, wd = (low.weight_access(kc, v) for v in (gate, up, down))
        off, R = weight_offset(wg), T * k

        def pair(m):
            p = cast(load(pb, m), I64)
            return p // k, p % k

        def store(m, n, v):
            t, s_ = pair(m)
            addr = oo + t * H + n
            lanes = v.dtype.count
            kb.store(ob, addr, load(ob, addr, lanes) + v * kir.bcast(load(wb, wo + t * wse + s_), lanes))
        moe_k.moe_int8(kb, V, kc.buf(offs), n_exp, R.expr(), lambda m: (xb, xo + pair(m)[0] * xse), wg, wu, wd,
                       H, I, H, kc.buf(low.scratch(F32, R * wg.pk.tiles(I) * int8_dot.TILE, "moe_h")),
                       act_rows(low, kc, R, H, off, "moe_xq"), act_rows(low, kc, R, I, off, "moe_hq"), store)
        low.emit(kc)
        return dest
    MR, NR = tile_shape(low)
    if act:
        kc = KC("round_a8")
        xb, xo, xse = kc.buf(x.slot), x.offset.expr(), xs.expr()
        x, xs = round_rows(low, kc, T, H, lambda m: (xb, xo + m * xse), "moe_x_a8"), Poly.of(H)
        low.emit(kc)
    kc = KC("moe_gate_up")
    moe_k.moe_gate_up(kc.kb, V, (kc.buf(x.slot), x.offset.expr(), xs.expr()), kc.buf(offs), kc.buf(pairs),
                      low.weight_access(kc, gate), low.weight_access(kc, up), n_exp, H, I, k, kc.buf(hs),
                      MR, max(1, NR // 2))
    if act:
        hb = kc.buf(hs)
        int8_dot.quantize_rows(kc.kb, V, (T * k).expr(), lambda m: (hb, m * I), I, lambda m: FakeQuant(hb, m * I))
    low.emit(kc)
    kc = KC("moe_down")
    moe_k.moe_down(kc.kb, V, kc.buf(offs), kc.buf(pairs), (kc.buf(wts.slot), wts.offset.expr(), ws.expr()),
                   low.weight_access(kc, down), n_exp, H, I, k, kc.buf(hs),
                   (kc.buf(dest.slot), dest.offset.expr(), Poly.of(H).expr()), MR, NR)
    low.emit(kc)
    return dest


# ---- norms and softmax ------------------------------------------------------------------------------------------------------
@handles(Op.RMSNORM)
def _rmsnorm(low: Lowerer, node: Node):
    x, R, xs = low.as_rows(low.val(node.src[0]))
    w = low.val(node.src[1])
    H = int(node.shape[-1])
    dest = low.out_view(node)
    kc = KC("rmsnorm")
    kb = kc.kb
    V = low.V
    xb, yb = kc.buf(x.slot), kc.buf(dest.slot)
    with kb.loop(0, R.expr(), parallel=True, grain=max(1, 8192 // H), name="r") as r:
        xo = kb.let(x.offset.expr() + r * xs.expr(), "xo")
        yo = kb.let(dest.offset.expr() + r * H, "yo")
        ss = kb.reg(const(0.0, F32.vec(V)), "ss")
        if H // V:
            with kb.loop(0, H // V * V, step=V, name="k") as k:
                v = kb.let(load(xb, xo + k, V), "xv")
                kb.set(ss, kir.fma(v, v, ss.v))
        tot = kb.reg(kir.reduce_add(ss.v), "tot")
        if H % V:
            with kb.loop(H // V * V, H, name="k") as k:
                v = kb.let(load(xb, xo + k), "x")
                kb.set(tot, kir.fma(v, v, tot.v))
        rinv = kb.let(const(1.0, F32) / kir.sqrt(tot.v / const(float(H), F32) + const(float(node.arg), F32)), "ri")
        with kb.loop(0, H, name="k") as k:
            kb.store(yb, yo + k, (load(xb, xo + k) * rinv) * low.load(kc, w, [k]))
    low.emit(kc)
    return dest


@handles(Op.SOFTMAX)
def _softmax(low: Lowerer, node: Node):
    x = low.val(node.src[0])
    axis = node.arg % node.ndim
    dest = low.out_view(node)
    kc = KC("softmax")
    kb = kc.kb
    outer = [d for i, d in enumerate(x.shape) if i != axis]
    n = x.shape[axis].expr()
    ob = kc.buf(dest.slot)
    with ExitStack() as st:
        idx = _loops(kb, st, outer, grain=max(1, 4096 // max(1, _static_inner([x.shape[axis]]))))
        full = lambda r: idx[:axis] + [r] + idx[axis:]
        mx = kb.reg(const(NEG_INF, F32), "mx")
        with kb.loop(0, n, name="r") as r:
            kb.set(mx, kir.maximum(mx.v, low.load(kc, x, full(r))))
        tot = kb.reg(const(0.0, F32), "tot")
        with kb.loop(0, n, name="r") as r:
            e = kb.let(kir.exp(low.load(kc, x, full(r)) - mx.v), "e")
            kb.store(ob, dest.index(full(r)), e)
            kb.set(tot, tot.v + e)
        inv = kb.let(const(1.0, F32) / tot.v, "inv")
        with kb.loop(0, n, name="r") as r:
            addr = dest.index(full(r))
            kb.store(ob, addr, load(ob, addr) * inv)
    low.emit(kc)
    return dest


# ---- lazy fused ops -------------------------------------------------------------------------------------------------------
@handles(Op.SWIGLU)
def _swiglu(low: Lowerer, node: Node):
    g, u = low.val(node.src[0]), low.val(node.src[1])
    shape = shape_of(node)

    def fn(kc, idx):
        a = low.load(kc, g, broadcast_index(idx, shape, g.shape))
        b = low.load(kc, u, broadcast_index(idx, shape, u.shape))
        one = const(1.0, F32)
        return (a * (one / (one + kir.exp(-a)))) * b
    return Lazy(shape, node.dtype, fn, 4)


@handles(Op.ROPE)
def _rope(low: Lowerer, node: Node):
    x, c, s = (low.val(n) for n in node.src)
    if isinstance(c, Lazy) and c.cost > 2:
        c = low.materialize(c)
    if isinstance(s, Lazy) and s.cost > 2:
        s = low.materialize(s)
    shape = shape_of(node)
    half_shape = shape[:-1] + (Poly.of(int(node.shape[-1]) // 2),)

    def fn(kc, idx):
        j = idx[-1]
        i = j // 2
        lead = list(idx[:-1])
        even = low.load(kc, x, lead + [i * 2])
        odd = low.load(kc, x, lead + [i * 2 + 1])
        hidx = lead + [i]
        cv = low.load(kc, c, broadcast_index(hidx, half_shape, c.shape))
        sv = low.load(kc, s, broadcast_index(hidx, half_shape, s.shape))
        is_even = (j % 2).eq(0)
        return kir.where(is_even, even * cv - odd * sv, even * sv + odd * cv)
    return Lazy(shape, node.dtype, fn, 6)


@handles(Op.KERNEL)
def _kernel(low: Lowerer, node: Node):
    operands = [low.val(s) for s in node.src]
    body = node.arg.out
    from dzc.ir.program import Program
    prog = Program("body", (), (("out", body),))
    local: dict[int, object] = {}
    for n in prog.toposort():
        if n.op == Op.INPUT:
            local[id(n)] = operands[int(str(n.arg)[2:])]
        elif n.op == Op.CONST:
            c = kir.const(n.arg, kdt(n.dtype))
            local[id(n)] = Lazy((), n.dtype, (lambda c: lambda kc, idx: c)(c), 0)
        elif n.op in (Op.RESHAPE,):
            local[id(n)] = reshape(low, local[id(n.src[0])], shape_of(n))
        elif n.op == Op.PERMUTE:
            local[id(n)] = permute(low, local[id(n.src[0])], n.arg)
        elif n.op == Op.EXPAND:
            local[id(n)] = expand(low, local[id(n.src[0])], shape_of(n))
        elif n.op == Op.SLICE:
            local[id(n)] = slice_(low, local[id(n.src[0])], *n.arg)
        elif n.op == Op.ARANGE:
            local[id(n)] = Lazy(shape_of(n), n.dtype, lambda kc, idx: kir.cast(idx[0], kir.I32), 0)
        else:
            local[id(n)] = elementwise(low, n, [local[id(s)] for s in n.src], n.op, shape_of(n))
    out = local[id(body)]
    if tuple(out.shape) != shape_of(node):
        out = expand(low, out, shape_of(node))
    return out


# ---- attention ------------------------------------------------------------------------------------------------------------
def _unit_last(low: Lowerer, v):
    v = low.as_view(v)
    if v.strides[-1] != 1:
        v = low.materialize(v)
    return v


@handles(Op.ATTENTION)
def _attention(low: Lowerer, node: Node):
    q, k, v = (_unit_last(low, low.val(n)) for n in node.src[:3])
    pos = low.as_contiguous(low.val(node.src[3]))
    N, H, D = node.src[0].shape
    S, Hk, _ = node.src[1].shape
    Dv = int(node.src[2].shape[2])
    dest = low.out_view(node)
    if not dest.is_contiguous():
        dest = low.new_view(node.shape, node.dtype)
    kc = KC("attention")

    def t3(view):
        return (kc.buf(view.slot), view.offset.expr(), view.strides[0].expr(), view.strides[1].expr())
    attn.attention(kc.kb, low.V, t3(q), t3(k), t3(v), (kc.buf(pos.slot), pos.offset.expr()),
                   (kc.buf(dest.slot), dest.offset.expr()), Poly.of(N).expr(), int(H), int(Hk), Poly.of(S).expr(), int(D), Dv, float(node.arg))
    low.emit(kc)
    return dest


@handles(Op.MLA_ATTENTION)
def _mla(low: Lowerer, node: Node):
    q_lat, q_pe = (_unit_last(low, low.val(n)) for n in node.src[:2])
    lat, kpe = (_unit_last(low, low.val(n)) for n in node.src[2:4])
    pos = low.as_contiguous(low.val(node.src[4]))
    N, H, C = node.src[0].shape
    R = int(node.src[1].shape[2])
    S = node.src[2].shape[0]
    dest = low.out_view(node)
    kc = KC("mla_attention")

    def t3(view):
        return (kc.buf(view.slot), view.offset.expr(), view.strides[0].expr(), view.strides[1].expr())

    def t2(view):
        return (kc.buf(view.slot), view.offset.expr(), view.strides[0].expr())
    attn.mla_attention(kc.kb, low.V, t3(q_lat), t3(q_pe), t2(lat), t2(kpe), (kc.buf(pos.slot), pos.offset.expr()),
                       (kc.buf(dest.slot), dest.offset.expr()), Poly.of(N).expr(), int(H), Poly.of(S).expr(), int(C), R,
                       float(node.arg))
    low.emit(kc)
    return dest


# ---- grouped MoE (passes/lower_moe.py) -------------------------------------------------------------------------------------
def _sorted_routing(low: Lowerer, node: Node, want_pairs: bool):
    idx, _, is_ = low.as_rows(low.val(node.src[0]))
    n_exp = node.arg
    T = Poly.of(node.src[0].shape[0])
    k = int(node.src[0].shape[1])
    dest = low.out_view(node)
    counts = low.scratch(I32, n_exp, "moe_counts")
    kc = KC("moe_sort" if want_pairs else "moe_offsets")
    if want_pairs:
        offs = low.scratch(I32, n_exp + 1, "moe_offs")
        pairs = kc.buf(dest.slot)
        assert dest.offset == 0
    else:
        offs = None
        pairs = None
    offs_buf = kc.buf(dest.slot) if not want_pairs else kc.buf(offs)
    moe_k.sort_by_expert(kc.kb, (kc.buf(idx.slot), idx.offset.expr(), is_.expr()), T.expr(), k, n_exp,
                         kc.buf(counts), offs_buf, pairs)
    low.emit(kc)
    return dest


if hasattr(Op, "MOE_SORT"):
    @handles(Op.MOE_SORT)
    def _moe_sort(low: Lowerer, node: Node):
        return _sorted_routing(low, node, True)

    @handles(Op.MOE_OFFSETS)
    def _moe_offsets(low: Lowerer, node: Node):
        return _sorted_routing(low, node, False)

    @handles(Op.GROUPED_SWIGLU)
    def _grouped_swiglu(low: Lowerer, node: Node):
        n_exp = node.arg
        xs_val = low.val(node.src[0])
        ws, _, _ = low.as_rows(low.val(node.src[1]))
        offs = low.as_contiguous(low.val(node.src[2]))
        experts = node.src[3:]
        gate, I, H = stacked_weight(low, [experts[3 * e] for e in range(n_exp)], "gate")
        up, _, _ = stacked_weight(low, [experts[3 * e + 1] for e in range(n_exp)], "up")
        down, Hout, _ = stacked_weight(low, [experts[3 * e + 2] for e in range(n_exp)], "down")
        R = Poly.of(node.shape[0])
        dest = low.out_view(node)
        hs = low.scratch(F32, R * I, "moe_h")
        MR, NR = tile_shape(low)
        V = low.V
        kc = KC("grouped_gate_up")
        if isinstance(xs_val, Lazy) and xs_val.gather is not None:
            table, gidx = xs_val.gather
            tv, _, ts = low.as_rows(table)
            gidx = low.as_view(gidx)
            tb, gb = kc.buf(tv.slot), kc.buf(gidx.slot)
            to, tse = tv.offset.expr(), ts.expr()
            xrow = lambda m: (tb, to + cast(load(gb, gidx.index([m])), I64) * tse)
        else:
            xv, _, xs = low.as_rows(xs_val)
            xb = kc.buf(xv.slot)
            xo, xse = xv.offset.expr(), xs.expr()
            xrow = lambda m: (xb, xo + m * xse)
        wstride = ws.strides[0].expr() if ws.shape and ws.strides[0] != 0 else kir.i64(1)
        if gate.packed.tile:
            kb = kc.kb
            ob, wb, oo, wo = kc.buf(dest.slot), kc.buf(ws.slot), dest.offset.expr(), ws.offset.expr()
            wg, wu, wd = (low.weight_access(kc, v) for v in (gate, up, down))
            off = weight_offset(wg)

            def store(m, n, v):
                kb.store(ob, oo + m * Hout + n, v * kir.bcast(load(wb, wo + m * wstride), v.dtype.count))
            moe_k.moe_int8(kb, V, kc.buf(offs.slot), n_exp, R.expr(), xrow, wg, wu, wd, H, I, Hout,
                           kc.buf(low.scratch(F32, R * wg.pk.tiles(I) * int8_dot.TILE, "moe_h")),
                           act_rows(low, kc, R, H, off, "moe_xq"), act_rows(low, kc, R, I, off, "moe_hq"), store)
            low.emit(kc)
            return dest
        if gate.ref.fmt.act:
            rounded = round_rows(low, kc, R, H, xrow, "moe_x_a8")
            rb = kc.buf(rounded.slot)
            xrow = lambda m: (rb, m * H)
        hb = kc.buf(hs)
        moe_k.grouped_gate_up(kc.kb, V, kc.buf(offs.slot), xrow, low.weight_access(kc, gate),
                              low.weight_access(kc, up), n_exp, H, I, hb, MR, max(1, NR // 2))
        if gate.ref.fmt.act:
            int8_dot.quantize_rows(kc.kb, V, R.expr(), lambda m: (hb, m * I), I, lambda m: FakeQuant(hb, m * I))
        low.emit(kc)
        kc = KC("grouped_down")
        ob, wb = kc.buf(dest.slot), kc.buf(ws.slot)
        oo, wo = dest.offset.expr(), ws.offset.expr()
        moe_k.grouped_down(kc.kb, V, kc.buf(offs.slot), low.weight_access(kc, down), n_exp, Hout, I, kc.buf(hs),
                           lambda m, n, v: kc.kb.store(ob, oo + m * Hout + n, v * load(wb, wo + m * wstride)),
                           MR, NR)
        low.emit(kc)
        return dest

    @handles(Op.SCATTER_ADD)
    def _scatter_add(low: Lowerer, node: Node):
        base = low.val(node.src[0])
        index = low.as_view(low.val(node.src[1]))
        rows, R, rs = low.as_rows(low.val(node.src[2]))
        dest = low.out_view(node)
        low.materialize(base, dest)
        C = 1
        for d in node.shape[1:]:
            C *= int(d)
        CB = max(low.V, 256)
        kc = KC("scatter_add")
        kb = kc.kb
        ob, rb, ib = kc.buf(dest.slot), kc.buf(rows.slot), kc.buf(index.slot)
        oo, ro = dest.offset.expr(), rows.offset.expr()
        with kb.loop(0, -(-C // CB), parallel=True, name="cb") as cb:
            c0 = kb.let(cb * CB, "c0")
            c1 = kb.let(kir.minimum(c0 + CB, C), "c1")
            with kb.loop(0, R.expr(), name="r") as r:
                t = kb.let(cast(load(ib, index.index([r])), I64), "t")
                with kb.loop(c0, c1, name="c") as c:
                    addr = kb.let(oo + t * C + c, "a")
                    kb.store(ob, addr, load(ob, addr) + load(rb, ro + r * rs.expr() + c))
        low.emit(kc)
        return dest
