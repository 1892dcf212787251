"""simplify, cse, dce and fold-weights: a pattern in, the pattern out, and bit-identical interpreter results."""
from __future__ import annotations

import numpy as np
import pytest

from passes_util import tiny_model
from dzc.errors import IRError
from dzc.ir.dtypes import DType
from dzc.ir.infer import make
from dzc.ir.interpreter import Interpreter
from dzc.ir.node import FusedBody, Node, WeightFormat
from dzc.ir.ops import MOVEMENT, Op
from dzc.ir.program import Program
from dzc.ir.shapes import P, T
from dzc.ir.tracer import Tensor, concat, input_, weight
from dzc.ir.verifier import verify
from dzc.ir.weights import WeightStore
from dzc.passes.base import PassContext
from dzc.passes.cse import CSE
from dzc.passes.dce import DCE
from dzc.passes.fold_weights import FoldWeights
from dzc.passes.simplify import Simplify, SimplifyLate

F32 = WeightFormat(DType.F32)
RNG = np.random.default_rng(0)


def program(*outputs: Tensor, inputs=()) -> Program:
    return Program("p", tuple(t.node for t in inputs), tuple((f"o{i}", t.node) for i, t in enumerate(outputs)))


def ops(p: Program) -> list[str]:
    return [n.op.name.lower() for n in p.toposort() if n.op not in (Op.INPUT, Op.CONST, Op.WEIGHT)]


def check_same(before: Program, after: Program, feed: dict, store: WeightStore = None, exact: bool = True) -> None:
    verify(after)
    store = store or WeightStore(lambda name: None)
    a, b = Interpreter(store).run(before, feed), Interpreter(store).run(after, feed)
    for k in a:
        if exact:
            np.testing.assert_array_equal(a[k], b[k], err_msg=k)
        else:
            np.testing.assert_allclose(a[k], b[k], rtol=1e-6, err_msg=k)


def ctx(store=None) -> PassContext:
    return PassContext(store or WeightStore(lambda name: None), None)


# ---- simplify ---------------------------------------------------------------------------------------------------
def test_simplify_rule_table():
    x = input_("x", DType.F32, (T, 4, 6))
    i = input_("i", DType.I32, (T,))
    neg0 = Tensor(Node(Op.CONST, DType.F32, (), (), -0.0))
    outs = [x * 1.0, 1.0 * x, x / 1.0, x + neg0, x - 0.0, -(-x), x.cast(DType.F32), i + 0,
            (x < 0).where(x, x),
            x.reshape(T, 24).reshape(T, 4, 6), x.permute(1, 0, 2).permute(1, 0, 2), x.permute(0, 1, 2),
            x.expand(T, 4, 6), x.slice(1, 0, 4), concat([x], 0)]
    before = program(*outs, inputs=[x, i])
    after = Simplify().run(before, ctx())
    assert ops(after) == []                                      # every output is an input again
    assert all(node.op == Op.INPUT for _, node in after.outputs)
    feed = {"x": RNG.standard_normal((3, 4, 6)).astype(np.float32), "i": np.arange(3, dtype=np.int32)}
    feed["x"][0, 0, 0] = -0.0
    check_same(before, after, feed)


def test_simplify_movement_chains_and_constants():
    x = input_("x", DType.F32, (T, 4, 6))
    c = input_("c", DType.F32, (P, 6))
    two = Tensor(Node(Op.CONST, DType.F32, (), (), 2.0))
    outs = [x.permute(1, 0, 2).permute(0, 2, 1),                  # -> one permute [1, 2, 0]
            x.slice(2, 1, 5).slice(2, 1, 3),                      # -> slice(2, 2, 4)
            concat([c, x.slice(0, 0, 1).reshape(1, 24).slice(1, 0, 6)], 0).slice(0, P, P + 1),   # -> the new row
            x.reshape(T, 1, 24).expand(T, 2, 24).expand(T, 2, 24),
            two * x, (two * 3.0) + x]                              # constants right; 2*3 folded to 6
    before = program(*outs, inputs=[x, c])
    after = Simplify().run(before, ctx())
    by_name = dict(after.outputs)
    assert by_name["o0"].op == Op.PERMUTE and by_name["o0"].arg == (1, 2, 0) and by_name["o0"].src[0].op == Op.INPUT
    assert by_name["o1"].op == Op.SLICE and by_name["o1"].arg == (2, 2, 4) and by_name["o1"].src[0].op == Op.INPUT
    assert by_name["o2"].op == Op.SLICE and by_name["o2"].src[0].op == Op.RESHAPE   # no concat left
    assert by_name["o3"].op == Op.EXPAND and by_name["o3"].src[0].op == Op.RESHAPE
    assert by_name["o4"].src[1].op == Op.CONST and by_name["o4"].src[0].op == Op.INPUT
    assert by_name["o5"].src[1].arg == 6.0 and by_name["o5"].op == Op.ADD
    feed = {"x": RNG.standard_normal((2, 4, 6)).astype(np.float32), "c": RNG.standard_normal((3, 6)).astype(np.float32)}
    check_same(before, after, feed)


