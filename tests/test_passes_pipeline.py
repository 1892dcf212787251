"""The pass pipeline and its runner: interpreter-checked passes on random tiny models, failures named by pass,
deterministic dumps, the memory plan, and `dzc ir` output that is byte-identical across runs."""
from __future__ import annotations

import io
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from passes_util import tiny_model, write_checkpoint
from dzc.errors import InputError, IRError
from dzc.ir.infer import make
from dzc.ir.node import Node
from dzc.ir.ops import Op
from dzc.passes.graph import rebuild
from dzc.passes.manager import RunOptions, run_pipeline
from dzc.passes.memory_plan import ALIGN, MemoryPlan, check_plan, plan_memory
from dzc.passes.pipeline import NATIVE, PIPELINE, TARGETS, all_passes, build_pipeline
from dzc.passes.views import is_free_view, is_kernel

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def models():
    return {q_lora: tiny_model(q_lora=q_lora, layers=3, seed=int(q_lora)) for q_lora in (True, False)}


@pytest.mark.parametrize("q_lora", [True, False])
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_every_pass_keeps_interpreter_results(models, q_lora, phase):
    m = models[q_lora]
    passes = build_pipeline("cpu", phase)
    result = run_pipeline(m.programs[phase], passes, m.context("cpu"), RunOptions(verify_passes=True, past=5))
    assert [r.name for r in result.records] == ["input"] + [p.name for p in passes]
    last = result.records[-1]
    assert last.total_rel < 1e-5 and all(r.max_rel < 1e-5 for r in result.records)
    assert last.kernels < result.records[0].kernels / 2
    table = result.table()
    assert "fuse-attention" in table and "max rel err" in table.splitlines()[0]


class Broken:
    """Turns the first residual add into a subtraction: a plausible miscompile."""

    name = "break-residual"
    description = "a deliberately wrong pass"

    def run(self, program, ctx):
        done = []

        def visit(node, src):
            if node.op == Op.ADD and not done and node.ndim == 2 and node.src[1].op == Op.LINEAR:
                done.append(node)
                return make(Op.SUB, list(src))
            return None
        return rebuild(program, visit)


class Mistyped:
    name = "mistype"
    description = "builds a node whose type disagrees with its operands"

    def run(self, program, ctx):
        name, logits = program.outputs[0]
        bad = Node(Op.NEG, logits.dtype, logits.shape[:-1] + (7,), (logits,))
        return program.with_outputs(((name, bad),) + program.outputs[1:])


def test_a_wrong_pass_is_named(models):
    m = models[True]
    passes = build_pipeline("interp", "decode")[:3] + [Broken()] + build_pipeline("interp", "decode")[3:]
    with pytest.raises(IRError, match="pass 'break-residual' changed output '(logits|cache[.0-9a-z_]+)' of ") as info:
        run_pipeline(m.programs["decode"], passes, m.context(), RunOptions(verify_passes=True))
    assert "\n" not in str(info.value)                            # one line, as the CLI prints it
    assert "break-residual" in info.value.table and "cse" in info.value.table
    with pytest.raises(IRError, match="after pass 'mistype'"):
        run_pipeline(m.programs["decode"], [Mistyped()], m.context())


class Rounding(Broken):
    """Changes values on purpose, like quantization, and says so."""

    name = "round-on-purpose"
    lossy = True


def test_lossy_passes_are_reported_not_judged(models):
    m = models[True]
    passes = [Rounding()] + build_pipeline("interp", "decode")
    result = run_pipeline(m.programs["decode"], passes, m.context(), RunOptions(verify_passes=True))
    lossy = result.records[1]
    assert lossy.max_rel > 1e-2 and "lossy: not checked" in lossy.note
    assert all(r.max_rel < 1e-5 for r in result.records[2:])   # later passes judged against the lossy result


def test_dumps_and_prints_are_deterministic(models, tmp_path):
    m = models[False]
    texts = []
    for run in range(2):
        out = io.StringIO()
        dump = tmp_path / f"dump{run}"
        run_pipeline(m.programs["prefill"], build_pipeline("cpu", "prefill"), m.context("cpu"),
                     RunOptions(print_after=frozenset({"fuse-rope"}), print_before=frozenset({"simplify"}),
                                dump_dir=dump, stream=out))
        texts.append((out.getvalue(), {p.name: p.read_bytes() for p in sorted(dump.iterdir())}))
    assert texts[0] == texts[1]
    printed, files = texts[0]
    passes = build_pipeline("cpu", "prefill")
    assert list(files) == ["00-input.ir"] + [f"{i:02d}-{p.name}.ir" for i, p in enumerate(passes, start=1)]
    assert files["04-fuse-rope.ir"].startswith(b"// after pass 04 fuse-rope (prefill)\nprogram prefill(")
    assert printed.count("// before pass 01 simplify") == 1 and printed.count("// after pass 04 fuse-rope") == 1
    assert printed.count("(prefill)\nprogram prefill(") == printed.count("program prefill(") == 2   # each headed
    every = io.StringIO()
    run_pipeline(m.programs["decode"], build_pipeline("interp", "decode"), m.context(),
                 RunOptions(print_after=frozenset({"all"}), stream=every))
    assert every.getvalue().count("// after pass") == len(build_pipeline("interp", "decode"))


