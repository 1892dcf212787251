"""Weight formats (ir/quant.py codecs) and the `quantize` pass."""
from __future__ import annotations

import numpy as np
import pytest

import pass_models as pm
from dzc.checkpoint import dtypes as ck
from dzc.errors import InputError, IRError
from dzc.ir import quant
from dzc.ir.dtypes import DType
from dzc.ir.node import WeightFormat
from dzc.ir.ops import Op
from dzc.ir.printer import format_program
from dzc.ir.verifier import verify
from dzc.ir.weights import WeightStore
from dzc.passes.absorb_mla import AbsorbMLA
from dzc.passes.lower_moe import LowerMoE
from dzc.passes.quantize import EMBEDDING, MATRIX, OTHER, ROUTER, Quantize, weight_roles

RNG = np.random.default_rng(0)
SHAPES = [(5, 48), (3, 7, 33), (4, 64), (2, 1), (130, 200)]


def bits(a: np.ndarray) -> np.ndarray:
    return np.ascontiguousarray(a, np.float32).view(np.uint32)


# ---- codecs ------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SHAPES)
def test_f32_is_exact(shape):
    w = RNG.standard_normal(shape).astype(np.float32)
    assert np.array_equal(bits(quant.decode(quant.encode(w, quant.F32), quant.F32)), bits(w))


@pytest.mark.parametrize("shape", SHAPES)
def test_bf16_and_f16_exact_on_representable_values_and_round_to_nearest_even(shape):
    sign = (RNG.integers(0, 2, shape) << 15).astype(np.uint16)
    w = ck.bf16_to_f32(RNG.integers(0, 0x7F00, shape).astype(np.uint16) | sign)   # finite bf16 values
    parts = quant.encode(w, quant.BF16)
    assert parts["data"].dtype == np.uint16
    assert np.array_equal(bits(quant.decode(parts, quant.BF16)), bits(w))
    h = RNG.standard_normal(shape).astype(np.float16).astype(np.float32)
    assert np.array_equal(bits(quant.decode(quant.encode(h, quant.F16), quant.F16)), bits(h))
    # rounding: 1 + 2^-8 is halfway between bf16 neighbours 1 and 1 + 2^-7: ties go to even (1.0)
    tie = np.array([1 + 2 ** -8, 1 + 3 * 2 ** -8], np.float32)
    assert quant.decode(quant.encode(tie, quant.BF16), quant.BF16).tolist() == [1.0, 1 + 2 ** -6]


def test_fp8_decodes_checkpoint_parts_exactly_with_ragged_blocks():
    w = (RNG.standard_normal((300, 200)) * 0.05).astype(np.float32)
    q, s = ck.quantize_fp8_blocks(w, (128, 128))            # what the checkpoint stores
    assert s.shape == (3, 2)
    fmt = quant.FP8_BLOCK128
    got = quant.decode({"q": q, "scale_inv": s}, fmt)
    assert np.array_equal(bits(got), bits(ck.dequantize_fp8_blocks(q, s, (128, 128))))
    assert np.array_equal(bits(got), bits(ck.e4m3_to_f32(q) * np.repeat(np.repeat(s, 128, 0), 128, 1)[:300, :200]))
    # encoding reproduces the checkpoint's codes and scales (DeepSeek's amax / 448 rule), hence its values
    parts = quant.encode(w, fmt)
    assert np.array_equal(parts["q"], q) and np.array_equal(parts["scale_inv"], s)
    # e4m3 has 3 mantissa bits: relative error <= 2^-4 above the subnormal range of each block
    big = np.abs(w) > np.repeat(np.repeat(s, 128, 0), 128, 1)[:300, :200] * 2 ** -6
    assert np.all(np.abs(got - w)[big] <= np.abs(w)[big] * 2 ** -4)


def test_fp8_batched_blocks():
    w = RNG.standard_normal((3, 12, 10)).astype(np.float32)
    fmt = WeightFormat(DType.FP8E4M3, (4, 8))
    parts = quant.encode(w, fmt)
    assert parts["q"].shape == (3, 12, 10) and parts["scale_inv"].shape == (3, 3, 2)
    for b in range(3):
        want = ck.dequantize_fp8_blocks(parts["q"][b], parts["scale_inv"][b], (4, 8))
        assert np.array_equal(quant.decode(parts, fmt)[b], want)


