"""Text form of a program: one op per line, SSA names, dtypes and shapes, weights by name (never values).

The output is a user interface and a diff target: the same program prints the same bytes on every run.
Names are assigned in topological order; constants are printed inline as `value:dtype`. A KERNEL's elementwise
body follows its line, indented, with its operands as %in0.. and its values as %<kernel>.0.., ending in
`return`.
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
    Op.ATTENTION: "scale", Op.MLA_ATTENTION: "scale",
}
for _name in ("MOE_SORT", "MOE_OFFSETS", "GROUPED_SWIGLU"):   # ops added by passes/lower_moe.py
    if hasattr(Op, _name):
        _ARG_NAMES[Op[_name]] = "experts"


def _type(node: Node) -> str:
    return f"{node.dtype}{format_shape(node.shape)}"


def _value(v: Any) -> str:
    if isinstance(v, float):
        return repr(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x) for x in v) + "]"
    return str(v)


def _format_arg(node: Node) -> str:
    if node.arg is None or node.op == Op.KERNEL:   # a kernel's body is printed below it
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


def node_names(program: Program) -> dict[int, str]:
    """id(node) -> the SSA name `format_program` prints for it (constants excluded: they print inline)."""
    namer = _Namer(program)
    for node in program.toposort():
        if node.op not in (Op.INPUT, Op.CONST):
            namer.define(node)
    return namer.names


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
        lines.append(f"  {name} = {node.op.name.lower()}{sep}{operands}{_format_arg(node)} : {_type(node)}"
                     + (" {" if node.op == Op.KERNEL else ""))
        if node.op == Op.KERNEL:
            lines.extend(_format_body(node, name))
    outs = ", ".join(f"{key}={namer.use(node)}" for key, node in program.outputs)
    lines.append(f"  return {outs}")
    lines.append("}")
    return "\n".join(lines) + "\n"


def _format_body(kernel: Node, name: str) -> list[str]:
    """A KERNEL's elementwise body, one op per line: inputs are %in0.., values %<kernel>.0.., then its result."""
    body = Program("body", (), (("out", kernel.arg.out),))
    names: dict[int, str] = {}
    lines = []
    for node in body.toposort():
        if node.op == Op.INPUT:
            names[id(node)] = "%" + node.arg
        elif node.op != Op.CONST:
            names[id(node)] = f"{name}.{len(lines)}"
            operands = ", ".join(f"{_value(s.arg)}:{s.dtype}" if s.op == Op.CONST else names[id(s)] for s in node.src)
            lines.append(f"    {names[id(node)]} = {node.op.name.lower()} {operands}{_format_arg(node)} : {_type(node)}")
    out = kernel.arg.out
    result = f"{_value(out.arg)}:{out.dtype}" if out.op == Op.CONST else names[id(out)]
    return lines + [f"    return {result}", "  }"]


def op_count(program: Program) -> int:
    """Ops that do work at run time (leaves excluded)."""
    return sum(1 for n in program.toposort() if n.op not in (Op.INPUT, Op.CONST, Op.WEIGHT, Op.ARANGE))

