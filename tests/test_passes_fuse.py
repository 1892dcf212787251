"""The fusion passes: each pattern in and out on the traced tiny model, interpreter equivalence, what must not
fuse, and the kernel count going down."""
from __future__ import annotations

import time

import numpy as np
import pytest

from passes_util import tiny_model, trace_model, v3_config
from dzc.checkpoint.config import ModelConfig
from dzc.ir.dtypes import DType
from dzc.ir.interpreter import Interpreter
from dzc.ir.node import Node
from dzc.ir.ops import ELEMENTWISE, Op
from dzc.ir.program import Program
from dzc.ir.shapes import T
from dzc.ir.tracer import input_
from dzc.ir.verifier import verify
from dzc.passes.fuse_elementwise import FuseElementwise
from dzc.passes.fuse_norm import FuseRMSNorm
from dzc.passes.fuse_rope import FuseRope
from dzc.passes.fuse_softmax_attention import FuseAttention, FuseSoftmax
from dzc.passes.fuse_swiglu import FuseSwiGLU
from dzc.passes.manager import compare, random_inputs, run_pipeline
from dzc.passes.pipeline import build_pipeline
from dzc.passes.views import kernel_count
from dzc.passes.base import PassContext

RAISE = [FuseRMSNorm, FuseRope, FuseSoftmax, FuseAttention, FuseSwiGLU]


def count(p: Program, op: Op) -> int:
    return sum(1 for n in p.toposort() if n.op == op)


def check_equivalent(model, before: Program, after: Program, tokens: int = 3) -> None:
    verify(after)
    feed = random_inputs(before, model.config.vocab_size, seed=1, tokens=tokens, past=6)
    interp = Interpreter(model.store)
    change = compare(interp.run(before, feed), interp.run(after, feed))
    assert change.ok and change.max_rel < 1e-5, change


@pytest.mark.parametrize("q_lora", [True, False])
@pytest.mark.parametrize("phase", ["decode", "prefill"])
def test_each_fusion_pattern_in_and_out(q_lora, phase):
    m = tiny_model(q_lora=q_lora, layers=3)
    layers = m.config.num_hidden_layers
    program = m.programs[phase]
    norms = layers * (3 + q_lora) + 1                            # input, post, kv_a (+ q_a), final
    expected = {Op.RMSNORM: norms, Op.ROPE: 2 * layers, Op.SOFTMAX: layers, Op.ATTENTION: layers,
                Op.SWIGLU: layers}                               # dense MLP or shared expert per layer
    assert count(program, Op.RSQRT) == norms and count(program, Op.EXP) == layers
    ctx = m.context()
    for cls in RAISE:
        program = cls().run(program, ctx)
        verify(program)
    for op, n in expected.items():
        assert count(program, op) == (0 if op == Op.SOFTMAX else n), op   # softmaxes end up inside attention
    for op in (Op.RSQRT, Op.EXP, Op.RMAX, Op.SILU):
        assert count(program, op) == 0, op
    assert count(program, Op.CMPLT) == layers - 1                # only the MoE routing's (layer 0 is dense)
    assert not [n for n in program.toposort() if n.op == Op.ARANGE]   # the causal mask is gone
    check_equivalent(m, m.programs[phase], program)


def test_rope_operands_are_the_shared_tables():
    m = tiny_model(layers=2)
    fused = FuseRope().run(m.programs["decode"], m.context())
    ropes = [n for n in fused.toposort() if n.op == Op.ROPE]
    q_ropes = [n for n in ropes if n.ndim == 3]
    k_ropes = [n for n in ropes if n.ndim == 2]
    assert len(q_ropes) == len(k_ropes) == 2
    assert q_ropes[0].src[1] is q_ropes[1].src[1]                 # cos [1, 1, d/2], shared by every layer
    assert k_ropes[0].src[1].op == Op.COS and k_ropes[0].src[1].shape == (1, 4)   # no reshape left for k_pe


def test_fusion_refuses_shared_intermediates():
    x = input_("x", DType.F32, (T, 8))
    w = input_("w", DType.F32, (8,))
    r = ((x * x).mean(-1) + 1e-6).rsqrt()
    normed = x * r * w
    program = Program("p", (x.node, w.node), (("y", normed.node), ("r", r.node)))   # r is also an output
    assert FuseRMSNorm().run(program, PassContext(None, None)).outputs == program.outputs
    e = (x - x.max(-1)).exp()
    soft = e / e.sum(-1)
    program = Program("p", (x.node,), (("y", soft.node), ("e", e.node)))
    assert FuseSoftmax().run(program, PassContext(None, None)).outputs == program.outputs
    act = x.silu()
    program = Program("p", (x.node, w.node), (("y", (act * w).node), ("a", act.node)))
    assert FuseSwiGLU().run(program, PassContext(None, None)).outputs == program.outputs
    # and a lone norm without its intermediates shared fuses
    program = Program("p", (x.node, w.node), (("y", normed.node),))
    assert FuseRMSNorm().run(program, PassContext(None, None)).output("y").op == Op.RMSNORM