def test_simplify_keeps_what_is_not_exact():
    x = input_("x", DType.F32, (4,))
    outs = [x + 0.0, (x * 2.0) * 3.0, x * 0.0]                   # -0 + 0 = +0; reassociation rounds; 0*inf = nan
    before = program(*outs, inputs=[x])
    assert Simplify().run(before, ctx()).outputs == before.outputs


def test_simplify_late_turns_unit_permutes_into_reshapes():
    x = input_("x", DType.F32, (1, 4, 6))
    y = input_("y", DType.F32, (2, 4, 6))
    before = program(x.permute(1, 0, 2), y.permute(1, 0, 2), inputs=[x, y])
    assert Simplify().run(before, ctx()).outputs == before.outputs
    after = SimplifyLate().run(before, ctx())
    assert [n.op for _, n in after.outputs] == [Op.RESHAPE, Op.PERMUTE]
    check_same(before, after, {"x": RNG.standard_normal((1, 4, 6)).astype(np.float32),
                               "y": RNG.standard_normal((2, 4, 6)).astype(np.float32)})


# ---- cse --------------------------------------------------------------------------------------------------------
def test_cse_merges_commuted_operands_and_constant_spellings():
    a, b = input_("a", DType.F32, (4,)), input_("b", DType.F32, (4,))
    one_int = Tensor(Node(Op.CONST, DType.F32, (), (), 1))        # an int arg on an f32 constant
    left, right = a + b, b + a
    before = program(left * right, (a * one_int).maximum(a * 1.0), inputs=[a, b])
    assert len(before.toposort()) == 10
    c = ctx()
    after = CSE().run(before, c)
    product = after.output("o0")
    assert product.src[0] is product.src[1]                      # a+b and b+a are one node
    mx = after.output("o1")
    assert mx.src[0] is mx.src[1]
    assert c.facts["cse"]["merged"] == 3
    check_same(before, after, {"a": RNG.standard_normal(4).astype(np.float32), "b": RNG.standard_normal(4).astype(np.float32)})


def test_cse_rejects_one_weight_name_with_two_types():
    x = input_("x", DType.F32, (4,))
    before = program(x * weight("w", F32, (4,)), x * weight("w", WeightFormat(DType.BF16), (4,)), inputs=[x])
    with pytest.raises(IRError, match="weight 'w' is used as"):
        CSE().run(before, ctx())


def test_cleanup_passes_leave_the_traced_model_alone():
    m = tiny_model(layers=2)
    for phase, p in m.programs.items():
        c = m.context()
        for cls in (Simplify, CSE, DCE, FoldWeights):
            assert cls().run(p, c).outputs == p.outputs, (phase, cls.name)


# ---- dce --------------------------------------------------------------------------------------------------------
def test_dce_drops_unused_and_repeated_kernel_operands():
    a, b = input_("a", DType.F32, (T, 4)), input_("b", DType.F32, (4,))
    i0, _, i2 = (Node(Op.INPUT, DType.F32, s, (), f"in{k}") for k, s in enumerate([(T, 4), (4,), (T, 4)]))
    body = make(Op.MUL, [make(Op.EXP, [i0]), i2])                # in1 unused; in0 and in2 are both `a`
    k = Node(Op.KERNEL, DType.F32, (T, 4), (a.node, b.node, a.node), FusedBody(body))
    before = Program("p", (a.node, b.node), (("out", k),))
    c = ctx()
    after = DCE().run(before, c)
    kernel = after.output("out")
    assert kernel.src == (a.node,) and c.facts["dce"]["removed"] == 2
    assert c.facts["dce"]["unused-inputs"] == ["b"]              # reported, never removed
    assert after.inputs == before.inputs
    feed = {"a": RNG.standard_normal((3, 4)).astype(np.float32), "b": np.zeros(4, np.float32)}
    check_same(before, after, feed)
    assert DCE().run(after, ctx()).outputs == after.outputs       # idempotent


