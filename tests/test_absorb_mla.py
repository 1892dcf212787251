"""absorb-mla: pattern in (kv_b over the concatenated cache), pattern out (MLA_ATTENTION over the latent cache),
interpreter equivalence, the prefill cost model, derived-weight formats."""
from __future__ import annotations

import numpy as np
import pytest

import pass_models as pm
from dzc.ir import quant
from dzc.ir.dtypes import DType
from dzc.ir.infer import make
from dzc.ir.node import Node, WeightFormat
from dzc.ir.ops import Op
from dzc.ir.printer import format_program
from dzc.ir.program import Program
from dzc.ir.verifier import verify
from dzc.passes.absorb_mla import (AbsorbMLA, absorbed_token_limit, choose_form, match_matmul,
                                   mla_attention_cost)
from dzc.passes.rewrite import graph_rewrite

V3 = dict(heads=128, kv_lora=512, rope=64, nope=128, v_dim=128)
TINY = dict(heads=4, kv_lora=16, rope=8, nope=12, v_dim=8)  # pass_models.config()


def linears_over_cache(program: Program) -> list[Node]:
    """LINEARs whose input is a CONCAT that includes a cache input (kv_b expanding the whole cache)."""
    return [n for n in program.nodes(Op.LINEAR)
            if n.src[0].op == Op.CONCAT and any(s.op == Op.INPUT and s.arg.startswith("cache.") for s in n.src[0].src)]


def max_err(a: dict, b: dict) -> float:
    assert a.keys() == b.keys()
    return max(float(np.abs(a[k] - b[k]).max()) for k in a)


@pytest.mark.parametrize("q_lora", [True, False])
def test_decode_pattern_in_and_out(q_lora):
    tm = pm.tiny(q_lora)
    before = tm.programs["decode"]
    layers = tm.config.num_hidden_layers
    assert len(linears_over_cache(before)) == layers          # pattern in: kv_b expands the cache each step
    assert not list(before.nodes(Op.MLA_ATTENTION))
    ctx = tm.ctx()
    after = AbsorbMLA().run(before, ctx)
    verify(after)
    assert linears_over_cache(after) == []                    # pattern out: kv_b never touches the cache
    mla = list(after.nodes(Op.MLA_ATTENTION))
    assert len(mla) == layers
    scale = tm.config.softmax_scale
    for node in mla:
        q_lat, q_pe, latent, k_pe, positions = node.src
        assert node.arg == pytest.approx(scale, rel=1e-12)  # the softmax scale is explicit, YaRN mscale included
        assert latent.op == Op.CONCAT and latent.src[0].arg.startswith("cache.")
        assert latent.src[0].arg.endswith("latent")
        assert k_pe.op == Op.CONCAT and k_pe.src[0].arg.endswith("k_pe")
        assert positions.op == Op.INPUT and positions.arg == "positions"
    names = {ref.name for ref in after.weights()}
    assert "model.layers.0.self_attn.kv_b_proj.w_uk" in names and "model.layers.0.self_attn.kv_b_proj.w_uv" in names
    assert not any(n.endswith("kv_b_proj.weight") for n in names)
    text = format_program(after)
    assert "mla_attention" in text and 'weight "model.layers.2.self_attn.kv_b_proj.w_uv" : f32[4, 8, 16]' in text
    # the first layer's cache rows are the very same nodes (later layers' differ only through earlier layers)
    assert after.output("cache.0.latent") is before.output("cache.0.latent")
    assert after.output("cache.0.k_pe") is before.output("cache.0.k_pe")
    assert ctx.facts["absorb-mla"]["decode"]["form"] == "absorbed"
    assert ctx.facts["absorb-mla"]["decode"]["layers"] == layers


@pytest.mark.parametrize("q_lora", [True, False])
@pytest.mark.parametrize("phase,tokens,past", [("decode", 1, 7), ("prefill", 5, 6), ("prefill", 3, 0)])
def test_interpreter_equivalence(q_lora, phase, tokens, past):
    tm = pm.tiny(q_lora, seed=3)
    before = tm.programs[phase]
    after = AbsorbMLA(prefill="absorbed").run(before, tm.ctx())
    verify(after)
    assert len(list(after.nodes(Op.MLA_ATTENTION))) == tm.config.num_hidden_layers
    feed = pm.inputs(tm.config, tokens, past)
    ref, out = pm.run(before, tm.weights, feed), pm.run(after, tm.weights, feed)
    assert max_err(out, ref) < 1e-5 * max(1.0, float(np.abs(ref["logits"]).max()))


def test_prefill_defaults_to_expanded_and_says_so():
    tm = pm.tiny()
    ctx = tm.ctx()
    before = tm.programs["prefill"]
    after = AbsorbMLA().run(before, ctx)
    assert after.outputs == before.outputs                    # nothing rewritten
    fact = ctx.facts["absorb-mla"]["prefill"]
    assert fact["form"] == "expanded" and fact["layers"] == 0
    assert "T=512, P=0" in fact["reason"]
    assert "prefill" in AbsorbMLA.description and "decode" in AbsorbMLA.description
    # the weights were still derived once, from the exact kv_b, for the decode program
    assert "model.layers.0.self_attn.kv_b_proj.w_uk" in tm.weights


