"""simplify: algebraic identities and movement-op folding, as a table of exact rewrites.

Invariant: every rule is exact in IEEE float32 (bit-identical results for every input, NaN and signed zeros
included) and keeps the node's dtype and shape; a rule whose result would have another type does not fire.
That is why `x + 0.0 -> x` is absent for floats (-0.0 + 0.0 is +0.0) while `x + -0.0 -> x` is present, and why
re-association (`(x*a)*b -> x*(a*b)`) is absent.

    x * 1, 1 * x, x / 1                  -> x
    x + -0.0, x - 0.0 (x + 0 for ints)   -> x
    -(-x)                                -> x
    cast(x) to x's own dtype             -> x
    where(c, x, x)                       -> x
    c1 op c2 (constants)                 -> the constant, computed in the op's dtype by the interpreter
    const op x (commutative op)          -> x op const              (constants on the right, for matchers)
    reshape(x) to x's shape              -> x
    reshape(reshape(x))                  -> reshape(x)
    permute(x) by the identity           -> x
    permute(permute(x, a), b)            -> permute(x, a[b])
    expand(x) to x's shape               -> x
    expand(expand(x))                    -> expand(x)
    slice(x) of the whole axis           -> x
    slice(slice(x)) on one axis          -> slice(x)
    slice(concat(a, b, ...)) within one operand  -> that operand, or a slice of it
    concat(x)                            -> x
  simplify-late only (after the passes that match the model's permutes):
    permute(x) moving only size-1 axes   -> reshape(x)              (e.g. [1, H, D] -> [H, 1, D] in decode)
"""
from __future__ import annotations

from typing import Any, Callable, Optional

import numpy as np

from dzc.ir.infer import make
from dzc.ir.node import Node
from dzc.ir.ops import BINARY, ELEMENTWISE, Op, UNARY
from dzc.ir.program import Program
from dzc.passes.base import PassContext
from dzc.passes.graph import COMMUTATIVE, const_value, norm_axis
from dzc.passes.rewrite import graph_rewrite

Rule = Callable[[Node, Any], Optional[Node]]


def _same_type(node: Node, out: Optional[Node]) -> Optional[Node]:
    if out is None or out.dtype != node.dtype or out.shape != node.shape:
        return None
    return out


def _is_one(n: Node) -> bool:
    v = const_value(n)
    return v is not None and not isinstance(v, bool) and v == 1


def _is_additive_identity(n: Node, dtype_is_float: bool) -> bool:
    v = const_value(n)
    if v is None or isinstance(v, bool):
        return False
    if dtype_is_float:
        return v == 0 and np.signbit(v)   # only -0.0 is an exact identity for float addition
    return v == 0


# ---- elementwise algebra ----------------------------------------------------------------------------------------
def mul_one(n: Node, ctx: Any) -> Optional[Node]:
    a, b = n.src
    if _is_one(b):
        return _same_type(n, a)
    if _is_one(a):
        return _same_type(n, b)
    return None


def div_one(n: Node, ctx: Any) -> Optional[Node]:
    a, b = n.src
    return _same_type(n, a) if _is_one(b) else None


def add_zero(n: Node, ctx: Any) -> Optional[Node]:
    a, b = n.src
    if _is_additive_identity(b, n.dtype.is_float):
        return _same_type(n, a)
    if _is_additive_identity(a, n.dtype.is_float):
        return _same_type(n, b)
    return None


def sub_zero(n: Node, ctx: Any) -> Optional[Node]:
    a, b = n.src
    v = const_value(b)
    if v is not None and not isinstance(v, bool) and v == 0 and not np.signbit(v):   # x - (+0) == x exactly
        return _same_type(n, a)
    return None


def double_neg(n: Node, ctx: Any) -> Optional[Node]:
    (x,) = n.src
    return _same_type(n, x.src[0]) if x.op == Op.NEG else None


def cast_same(n: Node, ctx: Any) -> Optional[Node]:
    (x,) = n.src
    return x if x.dtype == n.dtype else None


def where_same(n: Node, ctx: Any) -> Optional[Node]:
    _, a, b = n.src
    return _same_type(n, a) if a is b else None


def const_fold(n: Node, ctx: Any) -> Optional[Node]:
    """An elementwise op over constants only is itself a constant (computed exactly as the interpreter would)."""
    if not n.src or any(s.op != Op.CONST for s in n.src) or n.shape != ():
        return None
    from dzc.ir.interpreter import Interpreter   # local: the interpreter is only needed when a rule fires
    from dzc.ir.weights import WeightStore

    value = Interpreter(WeightStore(_no_weights)).run(Program("fold", (), (("v", n),)), {})["v"]
    scalar = value.item()
    if n.dtype.is_float:
        scalar = float(scalar)
    return Node(Op.CONST, n.dtype, (), (), scalar)


def _no_weights(name: str) -> np.ndarray:
    raise KeyError(name)


def const_right(n: Node, ctx: Any) -> Optional[Node]:
    a, b = n.src
    if a.op == Op.CONST and b.op != Op.CONST:
        return n.replace(src=(b, a))
    return None


