"""What a program node is while it is being lowered: a strided `View` of a buffer slot, or a `Lazy` index function.

Movement ops (reshape/permute/expand/slice) never copy: on a `View` they rewrite strides and offset, on a `Lazy`
they remap indices. Elementwise ops build `Lazy` values that fuse into whichever kernel finally reads them; a
value is materialised (written to a buffer by a kernel) only when it has several users, feeds a kernel that needs
memory (linear, attention, norms, ...), is broadcast while expensive, or is a program output.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable, Optional, Sequence

from dzc.codegen import kir
from dzc.codegen.kir import DT, E
from dzc.codegen.layout import Packed
from dzc.codegen.poly import Poly, prod
from dzc.ir.dtypes import DType
from dzc.ir.node import WeightRef


def kdt(d: DType) -> DT:
    """Kernel type of an IR activation dtype (storage-only dtypes never reach activations)."""
    return {DType.F32: kir.F32, DType.I32: kir.I32, DType.BOOL: kir.BOOL}[d]


@dataclass
class Slot:
    """One entry of the entry function's buffer table.

    kind: input (tokens, positions), output (logits), cache (KV rows, capacity rows), weight (one part of one
    compiled weight), arena (an intermediate or scratch of one program, placed at load time by liveness).
    """

    index: int
    name: str
    kind: str
    dtype: DT
    sizes: list = field(default_factory=list)        # Poly element counts (the largest one wins)
    program: str = ""
    live: list = field(default_factory=lambda: [None, None])   # first/last call index (arena)
    info: dict = field(default_factory=dict)

    def touch(self, call: int) -> None:
        if self.live[0] is None or call < self.live[0]:
            self.live[0] = call
        if self.live[1] is None or call > self.live[1]:
            self.live[1] = call


class SlotTable:
    def __init__(self) -> None:
        self.slots: list[Slot] = []
        self._by_key: dict[tuple, Slot] = {}

    def get(self, kind: str, name: str, dtype: DT, size: Poly, **info) -> Slot:
        key = (kind, name)
        slot = self._by_key.get(key)
        if slot is None:
            slot = Slot(len(self.slots), name, kind, dtype, [], info=dict(info))
            self.slots.append(slot)
            self._by_key[key] = slot
        if all(size != s for s in slot.sizes):
            slot.sizes.append(size)
        return slot

    def arena(self, program: str, dtype: DT, size: Poly, what: str = "") -> Slot:
        n = sum(1 for s in self.slots if s.kind == "arena" and s.program == program)
        slot = Slot(len(self.slots), f"{program}.{what or 't'}{n}", "arena", dtype, [size], program)
        self.slots.append(slot)
        return slot


class Value:
    shape: tuple
    dtype: DType


@dataclass
class View(Value):
    slot: Slot
    shape: tuple          # Poly dims
    strides: tuple        # Poly element strides
    offset: Poly
    dtype: DType

    @staticmethod
    def contiguous(slot: Slot, shape: Sequence, dtype: DType, offset: Poly = Poly.of(0)) -> "View":
        shape = tuple(Poly.of(d) for d in shape)
        strides, acc = [], Poly.of(1)
        for d in reversed(shape):
            strides.append(acc)
            acc = acc * d
        return View(slot, shape, tuple(reversed(strides)), Poly.of(offset), dtype)

    def index(self, idx: Sequence[E]) -> E:
        out = self.offset.expr()
        for i, s in zip(idx, self.strides):
            if s == 0:
                continue
            out = out + (i if s == 1 else i * s.expr())
        return out

    def is_contiguous(self) -> bool:
        acc = Poly.of(1)
        for d, s in zip(reversed(self.shape), reversed(self.strides)):
            if d != 1 and s != acc:
                return False
            acc = acc * d
        return True

    def rows(self) -> Optional[tuple[Poly, Poly]]:
        """(row count, row stride) when the view is rows of contiguous last-dim elements, else None."""
        if not self.shape:
            return Poly.of(1), Poly.of(1)
        if self.shape[-1] != 1 and self.strides[-1] != 1:
            return None
        lead = [(d, s) for d, s in zip(self.shape[:-1], self.strides[:-1]) if d != 1]
        if not lead:
            return Poly.of(1), self.shape[-1]
        for (d0, s0), (d1, s1) in zip(lead, lead[1:]):
            if s0 != s1 * d1:
                return None
        return prod(d for d, _ in lead), lead[-1][1]


@dataclass
class Lazy(Value):
    shape: tuple
    dtype: DType
    fn: Callable            # (kc, idx: list[E]) -> E
    cost: int = 1
    gather: Optional[tuple] = None   # (table View, idx Value) when this is table rows picked by a 1-D index


@dataclass
class WeightVal(Value):
    """A WEIGHT leaf: its packed layout and slots; elementwise readers decode single elements."""

    ref: WeightRef
    shape: tuple            # Poly dims (static)
    packed: Packed
    slots: dict             # part -> Slot
    dtype: DType = DType.F32


def numel(shape: Sequence) -> Poly:
    return prod(shape)


def broadcast_index(idx: Sequence[E], out_shape: Sequence, src_shape: Sequence) -> list[E]:
    """Right-aligned numpy broadcasting: index of the source element that out element `idx` reads."""
    lead = len(out_shape) - len(src_shape)
    res = []
    for i, d in enumerate(src_shape):
        o = out_shape[lead + i]
        res.append(kir.i64(0) if (d == 1 and o != 1) else idx[lead + i])
    return res


def _groups(a: Sequence[Poly], b: Sequence[Poly]) -> Optional[list[tuple[list[int], list[int]]]]:
    """Split dims of a and b into consecutive groups with equal products (size-1 dims excluded)."""
    ia = [i for i, d in enumerate(a) if d != 1]
    ib = [i for i, d in enumerate(b) if d != 1]
    groups = []
    i = j = 0
    while i < len(ia) or j < len(ib):
        if i >= len(ia) or j >= len(ib):
            return None
        ga, gb = [ia[i]], [ib[j]]
        pa, pb = a[ia[i]], b[ib[j]]
        i += 1
        j += 1
        steps = 0
        while pa != pb:
            steps += 1
            if steps > 64:
                return None
            ca, cb = pa.is_const, pb.is_const
            if ca and cb:
                if pa.value() < pb.value():
                    if i >= len(ia):
                        return None
                    ga.append(ia[i]); pa = pa * a[ia[i]]; i += 1
                else:
                    if j >= len(ib):
                        return None
                    gb.append(ib[j]); pb = pb * b[ib[j]]; j += 1
            elif i < len(ia) and (j >= len(ib) or not ca):
                ga.append(ia[i]); pa = pa * a[ia[i]]; i += 1
            elif j < len(ib):
                gb.append(ib[j]); pb = pb * b[ib[j]]; j += 1
            else:
                return None
        groups.append((ga, gb))
    return groups


def reshape_index(idx: Sequence[E], out_shape: Sequence[Poly], in_shape: Sequence[Poly]) -> list[E]:
    """Index into `in_shape` of element `idx` of its reshape to `out_shape` (row-major)."""
    groups = _groups(in_shape, out_shape)
    if groups is None:
        groups = [([i for i in range(len(in_shape))], [j for j in range(len(out_shape))])]
    res: list[E] = [kir.i64(0)] * len(in_shape)
    for ga, gb in groups:
        if len(ga) == 1 and len(gb) == 1:
            res[ga[0]] = idx[gb[0]]
            continue
        lin: E = kir.i64(0)
        stride = Poly.of(1)
        for j in reversed(gb):
            lin = lin + idx[j] * stride.expr()
            stride = stride * out_shape[j]
        stride = Poly.of(1)
        for i in reversed(ga):
            d = in_shape[i]
            q = lin // stride.expr() if stride != 1 else lin
            res[i] = q if i == ga[0] else q % d.expr()
            stride = stride * d
    return res


def reshape_view(v: View, shape: Sequence[Poly]) -> Optional[View]:
    """The same data seen with `shape`, when strides allow it (else None: the caller materialises)."""
    if v.is_contiguous():
        return View.contiguous(v.slot, shape, v.dtype, v.offset)
    groups = _groups(v.shape, shape)
    if groups is None:
        return None
    strides: list[Poly] = [Poly.of(0)] * len(shape)
    for ga, gb in groups:
        for x, y in zip(ga, ga[1:]):
            if v.strides[x] != v.strides[y] * v.shape[y]:
                return None
        base = v.strides[ga[-1]]
        acc = base
        for j in reversed(gb):
            strides[j] = acc
            acc = acc * shape[j]
    return View(v.slot, tuple(shape), tuple(strides), v.offset, v.dtype)
