"""Integer polynomials in the run-time symbols (T, P): dims, strides, offsets and buffer sizes.

IR dims are affine (`Sym`), but strides of contiguous buffers multiply dims (`[H, T, P+T]` has an H-stride of
T*P + T*T), so the code generator keeps them as polynomials with structural equality.
"""
from __future__ import annotations

from typing import Mapping, Union

from dzc.codegen import kir
from dzc.ir.shapes import Sym

Monomial = tuple[str, ...]   # sorted symbol names, () for the constant term


class Poly:
    __slots__ = ("terms",)

    def __init__(self, terms: Mapping[Monomial, int] | None = None) -> None:
        self.terms = {m: c for m, c in (terms or {}).items() if c != 0}

    @staticmethod
    def of(x: Union["Poly", int, Sym]) -> "Poly":
        if isinstance(x, Poly):
            return x
        if isinstance(x, Sym):
            t = {(name,): c for name, c in x.terms}
            if x.const:
                t[()] = x.const
            return Poly(t)
        return Poly({(): int(x)})

    def __add__(self, o) -> "Poly":
        o = Poly.of(o)
        t = dict(self.terms)
        for m, c in o.terms.items():
            t[m] = t.get(m, 0) + c
        return Poly(t)

    __radd__ = __add__

    def __neg__(self) -> "Poly":
        return Poly({m: -c for m, c in self.terms.items()})

    def __sub__(self, o) -> "Poly":
        return self + (-Poly.of(o))

    def __rsub__(self, o) -> "Poly":
        return Poly.of(o) - self

    def __mul__(self, o) -> "Poly":
        o = Poly.of(o)
        t: dict[Monomial, int] = {}
        for m1, c1 in self.terms.items():
            for m2, c2 in o.terms.items():
                m = tuple(sorted(m1 + m2))
                t[m] = t.get(m, 0) + c1 * c2
        return Poly(t)

    __rmul__ = __mul__

    def __eq__(self, o) -> bool:
        try:
            return self.terms == Poly.of(o).terms
        except (TypeError, ValueError):
            return False

    def __hash__(self) -> int:
        return hash(tuple(sorted(self.terms.items())))

    @property
    def is_const(self) -> bool:
        return all(m == () for m in self.terms)

    @property
    def const(self) -> int:
        return self.terms.get((), 0)

    def value(self) -> int:
        assert self.is_const, f"{self} is symbolic"
        return self.const

    def evaluate(self, env: Mapping[str, int]) -> int:
        total = 0
        for m, c in self.terms.items():
            v = c
            for name in m:
                v *= env[name]
            total += v
        return total

    def expr(self) -> kir.E:
        out: kir.E = kir.i64(0)
        for m, c in sorted(self.terms.items()):
            term: kir.E = kir.i64(c)
            for name in m:
                term = term * kir.var(name)
            out = out + term
        return out

    def to_json(self) -> list:
        return [[list(m), c] for m, c in sorted(self.terms.items())]

    @staticmethod
    def from_json(data: list) -> "Poly":
        return Poly({tuple(m): c for m, c in data})

    def __repr__(self) -> str:
        if not self.terms:
            return "0"
        parts = []
        for m, c in sorted(self.terms.items()):
            if not m:
                parts.append(str(c))
            else:
                parts.append(("" if c == 1 else f"{c}*") + "*".join(m))
        return " + ".join(parts)


def prod(dims) -> Poly:
    out = Poly.of(1)
    for d in dims:
        out = out * Poly.of(d)
    return out
