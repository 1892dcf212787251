"""fold-weights: evaluate weight-only subgraphs at compile time.

A subgraph whose leaves are only WEIGHTs and CONSTs, at least one WEIGHT among them (transposes, splits, reshapes and slices of weights, scalings
of them, products of two weights) gives the same value on every call. This pass evaluates each maximal such
subgraph once with the interpreter and replaces it by a new WEIGHT defined in `ctx.weights`, so the run-time
program reads the result instead of recomputing it (and contains no transposes or slices of weights):

    linear(x, W)                              -> unchanged (a weight used directly is already a leaf)
    matmul(x, permute(slice(W, 1, 0, 24)))    -> matmul(x, W'),  W' = "W#slice(1,0,24)#permute(1,0)"
    mul(W, 2.0)  /  concat(W1, W2)            -> W'' = "W#fold-<12 hex digits of the subgraph's hash>"

Derived names are deterministic (the same program folds to the same names in every run and in both phases, so a
weight folded for prefill and decode is stored once). Folds stop below EXPAND (a broadcast weight would be stored
at its broadcast size) and below values that are not f32 (weights are f32-valued leaves). A scalar result becomes
a CONST.

A derived weight's storage format: a movement-only fold of an unblocked weight keeps its element type (moving
bf16 values keeps them bf16-exact); everything else (arithmetic, or moving a block-quantized weight, whose
blocks no longer line up) is stored as f32 until a quantization pass says otherwise.

Invariant: results are bit-identical: the folded value is what the interpreter computed from the same ops.
"""
from __future__ import annotations

import hashlib
from typing import Optional

from dzc.ir.dtypes import DType
from dzc.ir.interpreter import Interpreter
from dzc.ir.node import Node, WeightFormat, WeightRef
from dzc.ir.ops import Op
from dzc.ir.printer import format_program
from dzc.ir.program import Program
from dzc.passes.base import PassContext
from dzc.passes.graph import Uses, rebuild

_CHAIN_OPS = frozenset({Op.RESHAPE, Op.PERMUTE, Op.SLICE})


def _is_constant(node: Node, constant: dict[int, bool]) -> bool:
    if node.op in (Op.WEIGHT, Op.CONST):
        return True
    if node.op == Op.ARANGE:
        return isinstance(node.shape[0], int)
    if node.op == Op.INPUT or node.op == Op.EXPAND:
        return False
    return all(constant[id(s)] for s in node.src)


def foldable_roots(program: Program) -> list[Node]:
    """Roots of the maximal weight-only subgraphs: constant f32 nodes some run-time node reads.

    Walks users before producers: a constant node all of whose readers are computed at compile time is folded
    into them; one read at run time becomes a root if it is f32, and otherwise stays a run-time op whose own
    constant operands become roots.
    """
    uses = Uses(program)
    constant: dict[int, bool] = {}
    weighty: dict[int, bool] = {}   # reads a weight (constant-only arithmetic is left to simplify and to kernels)
    for n in uses.order:
        constant[id(n)] = _is_constant(n, constant)
        weighty[id(n)] = n.op == Op.WEIGHT or any(weighty[id(s)] for s in n.src)
    at_compile_time: dict[int, bool] = {}
    roots = []
    for n in reversed(uses.order):
        if not constant[id(n)] or not n.src or not weighty[id(n)]:
            continue
        read_at_run_time = id(n) in uses.outputs or any(not at_compile_time.get(id(u), False)
                                                         for u in uses.users[id(n)])
        if not read_at_run_time:
            at_compile_time[id(n)] = True
        elif n.dtype == DType.F32:
            at_compile_time[id(n)] = True
            roots.append(n)
    return roots[::-1]


def _chain(node: Node) -> Optional[tuple[Node, list[Node]]]:
    """(weight, ops from the weight up) when `node` is a chain of reshapes/permutes/slices of one weight."""
    ops = []
    while node.op in _CHAIN_OPS:
        ops.append(node)
        node = node.src[0]
    return (node, ops[::-1]) if node.op == Op.WEIGHT and ops else None


def derived_name(root: Node) -> tuple[str, WeightFormat]:
    """A deterministic name and storage format for the value of `root`."""
    chain = _chain(root)
    if chain is not None:
        weight, ops = chain
        parts = [weight.arg.name]
        for op in ops:
            if op.op == Op.SLICE:
                axis, start, stop = op.arg
                parts.append(f"slice({axis % op.ndim},{start},{stop})")
            else:
                parts.append(f"{op.op.name.lower()}({','.join(str(d) for d in op.arg)})")
        fmt = weight.arg.fmt
        keep = fmt.block is None and fmt.layout == "rowmajor"
        return "#".join(parts), (WeightFormat(fmt.dtype) if keep else WeightFormat(DType.F32))
    text = format_program(Program("fold", (), (("value", root),)))
    digest = hashlib.sha256(text.encode()).hexdigest()[:12]
    first = next((n.arg.name for n in Program("fold", (), (("value", root),)).toposort() if n.op == Op.WEIGHT),
                 "const")
    return f"{first}#fold-{digest}", WeightFormat(DType.F32)


def _leaf(root: Node, name: str, fmt: WeightFormat, ctx: PassContext) -> Node:
    """A scalar folds to a CONST (printed inline, free to broadcast); anything else to a WEIGHT."""
    if root.shape == ():
        return Node(Op.CONST, DType.F32, (), (), float(ctx.weights.f32(name).item()))
    return Node(Op.WEIGHT, DType.F32, root.shape, (), WeightRef(name, fmt))


class FoldWeights:
    name = "fold-weights"
    description = "evaluate weight-only subgraphs (transposes, splits, scalings) once; read the result as a weight"

    def run(self, program: Program, ctx: PassContext) -> Program:
        roots = foldable_roots(program)
        if not roots:
            ctx.facts[self.name] = {"summary": "nothing to fold", "folded": {}}
            return program
        named = [(root, *derived_name(root)) for root in roots]
        missing = [(root, name) for root, name, _ in named if name not in ctx.weights]
        if missing:
            values = Interpreter(ctx.weights).run(
                Program("fold", (), tuple((f"v{i}", root) for i, (root, _) in enumerate(missing))), {})
            for i, (_, name) in enumerate(missing):
                ctx.weights.define(name, values[f"v{i}"])
        replace = {id(root): _leaf(root, name, fmt, ctx) for root, name, fmt in named}
        out = rebuild(program, lambda node, src: replace.get(id(node)))
        ctx.facts[self.name] = {"summary": f"{len(roots)} weight subgraphs folded",
                                "folded": {name: format_program(Program("fold", (), (("value", root),)))
                                           for root, name, _ in named}}
        return out
