"""select-layout: per-target weight layouts, exact across layouts, with the documented bytes."""
from __future__ import annotations

import struct

import numpy as np
import pytest

import pass_models as pm
from dzc.errors import IRError
from dzc.ir import quant
from dzc.ir.dtypes import DType
from dzc.ir.printer import format_program
from dzc.ir.verifier import verify
from dzc.passes.absorb_mla import AbsorbMLA
from dzc.passes.layout import SelectLayout, layout_for
from dzc.passes.lower_moe import LowerMoE
from dzc.passes.quantize import Quantize

RNG = np.random.default_rng(1)


@pytest.mark.parametrize("fmt", [quant.INT8_G32, quant.INT4_G32])
@pytest.mark.parametrize("shape", [(5, 48), (3, 7, 33), (4, 64), (2, 1)])
def test_relayout_is_exact_both_ways(fmt, shape):
    w = RNG.standard_normal(shape).astype(np.float32)
    rowmajor = quant.encode(w, fmt)
    blocked_fmt = quant.with_layout(fmt, quant.K32_BLOCKED)
    blocked = quant.relayout(rowmajor, fmt, quant.K32_BLOCKED)
    groups = -(-shape[-1] // 32)
    assert blocked["blocks"].shape == shape[:-1] + (groups * (36 if fmt.dtype == DType.I8 else 20),)
    assert np.array_equal(quant.decode(blocked, blocked_fmt), quant.decode(rowmajor, fmt))
    assert np.array_equal(quant.decode(quant.encode(w, blocked_fmt), blocked_fmt), quant.decode(rowmajor, fmt))
    back = quant.relayout(blocked, blocked_fmt, quant.ROWMAJOR)
    assert all(np.array_equal(back[k], rowmajor[k]) for k in rowmajor)


def test_k32_blocked_bytes_are_as_documented():
    w = RNG.standard_normal((2, 40)).astype(np.float32)
    p8 = quant.encode(w, quant.INT8_G32)
    b8 = quant.relayout(p8, quant.INT8_G32, quant.K32_BLOCKED)["blocks"]
    row, g = 1, 1                                                    # row 1, group 1 (the ragged one: 8 values)
    block = b8[row, g * 36:(g + 1) * 36].tobytes()
    assert struct.unpack("<f", block[:4])[0] == p8["scale"][row, g]
    assert list(np.frombuffer(block[4:12], np.int8)) == list(p8["q"][row, 32:40])
    assert block[12:] == bytes(24)                                  # padding values are 0
    p4 = quant.encode(w, quant.INT4_G32)
    b4 = quant.relayout(p4, quant.INT4_G32, quant.K32_BLOCKED)["blocks"]
    v = quant.codec_for(quant.INT4_G32)._unpack(p4)                  # the signed values
    block = b4[row, 0:20].tobytes()
    assert struct.unpack("<f", block[:4])[0] == p4["scale"][row, 0]
    for i in range(16):
        assert block[4 + i] == ((int(v[row, i]) + 8) | ((int(v[row, 16 + i]) + 8) << 4))
    # rowmajor int4: byte j = element 2j (low nibble) | element 2j+1 (high nibble)
    assert p4["q"][row, 3] == ((int(v[row, 6]) + 8) | ((int(v[row, 7]) + 8) << 4))


def test_layout_table():
    assert layout_for("cpu", quant.INT8_G32) == quant.K32_BLOCKED
    assert layout_for("cpu", quant.INT4_G32) == quant.K32_BLOCKED
    for fmt in (quant.F32, quant.BF16, quant.FP8_BLOCK128):
        assert layout_for("cpu", fmt) == quant.ROWMAJOR
    for fmt in (quant.F32, quant.INT8_G32, quant.INT4_G32):
        assert layout_for("interp", fmt) == quant.ROWMAJOR


@pytest.mark.parametrize("q_lora", [True, False])
@pytest.mark.parametrize("quant_name", ["int8", "int4", "bf16"])
def test_cpu_layouts_keep_values(q_lora, quant_name):
    tm = pm.tiny(q_lora)
    ctx = tm.ctx(quant=quant_name, target="cpu")
    feed = pm.inputs(tm.config, 1, 5)
    program = tm.programs["decode"]
    for p in (AbsorbMLA(), LowerMoE(), Quantize()):
        program = p.run(program, ctx)
    before = pm.run(program, tm.weights, feed)
    after = SelectLayout().run(program, ctx)
    verify(after)
    expect = quant.K32_BLOCKED if quant_name in ("int8", "int4") else quant.ROWMAJOR
    for ref in after.weights():
        want = expect if ref.fmt.dtype in (DType.I8, DType.I4) else quant.ROWMAJOR
        assert ref.fmt.layout == want
        stored = tm.weights.encoded(ref.name)
        if want != quant.ROWMAJOR:
            assert stored[0] == ref.fmt and set(stored[1]) == {"blocks", "shape"}
    out = pm.run(after, tm.weights, feed)
    for k in before:                                            # bit-identical: a layout only moves bytes
        assert np.array_equal(out[k], before[k])
    if expect == quant.K32_BLOCKED:
        assert f"{quant_name[0]}{quant_name[3]}<1x32>@k32-blocked" in format_program(after)
    # back to the interpreter's layout: rowmajor again, same values
    back = SelectLayout().run(after, tm.ctx(quant=quant_name, target="interp"))
    assert all(ref.fmt.layout == quant.ROWMAJOR for ref in back.weights())
    assert all(np.array_equal(v, before[k]) for k, v in pm.run(back, tm.weights, feed).items())


def test_interp_target_changes_nothing():
    tm = pm.tiny()
    ctx = tm.ctx(quant="int8", target="interp")
    program = Quantize().run(tm.programs["decode"], ctx)
    assert SelectLayout().run(program, ctx).outputs == program.outputs
    assert ctx.facts["select-layout"]["decode"]["layouts"]["i8@rowmajor"] > 0


def test_weight_missing_from_the_store_in_its_format_is_an_error():
    tm = pm.tiny()
    program = Quantize().run(tm.programs["decode"], tm.ctx(quant="int8"))
    fresh = pm.tiny()                                           # a store that never saw the quantize pass
    with pytest.raises(IRError, match="run 'quantize' first"):
        SelectLayout().run(program, fresh.ctx(target="cpu"))
