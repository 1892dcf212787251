"""lower-moe: MOE (prefill) -> MOE_SORT / MOE_OFFSETS / GROUPED_SWIGLU / SCATTER_ADD; decode keeps MOE.
The new ops' type rules and numpy semantics, and interpreter equivalence on tiny models."""
from __future__ import annotations

import numpy as np
import pytest

import pass_models as pm
from dzc.errors import IRError
from dzc.ir.dtypes import DType
from dzc.ir.infer import make
from dzc.ir.interpreter import Interpreter
from dzc.ir.node import Node, WeightFormat, WeightRef
from dzc.ir.ops import Op
from dzc.ir.printer import format_program
from dzc.ir.program import Program
from dzc.ir.shapes import T, Sym
from dzc.ir.verifier import verify
from dzc.ir.weights import WeightStore
from dzc.passes.absorb_mla import AbsorbMLA
from dzc.passes.lower_moe import LowerMoE

GROUPED = (Op.MOE_SORT, Op.MOE_OFFSETS, Op.GROUPED_SWIGLU, Op.SCATTER_ADD)


def count(program: Program, op: Op) -> int:
    return sum(1 for _ in program.nodes(op))


@pytest.mark.parametrize("q_lora", [True, False])
def test_prefill_pattern_in_and_out(q_lora):
    tm = pm.tiny(q_lora)
    before = tm.programs["prefill"]
    moe_layers = sum(tm.config.is_moe_layer(i) for i in range(tm.config.num_hidden_layers))
    assert count(before, Op.MOE) == moe_layers and all(count(before, op) == 0 for op in GROUPED)
    ctx = tm.ctx()
    after = LowerMoE().run(before, ctx)
    verify(after)
    assert count(after, Op.MOE) == 0
    assert all(count(after, op) == moe_layers for op in GROUPED)
    assert ctx.facts["lower-moe"]["prefill"]["lowered"] == moe_layers
    sort = next(after.nodes(Op.MOE_SORT))
    assert sort.shape == (Sym.make({"T": 3}, 0),) and sort.arg == 8       # T*k slots, E = 8
    text = format_program(after)
    assert "grouped_swiglu" in text and "scatter_add" in text and "moe_sort" in text


def test_decode_keeps_moe():
    tm = pm.tiny()
    ctx = tm.ctx()
    before = tm.programs["decode"]
    after = LowerMoE().run(before, ctx)
    assert after.outputs == before.outputs
    fact = ctx.facts["lower-moe"]["decode"]
    assert fact["kept"] == 2 and fact["lowered"] == 0 and "GEMV" in fact["form"]


@pytest.mark.parametrize("q_lora", [True, False])
@pytest.mark.parametrize("tokens,past", [(6, 5), (1, 3), (9, 0)])
def test_interpreter_equivalence(q_lora, tokens, past):
    tm = pm.tiny(q_lora, seed=5)
    before = tm.programs["prefill"]
    ctx = tm.ctx()
    after = LowerMoE().run(before, ctx)
    both = LowerMoE().run(AbsorbMLA(prefill="absorbed").run(before, ctx), ctx)
    feed = pm.inputs(tm.config, tokens, past)
    ref = pm.run(before, tm.weights, feed)
    for program in (after, both):
        out = pm.run(program, tm.weights, feed)
        for k in ref:
            np.testing.assert_allclose(out[k], ref[k], rtol=1e-5, atol=1e-5 * float(np.abs(ref[k]).max()))


def test_unused_experts_do_no_work():
    """NaN weights in an expert no token picks must not reach the output: only routed experts are computed."""
    tm = pm.tiny()
    program = LowerMoE().run(tm.programs["prefill"], tm.ctx())
    feed = pm.inputs(tm.config, 4, 2)
    grouped = next(program.nodes(Op.GROUPED_SWIGLU))
    idx_node = grouped.src[2].src[0]                                   # offsets = MOE_OFFSETS(idx) of this layer
    probe = Program("probe", program.inputs, (("idx", idx_node),))
    used = set(pm.run(probe, tm.weights, feed)["idx"].ravel().tolist())
    unused = sorted(set(range(8)) - used)
    assert unused, "the test needs an expert no token picked"
    layer_prefix = grouped.src[3].arg.name.rsplit(".experts.", 1)[0]
    poisoned = {f"{layer_prefix}.experts.{e}.{p}_proj.weight" for e in unused for p in ("gate", "up", "down")}
    values = {name: (np.full_like(tm.weights.f32(name), np.nan) if name in poisoned else tm.weights.f32(name))
              for name in {ref.name for ref in program.weights()}}
    out = Interpreter(WeightStore(values.__getitem__)).run(program, feed)
    assert np.isfinite(out["logits"]).all()


# ---- the ops themselves ----------------------------------------------------------------------------------------
def _inp(name, dtype, shape):
    return Node(Op.INPUT, dtype, shape, (), name)


