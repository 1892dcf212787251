"""`quantize`: give every matrix weight the storage format asked for with --quant, encoded at compile time.

Quantization is a format, not an op: the graph keeps its LINEAR/MOE/MATMUL nodes and only the WEIGHT leaves'
`WeightFormat` changes; kernels dequantize in registers. Which weights (found by structure, not by name):

  matrix weights   the weight operand of LINEAR (batched ones too: MLA's absorbed W_UK / W_UV), the expert weights
                   of MOE / GROUPED_SWIGLU, and WEIGHT operands of MATMUL. This covers every Linear inside the
                   layers and lm_head.
  router           excluded: the LINEAR weights that feed a MOE's routing operands (idx, w) without another
                   LINEAR in between, i.e. mlp.gate.weight. Routing decisions are discrete; they stay exact.
  embedding        a weight only GATHERed (embed_tokens when untied): f32 under --quant f32, bf16 under
                   bf16/int8/int4. One row is read per token, so its format costs no bandwidth, only memory, and
                   bf16 keeps the checkpoint's (bf16) values exact. A tied table is a matrix weight.
  everything else  unchanged: norm weights, the gate's e_score_correction_bias, rope tables.

ctx.quant None keeps every weight's checkpoint format (FP8 stays block-FP8: no dequantized copy exists);
ctx.quant in {f32, bf16, int8, int4} re-encodes from the weight's exact f32 value (ir/quant.py documents the
bytes). int8/int4 LINEAR and expert weights get `act=8` (their input rows are rounded to int8 per 32, see
WeightFormat.act); weights also read another way (MATMUL operands, a GATHERed tied table) keep f32 activations. A weight already stored in the target encoding (another program of the same compile got there first)
is reused, never re-rounded.

Invariant: the graph is unchanged except for WEIGHT formats; every WEIGHT's format has a codec and, where it is
not plain f32, ctx.weights holds its parts in exactly that format, so the interpreter decodes what kernels read.
"""
from __future__ import annotations

import dataclasses
from collections import Counter

from dzc.errors import InputError
from dzc.ir import quant
from dzc.ir.dtypes import DType
from dzc.ir.node import Node, WeightFormat, WeightRef
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.passes.base import PassContext
from dzc.passes.rewrite import graph_rewrite

MATRIX, ROUTER, EMBEDDING, OTHER = "matrix", "router", "embedding", "other"
EMBEDDING_FORMATS = {"f32": quant.F32, "bf16": quant.BF16, "int8": quant.BF16, "int4": quant.BF16}
_EXPERT_OPS = {Op.MOE: 3, Op.GROUPED_SWIGLU: 3}  # op -> index of its first expert weight


def _router_weights(routing: list[Node]) -> set[str]:
    """Weights of the LINEARs reached from routing operands without passing through another LINEAR's input."""
    found: set[str] = set()
    seen: set[int] = set()
    stack = list(routing)
    while stack:
        node = stack.pop()
        if id(node) in seen:
            continue
        seen.add(id(node))
        if node.op == Op.LINEAR:
            found.add(node.src[1].arg.name)
            continue  # the router reads activations; everything upstream of them is not routing
        if node.op in (Op.MOE, Op.GROUPED_SWIGLU, Op.MATMUL, Op.GATHER):
            continue
        stack.extend(node.src)
    return found


def weight_roles(program: Program) -> dict[str, str]:
    """name -> MATRIX | ROUTER | EMBEDDING | OTHER for every weight of `program` (see the module docstring)."""
    roles: dict[str, set[str]] = {}
    routing: list[Node] = []
    for node in program.toposort():
        if node.op == Op.WEIGHT:
            roles.setdefault(node.arg.name, set())
        elif node.op == Op.LINEAR:
            roles.setdefault(node.src[1].arg.name, set()).add(MATRIX)
        elif node.op in _EXPERT_OPS:
            for w in node.src[_EXPERT_OPS[node.op]:]:
                roles.setdefault(w.arg.name, set()).add(MATRIX)
        elif node.op == Op.MATMUL:
            for s in node.src:
                if s.op == Op.WEIGHT:
                    roles.setdefault(s.arg.name, set()).add(MATRIX)
        elif node.op == Op.GATHER and node.src[0].op == Op.WEIGHT:
            roles.setdefault(node.src[0].arg.name, set()).add(EMBEDDING)
        if node.op == Op.MOE:
            routing += [node.src[1], node.src[2]]
        elif node.op in (Op.MOE_SORT, Op.MOE_OFFSETS):
            routing.append(node.src[0])
        elif node.op == Op.GROUPED_SWIGLU:
            routing.append(node.src[1])
    routers = _router_weights(routing)
    out = {}
    for name, kinds in roles.items():
        out[name] = ROUTER if name in routers else MATRIX if MATRIX in kinds else EMBEDDING if kinds else OTHER
    return out


