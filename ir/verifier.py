"""The IR verifier: runs between passes and rejects malformed programs before they reach an executor.

Checks: every node's type equals what its op's type rule infers from its operands; leaves carry the right
kind of argument; every INPUT reached is a declared input; declared inputs are unique; output names are unique.
(SSA and acyclicity hold by construction: nodes are immutable and built from existing operands.)
"""
from __future__ import annotations

from dzc.errors import IRError
from dzc.ir.infer import infer, leaf_type_ok
from dzc.ir.ops import LEAVES, Op
from dzc.ir.program import Program
from dzc.ir.shapes import format_shape


def verify(program: Program, after: str = "") -> None:
    where = f" after pass '{after}'" if after else ""
    declared = {id(n) for n in program.inputs}
    if len(declared) != len(program.inputs) or len({n.arg for n in program.inputs}) != len(program.inputs):
        raise IRError(f"program {program.name}{where}: duplicate inputs")
    names = [k for k, _ in program.outputs]
    if len(set(names)) != len(names):
        raise IRError(f"program {program.name}{where}: duplicate output names")
    for node in program.toposort():
        if node.op in LEAVES:
            if not leaf_type_ok(node):
                raise IRError(f"program {program.name}{where}: malformed {node.op.name.lower()} leaf {node.arg!r}")
            if node.op == Op.INPUT and id(node) not in declared:
                raise IRError(f"program {program.name}{where}: input '{node.arg}' is used but not declared")
            continue
        dtype, shape = infer(node.op, node.src, node.arg)
        if dtype != node.dtype or tuple(shape) != node.shape:
            raise IRError(
                f"program {program.name}{where}: {node.op.name.lower()} is typed {node.dtype}{format_shape(node.shape)}"
                f" but its operands give {dtype}{format_shape(shape)}")
