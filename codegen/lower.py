"""Lower a program (any mix of ops in ir/ops.py, before or after the pass pipeline) to kernels and a schedule.

One `Lowerer` per program walks the nodes in topological order and keeps, per node, a `View` (data in a buffer
slot) or a `Lazy` (an index function fused into whoever reads it) — see codegen/values.py. Each op either
rewrites views/indices (movement), builds a lazy expression (elementwise, gather, take, rope, swiglu, fused
KERNEL bodies) or emits kernels (reductions, topk, matmul, linear, moe, norms, softmax, attention) into the shared
`Module`, appending `Call`s to the program's schedule.

Buffers: program inputs and outputs, the KV caches, every weight part and every intermediate are slots of one
table that the entry function `dzc_<program>(buffers, T, P)` receives. A cache input `cache.X` [P, w] and the
output of the same name [T, w] are the same slot (capacity rows): the new rows are written at row P, and
CONCAT(cache input, new rows) is a view of rows [0, P+T), so nothing is copied per token. Intermediates are arena
slots with polynomial sizes and live ranges (call indices); the runtime places them at load time.
"""
from __future__ import annotations

import math

from contextlib import ExitStack
from typing import Optional, Sequence

from dzc.codegen import kir
from dzc.codegen.builder import KernelBuilder
from dzc.codegen.kir import Buf, Call, E, Module
from dzc.codegen.kernels.weights import WeightAccess
from dzc.codegen.layout import for_target, packed_format, rows_cols
from dzc.codegen.poly import Poly
from dzc.codegen.target import Target
from dzc.codegen.values import (
    Lazy, Slot, SlotTable, Value, View, WeightVal, broadcast_index, kdt, numel, reshape_index, reshape_view)
from dzc.errors import CompileError
from dzc.ir.dtypes import DType
from dzc.ir.node import Node
from dzc.ir.ops import Op
from dzc.ir.program import Program


class KC:
    """One kernel under construction: a builder plus the slots bound to its buffer parameters."""

    def __init__(self, kind: str) -> None:
        self.kb = KernelBuilder(kind, kind)
        self.slots: list[Slot] = []
        self._bufs: dict[int, Buf] = {}

    def buf(self, slot: Slot) -> Buf:
        b = self._bufs.get(slot.index)
        if b is None:
            b = self.kb.buf(f"a{len(self.slots)}", slot.dtype)
            self._bufs[slot.index] = b
            self.slots.append(slot)
        return b