def _read_other_than_linear(program: Program) -> set[str]:
    """Weights some op reads other than as a LINEAR's or expert op's weight operand (MATMUL, GATHER of a tied
    table): their activations stay f32 and their layout stays the plain one every reader understands."""
    out: set[str] = set()
    for node in program.toposort():
        first = 1 if node.op == Op.LINEAR else _EXPERT_OPS.get(node.op)
        for i, s in enumerate(node.src):
            if s.op == Op.WEIGHT and (first is None or i < first):
                out.add(s.arg.name)
    return out


def target_format(quant_name: str) -> WeightFormat:
    fmt = quant.QUANT_FORMATS.get(quant_name)
    if fmt is None:
        raise InputError(f"--quant {quant_name!r} is not supported (supported: {', '.join(quant.QUANT_FORMATS)})")
    return fmt


def store_as(ctx: PassContext, ref: WeightRef, fmt: WeightFormat) -> WeightFormat:
    """Make ctx.weights hold `ref` in `fmt` (any layout if already encoded so); returns the format it now has."""
    stored = ctx.weights.encoded(ref.name)
    if stored is not None and quant.same_encoding(stored[0], fmt):
        return dataclasses.replace(stored[0], act=fmt.act)
    if stored is None and fmt.dtype == DType.F32:
        return fmt  # the store already serves this weight's exact f32 values
    value = ctx.weights.f32(ref.name)
    ctx.weights.define_encoded(ref.name, fmt, quant.encode(value, fmt), quant.codec_for(fmt))
    return fmt


class Quantize:
    name = "quantize"
    description = ("re-encode matrix weights (Linear, experts, lm_head, absorbed MLA) into --quant f32|bf16|int8|int4; "
                   "without --quant keep checkpoint formats (FP8 stays FP8); router, norms, bias never")

    def run(self, program: Program, ctx: PassContext) -> Program:
        roles = weight_roles(program)
        if ctx.quant is None:
            for ref in program.weights():
                quant.codec_for(ref.fmt)  # every checkpoint format must be decodable
            out = program
        else:
            wanted = {MATRIX: target_format(ctx.quant), EMBEDDING: EMBEDDING_FORMATS[ctx.quant]}
            float_inputs = _read_other_than_linear(program)

            def rule(node: Node, _ctx) -> Node | None:
                fmt = wanted.get(roles[node.arg.name])
                if fmt is None:
                    return None
                if node.arg.name in float_inputs:
                    fmt = dataclasses.replace(fmt, act=0)   # e.g. MATMUL's activations stay f32 (WeightFormat.act)
                new_fmt = store_as(ctx, node.arg, fmt)
                return None if new_fmt == node.arg.fmt else node.replace(arg=WeightRef(node.arg.name, new_fmt))

            out = graph_rewrite(program, {Op.WEIGHT: [rule]})
        formats = Counter(str(ref.fmt) for ref in out.weights())
        facts = ctx.facts.setdefault(self.name, {})
        facts[program.name] = {"quant": ctx.quant, "formats": dict(sorted(formats.items())),
                               "roles": dict(sorted(Counter(roles.values()).items()))}
        facts["summary"] = f"{program.name}: " + ", ".join(f"{n} {f}" for f, n in sorted(formats.items()))
        return out

    @staticmethod
    def lossy(ctx: PassContext) -> bool:
        """True when this run rounds weights on purpose (--quant bf16/int8/int4): outputs move by the quantization
        error, so a pass-by-pass numeric check (--verify-passes) re-baselines after it instead of comparing."""
        return ctx.quant not in (None, "f32")


PASS = Quantize()