def test_prefill_estimate_can_choose_absorbed():
    tm = pm.tiny()
    ctx = tm.ctx()
    after = AbsorbMLA(prefill_tokens=4, prefill_past=4000).run(tm.programs["prefill"], ctx)
    assert ctx.facts["absorb-mla"]["prefill"]["form"] == "absorbed"
    assert len(list(after.nodes(Op.MLA_ATTENTION))) == tm.config.num_hidden_layers
    forced = AbsorbMLA(prefill="expanded").run(tm.programs["prefill"], ctx)
    assert not list(forced.nodes(Op.MLA_ATTENTION))
    with pytest.raises(ValueError):
        AbsorbMLA(prefill="sometimes")


def test_cost_model_choices():
    # a fresh prompt: expanded, for V3 and the tiny model (for a handful of tokens the byte term may differ)
    for dims in (V3, TINY):
        for t in (64, 512, 4096):
            assert choose_form(t, 0, **dims) == "expanded"
    # one token over a cache: absorbed
    for dims in (V3, TINY):
        assert choose_form(1, 4096, **dims) == "absorbed"
    # a short continuation over a long cache: absorbed; a long one: expanded whatever the cache
    assert choose_form(16, 8192, **V3) == "absorbed"
    assert choose_form(512, 100_000, **V3) == "expanded"
    assert absorbed_token_limit(512, 128, 128) == pytest.approx(512 * 256 / 768)
    assert absorbed_token_limit(16, 12, 8) == pytest.approx(16 * 20 / 12)
    # the FLOP formula of the docstring: absorbed - expanded = H*[T*S*(2C-Dn-Dv) - C*(Dn+Dv)*P] MACs
    t, p = 37, 91
    c = mla_attention_cost(t, p, **TINY)
    h, kv, nope, v = TINY["heads"], TINY["kv_lora"], TINY["nope"], TINY["v_dim"]
    diff = h * (t * (t + p) * (2 * kv - nope - v) - kv * (nope + v) * p)
    assert c["absorbed"]["flops"] - c["expanded"]["flops"] == pytest.approx(2 * diff)
    assert c["expanded"]["bytes"] > c["absorbed"]["bytes"]


def _fuse_to_attention(program: Program) -> Program:
    """What a fusion pass does: the expanded attention as one ATTENTION(q, k, v, positions) op."""
    def rule(node, _):
        if match_matmul(node) is None:
            return None
        probs, vt = node.src
        x = probs.src[0].src[0].src[0]                         # div(exp(sub(x, max)), sum) -> x
        mask, scaled, _ = x.src
        qk = scaled.src[0]
        positions = mask.src[1].src[0].src[0]
        att = make(Op.ATTENTION, [qk.src[0].src[0], qk.src[1].src[0], vt.src[0], positions], scaled.src[1].arg)
        return make(Op.PERMUTE, [att], (1, 0, 2))
    return graph_rewrite(program, {Op.MATMUL: [rule]})


@pytest.mark.parametrize("q_lora", [True, False])
def test_matches_fused_attention_op(q_lora):
    tm = pm.tiny(q_lora)
    fused = _fuse_to_attention(tm.programs["decode"])
    verify(fused)
    assert len(list(fused.nodes(Op.ATTENTION))) == tm.config.num_hidden_layers
    after = AbsorbMLA().run(fused, tm.ctx())
    verify(after)
    assert not list(after.nodes(Op.ATTENTION)) and not linears_over_cache(after)
    feed = pm.inputs(tm.config, 1, 9)
    assert max_err(pm.run(after, tm.weights, feed), pm.run(tm.programs["decode"], tm.weights, feed)) < 1e-5


def test_other_masks_are_left_alone():
    """Only the causal mask j <= positions[i] is what MLA_ATTENTION computes; any other mask is not absorbed."""
    tm = pm.tiny()

    def shift_mask(node, _):  # positions + 1  ->  positions + 2
        if node.op == Op.ADD and node.src[1].op == Op.CONST and node.src[1].arg == 1 and node.dtype == DType.I32:
            return node.replace(src=(node.src[0], Node(Op.CONST, DType.I32, (), (), 2)))
        return None

    shifted = graph_rewrite(tm.programs["decode"], {Op.ADD: [shift_mask]})
    after = AbsorbMLA().run(shifted, tm.ctx())
    assert not list(after.nodes(Op.MLA_ATTENTION))


def test_derived_weights_values_and_determinism():
    tm = pm.tiny()
    ctx = tm.ctx()
    a = AbsorbMLA().run(tm.programs["decode"], ctx)
    b = AbsorbMLA().run(tm.programs["decode"], ctx)
    assert a.outputs == b.outputs                             # same names, same nodes
    h, nope, v = 4, 12, 8
    kv_b = tm.weights.f32("model.layers.1.self_attn.kv_b_proj.weight").reshape(h, nope + v, -1)
    uk = tm.weights.f32("model.layers.1.self_attn.kv_b_proj.w_uk")
    uv = tm.weights.f32("model.layers.1.self_attn.kv_b_proj.w_uv")
    assert np.array_equal(uk, kv_b[:, :nope].transpose(0, 2, 1)) and np.array_equal(uv, kv_b[:, nope:])


