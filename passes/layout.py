"""`select-layout`: store each weight in the byte layout its target's kernels read fastest.

A layout only permutes a format's bytes (ir/quant.py documents each one), so values never change:
decode(parts in the new layout) == decode(rowmajor parts), bit for bit. The table, per ctx.target:

  cpu      i8<1x32>, i4<1x32>  -> k32-blocked  (scale then its 32 values, per group: one streaming SIMD loop)
           f32, bf16, f16      -> rowmajor     ([N, K], K contiguous: a GEMV row is one contiguous run)
           fp8e4m3<128x128>    -> rowmajor     (the checkpoint's own bytes; one scale per 128-column run)
  interp and every other target: rowmajor for every format (GPU back ends add their entries here).

Below this IR-level choice, the CPU code generator interleaves rows of int8/int4 weights with int8 activations
(WeightFormat.act = 8) in tiles of 16 for AVX-512 VNNI (codegen/layout.py): a per-CPU detail of the same bytes.

Invariant: every WEIGHT's format has the layout the table gives for its dtype on ctx.target, and ctx.weights
holds its parts in that layout; the graph and all values are unchanged.
"""
from __future__ import annotations

from collections import Counter

from dzc.errors import IRError
from dzc.ir import quant
from dzc.ir.dtypes import DType
from dzc.ir.node import Node, WeightFormat, WeightRef
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.passes.base import PassContext
from dzc.passes.rewrite import graph_rewrite

TARGET_LAYOUTS: dict[str, dict[DType, str]] = {
    "cpu": {DType.I8: quant.K32_BLOCKED, DType.I4: quant.K32_BLOCKED},
    "interp": {},
}


def layout_for(target: str, fmt: WeightFormat) -> str:
    return TARGET_LAYOUTS.get(target, {}).get(fmt.dtype, quant.ROWMAJOR)


def store_in_layout(ctx: PassContext, ref: WeightRef, layout: str) -> WeightFormat:
    """Re-arrange `ref`'s parts in ctx.weights into `layout`; returns the new format."""
    fmt = quant.with_layout(ref.fmt, layout)
    stored = ctx.weights.encoded(ref.name)
    if stored is not None and quant.same_encoding(stored[0], ref.fmt):
        if stored[0].layout != layout:
            parts = quant.relayout(stored[1], stored[0], layout)
            ctx.weights.define_encoded(ref.name, fmt, parts, quant.codec_for(fmt))
        return fmt
    parts = quant.encode_exact(ctx.weights.f32(ref.name), fmt)  # plain floats: exact by construction
    if parts is None:
        raise IRError(f"select-layout: weight {ref.name!r} is typed {ref.fmt} but the weight store does not hold it "
                      f"in that format; run 'quantize' first")
    ctx.weights.define_encoded(ref.name, fmt, parts, quant.codec_for(fmt))
    return fmt


class SelectLayout:
    name = "select-layout"
    description = "store each weight in its target's fastest layout (cpu: int8/int4 k32-blocked, rest rowmajor)"

    def run(self, program: Program, ctx: PassContext) -> Program:
        def rule(node: Node, _ctx) -> Node | None:
            ref: WeightRef = node.arg
            layout = layout_for(ctx.target, ref.fmt)
            if layout == ref.fmt.layout:
                return None
            return node.replace(arg=WeightRef(ref.name, store_in_layout(ctx, ref, layout)))

        out = graph_rewrite(program, {Op.WEIGHT: [rule]})
        layouts = Counter(f"{ref.fmt.dtype}@{ref.fmt.layout}" for ref in out.weights())
        facts = ctx.facts.setdefault(self.name, {})
        facts[program.name] = {"target": ctx.target, "layouts": dict(sorted(layouts.items()))}
        counts = ", ".join(f"{n} {k}" for k, n in sorted(layouts.items()))
        facts["summary"] = f"{program.name} on {ctx.target}: {counts}"
        return out


PASS = SelectLayout()
