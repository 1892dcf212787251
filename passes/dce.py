"""dce: remove computation nothing reads.

A `Program` is its outputs plus everything reachable from them, so a node no output depends on is already gone
the moment a pass rebuilds the graph: there is no dead top-level node to delete. What can still be dead is
inside KERNEL nodes, whose operands are a calling convention:

    kernel(a, b, c) { body reads in0, in2 }     -> kernel(a, c) { in0, in1 }      (unused operand dropped)
    kernel(a, b, a) { in0, in1, in2 }           -> kernel(a, b) { in0, in1, in0 } (operand passed twice merged)

Declared program inputs are never removed, even when unused (e.g. a cache no attention reads): they are the
entry point's signature, which the runtime and the artifact format depend on. They are reported instead.

Invariant: results are bit-identical; only KERNEL operand lists and bodies change.
"""
from __future__ import annotations

from typing import Optional

from dzc.ir.node import FusedBody, Node
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.passes.base import PassContext
from dzc.passes.graph import rebuild


def body_nodes(body: FusedBody) -> list[Node]:
    return Program("body", (), (("out", body.out),)).toposort()


def prune_kernel(node: Node, src: tuple[Node, ...]) -> tuple[Optional[Node], int]:
    """The KERNEL with unused and repeated operands removed (None when nothing changes), and how many went."""
    used = {int(n.arg[2:]) for n in body_nodes(node.arg) if n.op == Op.INPUT}
    keep: list[Node] = []
    slot_of: dict[int, int] = {}   # old operand index -> new operand index
    first_slot: dict[int, int] = {}   # id(operand) -> its new index
    for i, s in enumerate(src):
        if i not in used:
            continue
        if id(s) not in first_slot:
            first_slot[id(s)] = len(keep)
            keep.append(s)
        slot_of[i] = first_slot[id(s)]
    if len(keep) == len(src) and all(slot_of[i] == i for i in range(len(src))):
        return None, 0
    remap: dict[int, Node] = {}
    for n in body_nodes(node.arg):
        if n.op == Op.INPUT:
            remap[id(n)] = n.replace(arg=f"in{slot_of[int(n.arg[2:])]}")
        elif n.src:
            remap[id(n)] = n.replace(src=tuple(remap[id(s)] for s in n.src))
        else:
            remap[id(n)] = n
    body = FusedBody(remap[id(node.arg.out)])
    return Node(Op.KERNEL, node.dtype, node.shape, tuple(keep), body), len(src) - len(keep)


class DCE:
    name = "dce"
    description = "drop unused and repeated KERNEL operands; report (never remove) unused program inputs"

    def run(self, program: Program, ctx: PassContext) -> Program:
        removed = 0

        def visit(node: Node, src: tuple[Node, ...]) -> Optional[Node]:
            nonlocal removed
            if node.op != Op.KERNEL:
                return None
            out, n = prune_kernel(node, src)
            removed += n
            return out

        out = rebuild(program, visit)
        reached = {id(n) for n in out.toposort()}
        unused = [n.arg for n in out.inputs if id(n) not in reached]
        ctx.facts[self.name] = {"summary": f"{removed} kernel operands removed"
                                + (f"; unused inputs: {', '.join(unused)}" if unused else ""),
                                "removed": removed, "unused-inputs": unused}
        return out