FP8 = WeightFormat(DType.FP8E4M3, (4, 8))  # blocks small enough that the tiny model has many (and ragged ones)


def _fp8_tiny():
    """Linear weights inside the layers stored block-FP8 in the store, as a checkpoint holds them."""
    is_fp8 = (lambda n: n.startswith("model.layers.") and n.endswith("proj.weight")
              or n.endswith("proj_with_mqa.weight"))
    tm = pm.tiny(format_of=lambda n: FP8 if is_fp8(n) else quant.F32)
    for ref in tm.programs["decode"].weights() + tm.programs["prefill"].weights():
        if ref.fmt == FP8 and tm.weights.encoded(ref.name) is None:
            parts = quant.encode(tm.weights.f32(ref.name), FP8)
            tm.weights.define_encoded(ref.name, FP8, parts, quant.codec_for(FP8))
    return tm


def test_fp8_kv_b_gives_fp8_absorbed_weights_exactly():
    tm = _fp8_tiny()
    before = tm.programs["decode"]
    after = AbsorbMLA().run(before, tm.ctx())
    fmts = {ref.name: ref.fmt for ref in after.weights()}
    name = "model.layers.0.self_attn.kv_b_proj"
    assert fmts[name + ".w_uk"] == WeightFormat(DType.FP8E4M3, (8, 4))     # sliced, transposed blocks
    assert fmts[name + ".w_uv"] == FP8                                     # sliced, not re-rounded
    kv_fmt, kv_parts = tm.weights.encoded(name + ".weight")
    uk_fmt, uk_parts = tm.weights.encoded(name + ".w_uk")
    uv_fmt, uv_parts = tm.weights.encoded(name + ".w_uv")
    q, s = kv_parts["q"].reshape(4, 20, 16), kv_parts["scale_inv"].reshape(4, 5, 2)
    assert np.array_equal(uk_parts["q"], q[:, :12].transpose(0, 2, 1))
    assert np.array_equal(uk_parts["scale_inv"], s[:, :3].transpose(0, 2, 1))
    assert uv_fmt == FP8 and np.array_equal(uv_parts["q"], q[:, 12:])
    assert np.array_equal(uv_parts["scale_inv"], s[:, 3:])
    feed = pm.inputs(tm.config, 1, 5)
    assert max_err(pm.run(after, tm.weights, feed), pm.run(before, tm.weights, feed)) < 1e-5


def test_bf16_kv_b_keeps_bf16():
    tm = pm.tiny(format_of=lambda n: quant.BF16 if n.endswith("kv_b_proj.weight") else quant.F32)
    for ref in tm.programs["decode"].weights():   # make the stored values bf16-exact, as a bf16 checkpoint's are
        if ref.fmt == quant.BF16 and tm.weights.encoded(ref.name) is None:
            tm.weights.define_encoded(ref.name, quant.BF16, quant.encode(tm.weights.f32(ref.name), quant.BF16),
                                      quant.codec_for(quant.BF16))
    after = AbsorbMLA().run(tm.programs["decode"], tm.ctx())
    fmts = {ref.name: ref.fmt for ref in after.weights()}
    assert fmts["model.layers.0.self_attn.kv_b_proj.w_uk"] == quant.BF16
    assert fmts["model.layers.0.self_attn.kv_b_proj.w_uv"] == quant.BF16


def test_fp8_kv_b_without_parts_is_reencoded_only_when_exact():
    """A store that serves only dequantized f32 (as the checkpoint loader does): aligned blocks re-encode to the
    same codes and scales, so W_UK/W_UV stay FP8; blocks spanning several heads cannot, so they become f32."""
    def run(fmt):
        tm = pm.tiny(format_of=lambda n: fmt if n.endswith("kv_b_proj.weight") else quant.F32)
        for ref in tm.programs["decode"].weights():   # FP8-representable values, as an FP8 checkpoint decodes to
            if ref.fmt == fmt:
                exact = quant.decode(quant.encode(tm.weights.f32(ref.name), fmt), fmt)
                tm.weights.define(ref.name, exact)
        after = AbsorbMLA().run(tm.programs["decode"], tm.ctx())
        fmts = {ref.name: ref.fmt for ref in after.weights()}
        name = "model.layers.0.self_attn.kv_b_proj"
        kv_b = tm.weights.f32(name + ".weight").reshape(4, 20, 16)
        assert np.array_equal(tm.weights.f32(name + ".w_uk"), kv_b[:, :12].transpose(0, 2, 1))
        assert np.array_equal(tm.weights.f32(name + ".w_uv"), kv_b[:, 12:])
        return fmts[name + ".w_uk"], fmts[name + ".w_uv"]

    assert run(FP8) == (WeightFormat(DType.FP8E4M3, (8, 4)), FP8)
    assert run(quant.FP8_BLOCK128) == (quant.F32, quant.F32)
