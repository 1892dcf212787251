"""`dzc ir MODEL`: show what the compiler does to a checkpoint's program, pass by pass.

    dzc ir MODEL [--phase decode|prefill] [--target T] [--quant Q]
           [--print-before PASS|all] [--print-after PASS|all] [--dump-dir DIR] [--verify-passes] [--dot FILE]
    dzc ir --list-passes [--target T] [--phase P] [--quant Q]

Without print flags it prints the final program. Every output is deterministic: the same checkpoint and flags
give the same bytes on every run (no timings, no addresses, no unordered iteration).
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Optional, TextIO

from dzc.errors import InputError, IRError
from dzc.ir.node import Node
from dzc.ir.ops import Op
from dzc.ir.printer import format_program, node_names
from dzc.ir.program import Program
from dzc.ir.shapes import format_shape
from dzc.model import deepseek_v3


def add_ir_parser(subparsers) -> argparse.ArgumentParser:
    p = subparsers.add_parser("ir", help="print a checkpoint's program before/after each compiler pass",
                              description=__doc__.split("\n\n")[0])
    p.add_argument("model", nargs="?", metavar="MODEL", help="checkpoint folder")
    p.add_argument("--target", default="interp", help="code generator the pipeline is for (interp, cpu, ...)")
    p.add_argument("--phase", default="decode", choices=deepseek_v3.PHASES,
                   help="entry point to compile (default decode)")
    p.add_argument("--quant", default=None, metavar="Q", help="weight format to quantize to (default: keep)")
    add_pass_print_args(p)
    p.add_argument("--verify-passes", action="store_true",
                   help="interpret the program before and after every pass on random inputs; print the table")
    p.add_argument("--dot", default=None, metavar="FILE", help="write the final program as a Graphviz graph")
    p.add_argument("--list-passes", action="store_true", help="list the pipeline's passes and exit")
    p.add_argument("--max-context", type=int, default=None, help="context the memory plan is sized for")
    p.add_argument("--max-tokens", type=int, default=None, help="prefill chunk the memory plan is sized for")
    p.set_defaults(func=run_ir)
    return p


def add_pass_print_args(p: argparse.ArgumentParser) -> None:
    """--print-before/--print-after/--dump-dir, shared by `dzc ir` and `dzc compile`."""
    p.add_argument("--print-before", action="append", default=[], metavar="PASS|all",
                   help="print the program before this pass (repeatable, or comma-separated)")
    p.add_argument("--print-after", action="append", default=[], metavar="PASS|all",
                   help="print the program after this pass (repeatable, or comma-separated)")
    p.add_argument("--dump-dir", default=None, metavar="DIR", help="write NN-<pass>.ir after every pass into DIR")


def pass_print_options(args: argparse.Namespace) -> tuple[frozenset[str], frozenset[str], Optional[Path]]:
    """The validated (print_before, print_after, dump_dir) of add_pass_print_args."""
    from dzc.passes.pipeline import all_passes
    known = {p.name for p in all_passes()}
    return (_selection(args.print_before, known, "--print-before"),
            _selection(args.print_after, known, "--print-after"),
            Path(args.dump_dir) if args.dump_dir else None)


def _selection(values: list[str], known: set[str], flag: str) -> frozenset[str]:
    names = {v.strip() for value in values for v in value.split(",") if v.strip()}
    unknown = sorted(names - known - {"all"})
    if unknown:
        raise InputError(f"{flag} {unknown[0]!r} is not a pass; choose 'all' or one of {', '.join(sorted(known))} "
                         f"(dzc ir --list-passes)")
    return frozenset(names)


def list_passes(target: str, phase: str, quant: Optional[str], out: TextIO) -> None:
    from dzc.passes.pipeline import build_pipeline

    passes = build_pipeline(target, phase, quant)
    width = max(len(p.name) for p in passes)
    out.write(f"passes for --target {target} --phase {phase}" + (f" --quant {quant}" if quant else "") + ":\n")
    for i, p in enumerate(passes, start=1):
        out.write(f"  {i:02d}  {p.name.ljust(width)}  {p.description}\n")


def run_ir(args: argparse.Namespace, out: Optional[TextIO] = None) -> int:
    from dzc.checkpoint.loader import Checkpoint
    from dzc.driver import checkpoint_weights
    from dzc.passes.base import PassContext
    from dzc.passes.manager import RunOptions, run_pipeline
    from dzc.passes.pipeline import build_pipeline

    out = out or sys.stdout
    if args.list_passes:
        list_passes(args.target, args.phase, args.quant, out)
        return 0
    if args.model is None:
        raise InputError("dzc ir needs a checkpoint folder (or --list-passes)")
    print_before, print_after, dump_dir = pass_print_options(args)
    passes = build_pipeline(args.target, args.phase, args.quant)

    checkpoint = Checkpoint.open(args.model)
    for warning in checkpoint.validate():
        print(f"dzc: warning: {warning}", file=sys.stderr)
    store, format_of = checkpoint_weights(checkpoint)
    program = deepseek_v3.trace(checkpoint.config, format_of, args.phase)
    facts = {}
    if args.max_context is not None:
        facts["max-context"] = args.max_context
    if args.max_tokens is not None:
        facts["max-tokens"] = args.max_tokens
    ctx = PassContext(store, checkpoint.config, target=args.target, quant=args.quant, facts=facts)
    options = RunOptions(print_before=print_before, print_after=print_after,
                         dump_dir=dump_dir,
                         verify_passes=args.verify_passes, stream=out)
    try:
        result = run_pipeline(program, passes, ctx, options)
    except IRError as exc:
        table = getattr(exc, "table", None)
        if table:
            out.write(table)
        raise
    if not print_before and not print_after:
        out.write(format_program(result.program))
    if args.verify_passes:
        out.write(result.table())
    if args.dot:
        Path(args.dot).write_bytes(to_dot(result.program).encode())
    return 0


# ---- Graphviz ---------------------------------------------------------------------------------------------------
def _label(node: Node, name: str) -> str:
    if node.op == Op.INPUT:
        return f"{name}\n{node.dtype}{format_shape(node.shape)}"
    head = f"{name} = {node.op.name.lower()}"
    weights = [s.arg.name for s in node.src if s.op == Op.WEIGHT]
    consts = [f"{s.arg!r}" for s in node.src if s.op == Op.CONST]
    lines = [head]
    if node.op == Op.KERNEL:
        body = Program("body", (), (("out", node.arg.out),)).toposort()
        lines.append("{" + ", ".join(n.op.name.lower() for n in body if n.op not in (Op.INPUT, Op.CONST)) + "}")
    if weights:
        lines.extend(weights[:2])
        if len(weights) > 2:
            lines.append(f"+{len(weights) - 2} weights")
    if consts:
        lines.append(", ".join(consts))
    lines.append(f"{node.dtype}{format_shape(node.shape)}")
    return "\n".join(lines)


def program_graph(program: Program):
    """A networkx DiGraph of `program`: one vertex per input and computed node (weights and constants are shown in
    their reader's label), edges from operand to reader, vertices in the printer's order and names."""
    import networkx as nx

    names = node_names(program)
    graph = nx.DiGraph(name=program.name)
    order = program.toposort()
    vertex = {}
    for node in order:
        if node.op in (Op.WEIGHT, Op.CONST):
            continue
        key = f"n{len(vertex)}"
        vertex[id(node)] = key
        shape = "ellipse" if node.op in (Op.INPUT, Op.ARANGE) else "box"
        graph.add_node(key, label=_label(node, names[id(node)]), shape=shape)
    for node in order:
        if id(node) not in vertex:
            continue
        for s in dict.fromkeys(node.src):
            if id(s) in vertex:
                graph.add_edge(vertex[id(s)], vertex[id(node)])
    for name, node in program.outputs:
        key = f"out_{len(graph)}"
        graph.add_node(key, label=name, shape="plaintext")
        if id(node) in vertex:
            graph.add_edge(vertex[id(node)], key)
    return graph


def _quote(text: str) -> str:
    return '"' + text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n") + '"'


def to_dot(program: Program) -> str:
    """DOT text of `program_graph` (written here: networkx's DOT writers need pydot or pygraphviz)."""
    graph = program_graph(program)
    lines = [f"digraph {_quote(program.name)} {{", '  node [fontname="monospace", fontsize=10];']
    for key, data in graph.nodes(data=True):
        lines.append(f"  {key} [label={_quote(data['label'])}, shape={data['shape']}];")
    for a, b in graph.edges():
        lines.append(f"  {a} -> {b};")
    lines.append("}")
    return "\n".join(lines) + "\n"
