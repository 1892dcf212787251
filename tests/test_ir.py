"""The IR core: printer determinism, the verifier, tracer basics, and interpreter ops against plain numpy."""
from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest

from passes_util import tiny_model
from dzc.errors import IRError
from dzc.ir.dtypes import DType
from dzc.ir.infer import make
from dzc.ir.interpreter import Interpreter
from dzc.ir.node import FusedBody, Node, WeightFormat
from dzc.ir.ops import Op
from dzc.ir.printer import format_program, node_names
from dzc.ir.program import Program
from dzc.ir.shapes import P, T
from dzc.ir.tracer import arange, concat, const, gather, input_, linear, take, topk, weight
from dzc.ir.verifier import verify
from dzc.ir.weights import WeightStore

F32 = WeightFormat(DType.F32)


def run(outputs: dict, inputs: dict = {}, weights: dict = {}, program_inputs=()) -> dict:
    program = Program("t", tuple(t.node for t in program_inputs), tuple((k, v.node) for k, v in outputs.items()))
    verify(program)
    return Interpreter(WeightStore(lambda name: weights[name])).run(program, inputs)


# ---- printer ----------------------------------------------------------------------------------------------------
def test_printer_is_deterministic_within_and_across_processes():
    m = tiny_model(layers=2)
    text = format_program(m.programs["decode"])
    assert text == format_program(tiny_model(layers=2).programs["decode"])   # retraced: same bytes
    script = textwrap.dedent("""
        import sys; sys.path.insert(0, "tests")
        from passes_util import tiny_model
        from dzc.ir.printer import format_program
        sys.stdout.write(format_program(tiny_model(layers=2).programs["decode"]))
    """)
    other = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, check=True,
                           cwd=Path(__file__).resolve().parents[1], env={"PYTHONHASHSEED": "123", "PATH": ""}).stdout
    assert other == text
    assert text.startswith("program decode(tokens: i32[1], positions: i32[1], cache.0.latent: f32[P, 16]")
    assert '%w0 = weight "model.embed_tokens.weight" : f32[96, 32]' in text
    assert "return logits=" in text.splitlines()[-2]


def test_printer_shows_kernel_bodies_and_names_match():
    x = input_("x", DType.F32, (T, 4))
    y = input_("y", DType.F32, (4,))
    i0 = Node(Op.INPUT, DType.F32, (T, 4), (), "in0")
    i1 = Node(Op.INPUT, DType.F32, (4,), (), "in1")
    body = make(Op.MUL, [make(Op.EXP, [make(Op.ADD, [i0, i1])]), Node(Op.CONST, DType.F32, (), (), 0.5)])
    k = Node(Op.KERNEL, DType.F32, (T, 4), (x.node, y.node), FusedBody(body))
    program = Program("k", (x.node, y.node), (("out", k),))
    verify(program)
    assert format_program(program) == textwrap.dedent("""\
        program k(x: f32[T, 4], y: f32[4]) {
          %0 = kernel %x, %y : f32[T, 4] {
            %0.0 = add %in0, %in1 : f32[T, 4]
            %0.1 = exp %0.0 : f32[T, 4]
            %0.2 = mul %0.1, 0.5:f32 : f32[T, 4]
            return %0.2
          }
          return out=%0
        }
        """)
    assert node_names(program)[id(k)] == "%0"
    xv, yv = np.ones((3, 4), np.float32), np.arange(4, dtype=np.float32)
    out = Interpreter(WeightStore(lambda n: None)).run(program, {"x": xv, "y": yv})["out"]
    np.testing.assert_allclose(out, np.exp(xv + yv) * 0.5, rtol=1e-6)


# ---- verifier ---------------------------------------------------------------------------------------------------
def test_verifier_catches_a_mistyped_node():
    a = input_("a", DType.F32, (2, 3))
    bad = Node(Op.ADD, DType.F32, (2, 4), (a.node, a.node))   # built by hand, bypassing type inference
    with pytest.raises(IRError, match=r"after pass 'broken'.*add is typed f32\[2, 4\] but its operands give f32\[2, 3\]"):
        verify(Program("p", (a.node,), (("out", bad),)), after="broken")


