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
    # Keyed by the node itself, not id(): a rule's intermediate results can be freed, and a reused id would
    # silently alias an unrelated node. Holding them as keys keeps them alive for the whole rewrite.
    done: dict[Node, Node] = {}

    def visit(root: Node) -> Node:
        # iterative post-order so deep graphs (60-layer models) do not hit the recursion limit
        stack: list[tuple[Node, bool]] = [(root, False)]
        while stack:
            node, ready = stack.pop()
            if node in done:
                continue
            if not ready:
                stack.append((node, True))
                stack.extend((s, False) for s in node.src if s not in done)
                continue
            new = node.replace(src=tuple(done[s] for s in node.src)) if node.src else node
            done[node] = apply(new)
        return done[root]

    def apply(node: Node) -> Node:
        for _ in range(_MAX_REWRITES_PER_NODE):
            for rule in rules.get(node.op, ()):
                out = rule(node, ctx)
                if out is not None and out is not node:
                    node = visit(out) if any(s not in done for s in out.src) else out
                    break
            else:
                return node
        raise RuntimeError(f"rewrite rules did not converge on {node!r}")

    outputs = tuple((name, visit(node)) for name, node in program.outputs)
    inputs = tuple(done.get(n, n) for n in program.inputs)
    return Program(program.name, inputs, outputs)
