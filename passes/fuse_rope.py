"""fuse-rope: raise the traced interleaved-pair rotation into one ROPE kernel.

The model (dzc/model/deepseek_v3.py `rope`) rotates pairs (x[2i], x[2i+1]) by angle i:

    pairs = reshape(x, [..., d/2, 2]);  e = slice(pairs, -1, 0, 1);  o = slice(pairs, -1, 1, 2)
    reshape(concat(e*C - o*S, e*S + o*C, axis=-1), x.shape)        -> rope(x, cos, sin)

where C and S are [..., d/2, 1] tables; the ROPE operands are those tables without the trailing 1
(cos = reshape(C, C.shape[:-1]), which the next simplify folds into the table's own reshape). Products and sums
may appear in either operand order. The pair reshape, slices, products and concat must have no other users.

Invariant: bit-identical (ROPE computes the same four products, one subtraction and one addition per pair).
"""
from __future__ import annotations

from typing import Optional

from dzc.ir.infer import make
from dzc.ir.node import Node
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.passes.base import PassContext
from dzc.passes.graph import Uses, commuted, norm_axis, replace_nodes
from dzc.passes.simplify import reshape_identity, reshape_reshape


def _half(node: Node, pairs: Node, index: int) -> bool:
    """node is slice(pairs, last axis, index, index+1)."""
    if node.op != Op.SLICE or node.src[0] is not pairs:
        return False
    axis, start, stop = node.arg
    return norm_axis(axis, pairs.ndim) == pairs.ndim - 1 and (start, stop) == (index, index + 1)


def _product_with(node: Node, factor: Node) -> Optional[Node]:
    """The other operand when node is mul(factor, other) (either order)."""
    if node.op != Op.MUL:
        return None
    for a, b in commuted(node):
        if a is factor:
            return b
    return None


def _table(t: Node) -> Node:
    """C [..., d/2, 1] -> [..., d/2], folding reshape chains right away."""
    out = make(Op.RESHAPE, [t], t.shape[:-1])
    out = reshape_reshape(out, None) or out
    return reshape_identity(out, None) or out


def match_rope(node: Node, uses: Uses) -> Optional[Node]:
    (cat,) = node.src
    if cat.op != Op.CONCAT or len(cat.src) != 2 or norm_axis(cat.arg, cat.ndim) != cat.ndim - 1:
        return None
    first, second = cat.src
    if first.op != Op.SUB or second.op != Op.ADD or first.ndim < 2:
        return None
    ec, os_ = first.src
    # find the pair reshape through e*C
    for e, _ in commuted(ec) if ec.op == Op.MUL else ():
        if e.op != Op.SLICE or e.src[0].op != Op.RESHAPE:
            continue
        pairs = e.src[0]
        x = pairs.src[0]
        d = x.shape[-1] if x.ndim else None
        if (not isinstance(d, int) or d % 2 or pairs.shape != x.shape[:-1] + (d // 2, 2) or node.shape != x.shape
                or not _half(e, pairs, 0)):
            continue
        cos = _product_with(ec, e)
        o = next((a for a, b in commuted(os_) if _half(a, pairs, 1)), None) if os_.op == Op.MUL else None
        if cos is None or o is None:
            continue
        sin = _product_with(os_, o)
        es, oc = None, None
        for a, b in commuted(second):
            if _product_with(a, e) is sin and _product_with(b, o) is cos:
                es, oc = a, b
        if es is None or sin is None or cos.shape != sin.shape or cos.shape[-1:] != (1,) or ec.shape != e.shape:
            continue
        inner = [cat, first, second, ec, os_, es, oc, e, o, pairs]
        inside = {id(n) for n in inner} | {id(node)}
        if all(uses.private(n, inside) for n in inner):
            return make(Op.ROPE, [x, _table(cos), _table(sin)])
    return None


class FuseRope:
    name = "fuse-rope"
    description = "the interleaved-pair rotation (reshape, slices, 4 products, concat) -> rope(x, cos, sin)"

    def run(self, program: Program, ctx: PassContext) -> Program:
        out, n = replace_nodes(program, {Op.RESHAPE: [match_rope]})
        ctx.facts[self.name] = {"summary": f"{n} rotations fused", "fused": n}
        return out