# ---- movement ---------------------------------------------------------------------------------------------------
def reshape_identity(n: Node, ctx: Any) -> Optional[Node]:
    (x,) = n.src
    return x if x.shape == n.shape else None


def reshape_reshape(n: Node, ctx: Any) -> Optional[Node]:
    (x,) = n.src
    return make(Op.RESHAPE, [x.src[0]], n.arg) if x.op == Op.RESHAPE else None


def permute_identity(n: Node, ctx: Any) -> Optional[Node]:
    return n.src[0] if tuple(n.arg) == tuple(range(n.ndim)) else None


def permute_permute(n: Node, ctx: Any) -> Optional[Node]:
    (x,) = n.src
    if x.op != Op.PERMUTE:
        return None
    inner, outer = x.arg, n.arg
    return make(Op.PERMUTE, [x.src[0]], tuple(inner[i] for i in outer))


def permute_to_reshape(n: Node, ctx: Any) -> Optional[Node]:
    """A permute that keeps every axis longer than 1 in its order moves no data: it is a reshape (a free view)."""
    (x,) = n.src
    moved = [axis for axis in n.arg if x.shape[axis] != 1]
    return make(Op.RESHAPE, [x], n.shape) if moved == sorted(moved) else None


def expand_identity(n: Node, ctx: Any) -> Optional[Node]:
    (x,) = n.src
    return x if x.shape == n.shape else None


def expand_expand(n: Node, ctx: Any) -> Optional[Node]:
    (x,) = n.src
    return make(Op.EXPAND, [x.src[0]], n.arg) if x.op == Op.EXPAND else None


def slice_whole(n: Node, ctx: Any) -> Optional[Node]:
    (x,) = n.src
    axis, start, stop = n.arg
    ax = norm_axis(axis, x.ndim)
    return x if start == 0 and stop == x.shape[ax] else None


def slice_slice(n: Node, ctx: Any) -> Optional[Node]:
    (x,) = n.src
    if x.op != Op.SLICE:
        return None
    axis, start, stop = n.arg
    in_axis, in_start, _ = x.arg
    if norm_axis(axis, n.ndim) != norm_axis(in_axis, x.ndim):
        return None
    return make(Op.SLICE, [x.src[0]], (axis, in_start + start, in_start + stop))


def slice_concat(n: Node, ctx: Any) -> Optional[Node]:
    (x,) = n.src
    if x.op != Op.CONCAT:
        return None
    axis, start, stop = n.arg
    ax = norm_axis(axis, n.ndim)
    if norm_axis(x.arg, x.ndim) != ax:
        return None
    offset: Any = 0
    for part in x.src:
        lo, hi = start - offset, stop - offset   # the slice in the part's coordinates
        size = part.shape[ax]
        if isinstance(lo, int) and lo >= 0 and _le(hi, size):
            if lo == 0 and hi == size:
                return part
            return make(Op.SLICE, [part], (axis, lo, hi))
        offset = offset + size
    return None


def _le(a: Any, b: Any) -> bool:
    """a <= b for dims that may be symbolic: provable only when they differ by a constant or are equal."""
    diff = b - a
    return (isinstance(diff, int) and diff >= 0) or a == b


def concat_single(n: Node, ctx: Any) -> Optional[Node]:
    return n.src[0] if len(n.src) == 1 else None


RULES: dict[Op, list[Rule]] = {
    Op.MUL: [const_fold, mul_one, const_right],
    Op.DIV: [const_fold, div_one],
    Op.ADD: [const_fold, add_zero, const_right],
    Op.SUB: [const_fold, sub_zero],
    Op.MAX: [const_fold, const_right],
    Op.NEG: [const_fold, double_neg],
    Op.CAST: [cast_same, const_fold],
    Op.WHERE: [where_same, const_fold],
    Op.RESHAPE: [reshape_identity, reshape_reshape],
    Op.PERMUTE: [permute_identity, permute_permute],
    Op.EXPAND: [expand_identity, expand_expand],
    Op.SLICE: [slice_whole, slice_slice, slice_concat],
    Op.CONCAT: [concat_single],
}
for _op in (UNARY | BINARY) - set(RULES):   # the remaining scalar ops: constant folding only
    RULES[_op] = [const_fold]
assert set(RULES) >= ELEMENTWISE and COMMUTATIVE <= set(RULES)


LATE_RULES: dict[Op, list[Rule]] = {**RULES, Op.PERMUTE: [permute_identity, permute_permute, permute_to_reshape]}


class Simplify:
    name = "simplify"
    description = "exact algebraic identities (x*1, x+-0, --x, casts) and folding of chained movement ops"
    rules = RULES

    def run(self, program: Program, ctx: PassContext) -> Program:
        before = len(program.toposort())
        out = graph_rewrite(program, self.rules, ctx)
        ctx.facts[self.name] = {"summary": f"{before - len(out.toposort())} nodes fewer"}
        return out


class SimplifyLate(Simplify):
    """simplify, plus: a permute that only moves size-1 axes becomes a reshape. Pattern-matching passes (attention
    fusion, MLA absorption) look for the permutes the model wrote, so this runs after them."""

    name = "simplify-late"
    description = "simplify, and permutes that only move size-1 axes become reshapes (free views)"
    rules = LATE_RULES
