"""Run a pipeline of passes over one program, checking after every pass.

After each pass the IR verifier (ir/verifier.py) runs, naming the pass when it fails, and so does a check of
KERNEL bodies (which the verifier does not look into). On request the runner also

  * prints the program before/after chosen passes (`print_before` / `print_after`: pass names or {"all"}),
  * writes one numbered file per pass into `dump_dir` (00-input.ir, 01-simplify.ir, ...), each headed by the
    pass name, so two compilations can be diffed pass by pass,
  * runs the numpy interpreter before the first pass and after every pass on the same random inputs (tokens,
    positions, and P > 0 random cache rows so the caches matter) and the same weights, and fails naming the
    first pass that changes any output beyond tolerance (`verify_passes`).

Tolerance. Passes may legitimately change float32 rounding (a fused norm divides where the trace multiplied
by 1/d; a native kernel sums in another order), never the math. Rounding changes are a few ulps per op
(float32 eps = 1.2e-7) and grow roughly linearly through a few hundred ops, so the error a pass may introduce
is ~1e-6 of the output's scale; a real miscompile (a wrong axis, a dropped mask, a swapped operand) moves
outputs by O(1) of their scale. Errors are therefore judged relative to each output's largest magnitude
(elementwise relative error is meaningless near zero logits): a pass fails when, for some output,
max|after - before| > RTOL * max|before| + ATOL with RTOL = 1e-4 and ATOL = 1e-6 (the floor for outputs that
are ~0). The same bound is applied to the accumulated change against the traced program. Non-finite values
must match exactly (same positions, same values). A pass that changes values on purpose (quantization) declares
`lossy`: its change is reported, not judged, and later passes are judged against its result.
"""
from __future__ import annotations

import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterable, Mapping, Optional, Sequence, TextIO

import numpy as np

from dzc.errors import IRError
from dzc.ir.infer import infer
from dzc.ir.interpreter import Interpreter
from dzc.ir.ops import ELEMENTWISE, LEAVES, Op
from dzc.ir.printer import format_program
from dzc.ir.node import Node
from dzc.ir.program import Program
from dzc.ir.shapes import Sym
from dzc.ir.verifier import verify
from dzc.passes.base import Pass, PassContext
from dzc.passes.views import is_kernel

RTOL = 1e-4
ATOL = 1e-6


@dataclass
class RunOptions:
    print_before: frozenset[str] = frozenset()   # pass names, or {"all"}
    print_after: frozenset[str] = frozenset()
    dump_dir: Optional[Path] = None
    verify_passes: bool = False
    stream: TextIO = field(default_factory=lambda: sys.stdout)
    seed: int = 0
    tokens: int = 3   # T for programs with a symbolic token count (prefill)
    past: int = 5     # P: rows already in every cache


@dataclass
class PassRecord:
    """One row of the pass table."""

    name: str
    ops: int
    kernels: int
    max_abs: Optional[float] = None   # change against the previous program (None: not checked)
    max_rel: Optional[float] = None
    total_abs: Optional[float] = None  # change against the input program
    total_rel: Optional[float] = None
    seconds: float = 0.0
    note: str = ""


@dataclass
class PipelineResult:
    program: Program
    records: list[PassRecord]

    def table(self) -> str:
        return format_table(self.records)


# ---- checks -----------------------------------------------------------------------------------------------------
def verify_bodies(program: Program, after: str = "", order: Optional[list] = None) -> None:
    """Every KERNEL body: elementwise ops over INPUTs in0..k-1 typed like the operands, and CONSTs; types re-inferred."""
    where = f" after pass '{after}'" if after else ""
    for node in order if order is not None else program.toposort():
        if node.op != Op.KERNEL:
            continue
        body = Program("body", (), (("out", node.arg.out),))
        for n in body.toposort():
            if n.op == Op.INPUT:
                index = int(n.arg[2:]) if n.arg.startswith("in") and n.arg[2:].isdigit() else -1
                if not 0 <= index < len(node.src) or (node.src[index].dtype, node.src[index].shape) != (n.dtype, n.shape):
                    raise IRError(f"program {program.name}{where}: kernel body input '{n.arg}' does not match an "
                                  f"operand of its kernel ({len(node.src)} operands)")
            elif n.op == Op.CONST:
                continue
            elif n.op not in ELEMENTWISE:
                raise IRError(f"program {program.name}{where}: kernel body holds a {n.op.name.lower()} op; "
                              f"bodies are elementwise only")
            elif infer(n.op, n.src, n.arg) != (n.dtype, tuple(n.shape)):
                raise IRError(f"program {program.name}{where}: kernel body {n.op.name.lower()} is mistyped")


