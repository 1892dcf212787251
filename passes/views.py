"""Which nodes cost a kernel launch and which are free views of another node's buffer.

Cost model (the one `kernel_count`, `dzc ir --verify-passes` and the memory planner share): every value a
kernel produces is stored contiguously in row-major order. A RESHAPE of such a value is free (same bytes, new
shape); so is a SLICE that takes a contiguous range, i.e. every axis before the sliced one has size 1 (rows of
a [P, C] cache, a prefix of a [1, K] row). Every other movement op (PERMUTE, EXPAND, CONCAT, strided SLICE) is
counted as a copy kernel. That is conservative: a code generator may fold a strided view into its consumer, but
the count should not promise that. Leaves (inputs, weights, constants, aranges) are not kernels.
"""
from __future__ import annotations

from dzc.ir.node import Node
from dzc.ir.ops import LEAVES, Op
from dzc.ir.program import Program


def is_free_view(node: Node) -> bool:
    """True when `node` needs no kernel: it re-reads its operand's buffer (see the module docstring)."""
    if node.op == Op.RESHAPE:
        return True
    if node.op == Op.SLICE:
        (x,) = node.src
        axis = node.arg[0] % x.ndim
        return all(d == 1 for d in x.shape[:axis])
    return False


def is_kernel(node: Node) -> bool:
    return node.op not in LEAVES and not is_free_view(node)


def kernels(program: Program) -> list[Node]:
    """The nodes that launch a kernel, in execution (topological) order."""
    return [n for n in program.toposort() if is_kernel(n)]


def kernel_count(program: Program) -> int:
    return sum(1 for n in program.toposort() if is_kernel(n))


def view_base(node: Node) -> Node:
    """The node whose buffer a chain of free views reads (the node itself when it is not a free view)."""
    while is_free_view(node):
        node = node.src[0]
    return node