def test_pipeline_selection():
    names = [p.name for p in all_passes()]
    assert len(names) == len(set(names))
    assert all(n == n.lower() and " " not in n and p.description and "\n" not in p.description
               for n, p in zip(names, all_passes()))
    for target in TARGETS:
        for phase in ("prefill", "decode"):
            chosen = [p.name for p in build_pipeline(target, phase)]
            assert ("memory-plan" in chosen) == (target in NATIVE)
            if "memory-plan" in chosen:
                assert chosen[-1] == "memory-plan"
            assert chosen.index("fuse-softmax") < chosen.index("fuse-attention") < chosen.index("fuse-elementwise")
    assert isinstance(PIPELINE, list)
    with pytest.raises(InputError, match="unknown target 'tpu'"):
        build_pipeline("tpu", "decode")
    with pytest.raises(InputError, match="unknown phase"):
        build_pipeline("cpu", "train")


# ---- memory plan ------------------------------------------------------------------------------------------------
def _final(m, phase):
    passes = [p for p in build_pipeline("cpu", phase) if p.name != "memory-plan"]
    return run_pipeline(m.programs[phase], passes, m.context("cpu")).program


def test_memory_plan(models):
    m = models[True]
    decode = _final(m, "decode")
    plan = plan_memory(decode, max_tokens=64, max_context=128)
    check_plan(plan)
    assert isinstance(plan, MemoryPlan) and plan.arena_bytes <= plan.total_bytes
    assert all(off % ALIGN == 0 and size % ALIGN == 0 for off, size in plan.slots.values())
    assert set(plan.slots) == {n for n in decode.toposort() if is_kernel(n)}
    logits = decode.output("logits")
    assert plan[logits][1] == -(-m.config.vocab_size * 4 // ALIGN) * ALIGN     # exact: [1, vocab] f32
    latent = next(n for n in plan if n.op == Op.CONCAT and n.shape[1] == m.config.kv_lora_rank)
    assert plan[latent][1] == 128 * m.config.kv_lora_rank * 4                     # P+1 rows at P = max_context-1
    assert plan.bounds == [{"P": 127, "T": 1}]
    views = [n for n in decode.toposort() if is_free_view(n) and n.src[0] in plan.slots]
    assert views and all(plan[v] == plan[v.src[0]] for v in views)              # a view reads its base's slot
    assert plan.live[logits][1] == len(decode.toposort())                       # outputs live to the end
    assert plan.arena_bytes < 0.6 * plan.total_bytes

    prefill = _final(m, "prefill")
    small, large = (plan_memory(prefill, max_tokens=t, max_context=256) for t in (16, 64))
    check_plan(small)
    check_plan(large)
    assert small.arena_bytes < large.arena_bytes
    assert large.bounds == [{"T": 64, "P": 192}, {"T": 1, "P": 255}]


def test_memory_plan_pass_records_the_plan(models):
    m = models[False]
    ctx = m.context("cpu", **{"max-context": 64, "max-tokens": 8})
    result = run_pipeline(m.programs["decode"], build_pipeline("cpu", "decode"), ctx)
    plan = ctx.facts["memory-plan"]
    assert plan.program == "decode" and ctx.facts["memory-plans"]["decode"] is plan
    assert result.records[-1].name == "memory-plan" and result.records[-2].kernels == result.records[-1].kernels
    assert plan.bounds == [{"P": 63, "T": 1}]
    assert "arena" in ctx.facts["memory-plan"].summary()


# ---- dzc ir -----------------------------------------------------------------------------------------------------
CLI = textwrap.dedent("""
    import argparse, sys
    from dzc.cli_ir import add_ir_parser
    from dzc.errors import DzcError
    parser = argparse.ArgumentParser(prog="dzc")
    add_ir_parser(parser.add_subparsers(dest="command"))
    args = parser.parse_args(sys.argv[1:])
    try:
        sys.exit(args.func(args))
    except DzcError as exc:
        print(f"dzc: error: {exc}", file=sys.stderr)
        sys.exit(1)
""")


def dzc_ir(*argv: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", CLI, "ir", *argv], capture_output=True, cwd=ROOT)


def test_dzc_ir_is_byte_identical_across_runs(models, tmp_path):
    ckpt = write_checkpoint(tmp_path / "ckpt", models[True])
    args = [str(ckpt), "--phase", "prefill", "--target", "cpu", "--verify-passes", "--print-after", "fuse-attention"]
    first = dzc_ir(*args, "--dot", str(tmp_path / "a.dot"), "--dump-dir", str(tmp_path / "a"))
    second = dzc_ir(*args, "--dot", str(tmp_path / "b.dot"), "--dump-dir", str(tmp_path / "b"))
    assert first.returncode == 0, first.stderr.decode()
    assert first.stdout == second.stdout and first.stdout
    assert (tmp_path / "a.dot").read_bytes() == (tmp_path / "b.dot").read_bytes()
    assert [p.read_bytes() for p in sorted((tmp_path / "a").iterdir())] == \
           [p.read_bytes() for p in sorted((tmp_path / "b").iterdir())]
    text = first.stdout.decode()
    assert text.startswith("// after pass 06 fuse-attention (prefill)\nprogram prefill(")
    assert "attention" in text and "memory-plan" in text.splitlines()[-2]
    dot = (tmp_path / "a.dot").read_text()
    assert dot.startswith('digraph "prefill" {') and "rmsnorm" in dot and " -> " in dot

    plain = dzc_ir(str(ckpt))
    assert plain.returncode == 0 and plain.stdout.decode().startswith("program decode(")
    listing = dzc_ir("--list-passes", "--target", "cpu")
    assert listing.returncode == 0 and b"fuse-elementwise" in listing.stdout and b"memory-plan" in listing.stdout
    bad = dzc_ir(str(ckpt), "--print-after", "fuse-everything")
    assert bad.returncode == 1 and bad.stderr.decode().startswith("dzc: error: --print-after 'fuse-everything'")
    assert bad.stderr.count(b"\n") == 1