# ---- fold-weights -----------------------------------------------------------------------------------------------
def weight_program(fmt=F32):
    """What absorb-mla-like rewrites leave: slices/permutes/reshapes and arithmetic of weights at run time."""
    heads, nope, v, c = 4, 12, 10, 16
    kv_b = weight("kv_b", fmt, (heads * (nope + v), c))
    x = input_("x", DType.F32, (heads, T, nope))
    lat = input_("lat", DType.F32, (heads, T, c))
    per_head = kv_b.reshape(heads, nope + v, c)
    w_uk = per_head.slice(1, 0, nope)                             # [H, nope, C]
    w_uv = per_head.slice(1, nope, nope + v).permute(0, 2, 1)    # [H, C, v]
    scale = weight("s", F32, (c,))
    outs = [x @ w_uk, lat @ w_uv,
            lat * (scale * 2.0),                                  # arithmetic on a weight
            lat * scale.reshape(1, 1, c).expand(heads, 1, c),     # broadcast: stays an expand of a folded weight
            lat * scale.sum(-1).reshape(),                        # a scalar: becomes a CONST
            concat([x, w_uk.slice(2, 0, 12).permute(0, 2, 1).slice(1, 0, 1).expand(heads, 1, nope)], 1)]
    weights = {"kv_b": (RNG.standard_normal((heads * (nope + v), c)) * 0.1).astype(np.float32),
               "s": RNG.standard_normal(c).astype(np.float32)}
    feed = {"x": RNG.standard_normal((heads, 3, nope)).astype(np.float32),
            "lat": RNG.standard_normal((heads, 3, c)).astype(np.float32)}
    return program(*outs, inputs=[x, lat]), weights, feed


def test_fold_weights_pattern_in_and_out():
    before, weights, feed = weight_program()
    store = WeightStore(lambda n: weights[n])
    moves = lambda p: [n for n in p.toposort() if n.op in MOVEMENT and n.src[0].op == Op.WEIGHT]
    assert {n.op for n in moves(before)} == {Op.RESHAPE}
    c = PassContext(store, None)
    after = FoldWeights().run(before, c)
    # no transposes, slices or reshapes of weights survive; only broadcasts (expand) of folded weights
    assert [n.op for n in moves(after)] == [Op.EXPAND, Op.EXPAND]
    assert not [n for n in after.toposort() if n.op in (Op.PERMUTE, Op.SLICE) and n.src[0].op == Op.WEIGHT]
    names = sorted(ref.name for ref in after.weights())
    assert "kv_b#reshape(4,22,16)#slice(1,0,12)" in names
    assert "kv_b#reshape(4,22,16)#slice(1,12,22)#permute(0,2,1)" in names
    assert any(n.startswith("s#fold-") and len(n) == len("s#fold-") + 12 for n in names)
    assert after.output("o4").src[1].op == Op.CONST                # the scalar sum folded to a constant
    check_same(before, after, feed, store)
    np.testing.assert_array_equal(store.f32("kv_b#reshape(4,22,16)#slice(1,0,12)"),
                                  weights["kv_b"].reshape(4, 22, 16)[:, :12])
    # deterministic and idempotent: a second compile (another phase, another process) names the same weights
    again = FoldWeights().run(before, PassContext(store, None))
    assert again.outputs == after.outputs
    assert FoldWeights().run(after, PassContext(store, None)).outputs == after.outputs


def test_fold_weights_derived_formats():
    before, weights, _ = weight_program(WeightFormat(DType.BF16))
    after = FoldWeights().run(before, PassContext(WeightStore(lambda n: weights[n]), None))
    fmts = {ref.name: ref.fmt for ref in after.weights()}
    assert fmts["kv_b#reshape(4,22,16)#slice(1,0,12)"] == WeightFormat(DType.BF16)   # moved bf16 values stay bf16
    before, weights, _ = weight_program(WeightFormat(DType.FP8E4M3, (4, 8)))
    after = FoldWeights().run(before, PassContext(WeightStore(lambda n: weights[n]), None))
    fmts = {ref.name: ref.fmt for ref in after.weights()}
    assert fmts["kv_b#reshape(4,22,16)#slice(1,0,12)"] == WeightFormat(DType.F32)    # blocks no longer line up