def random_inputs(program: Program, vocab_size: Optional[int], seed: int = 0, tokens: int = 3,
                  past: int = 5) -> dict[str, np.ndarray]:
    """Inputs for a test call: `tokens` new tokens at positions past.., `past` random rows in every cache."""
    rng = np.random.default_rng(seed)
    env = {"T": tokens, "P": past}
    out: dict[str, np.ndarray] = {}
    for node in program.inputs:
        shape = tuple(d.evaluate(env) if isinstance(d, Sym) else d for d in node.shape)
        if node.arg == "positions":
            out[node.arg] = (past + np.arange(shape[0])).astype(np.int32)
        elif node.arg == "tokens":
            out[node.arg] = rng.integers(0, vocab_size or _vocab(program, node), size=shape).astype(np.int32)
        elif node.dtype.is_float:
            out[node.arg] = rng.standard_normal(shape).astype(np.float32)
        else:
            out[node.arg] = np.zeros(shape, dtype=node.dtype.numpy)
    return out


def _vocab(program: Program, tokens: Node) -> int:
    """Rows of the table the token ids index (the embedding), when the config does not say."""
    rows = [n.src[0].shape[0] for n in program.toposort() if n.op == Op.GATHER and n.src[1] is tokens]
    return min((r for r in rows if isinstance(r, int)), default=1)


@dataclass
class Change:
    """How far one set of outputs moved from another: maxima over all outputs, and the worst output by tolerance."""

    max_abs: float
    max_rel: float
    output: str   # the output closest to (or furthest past) its tolerance
    ok: bool


def compare(before: Mapping[str, np.ndarray], after: Mapping[str, np.ndarray]) -> Change:
    max_abs = max_rel = 0.0
    worst, worst_ratio, ok = "", -1.0, True
    for name, ref in before.items():
        got = after.get(name)
        if got is None or np.shape(got) != np.shape(ref):
            return Change(float("inf"), float("inf"), name, False)
        ref64, got64 = np.asarray(ref, np.float64), np.asarray(got, np.float64)
        finite = np.isfinite(ref64)
        if not np.array_equal(finite, np.isfinite(got64)) or not np.array_equal(ref64[~finite], got64[~finite]):
            return Change(float("inf"), float("inf"), name, False)
        if not finite.any():
            continue
        err = float(np.max(np.abs(got64[finite] - ref64[finite])))
        scale = float(np.max(np.abs(ref64[finite])))
        rel = err / scale if scale > 0 else (0.0 if err == 0 else float("inf"))
        ratio = err / (RTOL * scale + ATOL)
        max_abs, max_rel = max(max_abs, err), max(max_rel, rel)
        ok = ok and ratio <= 1.0
        if ratio > worst_ratio:
            worst, worst_ratio = name, ratio
    return Change(max_abs, max_rel, worst, ok)


# ---- the runner -------------------------------------------------------------------------------------------------
def _wants(selection: Iterable[str], name: str) -> bool:
    selection = set(selection)
    return "all" in selection or name in selection


def _header(kind: str, index: int, name: str, program: Program) -> str:
    return f"// {kind} pass {index:02d} {name} ({program.name})\n"