@pytest.mark.parametrize("fmt,qmax", [(quant.INT8_G32, 127), (quant.INT4_G32, 7)])
@pytest.mark.parametrize("shape", SHAPES)
def test_int_group_error_bound(fmt, qmax, shape):
    w = RNG.standard_normal(shape).astype(np.float32)
    w[..., :1] *= 40  # an outlier: it only costs its own group precision
    parts = quant.encode(w, fmt)
    got = quant.decode(parts, fmt)
    k = shape[-1]
    groups = -(-k // 32)
    assert parts["scale"].shape == shape[:-1] + (groups,) and parts["scale"].dtype == np.float16
    pad = np.zeros(shape[:-1] + (groups * 32,), np.float32)
    pad[..., :k] = np.abs(w)
    amax = pad.reshape(shape[:-1] + (groups, 32)).max(-1)
    np.testing.assert_array_equal(parts["scale"], (amax / np.float32(qmax)).astype(np.float16))
    scale = np.repeat(parts["scale"].astype(np.float32), 32, -1)[..., :k]
    assert np.all(np.abs(got - w) <= scale * (0.5 + qmax * 2.0 ** -11 + 1e-5))
    # decode is exactly value * scale in float32
    v = quant.codec_for(fmt)._unpack(parts)
    assert v.min() >= -qmax and v.max() <= qmax
    assert np.array_equal(bits(got), bits(v.astype(np.float32) * scale))


def test_int_group_zero_groups_and_storage():
    for fmt, qmax in ((quant.INT8_G32, 127), (quant.INT4_G32, 7)):
        w = np.zeros((2, 40), np.float32)
        w[1, 35] = -qmax / 16           # scale 1/16: exact in float16, so the round trip is exact
        parts = quant.encode(w, fmt)
        assert np.array_equal(quant.decode(parts, fmt), w)
    p8, p4 = quant.encode(w * 127 / 7, quant.INT8_G32), quant.encode(w, quant.INT4_G32)
    assert p8["q"].dtype == np.int8 and p8["q"].shape == (2, 40) and p8["q"][1, 35] == -127
    assert p4["q"].dtype == np.uint8 and p4["q"].shape == (2, 20)
    # element 35 = byte 17, high nibble; -7 + 8 = 1; the low nibble (element 34) is zero = 8
    assert p4["q"][1, 17] == (1 << 4) | 8 and p4["q"][0, 0] == 0x88
    assert quant.parts_nbytes(p4) == 2 * 20 + 2 * 2 * 2          # float16 scales


def test_int4_odd_k():
    w = RNG.standard_normal((3, 33)).astype(np.float32)
    parts = quant.encode(w, quant.INT4_G32)
    assert parts["q"].shape == (3, 17) and (parts["q"][:, 16] >> 4 == 8).all()   # padding nibble is zero
    assert quant.decode(parts, quant.INT4_G32).shape == (3, 33)


def test_encode_exact_and_format_errors():
    w = RNG.standard_normal((4, 8)).astype(np.float32)
    assert quant.encode_exact(w, quant.BF16) is None
    assert quant.encode_exact(quant.decode(quant.encode(w, quant.BF16), quant.BF16), quant.BF16) is not None
    with pytest.raises(IRError):
        quant.codec_for(WeightFormat(DType.I8, (32, 1)))
    with pytest.raises(IRError):
        quant.codec_for(WeightFormat(DType.FP8E4M3, (128, 128), "k32-blocked"))
    with pytest.raises(IRError):
        quant.codec_for(WeightFormat(DType.BF16, (1, 32)))
    with pytest.raises(IRError):
        quant.codec_for(WeightFormat(DType.I8, (1, 16), "k32-blocked"))


def test_weight_store_decodes_encoded_weights_exactly():
    w = RNG.standard_normal((6, 64)).astype(np.float32)
    store = WeightStore(lambda name: w)
    parts = quant.encode(w, quant.INT8_G32)
    store.define_encoded("x", quant.INT8_G32, parts, quant.codec_for(quant.INT8_G32))
    assert np.array_equal(store.f32("x"), quant.decode(parts, quant.INT8_G32))
    assert store.encoded("x")[0] == quant.INT8_G32


# ---- the pass ----------------------------------------------------------------------------------------------------
def test_roles_are_structural():
    tm = pm.tiny()
    for program in (tm.programs["prefill"], LowerMoE().run(tm.programs["prefill"], tm.ctx()),
                    AbsorbMLA().run(tm.programs["decode"], tm.ctx())):
        roles = weight_roles(program)
        assert roles["model.layers.1.mlp.gate.weight"] == ROUTER
        assert roles["model.layers.1.mlp.gate.e_score_correction_bias"] == OTHER
        assert roles["model.layers.1.post_attention_layernorm.weight"] == OTHER
        assert roles["model.embed_tokens.weight"] == EMBEDDING
        assert roles["lm_head.weight"] == MATRIX
        assert roles["model.layers.2.mlp.experts.7.down_proj.weight"] == MATRIX
        assert roles["model.layers.1.mlp.shared_experts.up_proj.weight"] == MATRIX
        assert {name for name, r in roles.items() if r == ROUTER} == {"model.layers.1.mlp.gate.weight",
                                                                     "model.layers.2.mlp.gate.weight"}


def _fp8_checkpoint_tiny():
    fp8 = quant.FP8_BLOCK128
    linear = lambda n: n.startswith("model.layers.") and n.endswith(("_proj.weight", "_proj_with_mqa.weight"))
    plain = lambda n: quant.F32 if n.endswith("bias") or n.startswith("rope.") else quant.BF16
    tm = pm.tiny(format_of=lambda n: fp8 if linear(n) else plain(n),
                 hidden_size=160, intermediate_size=200)     # ragged 128-blocks
    for ref in tm.programs["prefill"].weights() + tm.programs["decode"].weights():
        if ref.fmt.dtype != DType.F32 and tm.weights.encoded(ref.name) is None:
            tm.weights.define_encoded(ref.name, ref.fmt, quant.encode(tm.weights.f32(ref.name), ref.fmt),
                                      quant.codec_for(ref.fmt))
    return tm


def test_no_quant_keeps_checkpoint_formats():
    tm = _fp8_checkpoint_tiny()
    ctx = tm.ctx()
    before = tm.programs["prefill"]
    stored = {ref.name: tm.weights.encoded(ref.name) for ref in before.weights()}
    after = Quantize().run(before, ctx)
    assert after is before
    for ref in after.weights():
        assert (tm.weights.encoded(ref.name) or (None, None))[1] is (stored[ref.name] or (None, None))[1]
    assert ctx.facts["quantize"]["prefill"]["formats"]["fp8e4m3<128x128>"] > 0
    line = 'weight "model.layers.0.self_attn.kv_a_proj_with_mqa.weight" : fp8e4m3<128x128>[24, 160]'
    assert line in format_program(after)


@pytest.mark.parametrize("q_lora", [True, False])
def test_int8_formats_and_logits_within_10_percent(q_lora):
    # hidden 128: four int8 activation groups per row (at 32 one group is the whole row, and the random routers'
    # near-ties flip an expert choice now and then, which no error bound covers)
    tm = pm.tiny(q_lora, seed=2, hidden_size=128)
    feeds = {"prefill": pm.inputs(tm.config, 5, 4), "decode": pm.inputs(tm.config, 1, 6)}
    refs = {ph: pm.run(tm.programs[ph], tm.weights, feeds[ph]) for ph in feeds}
    ctx = tm.ctx(quant="int8")
    for phase in ("prefill", "decode"):
        program = tm.programs[phase]
        for p in (AbsorbMLA(), LowerMoE(), Quantize()):
            program = p.run(program, ctx)
            verify(program)
        roles = weight_roles(program)
        batched = {n.src[1].arg.name for n in program.toposort() if n.op == Op.LINEAR and n.src[1].ndim == 3}
        assert bool(batched) == (phase == "decode")      # absorbed W_UK / W_UV: batched LINEARs, int8 like the rest
        for ref in program.weights():
            want = {MATRIX: quant.QUANT_FORMATS["int8"], EMBEDDING: quant.BF16}.get(roles[ref.name], quant.F32)
            assert ref.fmt == want, ref.name
            if want != quant.F32:
                assert quant.same_encoding(tm.weights.encoded(ref.name)[0], want)
        text = format_program(program)
        assert "i8<1x32>" in text and 'weight "model.layers.1.mlp.gate.weight" : f32[8, 128]' in text
        assert 'weight "lm_head.weight" : i8<1x32>+a8[64, 128]' in text
        out = pm.run(program, tm.weights, feeds[phase])
        assert pm.rel_l2(out["logits"], refs[phase]["logits"]) < 0.10
        assert pm.rel_l2(out["logits"], refs[phase]["logits"]) > 0        # it did quantize


def test_bf16_and_f32_from_fp8_checkpoint():
    tm = _fp8_checkpoint_tiny()
    name = "model.layers.1.mlp.experts.3.down_proj.weight"
    exact = tm.weights.f32(name).copy()
    ctx = tm.ctx(quant="f32")
    out = Quantize().run(tm.programs["prefill"], ctx)
    fmts = {ref.name: ref.fmt for ref in out.weights()}
    assert fmts[name] == quant.F32 and fmts["model.embed_tokens.weight"] == quant.F32
    assert np.array_equal(tm.weights.f32(name), exact)        # the exact dequantized FP8 values
    tm = _fp8_checkpoint_tiny()
    exact = tm.weights.f32(name).copy()
    out = Quantize().run(tm.programs["prefill"], tm.ctx(quant="bf16"))
    assert {ref.name: ref.fmt for ref in out.weights()}[name] == quant.BF16
    assert np.array_equal(bits(tm.weights.f32(name)), bits(ck.bf16_to_f32(ck.f32_to_bf16(exact))))


def test_second_program_reuses_encodings():
    tm = pm.tiny()
    ctx = tm.ctx(quant="int4")
    Quantize().run(tm.programs["prefill"], ctx)
    name = "model.layers.0.mlp.down_proj.weight"
    parts = tm.weights.encoded(name)[1]
    Quantize().run(tm.programs["decode"], ctx)
    assert tm.weights.encoded(name)[1] is parts               # not re-rounded from its own decoded values


def test_tied_embeddings_follow_the_matrix_format():
    tm = pm.tiny(tie_word_embeddings=True)
    out = Quantize().run(tm.programs["decode"], tm.ctx(quant="int8"))
    assert {ref.name: ref.fmt for ref in out.weights()}["model.embed_tokens.weight"] == quant.INT8_G32


def test_unknown_quant_is_a_user_error():
    tm = pm.tiny()
    with pytest.raises(InputError, match="int3"):
        Quantize().run(tm.programs["decode"], tm.ctx(quant="int3"))
