"""A program: named runtime inputs, named outputs, and the dataflow graph between them."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterator

from dzc.ir.node import Node, WeightRef
from dzc.ir.ops import Op


@dataclass(frozen=True)
class Program:
    """One entry point of a compiled model (e.g. `prefill` or `decode`).

    `inputs` are INPUT leaves in calling order; `outputs` map names (e.g. "logits", "cache.0.latent") to nodes.
    Symbols used in shapes (T, P) are bound at run time from the input shapes.
    """

    name: str
    inputs: tuple[Node, ...]
    outputs: tuple[tuple[str, Node], ...]

    def output(self, name: str) -> Node:
        for key, node in self.outputs:
            if key == name:
                return node
        raise KeyError(name)

    def toposort(self) -> list[Node]:
        """Every reachable node once, operands before users, in a deterministic order (DFS by operand order)."""
        order: list[Node] = []
        seen: set[int] = set()
        for _, root in self.outputs:
            stack: list[tuple[Node, bool]] = [(root, False)]
            while stack:
                node, expanded = stack.pop()
                if expanded:
                    order.append(node)
                    continue
                if id(node) in seen:
                    continue
                seen.add(id(node))
                stack.append((node, True))
                stack.extend((s, False) for s in reversed(node.src) if id(s) not in seen)
        return order

    def weights(self) -> list[WeightRef]:
        return [n.arg for n in self.toposort() if n.op == Op.WEIGHT]

    def nodes(self, op: Op) -> Iterator[Node]:
        return (n for n in self.toposort() if n.op == op)

    def with_outputs(self, outputs: tuple[tuple[str, Node], ...]) -> "Program":
        return Program(self.name, self.inputs, outputs)