class Lowerer:
    def __init__(self, program: Program, store, target: Target, module: Module, slots: SlotTable,
                 options: Optional[dict] = None) -> None:
        self.program = program
        self.store = store
        self.target = target
        self.module = module
        self.slots = slots
        self.options = options or {}
        self.V = target.vector_width
        self.calls: list[Call] = []
        self.values: dict[int, Value] = {}
        self.uses: dict[int, int] = {}
        self.dests: dict[int, View] = {}
        self.filled: set[int] = set()

    # ---- driver ------------------------------------------------------------------------------------------------
    def run(self) -> list[Call]:
        order = self.program.toposort()
        for node in order:
            for s in set(id(s) for s in node.src):
                self.uses[s] = self.uses.get(s, 0) + 1
        input_names = {n.arg for n in self.program.inputs}
        for name, node in self.program.outputs:
            self.uses[id(node)] = self.uses.get(id(node), 0) + 1
            if id(node) not in self.dests:
                self.dests[id(node)] = self._output_view(name, node, name in input_names)
        for node in order:
            value = self.lower(node)
            if id(node) in self.dests and id(node) not in self.filled:
                dest = self.dests[id(node)]
                if value is not dest:
                    value = self.materialize(value, dest)
                self.filled.add(id(node))
            elif isinstance(value, Lazy) and self.uses.get(id(node), 0) > 1 and value.cost > 0:
                value = self.materialize(value)
            self.values[id(node)] = value
        # outputs named twice get copies
        done: set[int] = set()
        for name, node in self.program.outputs:
            if id(node) in done:
                self.materialize(self.values[id(node)], self._output_view(name, node, name in input_names))
            done.add(id(node))
        return self.calls

    def _output_view(self, name: str, node: Node, is_cache: bool) -> View:
        shape = tuple(Poly.of(d) for d in node.shape)
        if is_cache:
            if len(shape) != 2 or not shape[1].is_const:
                raise CompileError(f"cache output {name!r} must be [rows, width], got {node.shape}")
            w = shape[1].value()
            slot = self.slots.get("cache", name, kdt(node.dtype), Poly.of(0), width=w)
            return View(slot, shape, (Poly.of(w), Poly.of(1)), Poly({("P",): w}), node.dtype)
        slot = self.slots.get("output", name, kdt(node.dtype), numel(shape), shape=[str(d) for d in shape])
        return View.contiguous(slot, shape, node.dtype)

    def emit(self, kc: KC) -> None:
        kernel = kc.kb.build()
        name = self.module.add(kernel)
        index = len(self.calls)
        self.calls.append(Call(name, [s.index for s in kc.slots]))
        for s in kc.slots:
            if s.kind == "arena":
                s.touch(index)

    def new_view(self, shape: Sequence, dtype: DType, what: str = "") -> View:
        shape = tuple(Poly.of(d) for d in shape)
        slot = self.slots.arena(self.program.name, kdt(dtype), numel(shape), what)
        return View.contiguous(slot, shape, dtype)

    def scratch(self, dtype: kir.DT, size: Poly | int, what: str = "s") -> Slot:
        return self.slots.arena(self.program.name, dtype, Poly.of(size), what)

    def out_view(self, node: Node) -> View:
        dest = self.dests.get(id(node))
        if dest is not None and id(node) not in self.filled and dest.is_contiguous():
            self.filled.add(id(node))
            return dest
        return self.new_view(node.shape, node.dtype)

    # ---- reading values inside kernels ----------------------------------------------------------------------
    def load(self, kc: KC, value: Value, idx: Sequence[E]) -> E:
        if isinstance(value, View):
            return kir.load(kc.buf(value.slot), value.index(idx))
        if isinstance(value, Lazy):
            return value.fn(kc, list(idx))
        if isinstance(value, WeightVal):
            wa = self.weight_access(kc, value)
            if len(value.shape) <= 1:
                return wa.scalar(0, 0, idx[0] if idx else kir.i64(0))
            row: E = kir.i64(0)
            for i, d in zip(idx[:-1], value.shape[:-1]):
                row = row * d.expr() + i
            return wa.scalar(0, row, idx[-1])
        raise CompileError(f"cannot read value {value!r}")

    def weight_access(self, kc: KC, w: WeightVal) -> WeightAccess:
        weight_slots(self, w)
        dims = tuple(d.value() for d in w.shape)
        batched = len(dims) == 3            # a batched LINEAR's [B, N, K]: B matrices stacked like MoE experts
        N, K = (dims[1], dims[2]) if batched else rows_cols(dims) if dims else (1, 1)
        scale = kc.buf(w.slots["scale"]) if "scale" in w.slots else None
        wa = WeightAccess(w.packed, kc.buf(w.slots["data"]), scale, N, K)
        wa.fp8_bits = w.packed.kind == "fp8" and self.target.denormals_fast
        info = w.slots["data"].info
        if "stack" in info or batched:
            wa.E = int(info["shape"][0])
        return wa

    # ---- materialisation ------------------------------------------------------------------------------------------
    def materialize(self, value: Value, dest: Optional[View] = None, what: str = "") -> View:
        shape = value.shape
        if dest is None:
            dest = self.new_view(shape, value.dtype, what)
        kc = KC("copy" if isinstance(value, View) else "elementwise")
        kb = kc.kb
        inner = 1
        for d in shape[1:]:
            inner *= d.value() if d.is_const else 64
        with ExitStack() as stack:
            idx = []
            for i, d in enumerate(shape):
                idx.append(stack.enter_context(
                    kb.loop(0, d.expr(), parallel=(i == 0), grain=max(1, 32768 // max(1, inner)))))
            v = self.load(kc, value, idx)
            dt = kdt(dest.dtype)
            if v.dtype != dt:
                v = kir.cast(v, dt)
            kb.store(kc.buf(dest.slot), dest.index(idx), v)
        self.emit(kc)
        return dest

    def as_view(self, value: Value) -> View:
        return value if isinstance(value, View) else self.materialize(value)

    def as_rows(self, value: Value) -> tuple[View, Poly, Poly]:
        """A view whose rows (all leading dims) are contiguous: (view, row count, row stride)."""
        v = self.as_view(value)
        r = v.rows()
        if r is None:
            v = self.materialize(v)
            r = v.rows()
        return v, r[0], r[1]

    def as_contiguous(self, value: Value) -> View:
        v = self.as_view(value)
        return v if v.is_contiguous() else self.materialize(v)

    def val(self, node: Node) -> Value:
        return self.values[id(node)]

    # ---- lowering one node ------------------------------------------------------------------------------------------
    def lower(self, node: Node) -> Value:
        op = node.op
        handler = _HANDLERS.get(op)
        if handler is None:
            raise CompileError(f"the CPU backend cannot lower op {op.name.lower()} (node {node!r})")
        return handler(self, node)


# ---- handlers ------------------------------------------------------------------------------------------------------
_HANDLERS: dict = {}


def handles(*ops: Op):
    def reg(fn):
        for op in ops:
            _HANDLERS[op] = fn
        return fn
    return reg


def shape_of(node: Node) -> tuple:
    return tuple(Poly.of(d) for d in node.shape)


@handles(Op.INPUT)
def _input(low: Lowerer, node: Node) -> Value:
    name = node.arg
    shape = shape_of(node)
    if name in {k for k, _ in low.program.outputs}:
        if len(shape) != 2 or not shape[1].is_const:
            raise CompileError(f"cache input {name!r} must be [P, width], got {node.shape}")
        w = shape[1].value()
        slot = low.slots.get("cache", name, kdt(node.dtype), Poly.of(0), width=w)
        return View(slot, shape, (Poly.of(w), Poly.of(1)), Poly.of(0), node.dtype)
    slot = low.slots.get("input", name, kdt(node.dtype), numel(shape), shape=[str(d) for d in shape])
    return View.contiguous(slot, shape, node.dtype)


@handles(Op.WEIGHT)
def _weight(low: Lowerer, node: Node) -> Value:
    """Weights get their buffer slots only when a kernel reads them (MoE experts are read stacked instead)."""
    ref = node.arg
    shape = tuple(Poly.of(d) for d in node.shape)
    enc = low.store.encoded(ref.name) if hasattr(low.store, "encoded") else None
    pk = packed_format(enc[0] if enc else ref.fmt, enc[1] if enc else None, tuple(node.shape))
    return WeightVal(ref, shape, for_target(pk, low.target, ref.fmt.act, tuple(node.shape)), {})


def weight_slots(low: "Lowerer", w: WeightVal) -> dict:
    if not w.slots:
        ref, pk = w.ref, w.packed
        dims = tuple(d.value() for d in w.shape)
        N, K = rows_cols(dims) if dims else (1, 1)
        info = dict(weight=ref.name, shape=list(dims), packed=pk.to_json())
        w.slots["data"] = low.slots.get("weight", ref.name + ":data", pk.data_dt,
                                        Poly.of(math.prod(pk.data_shape(N, K))), part="data", **info)
        if pk.group:
            w.slots["scale"] = low.slots.get("weight", ref.name + ":scale", pk.scale_dt,
                                             Poly.of(math.prod(pk.scale_shape(N, K))), part="scale", **info)
    return w.slots


@handles(Op.CONST)
def _const(low: Lowerer, node: Node) -> Value:
    c = kir.const(node.arg, kdt(node.dtype))
    return Lazy((), node.dtype, lambda kc, idx: c, cost=0)


@handles(Op.ARANGE)
def _arange(low: Lowerer, node: Node) -> Value:
    return Lazy(shape_of(node), node.dtype, lambda kc, idx: kir.cast(idx[0], kir.I32), cost=0)


def _ew_expr(op: Op, node: Node, a: list[E]) -> E:
    f1 = lambda v: kir.const(v, kir.F32)
    x = a[0]
    if op == Op.NEG: return -x
    if op == Op.EXP: return kir.exp(x)
    if op == Op.LOG: return kir.log(x)
    if op == Op.SQRT: return kir.sqrt(x)
    if op == Op.RSQRT: return f1(1.0) / kir.sqrt(x)
    if op == Op.RECIP: return f1(1.0) / x
    if op == Op.SIGMOID: return f1(1.0) / (f1(1.0) + kir.exp(-x))
    if op == Op.SILU: return x * (f1(1.0) / (f1(1.0) + kir.exp(-x)))
    if op == Op.COS: return kir.cos(x)
    if op == Op.SIN: return kir.sin(x)
    if op == Op.CAST: return kir.cast(x, kdt(node.dtype))
    if op == Op.ADD: return x + a[1]
    if op == Op.SUB: return x - a[1]
    if op == Op.MUL: return x * a[1]
    if op == Op.DIV: return x / a[1]
    if op == Op.MAX: return kir.maximum(x, a[1])
    if op == Op.CMPLT: return x < a[1]
    if op == Op.WHERE: return kir.where(x, a[1], a[2])
    raise CompileError(f"not elementwise: {op}")


def elementwise(low: Lowerer, node: Node, srcs: Sequence[Value], op: Op, shape: tuple) -> Lazy:
    total = numel(shape)
    vals = []
    for v in srcs:
        if isinstance(v, Lazy) and v.cost > 2 and numel(v.shape) != total:
            v = low.materialize(v)      # do not recompute an expensive value once per broadcast element
        vals.append(v)

    def fn(kc: KC, idx: list[E]) -> E:
        args = [low.load(kc, v, broadcast_index(idx, shape, v.shape)) for v in vals]
        return _ew_expr(op, node, args)
    cost = 1 + sum(v.cost for v in vals if isinstance(v, Lazy))
    return Lazy(shape, node.dtype, fn, cost)


@handles(Op.NEG, Op.EXP, Op.LOG, Op.SQRT, Op.RSQRT, Op.RECIP, Op.SIGMOID, Op.SILU, Op.COS, Op.SIN, Op.CAST,
         Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MAX, Op.CMPLT, Op.WHERE)
def _elementwise(low: Lowerer, node: Node) -> Value:
    return elementwise(low, node, [low.val(s) for s in node.src], node.op, shape_of(node))


# ---- movement ------------------------------------------------------------------------------------------------------------
def reshape(low: Lowerer, v: Value, shape: tuple) -> Value:
    if isinstance(v, View):
        r = reshape_view(v, shape)
        if r is None:
            r = reshape_view(low.materialize(v), shape)
        return r
    src_shape = v.shape
    return Lazy(shape, v.dtype, lambda kc, idx: low.load(kc, v, reshape_index(idx, shape, src_shape)),
                getattr(v, "cost", 1))


def permute(low: Lowerer, v: Value, order: Sequence[int]) -> Value:
    shape = tuple(v.shape[i] for i in order)
    if isinstance(v, View):
        return View(v.slot, shape, tuple(v.strides[i] for i in order), v.offset, v.dtype)

    def fn(kc, idx):
        src = [None] * len(order)
        for i, o in enumerate(order):
            src[o] = idx[i]
        return low.load(kc, v, src)
    return Lazy(shape, v.dtype, fn, getattr(v, "cost", 1))


def expand(low: Lowerer, v: Value, shape: tuple) -> Value:
    if isinstance(v, Lazy) and v.cost > 2 and numel(shape) != numel(v.shape):
        v = low.materialize(v)
    if isinstance(v, View):
        strides = tuple(Poly.of(0) if (d == 1 and o != 1) else s for d, o, s in zip(v.shape, shape, v.strides))
        return View(v.slot, shape, strides, v.offset, v.dtype)
    src_shape = v.shape
    return Lazy(shape, v.dtype, lambda kc, idx: low.load(kc, v, broadcast_index(idx, shape, src_shape)),
                getattr(v, "cost", 1))


def slice_(low: Lowerer, v: Value, axis: int, start, stop) -> Value:
    axis %= len(v.shape)
    start, stop = Poly.of(start), Poly.of(stop)
    shape = v.shape[:axis] + (stop - start,) + v.shape[axis + 1:]
    if isinstance(v, View):
        return View(v.slot, shape, v.strides, v.offset + start * v.strides[axis], v.dtype)

    def fn(kc, idx):
        idx = list(idx)
        idx[axis] = idx[axis] + start.expr()
        return low.load(kc, v, idx)
    return Lazy(shape, v.dtype, fn, getattr(v, "cost", 1))


@handles(Op.RESHAPE)
def _reshape(low, node):
    return reshape(low, low.val(node.src[0]), shape_of(node))


@handles(Op.PERMUTE)
def _permute(low, node):
    return permute(low, low.val(node.src[0]), node.arg)


@handles(Op.EXPAND)
def _expand(low, node):
    return expand(low, low.val(node.src[0]), shape_of(node))


@handles(Op.SLICE)
def _slice(low, node):
    axis, start, stop = node.arg
    return slice_(low, low.val(node.src[0]), axis, start, stop)


@handles(Op.CONCAT)
def _concat(low, node):
    axis = node.arg % node.ndim
    vals = [low.val(s) for s in node.src]
    vals_nz = [v for v in vals if v.shape[axis] != 0]
    # adjacent views of one buffer (the KV cache's old rows + the new rows written at row P) need no copy
    if all(isinstance(v, View) for v in vals_nz) and vals_nz:
        first = vals_nz[0]
        ok = all(v.slot is first.slot and v.strides == first.strides for v in vals_nz)
        pos = first.offset
        for v in vals_nz:
            ok = ok and v.offset == pos
            pos = v.offset + v.shape[axis] * v.strides[axis]
        if ok and all(first.strides[i] != 0 for i in [axis]):
            return View(first.slot, shape_of(node), first.strides, first.offset, node.dtype)
    dest = low.out_view(node)
    start = Poly.of(0)
    for v in vals:
        n = v.shape[axis]
        part = slice_(low, dest, axis, start, start + n)
        low.materialize(v, part)
        start = start + n
    return dest


# ---- indexing ---------------------------------------------------------------------------------------------------------------
@handles(Op.GATHER)
def _gather(low, node):
    table, idx = low.val(node.src[0]), low.val(node.src[1])
    k = len(idx.shape)

    def fn(kc, i):
        r = kir.cast(low.load(kc, idx, i[:k]), kir.I64)
        return low.load(kc, table, [r] + list(i[k:]))
    rows = isinstance(table, View) and len(table.shape) == 2 and k == 1 and table.rows() is not None
    return Lazy(shape_of(node), node.dtype, fn, 2, gather=(table, idx) if rows else None)


@handles(Op.TAKE)
def _take(low, node):
    x, idx = low.val(node.src[0]), low.val(node.src[1])

    def fn(kc, i):
        j = kir.cast(low.load(kc, idx, i), kir.I64)
        return low.load(kc, x, list(i[:-1]) + [j])
    return Lazy(shape_of(node), node.dtype, fn, 2)


from dzc.codegen import lower_ops  # noqa: E402,F401  (registers the kernel-emitting handlers)
