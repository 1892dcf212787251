"""Text form of a program: one op per line, SSA names, dtypes and shapes, weights by name (never values).

The output is a user interface and a diff target: the same program prints the same bytes on every run.
Names are assigned in topological order; constants are printed inline as `value:dtype`.
"""
from __future__ import annotations

from typing import Any

from dzc.ir.node import Node
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.ir.shapes import format_shape

# How each op's static argument is spelled; ops not listed print `{arg=...}` when they have one.
_ARG_NAMES: dict[Op, str] = {
    Op.SUM: "axis", Op.RMAX: "axis", Op.SOFTMAX: "axis", Op.CONCAT: "axis", Op.RESHAPE: "shape",
    Op.EXPAND: "shape", Op.PERMUTE: "order", Op.TOPK: "k", Op.CAST: "to", Op.RMSNORM: "eps", Op.MOE: "experts",
}


def _type(node: Node) -> str:
    return f"{node.dtype}{format_shape(node.shape)}"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def _format_arg(node: Node) -> str:
    if node.arg is None:
        return ""
    if node.op == Op.SLICE:
        axis, start, stop = node.arg
        return f" {{axis={axis}, start={start}, stop={stop}}}"
    return f" {{{_ARG_NAMES.get(node.op, 'arg')}={_value(node.arg)}}}"


class _Namer:
    def __init__(self, program: Program) -> None:
        self.names: dict[int, str] = {id(n): "%" + n.arg for n in program.inputs}
        self.counts = {"w": 0, "": 0}

    def define(self, node: Node) -> str:
        prefix = "w" if node.op == Op.WEIGHT else ""
        name = f"%{prefix}{self.counts[prefix]}"
        self.counts[prefix] += 1
        self.names[id(node)] = name
        return name

    def use(self, node: Node) -> str:
        if node.op == Op.CONST:
            return f"{_value(node.arg)}:{node.dtype}"
        return self.names[id(node)]


def format_program(program: Program) -> str:
    namer = _Namer(program)
    params = ", ".join(f"{n.arg}: {_type(n)}" for n in program.inputs)
    lines = [f"program {program.name}({params}) {{"]
    for node in program.toposort():
        if node.op in (Op.INPUT, Op.CONST):
            continue
        name = namer.define(node)
        if node.op == Op.WEIGHT:
            lines.append(f"  {name} = weight \"{node.arg.name}\" : {node.arg.fmt}{format_shape(node.shape)}")
            continue
        operands = ", ".join(namer.use(s) for s in node.src)
        sep = " " if operands else ""
        lines.append(f"  {name} = {node.op.name.lower()}{sep}{operands}{_format_arg(node)} : {_type(node)}")
    outs = ", ".join(f"{key}={namer.use(node)}" for key, node in program.outputs)
    lines.append(f"  return {outs}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def op_count(program: Program) -> int:
    """Ops that do work at run time (leaves excluded)."""
    return sum(1 for n in program.toposort() if n.op not in (Op.INPUT, Op.CONST, Op.WEIGHT, Op.ARANGE))

