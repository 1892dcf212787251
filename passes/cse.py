"""cse: merge equal computations.

Hash-consing (ir/node.py) already merges structurally equal nodes as they are built, so most of CSE is free. This
pass does the part construction cannot:

    a op b  and  b op a   (op in ADD, MUL, MAX)   -> the first of them (in topological order); operand order
                                                     is otherwise left as written
    CONST 1 : f32  (an int arg on a float type)   -> CONST 1.0 : f32  (and 1.0 : i32 -> 1 : i32)
    two WEIGHT leaves with one name               -> an error unless they agree (name = storage, one type)

Invariant: results are bit-identical (IEEE add, mul and max commute exactly; NaN propagates either way), and the
program is rebuilt through the node cache, so every node is re-interned.
"""
from __future__ import annotations

from typing import Optional

from dzc.errors import IRError
from dzc.ir.node import Node
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.passes.base import PassContext
from dzc.passes.graph import COMMUTATIVE, rebuild


def _normalise_const(n: Node) -> Optional[Node]:
    v = n.arg
    if n.dtype.is_float and isinstance(v, int) and not isinstance(v, bool):
        return n.replace(arg=float(v))
    if not n.dtype.is_float and isinstance(v, float) and v.is_integer() and n.dtype.name != "BOOL":
        return n.replace(arg=int(v))
    return None


def check_weight_names(program: Program) -> None:
    seen: dict[str, Node] = {}
    for n in program.toposort():
        if n.op != Op.WEIGHT:
            continue
        other = seen.setdefault(n.arg.name, n)
        if other is not n:
            raise IRError(f"program {program.name}: weight '{n.arg.name}' is used as {other.arg.fmt}{list(other.shape)} "
                          f"and as {n.arg.fmt}{list(n.shape)}; one name must mean one stored tensor")


class CSE:
    name = "cse"
    description = "merge equal computations: commutative operand order, constant spelling, weights by name"

    def run(self, program: Program, ctx: PassContext) -> Program:
        order = program.toposort()
        first: dict[tuple, Node] = {}   # commutative node, operands as a set -> the first such node built

        def visit(node: Node, src: tuple[Node, ...]) -> Node:
            if node.op == Op.CONST:
                return _normalise_const(node) or node
            out = node.replace(src=src) if src else node
            if node.op in COMMUTATIVE:
                a, b = src
                key = (out.op, out.dtype, out.shape, frozenset((id(a), id(b))))
                out = first.setdefault(key, out)
            return out

        out = rebuild(program, visit)
        check_weight_names(out)
        merged = len(order) - len(out.toposort())
        ctx.facts[self.name] = {"summary": f"{merged} nodes merged", "merged": merged}
        return out
