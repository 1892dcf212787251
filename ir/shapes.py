"""Shapes with symbolic dimensions.

A program is traced once and runs for any number of new tokens `T` and any cache position `P` (tokens already
in the KV cache). A dimension is an `int` or a `Sym`: an affine sum of named symbols plus a constant, so that the
length of the attended sequence is `P+T` and a slice `[P:P+T]` has a known symbolic length.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Union


@dataclass(frozen=True)
class Sym:
    """sum(coef * symbol) + const, kept in canonical (sorted, zero-free) form so equal dims compare equal."""

    terms: tuple[tuple[str, int], ...]
    const: int = 0

    @staticmethod
    def named(name: str) -> "Sym":
        return Sym(((name, 1),), 0)

    @staticmethod
    def make(terms: Mapping[str, int], const: int) -> "Dim":
        canon = tuple(sorted((k, v) for k, v in terms.items() if v != 0))
        return const if not canon else Sym(canon, const)

    def _combine(self, other: "Dim", sign: int) -> "Dim":
        terms = dict(self.terms)
        if isinstance(other, Sym):
            for k, v in other.terms:
                terms[k] = terms.get(k, 0) + sign * v
            return Sym.make(terms, self.const + sign * other.const)
        return Sym.make(terms, self.const + sign * int(other))

    def __add__(self, other: "Dim") -> "Dim":
        return self._combine(other, 1)

    __radd__ = __add__

    def __sub__(self, other: "Dim") -> "Dim":
        return self._combine(other, -1)

    def __rsub__(self, other: "Dim") -> "Dim":
        return Sym.make({k: -v for k, v in self.terms}, int(other) - self.const)

    def evaluate(self, env: Mapping[str, int]) -> int:
        return sum(v * env[k] for k, v in self.terms) + self.const

    def __str__(self) -> str:
        parts = [(k if v == 1 else f"{v}*{k}") for k, v in self.terms]
        text = "+".join(parts).replace("+-", "-")
        if self.const:
            text += f"{self.const:+d}"
        return text


Dim = Union[int, Sym]
Shape = tuple[Dim, ...]

T = Sym.named("T")  # new tokens in this call
P = Sym.named("P")  # tokens already in the KV cache


def evaluate(dim: Dim, env: Mapping[str, int]) -> int:
    return dim.evaluate(env) if isinstance(dim, Sym) else dim


def evaluate_shape(shape: Shape, env: Mapping[str, int]) -> tuple[int, ...]:
    return tuple(evaluate(d, env) for d in shape)


def format_shape(shape: Shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def numel(shape: Shape) -> Dim:
    """Element count; affine as long as at most one dim is symbolic (always true in dzc's programs)."""
    const, sym = 1, None
    for d in shape:
        if isinstance(d, Sym):
            if sym is not None:
                raise ValueError(f"numel of {format_shape(shape)} is not affine in the symbols")
            sym = d
        else:
            const *= d
    return const if sym is None else Sym.make({k: v * const for k, v in sym.terms}, sym.const * const)
