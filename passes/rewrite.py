"""The rewrite driver: apply a table of per-op rules bottom-up until nothing matches.

A rule looks at one node (whose operands are already rewritten) and returns a replacement node or None.
Because nodes are hash-consed, rebuilding an unchanged node returns the same object, so a rewrite that
matches nothing returns the very same program, and rebuilt graphs are deduplicated for free.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Optional, Sequence

from dzc.ir.node import Node
from dzc.ir.ops import Op
from dzc.ir.program import Program

Rule = Callable[[Node, Any], Optional[Node]]
RuleTable = Mapping[Op, Sequence[Rule]]

_MAX_REWRITES_PER_NODE = 64  # a rule set that ping-pongs is a bug; fail loudly instead of hanging


def graph_rewrite(program: Program, rules: RuleTable, ctx: Any = None) -> Program:
    done: dict[int, Node] = {}

    def visit(root: Node) -> Node:
        # iterative post-order so deep graphs (60-layer models) do not hit the recursion limit
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:
            node, ready = stack.pop()
            if id(node) in done:
                continue
            if not ready:
                stack.append((node, True))
                stack.extend((s, False) for s in node.src if id(s) not in done)
                continue
            new = node.replace(src=tuple(done[id(s)] for s in node.src)) if node.src else node
            done[id(node)] = apply(new)
        return done[id(root)]

    def apply(node: Node) -> Node:
        for _ in range(_MAX_REWRITES_PER_NODE):
            for rule in rules.get(node.op, ()):
                out = rule(node, ctx)
                if out is not None and out is not node:
                    node = visit(out) if any(id(s) not in done for s in out.src) else out
                    break
            else:
                return node
        raise RuntimeError(f"rewrite rules did not converge on {node!r}")

    outputs = tuple((name, visit(node)) for name, node in program.outputs)
    inputs = tuple(done.get(id(n), n) for n in program.inputs)
    return Program(program.name, inputs, outputs)
