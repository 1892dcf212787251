"""`lower-moe`: lower the routed-expert MOE op of many-token programs to sort -> grouped SwiGLU -> scatter-add.

    MOE(x[N,H], idx[N,k], w[N,k], gate_e, up_e, down_e ...)            (N symbolic: prefill)
 => slots   = MOE_SORT(idx)                          i32[N*k]  flat slots n*k+j, grouped by expert (stable)
    offsets = MOE_OFFSETS(idx)                       i32[E+1]  expert e owns sorted rows offsets[e]..offsets[e+1]
    tok     = GATHER(reshape(expand(arange(N)[:,None], [N,k]), [N*k]), slots)   token of each sorted row
    ws      = GATHER(reshape(w, [N*k]), slots)       routing weight of each sorted row
    ys      = GROUPED_SWIGLU(GATHER(x, tok), ws, offsets, gate_e, up_e, down_e ...)   [N*k, H]
    out     = SCATTER_ADD(zeros[N,H], tok, ys)

Each expert runs one matmul chain over its contiguous range of rows (a grouped GEMM), and only experts that
received rows do any work. A one-token program (decode, N == 1) keeps MOE: its semantics already touch only
the k selected experts, and the CPU code generator emits it as k indexed GEMVs with gate and up fused; sorting
one token's k slots would only add work.

Invariant: the program computes the same values (up to float summation order in the scatter); every MOE whose
token axis is not the constant 1 is gone, and ctx.facts['lower-moe'][program] says what was kept and lowered.
"""
from __future__ import annotations

from dzc.ir.dtypes import DType
from dzc.ir.infer import make
from dzc.ir.node import Node
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.ir.shapes import numel
from dzc.passes.base import PassContext
from dzc.passes.rewrite import graph_rewrite


def _const(value, dtype: DType) -> Node:
    return Node(Op.CONST, dtype, (), (), float(value) if dtype.is_float else int(value))


def lower_moe_node(node: Node) -> Node:
    """The grouped form of one MOE node (any token count)."""
    x, idx, w, *experts = node.src
    n_experts = node.arg
    n, k = idx.shape
    flat = numel(idx.shape)
    slots = make(Op.MOE_SORT, [idx], n_experts)
    offsets = make(Op.MOE_OFFSETS, [idx], n_experts)
    arange = Node(Op.ARANGE, DType.I32, (n,), ())
    token_of_slot = make(Op.RESHAPE, [make(Op.EXPAND, [make(Op.RESHAPE, [arange], (n, 1))], (n, k))], (flat,))
    tok = make(Op.GATHER, [token_of_slot, slots])
    ws = make(Op.GATHER, [make(Op.RESHAPE, [w], (flat,)), slots])
    ys = make(Op.GROUPED_SWIGLU, [make(Op.GATHER, [x, tok]), ws, offsets, *experts], n_experts)
    zeros = make(Op.EXPAND, [make(Op.RESHAPE, [_const(0.0, x.dtype)], (1,) * x.ndim)], x.shape)
    return make(Op.SCATTER_ADD, [zeros, tok, ys])


class LowerMoE:
    name = "lower-moe"
    description = "lower MOE to sort/offsets -> grouped SwiGLU -> scatter-add when N > 1; decode keeps k indexed GEMVs"

    def run(self, program: Program, ctx: PassContext) -> Program:
        counts = {"kept": 0, "lowered": 0}

        def rule(node: Node, _ctx) -> Node | None:
            if node.src[0].shape[0] == 1:
                counts["kept"] += 1
                return None
            counts["lowered"] += 1
            return lower_moe_node(node)

        out = graph_rewrite(program, {Op.MOE: [rule]})
        note = ("one token: MOE kept (k indexed GEMVs, gate/up fused)" if counts["kept"] and not counts["lowered"]
                else "grouped: MOE_SORT/MOE_OFFSETS -> GROUPED_SWIGLU -> SCATTER_ADD" if counts["lowered"]
                else "no MOE")
        facts = ctx.facts.setdefault(self.name, {})
        facts[program.name] = {**counts, "form": note}
        facts["summary"] = f"{program.name}: {counts['lowered']} MOE lowered, {counts['kept']} kept"
        return out


PASS = LowerMoE()
