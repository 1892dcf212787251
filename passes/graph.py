"""Graph helpers shared by the passes: use counts, matching helpers, and a rewrite driver for fusion.

`graph_rewrite` (passes/rewrite.py) is the right driver for local algebra: a rule sees one node whose operands
are already rewritten. Fusion also needs to know whether an intermediate value has other users (fusing it
would then duplicate work), and use counts are only meaningful on the graph as it was. `replace_nodes` runs one
sweep in topological order over the *original* graph: a rule sees an original node (with `Uses` of the
original program) and returns a replacement built from original nodes; the driver rebinds that replacement's
operands to their rewritten versions.
"""
from __future__ import annotations

from typing import Callable, Iterator, Optional, Union

from dzc.ir.node import Node
from dzc.ir.ops import Op
from dzc.ir.program import Program

COMMUTATIVE = frozenset({Op.ADD, Op.MUL, Op.MAX})
Scalar = Union[int, float, bool]


class Uses:
    """Distinct users of every node of a program (a program output counts as one more user)."""

    def __init__(self, program: Program) -> None:
        self.order = program.toposort()
        self.index: dict[int, int] = {id(n): i for i, n in enumerate(self.order)}
        self.users: dict[int, list[Node]] = {id(n): [] for n in self.order}
        for n in self.order:
            for s in dict.fromkeys(n.src, None):  # distinct operands, in order
                self.users[id(s)].append(n)
        self.outputs: set[int] = {id(node) for _, node in program.outputs}

    def count(self, node: Node) -> int:
        return len(self.users.get(id(node), ())) + (id(node) in self.outputs)

    def only_user_is(self, node: Node, user: Node) -> bool:
        """`node` is used by `user` and nothing else (and is not a program output)."""
        return id(node) not in self.outputs and [id(u) for u in self.users.get(id(node), ())] == [id(user)]

    def private(self, node: Node, inside: "set[int]") -> bool:
        """Every use of `node` is by a node in `inside` (ids) and it is not a program output."""
        return id(node) not in self.outputs and all(id(u) in inside for u in self.users.get(id(node), ()))


# ---- matching helpers -------------------------------------------------------------------------------------------
def const_value(node: Node) -> Optional[Scalar]:
    return node.arg if node.op == Op.CONST else None


def is_const(node: Node, value: Scalar) -> bool:
    """A CONST equal to `value` (1 == 1.0; -0.0 == 0.0 here: callers that care about the sign check it)."""
    return node.op == Op.CONST and node.arg == value


def commuted(node: Node) -> Iterator[tuple[Node, Node]]:
    """The two operands of a binary node in both orders when the op commutes, else as written."""
    a, b = node.src
    yield a, b
    if node.op in COMMUTATIVE and a is not b:
        yield b, a


def norm_axis(axis: int, ndim: int) -> int:
    return axis % ndim if -ndim <= axis < ndim else axis


def is_op(node: Node, op: Op, arg: object = ..., nsrc: Optional[int] = None) -> bool:
    if node.op != op:
        return False
    if arg is not ... and node.arg != arg:
        return False
    return nsrc is None or len(node.src) == nsrc


# ---- the fusion driver ------------------------------------------------------------------------------------------
FusionRule = Callable[[Node, Uses], Optional[Node]]


def replace_nodes(program: Program, rules: dict[Op, list[FusionRule]]) -> tuple[Program, int]:
    """One sweep over `program`; returns the rewritten program and how many nodes a rule replaced.

    A rule gets an original node and the original `Uses`; it returns None or a node of the same type built from
    original nodes (plus new ones). Rules fire bottom-up, so an outer pattern may contain an inner node that was
    itself replaced: the outer replacement's operands are rebound to the rewritten graph.
    """
    uses = Uses(program)
    done: dict[int, Node] = {}   # original node id -> rewritten node (originals stay alive in uses.order)
    fresh: dict[int, tuple[Node, Node]] = {}   # rule-built node id -> (that node, rebound): the node is kept
    fired = 0                                  # alive here so its id cannot be reused by another node

    def rebind(node: Node) -> Node:
        hit = done.get(id(node))
        if hit is not None and uses.index.get(id(node)) is not None:
            return hit
        if not node.src:
            return node
        seen = fresh.get(id(node))
        if seen is not None and seen[0] is node:
            return seen[1]
        new = node.replace(src=tuple(rebind(s) for s in node.src))
        fresh[id(node)] = (node, new)
        return new

    for node in uses.order:
        out = None
        for rule in rules.get(node.op, ()):
            out = rule(node, uses)
            if out is not None:
                break
        if out is None:
            done[id(node)] = node.replace(src=tuple(done[id(s)] for s in node.src)) if node.src else node
            continue
        if out.dtype != node.dtype or out.shape != node.shape:
            raise AssertionError(f"fusion rule for {node!r} changed its type to {out!r}")
        fired += 1
        done[id(node)] = rebind(out)
    outputs = tuple((name, done[id(n)]) for name, n in program.outputs)
    return Program(program.name, program.inputs, outputs), fired


def rebuild(program: Program, fn: Callable[[Node, tuple[Node, ...]], Optional[Node]]) -> Program:
    """Rebuild bottom-up: fn(original node, rewritten operands) returns the new node or None (keep it)."""
    done: dict[int, Node] = {}
    for node in program.toposort():
        src = tuple(done[id(s)] for s in node.src)
        out = fn(node, src)
        done[id(node)] = out if out is not None else (node.replace(src=src) if node.src else node)
    outputs = tuple((name, done[id(n)]) for name, n in program.outputs)
    inputs = tuple(done.get(id(n), n) for n in program.inputs)
    return Program(program.name, inputs, outputs)
