"""fuse-rmsnorm: raise the traced RMS norm into one RMSNORM kernel.

    mul(mul(x, rsqrt(add(mul(sum(mul(x, x), -1), 1/d), eps))), w)   -> rmsnorm(x, w) {eps}
    (the mean may also be spelled div(sum(...), d); operands of mul/add in either order)

The intermediates (x*x, the sum, the mean, the rsqrt, the unweighted product) must have no other users, or
fusing would compute them twice. `w` is any [d] value (a norm weight in practice).

Invariant: same value up to float32 rounding (the kernel averages with one division instead of a multiply by
1/d; |relative change| ~ 1e-7 per norm).
"""
from __future__ import annotations

from typing import Optional

from dzc.ir.infer import make
from dzc.ir.node import Node
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.passes.base import PassContext
from dzc.passes.graph import Uses, commuted, const_value, norm_axis, replace_nodes


def _mean_of_squares(node: Node, d: int) -> Optional[tuple[Node, list[Node]]]:
    """(x, [nodes]) when `node` is mean(x*x, -1) over d elements."""
    if node.op == Op.MUL:
        for total, k in commuted(node):
            v = const_value(k)
            if v is not None and total.op == Op.SUM and abs(v * d - 1.0) < 1e-6:
                break
        else:
            return None
    elif node.op == Op.DIV:
        total, k = node.src
        if total.op != Op.SUM or const_value(k) != d:
            return None
    else:
        return None
    (sq,) = total.src
    if norm_axis(total.arg, sq.ndim) != sq.ndim - 1 or sq.op != Op.MUL or sq.src[0] is not sq.src[1]:
        return None
    return sq.src[0], [total, sq]


def match_rmsnorm(node: Node, uses: Uses) -> Optional[Node]:
    d = node.shape[-1] if node.ndim else None
    if not isinstance(d, int):
        return None
    for scaled, w in commuted(node):
        if w.shape != (d,) or scaled.op != Op.MUL or scaled.shape != node.shape:
            continue
        for x, r in commuted(scaled):
            if r.op != Op.RSQRT or r.src[0].op != Op.ADD or x.shape != node.shape:
                continue
            add = r.src[0]
            for mean, eps_node in commuted(add):
                eps = const_value(eps_node)
                found = _mean_of_squares(mean, d) if eps is not None else None
                if found is None or found[0] is not x:
                    continue
                inner = [scaled, r, add, mean, *found[1]]
                inside = {id(n) for n in inner} | {id(node)}
                if all(uses.private(n, inside) for n in inner):
                    return make(Op.RMSNORM, [x, w], float(eps))
    return None


class FuseRMSNorm:
    name = "fuse-rmsnorm"
    description = "x * rsqrt(mean(x*x) + eps) * w  ->  rmsnorm(x, w)"

    def run(self, program: Program, ctx: PassContext) -> Program:
        out, n = replace_nodes(program, {Op.MUL: [match_rmsnorm]})
        ctx.facts[self.name] = {"summary": f"{n} norms fused", "fused": n}
        return out
