"""fuse-elementwise: chains of elementwise ops become one KERNEL each.

Walking users before producers, every elementwise node not yet taken starts a group; an elementwise operand
joins the group when all of its users are already in it (and it is not a program output), so each value
computed inside a kernel is read only inside it. CONST operands are copied into the body; every other operand
becomes a kernel input. A group of two or more ops becomes

    kernel(in0, in1, ...) { the group, with its inputs as in0.. and its constants inline }

and a lone op stays as it is (it already is one kernel; wrapping it would change nothing a code generator sees).
Shapes inside a body broadcast, so a value of a smaller shape (a [N, 1] row statistic) is recomputed per output
element; that is what fusing buys (no round trip through memory) and costs (a few flops).

Residual adds: `h + attn` is one ADD whose result is read by the next norm and by the next residual add, so it
stays a lone op (a KERNEL has one output; folding it into both readers would recompute it and fork the residual
stream). Adds whose result has one elementwise reader (the MoE `routed + shared` sum feeding the residual add)
join that reader's kernel.

Invariant: bit-identical (the body is the same ops on the same values).
"""
from __future__ import annotations

import heapq

from dzc.ir.node import FusedBody, Node
from dzc.ir.ops import ELEMENTWISE, Op
from dzc.ir.program import Program
from dzc.passes.base import PassContext
from dzc.passes.graph import Uses, rebuild


def elementwise_groups(program: Program) -> tuple[Uses, dict[int, list[Node]]]:
    """root id -> the group's nodes (root first, then by descending topological index)."""
    uses = Uses(program)
    taken: set[int] = set()
    groups: dict[int, list[Node]] = {}
    for root in reversed(uses.order):
        if root.op not in ELEMENTWISE or id(root) in taken:
            continue
        members = [root]
        inside = {id(root)}
        heap = [(-uses.index[id(s)], id(s), s) for s in dict.fromkeys(root.src) if s.op in ELEMENTWISE]
        heapq.heapify(heap)
        seen = {id(s) for _, _, s in heap}
        while heap:
            _, _, s = heapq.heappop(heap)
            if id(s) in taken or not uses.private(s, inside):
                continue
            members.append(s)
            inside.add(id(s))
            for t in dict.fromkeys(s.src):
                if t.op in ELEMENTWISE and id(t) not in seen:
                    seen.add(id(t))
                    heapq.heappush(heap, (-uses.index[id(t)], id(t), t))
        taken |= inside
        if len(members) >= 2:
            groups[id(root)] = members
    return uses, groups


def make_kernel(members: list[Node], uses: Uses, rewritten: dict[int, Node]) -> Node:
    """The KERNEL computing members[0] from its group; `rewritten` maps original ids to rewritten nodes."""
    inside = {id(m) for m in members}
    inputs: list[Node] = []
    slot: dict[int, Node] = {}   # rewritten operand id -> its body INPUT
    body: dict[int, Node] = {}

    def leaf(s: Node) -> Node:
        if s.op == Op.CONST:
            return s
        new = rewritten[id(s)]
        if id(new) not in slot:
            slot[id(new)] = Node(Op.INPUT, new.dtype, new.shape, (), f"in{len(inputs)}")
            inputs.append(new)
        return slot[id(new)]

    for m in sorted(members, key=lambda m: uses.index[id(m)]):   # operands before users
        body[id(m)] = m.replace(src=tuple(body[id(s)] if id(s) in inside else leaf(s) for s in m.src))
    out = body[id(members[0])]
    return Node(Op.KERNEL, out.dtype, out.shape, tuple(inputs), FusedBody(out))


class FuseElementwise:
    name = "fuse-elementwise"
    description = "chains of elementwise ops whose intermediates have one reader -> one KERNEL each"

    def run(self, program: Program, ctx: PassContext) -> Program:
        uses, groups = elementwise_groups(program)
        rewritten: dict[int, Node] = {}

        def visit(node: Node, src: tuple[Node, ...]) -> Node:
            members = groups.get(id(node))
            if members is not None:
                out = make_kernel(members, uses, rewritten)
            else:
                out = node.replace(src=src) if src else node
            rewritten[id(node)] = out
            return out

        out = rebuild(program, visit)
        fused = sum(len(m) for m in groups.values())
        ctx.facts[self.name] = {"summary": f"{fused} ops in {len(groups)} kernels", "kernels": len(groups)}
        return out
