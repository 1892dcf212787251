"""fuse-swiglu: the gated activation of every SwiGLU MLP as one kernel.

    mul(silu(g), u)  (either order)                                 -> swiglu(g, u)

The silu must have no other user. Invariant: bit-identical (SWIGLU computes g * sigmoid(g) * u in that order).
"""
from __future__ import annotations

from typing import Optional

from dzc.ir.infer import make
from dzc.ir.node import Node
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.passes.base import PassContext
from dzc.passes.graph import Uses, commuted, replace_nodes


def match_swiglu(node: Node, uses: Uses) -> Optional[Node]:
    for act, up in commuted(node):
        if act.op == Op.SILU and act is not up and uses.only_user_is(act, node):
            out = make(Op.SWIGLU, [act.src[0], up])
            if out.shape == node.shape:
                return out
    return None


class FuseSwiGLU:
    name = "fuse-swiglu"
    description = "silu(gate) * up  ->  swiglu(gate, up)"

    def run(self, program: Program, ctx: PassContext) -> Program:
        out, n = replace_nodes(program, {Op.MUL: [match_swiglu]})
        ctx.facts[self.name] = {"summary": f"{n} activations fused", "fused": n}
        return out