def _w(name, shape):
    return Node(Op.WEIGHT, DType.F32, shape, (), WeightRef(name, WeightFormat(DType.F32)))


def test_sort_and_offsets_semantics():
    idx = _inp("idx", DType.I32, (T, 2))
    prog = Program("p", (idx,), (("slots", make(Op.MOE_SORT, [idx], 4)), ("offsets", make(Op.MOE_OFFSETS, [idx], 4))))
    verify(prog)
    out = Interpreter(WeightStore(lambda n: None)).run(prog, {"idx": np.array([[2, 0], [0, 3], [2, 1]], np.int32)})
    # slots: flat n*k+j ordered by expert, ties by slot: expert0 {1, 2}, expert1 {5}, expert2 {0, 4}, expert3 {3}
    assert out["slots"].tolist() == [1, 2, 5, 0, 4, 3] and out["slots"].dtype == np.int32
    assert out["offsets"].tolist() == [0, 2, 3, 5, 6] and out["offsets"].dtype == np.int32


def test_grouped_swiglu_and_scatter_add_semantics():
    rng = np.random.default_rng(0)
    h, inter, e = 6, 5, 3
    xs, ws, offs = _inp("xs", DType.F32, (T, h)), _inp("ws", DType.F32, (T,)), _inp("offsets", DType.I32, (e + 1,))
    shape_of = {"gate": (inter, h), "up": (inter, h), "down": (h, inter)}
    experts = [_w(f"e{i}.{p}", shape_of[p]) for i in range(e) for p in ("gate", "up", "down")]
    ys = make(Op.GROUPED_SWIGLU, [xs, ws, offs, *experts], e)
    base, index = _inp("base", DType.F32, (Sym.named("N"), h)), _inp("index", DType.I32, (T,))
    out_node = make(Op.SCATTER_ADD, [base, index, ys])
    prog = Program("p", (xs, ws, offs, base, index), (("ys", ys), ("out", out_node)))
    verify(prog)
    values = {ref.name: rng.standard_normal(shape_of[ref.name.split(".")[1]]).astype(np.float32) for ref in prog.weights()}
    feed = {"xs": rng.standard_normal((5, h)).astype(np.float32), "ws": rng.random(5).astype(np.float32),
            "offsets": np.array([0, 2, 2, 5], np.int32),  # expert 1 has no rows
            "base": rng.standard_normal((3, h)).astype(np.float32), "index": np.array([0, 2, 0, 0, 1], np.int32)}
    out = Interpreter(WeightStore(values.__getitem__)).run(prog, feed)
    silu = lambda a: a / (1 + np.exp(-a))
    expert_of_row = [0, 0, 2, 2, 2]
    def expert(x, row):
        return (silu(row @ values[f"e{x}.gate"].T) * (row @ values[f"e{x}.up"].T)) @ values[f"e{x}.down"].T
    want = np.stack([feed["ws"][r] * expert(x, feed["xs"][r]) for r, x in enumerate(expert_of_row)])
    np.testing.assert_allclose(out["ys"], want, rtol=1e-5, atol=1e-6)
    scattered = feed["base"].copy()
    for r, t in enumerate(feed["index"]):
        scattered[t] += want[r]
    np.testing.assert_allclose(out["out"], scattered, rtol=1e-5, atol=1e-6)


def test_type_rules_reject_bad_operands():
    idx_f = _inp("idx", DType.F32, (T, 2))
    with pytest.raises(IRError, match="moe_sort"):
        make(Op.MOE_SORT, [idx_f], 4)
    idx = _inp("idx", DType.I32, (T, 2))
    with pytest.raises(IRError, match="moe_offsets"):
        make(Op.MOE_OFFSETS, [idx], 0)
    xs, ws, offs = _inp("xs", DType.F32, (T, 6)), _inp("ws", DType.F32, (T,)), _inp("o", DType.I32, (3,))
    experts = [_w("g", (5, 6)), _w("u", (5, 6)), _w("d", (6, 5))] * 2
    assert make(Op.GROUPED_SWIGLU, [xs, ws, offs, *experts], 2).shape == (T, 6)
    with pytest.raises(IRError, match="grouped_swiglu"):
        make(Op.GROUPED_SWIGLU, [xs, ws, offs, *experts[:3]], 2)       # weights for one expert only
    with pytest.raises(IRError, match="grouped_swiglu"):
        make(Op.GROUPED_SWIGLU, [xs, ws, offs, _w("g", (5, 7)), *experts[1:]], 2)   # gate K != H
    base = _inp("b", DType.F32, (T, 6))
    with pytest.raises(IRError, match="scatter_add"):
        make(Op.SCATTER_ADD, [base, _inp("i", DType.I32, (T,)), _inp("r", DType.F32, (T, 5))])