def test_verifier_catches_undeclared_inputs_and_duplicate_outputs():
    a, b = input_("a", DType.F32, (2,)), input_("b", DType.F32, (2,))
    s = (a + b).node
    with pytest.raises(IRError, match="input 'b' is used but not declared"):
        verify(Program("p", (a.node,), (("out", s),)))
    with pytest.raises(IRError, match="duplicate output names"):
        verify(Program("p", (a.node, b.node), (("out", s), ("out", s))))
    with pytest.raises(IRError, match="matmul"):
        make(Op.MATMUL, [input_("m", DType.F32, (2, 3)).node, input_("n", DType.F32, (4, 5)).node])


# ---- tracer -----------------------------------------------------------------------------------------------------
def test_tracer_types_and_hash_consing():
    x = input_("x", DType.F32, (T, 8))
    assert (x * 2).node is (x * 2).node                       # hash-consed: identity is equality
    assert (x * 2).node is not (x * 2.5).node
    assert const(1, DType.F32).node.arg == 1.0 and isinstance(const(1, DType.F32).node.arg, float)
    assert const(2, DType.I32).node.arg == 2 and isinstance(const(2, DType.I32).node.arg, int)
    assert x.sum(-1).shape == (T, 1) and x.reshape(T, 2, 4).permute(1, 0, 2).shape == (2, T, 4)
    assert x.slice(-1, 2, 6).shape == (T, 4)
    assert concat([input_("c", DType.F32, (P, 8)), x], 0).shape == (P + T, 8)
    assert (arange(P + T).reshape(1, P + T) < x.slice(-1, 0, 1).cast(DType.I32)).dtype == DType.BOOL
    w = weight("w", F32, (16, 8))
    assert linear(x, w).shape == (T, 16)
    with pytest.raises(IRError):
        linear(x, weight("v", F32, (16, 7)))


# ---- interpreter ops vs numpy -----------------------------------------------------------------------------------
def test_interpreter_elementwise_reductions_and_movement():
    rng = np.random.default_rng(0)
    xv = rng.standard_normal((3, 4)).astype(np.float32)
    x = input_("x", DType.F32, (T, 4))
    got = run({"sig": x.sigmoid(), "silu": x.silu(), "rsqrt": (x * x + 1).rsqrt(), "max": x.maximum(0.5),
               "div": x / 3, "sum": x.sum(-1), "rmax": x.max(0), "neg": -x, "where": (x < 0).where(x, 0.0),
               "sm": x.softmax(-1), "perm": x.permute(1, 0), "slice": x.slice(1, 1, 3),
               "expand": x.reshape(T, 1, 4).expand(T, 2, 4), "concat": concat([x, x * 2], 1)},
              {"x": xv}, program_inputs=[x])
    sig = 1 / (1 + np.exp(-xv))
    want = {"sig": sig, "silu": xv * sig, "rsqrt": 1 / np.sqrt(xv * xv + 1), "max": np.maximum(xv, 0.5),
            "div": xv / 3, "sum": xv.sum(-1, keepdims=True), "rmax": xv.max(0, keepdims=True), "neg": -xv,
            "where": np.where(xv < 0, xv, 0), "sm": np.exp(xv) / np.exp(xv).sum(-1, keepdims=True),
            "perm": xv.T, "slice": xv[:, 1:3], "expand": np.broadcast_to(xv[:, None], (3, 2, 4)),
            "concat": np.concatenate([xv, 2 * xv], 1)}
    for k in want:
        np.testing.assert_allclose(got[k], want[k], rtol=1e-6, atol=1e-7, err_msg=k)
        assert got[k].dtype == want[k].dtype or got[k].dtype == np.float32, k