def run_pipeline(program: Program, passes: Sequence[Pass], ctx: PassContext,
                 options: Optional[RunOptions] = None) -> PipelineResult:
    opts = options or RunOptions()
    verify(program)
    records = [PassRecord("input", *_check_and_count(program, ""))]
    interpreter = inputs = reference = previous = baseline = None
    if opts.verify_passes:
        interpreter = Interpreter(ctx.weights)
        vocab = getattr(ctx.config, "vocab_size", None)
        inputs = random_inputs(program, vocab, opts.seed, opts.tokens, opts.past)
        reference = previous = baseline = interpreter.run(program, inputs)
        records[0].max_abs = records[0].max_rel = records[0].total_abs = records[0].total_rel = 0.0
    dump = Path(opts.dump_dir) if opts.dump_dir is not None else None
    if dump is not None:
        dump.mkdir(parents=True, exist_ok=True)
        _write(dump / "00-input.ir", f"// input ({program.name})\n" + format_program(program))

    for index, p in enumerate(passes, start=1):
        if _wants(opts.print_before, p.name):
            opts.stream.write(_header("before", index, p.name, program) + format_program(program))
        start = time.perf_counter()
        before = program
        try:
            program = p.run(program, ctx)
        except IRError:
            raise
        except Exception as exc:   # a bug in a pass: keep the traceback, say which pass
            exc.add_note(f"in pass '{p.name}' ({index} of {len(passes)}) on program {program.name}")
            raise
        seconds = time.perf_counter() - start
        if program == before:   # the same outputs, node for node: nothing to re-check or re-count
            ops, kernels = records[-1].ops, records[-1].kernels
        else:
            verify(program, after=p.name)
            ops, kernels = _check_and_count(program, p.name)
        record = PassRecord(p.name, ops, kernels, seconds=seconds, note=_note(ctx.facts.get(p.name)))
        if interpreter is not None:
            result = previous if program == before else interpreter.run(program, inputs)
            step, total = compare(previous, result), compare(reference, result)
            record.max_abs, record.max_rel = step.max_abs, step.max_rel
            record.total_abs, record.total_rel = total.max_abs, total.max_rel
            records.append(record)
            if is_lossy(p, ctx):   # changes values on purpose: judge later passes against its result
                record.note = (record.note + "; " if record.note else "") + "lossy: not checked, new baseline"
                baseline = result
            elif not step.ok:
                raise _numeric_error(f"pass '{p.name}' changed output '{step.output}' of program {program.name} by "
                                     f"{step.max_abs:.3g} ({step.max_rel:.3g} of its scale)", records)
            drift = total if baseline is reference else compare(baseline, result)
            if not drift.ok:
                raise _numeric_error(f"after pass '{p.name}' output '{drift.output}' of program {program.name} is "
                                     f"{drift.max_abs:.3g} ({drift.max_rel:.3g} of its scale) from the input "
                                     f"program's", records)
            previous = result
        else:
            records.append(record)
        if _wants(opts.print_after, p.name):
            opts.stream.write(_header("after", index, p.name, program) + format_program(program))
        if dump is not None:
            _write(dump / f"{index:02d}-{p.name}.ir", _header("after", index, p.name, program) + format_program(program))
    return PipelineResult(program, records)


def is_lossy(p: Pass, ctx: PassContext) -> bool:
    """A pass that changes values on purpose (quantization) says so with `lossy = True` or `lossy(ctx) -> bool`;
    --verify-passes then reports its change without judging it, and judges later passes against its result."""
    lossy = getattr(p, "lossy", False)
    return bool(lossy(ctx) if callable(lossy) else lossy)


def _note(fact: object) -> str:
    """A pass's one-line summary: facts[name]["summary"], or facts[name].summary() for a fact object."""
    if isinstance(fact, dict):
        return str(fact.get("summary", ""))
    summary = getattr(fact, "summary", None)
    return str(summary() if callable(summary) else summary or "")


def _check_and_count(program: Program, after: str) -> tuple[int, int]:
    """Check KERNEL bodies; (op count, kernel count) from one walk of the graph."""
    order = program.toposort()
    verify_bodies(program, after, order)
    return (sum(1 for n in order if n.op not in LEAVES), sum(1 for n in order if is_kernel(n)))


def _numeric_error(what: str, records: list[PassRecord]) -> IRError:
    """A one-line error (the CLI's contract); the table so far rides along as `.table` for callers to print."""
    err = IRError(f"{what}, beyond the tolerance of {RTOL:g} relative + {ATOL:g} absolute; this is a dzc bug")
    err.table = format_table(records)   # type: ignore[attr-defined]
    return err


def _write(path: Path, text: str) -> None:
    path.write_bytes(text.encode())


def format_table(records: Sequence[PassRecord]) -> str:
    def num(x: Optional[float]) -> str:
        return "-" if x is None else f"{x:.2e}"

    rows = [("#", "pass", "ops", "kernels", "max abs err", "max rel err", "note")]
    for i, r in enumerate(records):
        rows.append((f"{i:02d}", r.name, str(r.ops), str(r.kernels), num(r.max_abs), num(r.max_rel), r.note))
    widths = [max(len(row[c]) for row in rows) for c in range(len(rows[0]) - 1)]
    lines = ["  ".join(cell.ljust(w) if c < 2 else cell.rjust(w) for c, (cell, w) in enumerate(zip(row, widths)))
             + ("  " + row[-1] if row[-1] else "") for row in rows]
    last = records[-1] if records else None
    if last is not None and last.total_abs is not None:
        lines.append(f"total change vs input: max abs {num(last.total_abs)}, max rel {num(last.total_rel)} "
                     f"(tolerance {RTOL:g} rel + {ATOL:g} abs per pass and in total)")
    return "\n".join(line.rstrip() for line in lines) + "\n"