def test_attention_needs_the_causal_mask():
    """positions + 2 is not ATTENTION's rule (j <= positions[i]): that attention must stay unfused."""
    m = tiny_model(layers=1)
    program = FuseSoftmax().run(m.programs["prefill"], m.context())

    def shift(node: Node, src):
        if node.op == Op.ADD and node.dtype == DType.I32 and node.src[1].op == Op.CONST:
            return node.replace(src=(src[0], Node(Op.CONST, DType.I32, (), (), 2)))
        return None

    from dzc.passes.graph import rebuild
    shifted = rebuild(program, shift)
    assert count(FuseAttention().run(program, m.context()), Op.ATTENTION) == 1
    assert count(FuseAttention().run(shifted, m.context()), Op.ATTENTION) == 0


def test_fuse_elementwise_groups():
    x = input_("x", DType.F32, (T, 8))
    y = input_("y", DType.F32, (T, 1))
    shared = (x + y).exp()                                        # two readers: computed once, stays outside
    chain = ((shared * 2.0 - 1.0).sigmoid() + x).sqrt()          # 5 ops, one reader each -> one KERNEL
    lone = shared.sum(-1).reciprocal()                            # a lone op stays itself
    program = Program("p", (x.node, y.node), (("a", chain.node), ("b", lone.node), ("c", (shared * x).node)))
    fused = FuseElementwise().run(program, PassContext(None, None))
    verify(fused)
    a, b, c = (fused.output(k) for k in "abc")
    assert a.op == Op.KERNEL
    body = Program("body", (), (("out", a.arg.out),)).toposort()
    assert [n.op for n in body if n.op in ELEMENTWISE] == [Op.MUL, Op.SUB, Op.SIGMOID, Op.ADD, Op.SQRT]
    assert len(a.src) == 2 and a.src[1] is x.node and a.src[0].op == Op.KERNEL   # in0 = exp(x + y) kernel
    assert b.op == Op.RECIP and c.op == Op.MUL and c.src[0] is a.src[0]
    assert a.src[0].src == (x.node, y.node)                       # (x + y).exp() is its own kernel
    feed = {"x": np.abs(np.random.default_rng(0).standard_normal((3, 8))).astype(np.float32),
            "y": np.zeros((3, 1), np.float32)}
    before, after = Interpreter(None).run(program, feed), Interpreter(None).run(fused, feed)
    for k in before:
        np.testing.assert_array_equal(before[k], after[k])


def test_kernel_count_goes_down_on_the_tiny_model():
    m = tiny_model(layers=3)
    for phase in ("decode", "prefill"):
        result = run_pipeline(m.programs[phase], build_pipeline("cpu", phase), m.context("cpu"))
        before, after = result.records[0].kernels, result.records[-1].kernels
        assert after < 0.5 * before, (phase, before, after)
        assert count(result.program, Op.KERNEL) >= 3


def test_v3_shape_traces_fast_and_fuses():
    cfg = ModelConfig.from_dict(v3_config())
    start = time.perf_counter()
    programs = trace_model(cfg)
    seconds = time.perf_counter() - start
    assert seconds < 4.0, f"tracing both 61-layer V3 programs took {seconds:.2f} s"   # ~1 s on an idle core
    decode = programs["decode"]
    layers = cfg.num_hidden_layers
    assert count(decode, Op.MOE) == layers - cfg.first_k_dense_replace
    # the fusion passes on a V3-shaped 4-layer slice (the whole 61-layer pipeline takes seconds)
    small = ModelConfig.from_dict(v3_config(layers=4))
    program = trace_model(small)["decode"]
    before = kernel_count(program)
    ctx = PassContext(None, small)
    for cls in RAISE + [FuseElementwise]:
        program = cls().run(program, ctx)
    verify(program)
    assert count(program, Op.ATTENTION) == 4 and count(program, Op.RMSNORM) == 4 * 4 + 1
    assert kernel_count(program) < 0.5 * before