def test_interpreter_indexing_and_linear_algebra():
    rng = np.random.default_rng(1)
    table = rng.standard_normal((10, 4)).astype(np.float32)
    idx = np.array([3, 0, 9], np.int32)
    scores = np.array([[0.1, 0.9, 0.5, 0.9], [3.0, 2.0, 1.0, 0.0]], np.float32)
    ids = input_("ids", DType.I32, (T,))
    s = input_("s", DType.F32, (2, 4))
    w = weight("w", F32, (5, 4))
    g = gather(weight("table", F32, (10, 4)), ids)
    k = topk(s, 2)
    got = run({"gather": g, "topk": k, "take": take(s, k), "linear": linear(g, w),
               "matmul": g.reshape(T, 1, 4) @ g.reshape(T, 4, 1)},
              {"ids": idx, "s": scores}, {"table": table, "w": rng.standard_normal((5, 4)).astype(np.float32)},
              program_inputs=[ids, s])
    np.testing.assert_array_equal(got["gather"], table[idx])
    np.testing.assert_array_equal(got["topk"], [[1, 3], [0, 1]])        # ties: lower index first
    np.testing.assert_array_equal(got["take"], scores[[[0], [1]], [[1, 3], [0, 1]]])
    np.testing.assert_allclose(got["matmul"][:, 0, 0], (table[idx] ** 2).sum(-1), rtol=1e-6)
    assert got["linear"].shape == (3, 5)


def test_interpreter_fused_ops_match_their_definitions():
    rng = np.random.default_rng(2)
    n, h, d, s = 2, 3, 8, 5
    xv = rng.standard_normal((n, h, d)).astype(np.float32)
    wv = rng.standard_normal(d).astype(np.float32)
    ang = rng.standard_normal((n, 1, d // 2)).astype(np.float32)
    qv, kv, vv = (rng.standard_normal(shape).astype(np.float32) for shape in ((n, h, d), (s, 1, d), (s, 1, 4)))
    pos = np.array([2, 4], np.int32)
    x, w = input_("x", DType.F32, (n, h, d)), input_("w", DType.F32, (d,))
    c, sn = input_("c", DType.F32, (n, 1, d // 2)), input_("sn", DType.F32, (n, 1, d // 2))
    q, k, v, p = (input_("q", DType.F32, (n, h, d)), input_("k", DType.F32, (s, 1, d)),
                  input_("v", DType.F32, (s, 1, 4)), input_("p", DType.I32, (n,)))
    outs = {"rms": make(Op.RMSNORM, [x.node, w.node], 1e-6), "rope": make(Op.ROPE, [x.node, c.node, sn.node]),
            "swiglu": make(Op.SWIGLU, [x.node, x.node]), "att": make(Op.ATTENTION, [q.node, k.node, v.node, p.node], 0.3)}
    program = Program("f", (x.node, w.node, c.node, sn.node, q.node, k.node, v.node, p.node),
                      tuple(outs.items()))
    verify(program)
    got = Interpreter(WeightStore(lambda _: None)).run(
        program, {"x": xv, "w": wv, "c": np.cos(ang), "sn": np.sin(ang), "q": qv, "k": kv, "v": vv, "p": pos})
    np.testing.assert_allclose(got["rms"], xv / np.sqrt((xv ** 2).mean(-1, keepdims=True) + 1e-6) * wv, rtol=1e-5)
    rot = np.empty_like(xv)
    e, o = xv[..., 0::2], xv[..., 1::2]
    rot[..., 0::2], rot[..., 1::2] = e * np.cos(ang) - o * np.sin(ang), e * np.sin(ang) + o * np.cos(ang)
    np.testing.assert_allclose(got["rope"], rot, rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(got["swiglu"], xv * xv / (1 + np.exp(-xv)), rtol=1e-6)
    for i in range(n):   # query i sees keys 0..pos[i]
        sc = np.einsum("hd,sd->hs", qv[i], kv[: pos[i] + 1, 0]) * 0.3
        pr = np.exp(sc - sc.max(-1, keepdims=True))
        pr /= pr.sum(-1, keepdims=True)
        np.testing.assert_allclose(got["att"][i], pr @ vv[: pos[i] + 1, 0], rtol=1e-5, atol=1e-6)
