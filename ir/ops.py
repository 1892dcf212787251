"""The op set. One enum, grouped by phase like tinygrad's: what the tracer emits, and what passes introduce.

Traced programs use only the primitive groups. Passes raise recognised subgraphs into FUSED_* ops (one kernel
each) and lower high-level ops (MOE) into the forms a code generator consumes.
"""
from __future__ import annotations

from enum import Enum, auto


class Op(Enum):
    # leaves
    INPUT = auto()       # arg: input name; a runtime value (token ids, positions, cache rows)
    WEIGHT = auto()      # arg: WeightRef; a named constant tensor held by the weight store
    CONST = auto()       # arg: python scalar; shape () (broadcast by consumers)
    ARANGE = auto()      # arg: None; shape (n,), values 0..n-1 (n may be symbolic)
    # elementwise
    NEG = auto(); EXP = auto(); LOG = auto(); SQRT = auto(); RSQRT = auto(); RECIP = auto()
    SIGMOID = auto(); SILU = auto(); COS = auto(); SIN = auto()
    CAST = auto()        # arg: target DType
    ADD = auto(); SUB = auto(); MUL = auto(); DIV = auto(); MAX = auto(); CMPLT = auto()
    WHERE = auto()
    # reductions over one axis, keepdims (arg: axis)
    SUM = auto(); RMAX = auto()
    # movement
    RESHAPE = auto()     # arg: new shape
    PERMUTE = auto()     # arg: axis order
    EXPAND = auto()      # arg: new shape (broadcast size-1 dims)
    SLICE = auto()       # arg: (axis, start, stop); start/stop may be symbolic
    CONCAT = auto()      # arg: axis
    # indexing and selection
    GATHER = auto()      # src: (table [N, ...], idx int [...]); rows of table: shape idx.shape + table.shape[1:]
    TAKE = auto()        # src: (x [..., n], idx int [..., k]); take_along_axis on the last axis
    TOPK = auto()        # arg: k; indices (i32) of the k largest along the last axis, largest first
    # linear algebra
    MATMUL = auto()      # batched a[..., m, k] @ b[..., k, n] (numpy broadcasting on batch dims)
    LINEAR = auto()      # x[..., K] @ W[N, K]^T with W a WEIGHT in any storage format; or batched,
                         #   x[B, M, K] @ W[B, N, K]^T per b (MLA's absorbed per-head matrices)
    MOE = auto()         # src: (x [T,H], idx [T,k], w [T,k], gate_0, up_0, down_0, ...): routed SwiGLU experts
    # fused kernels introduced by passes
    RMSNORM = auto()     # src: (x, weight); arg: eps
    SOFTMAX = auto()     # arg: axis
    SWIGLU = auto()      # src: (gate, up); silu(gate) * up
    ROPE = auto()        # src: (x [..., d], cos [.., d/2], sin [.., d/2]); interleaved-pair rotation
    ATTENTION = auto()   # src: (q [N,H,D], k [S,Hk,D], v [S,Hk,Dv], positions i32[N]); arg: scale. Hk in {1, H}.
                         #   causal: query i sees key j iff j <= positions[i]
    MLA_ATTENTION = auto()  # src: (q_lat [N,H,C], q_pe [N,H,R], latent [S,C], k_pe [S,R], positions i32[N]);
                            #   arg: scale. score = q_lat.latent + q_pe.k_pe; out = softmax(score) @ latent [N,H,C]
    KERNEL = auto()      # src: the fused chain's operands; arg: FusedBody (an elementwise graph over them)
    # grouped MoE (passes/lower_moe.py lowers prefill MOE into these); arg of each: E, the number of routed experts
    MOE_SORT = auto()        # src: (idx i32[N,k]); i32[N*k]: flat slots s = n*k + j ordered by expert idx.flat[s],
                             #   ties by s (a stable counting sort)
    MOE_OFFSETS = auto()     # src: (idx i32[N,k]); i32[E+1]: offsets[e] = #slots with expert < e, so expert e owns
                             #   sorted rows offsets[e] .. offsets[e+1]-1
    GROUPED_SWIGLU = auto()  # src: (xs [R,H], ws [R], offsets i32[E+1], gate_0, up_0, down_0, ...): row r of expert
                             #   e's range -> ws[r] * down_e(silu(gate_e xs[r]) * up_e xs[r]); [R, down rows]
    SCATTER_ADD = auto()     # src: (base [N,...], index i32[R], rows [R,...]); base + rows summed into rows index[r]


LEAVES = frozenset({Op.INPUT, Op.WEIGHT, Op.CONST, Op.ARANGE})
UNARY = frozenset({Op.NEG, Op.EXP, Op.LOG, Op.SQRT, Op.RSQRT, Op.RECIP, Op.SIGMOID, Op.SILU, Op.COS, Op.SIN,
                   Op.CAST})
BINARY = frozenset({Op.ADD, Op.SUB, Op.MUL, Op.DIV, Op.MAX, Op.CMPLT})
ELEMENTWISE = UNARY | BINARY | {Op.WHERE}
REDUCE = frozenset({Op.SUM, Op.RMAX})
MOVEMENT = frozenset({Op.RESHAPE, Op.PERMUTE, Op.EXPAND, Op.SLICE, Op.CONCAT})
FUSED = frozenset({Op.RMSNORM, Op.SOFTMAX, Op.SWIGLU, Op.ROPE, Op.ATTENTION, Op.MLA_ATTENTION, Op.KERNEL})
