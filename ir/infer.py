"""Type rules: the dtype and shape each op produces from its operands.

Used by the tracer to build nodes and by the verifier to re-check every node after a pass. A rule raises
`IRError` when operands do not fit, naming the op and the offending shapes.
"""
from __future__ import annotations

from typing import Any, Callable, Sequence

from dzc.errors import IRError
from dzc.ir.dtypes import DType
from dzc.ir.node import Node, WeightRef
from dzc.ir.ops import BINARY, Op, REDUCE, UNARY
from dzc.ir.shapes import Dim, Shape, format_shape, numel

Rule = Callable[[Sequence[Node], Any], tuple[DType, Shape]]
_RULES: dict[Op, Rule] = {}


def rule(*ops: Op) -> Callable[[Rule], Rule]:
    def register(fn: Rule) -> Rule:
        for op in ops:
            _RULES[op] = fn
        return fn
    return register


def infer(op: Op, src: Sequence[Node], arg: Any) -> tuple[DType, Shape]:
    try:
        return _RULES[op](src, arg)
    except IRError:
        raise
    except (ValueError, IndexError, TypeError) as exc:
        raise IRError(f"{op.name.lower()}: {exc}") from None


def make(op: Op, src: Sequence[Node], arg: Any = None) -> Node:
    """Build a node with its inferred type."""
    dtype, shape = infer(op, src, arg)
    return Node(op, dtype, shape, tuple(src), arg)


def _fail(op: str, msg: str, *nodes: Node) -> IRError:
    shapes = ", ".join(f"{n.dtype}{format_shape(n.shape)}" for n in nodes)
    return IRError(f"{op}: {msg} (operands {shapes})")


def broadcast_shapes(a: Shape, b: Shape) -> Shape:
    out: list[Dim] = []
    for i in range(max(len(a), len(b))):
        x = a[len(a) - 1 - i] if i < len(a) else 1
        y = b[len(b) - 1 - i] if i < len(b) else 1
        if x == y or y == 1:
            out.append(x)
        elif x == 1:
            out.append(y)
        else:
            raise ValueError(f"cannot broadcast {format_shape(a)} with {format_shape(b)}")
    return tuple(reversed(out))


def _axis(axis: int, ndim: int) -> int:
    if not -ndim <= axis < ndim:
        raise ValueError(f"axis {axis} out of range for rank {ndim}")
    return axis % ndim


@rule(*UNARY)
def _unary(src, arg):
    (x,) = src
    return (arg if isinstance(arg, DType) else x.dtype), x.shape


@rule(*BINARY)
def _binary(src, arg):
    a, b = src
    if a.dtype != b.dtype:
        raise _fail("binary op", "dtypes differ", a, b)
    return a.dtype, broadcast_shapes(a.shape, b.shape)


def _cmplt(src, arg):
    return DType.BOOL, _binary(src, arg)[1]


_RULES[Op.CMPLT] = _cmplt


@rule(Op.WHERE)
def _where(src, arg):
    c, a, b = src
    if c.dtype != DType.BOOL or a.dtype != b.dtype:
        raise _fail("where", "needs (bool, T, T)", c, a, b)
    return a.dtype, broadcast_shapes(c.shape, broadcast_shapes(a.shape, b.shape))


@rule(*REDUCE)
def _reduce(src, axis):
    (x,) = src
    ax = _axis(axis, x.ndim)
    return x.dtype, x.shape[:ax] + (1,) + x.shape[ax + 1:]


@rule(Op.RESHAPE)
def _reshape(src, shape):
    (x,) = src
    if numel(x.shape) != numel(tuple(shape)):
        raise _fail("reshape", f"element count differs from {format_shape(shape)}", x)
    return x.dtype, tuple(shape)


@rule(Op.PERMUTE)
def _permute(src, order):
    (x,) = src
    if sorted(order) != list(range(x.ndim)):
        raise _fail("permute", f"{order} is not a permutation", x)
    return x.dtype, tuple(x.shape[i] for i in order)


@rule(Op.EXPAND)
def _expand(src, shape):
    (x,) = src
    if len(shape) != x.ndim or any(a != b and a != 1 for a, b in zip(x.shape, shape)):
        raise _fail("expand", f"cannot expand to {format_shape(shape)}", x)
    return x.dtype, tuple(shape)


@rule(Op.SLICE)
def _slice(src, arg):
    (x,) = src
    axis, start, stop = arg
    ax = _axis(axis, x.ndim)
    return x.dtype, x.shape[:ax] + (stop - start,) + x.shape[ax + 1:]


@rule(Op.CONCAT)
def _concat(src, axis):
    first = src[0]
    ax = _axis(axis, first.ndim)
    total: Dim = 0
    for s in src:
        if s.dtype != first.dtype or s.ndim != first.ndim or any(
                a != b for i, (a, b) in enumerate(zip(s.shape, first.shape)) if i != ax):
            raise _fail("concat", "operands differ off the concat axis", *src)
        total = total + s.shape[ax]
    return first.dtype, first.shape[:ax] + (total,) + first.shape[ax + 1:]


@rule(Op.GATHER)
def _gather(src, arg):
    table, idx = src
    if idx.dtype != DType.I32:
        raise _fail("gather", "indices must be i32", table, idx)
    return table.dtype, idx.shape + table.shape[1:]


@rule(Op.TAKE)
def _take(src, arg):
    x, idx = src
    if idx.dtype != DType.I32 or x.ndim != idx.ndim or x.shape[:-1] != idx.shape[:-1]:
        raise _fail("take", "needs x[..., n] and i32 idx[..., k] with equal leading dims", x, idx)
    return x.dtype, idx.shape


@rule(Op.TOPK)
def _topk(src, k):
    (x,) = src
    if not isinstance(x.shape[-1], int) or not 0 < k <= x.shape[-1]:
        raise _fail("topk", f"k={k} does not fit the last axis", x)
    return DType.I32, x.shape[:-1] + (k,)


@rule(Op.MATMUL)
def _matmul(src, arg):
    a, b = src
    if a.dtype != b.dtype or a.ndim < 2 or b.ndim < 2 or a.shape[-1] != b.shape[-2]:
        raise _fail("matmul", "needs [..., m, k] @ [..., k, n]", a, b)
    batch = broadcast_shapes(a.shape[:-2], b.shape[:-2])
    return a.dtype, batch + (a.shape[-2], b.shape[-1])


@rule(Op.LINEAR)
def _linear(src, arg):
    x, w = src
    plain = w.ndim == 2
    batched = w.ndim == 3 and x.ndim == 3 and x.shape[0] == w.shape[0]
    if w.op != Op.WEIGHT or not (plain or batched) or x.shape[-1] != w.shape[-1] or x.dtype != DType.F32:
        raise _fail("linear", "needs f32 x[..., K] and a weight W[N, K], or x[B, M, K] and W[B, N, K]", x, w)
    return DType.F32, x.shape[:-1] + (w.shape[-2],)


@rule(Op.MOE)
def _moe(src, n_experts):
    x, idx, w, *experts = src
    if len(experts) != 3 * n_experts or idx.shape != w.shape or idx.shape[:-1] != x.shape[:-1]:
        raise _fail("moe", f"needs x, idx, w and 3 weights for each of {n_experts} experts", x, idx, w)
    return x.dtype, x.shape


@rule(Op.RMSNORM)
def _rmsnorm(src, eps):
    x, w = src
    if w.shape != x.shape[-1:]:
        raise _fail("rmsnorm", "weight must match the last axis", x, w)
    return x.dtype, x.shape


@rule(Op.SOFTMAX)
def _softmax(src, axis):
    (x,) = src
    _axis(axis, x.ndim)
    return x.dtype, x.shape


@rule(Op.SWIGLU)
def _swiglu(src, arg):
    return _binary(src, arg)


@rule(Op.ROPE)
def _rope(src, arg):
    x, cos, sin = src
    half = x.shape[-1] // 2 if isinstance(x.shape[-1], int) else None
    if half is None or cos.shape[-1] != half or cos.shape != sin.shape:
        raise _fail("rope", "needs x[..., d] with cos/sin [..., d/2]", x, cos, sin)
    return x.dtype, x.shape


@rule(Op.ATTENTION)
def _attention(src, scale):
    q, k, v, pos = src
    n, h, d = q.shape
    if k.ndim != 3 or k.shape[2] != d or k.shape[1] not in (1, h) or v.shape[:2] != k.shape[:2] or pos.shape != (n,):
        raise _fail("attention", "needs q[N,H,D], k[S,Hk,D], v[S,Hk,Dv], positions[N] with Hk 1 or H", q, k, v, pos)
    return q.dtype, (n, h, v.shape[2])


@rule(Op.MLA_ATTENTION)
def _mla_attention(src, scale):
    q_lat, q_pe, latent, k_pe, pos = src
    n, h, c = q_lat.shape
    if (q_pe.shape[:2] != (n, h) or latent.shape[1] != c or k_pe.shape[0] != latent.shape[0]
            or k_pe.shape[1] != q_pe.shape[2] or pos.shape != (n,)):
        raise _fail("mla_attention", "needs q_lat[N,H,C], q_pe[N,H,R], latent[S,C], k_pe[S,R], positions[N]",
                    q_lat, q_pe, latent, k_pe, pos)
    return q_lat.dtype, (n, h, c)


@rule(Op.KERNEL)
def _kernel(src, body):
    return body.out.dtype, body.out.shape


def leaf_type_ok(node: Node) -> bool:
    """Leaves are typed at construction; check their args are of the right kind."""
    if node.op == Op.WEIGHT:
        return isinstance(node.arg, WeightRef) and node.dtype == DType.F32
    if node.op == Op.ARANGE:
        return node.ndim == 1 and node.dtype == DType.I32
    if node.op == Op.CONST:
        return node.shape == ()
    return isinstance(node.arg, str)




# ---- grouped MoE (passes/lower_moe.py) -----------------------------------------------------------------------------
def _routing(op: str, idx: Node, n_experts: Any) -> None:
    if (idx.dtype != DType.I32 or idx.ndim != 2 or not isinstance(idx.shape[1], int)
            or not isinstance(n_experts, int) or n_experts < 1):
        raise _fail(op, f"needs i32 idx[N, k] and a positive expert count (got {n_experts!r})", idx)


@rule(Op.MOE_SORT)
def _moe_sort(src, n_experts):
    (idx,) = src
    _routing("moe_sort", idx, n_experts)
    return DType.I32, (numel(idx.shape),)


@rule(Op.MOE_OFFSETS)
def _moe_offsets(src, n_experts):
    (idx,) = src
    _routing("moe_offsets", idx, n_experts)
    return DType.I32, (n_experts + 1,)


@rule(Op.GROUPED_SWIGLU)
def _grouped_swiglu(src, n_experts):
    xs, ws, offsets, *experts = src
    ok = (xs.dtype == DType.F32 and xs.ndim == 2 and ws.dtype == DType.F32 and ws.shape == xs.shape[:1]
          and offsets.dtype == DType.I32 and offsets.shape == (n_experts + 1,) and len(experts) == 3 * n_experts)
    if ok:
        gate, up, down = experts[:3]
        ok = all(w.ndim == 2 for w in experts) and gate.shape[1] == xs.shape[1] and down.shape[1] == gate.shape[0]
        ok = ok and all(experts[i].shape == experts[i % 3].shape for i in range(len(experts))) and up.shape == gate.shape
    if not ok:
        raise _fail("grouped_swiglu", f"needs f32 xs[R,H], ws[R], i32 offsets[{n_experts}+1] and gate/up [I,H], "
                    f"down [H',I] for each of {n_experts} experts", xs, ws, offsets, *experts[:3])
    return DType.F32, (xs.shape[0], experts[2].shape[0])


@rule(Op.SCATTER_ADD)
def _scatter_add(src, arg):
    base, index, rows = src
    if index.dtype != DType.I32 or index.ndim != 1 or rows.shape[:1] != index.shape or rows.shape[1:] != base.shape[1:] \
            or rows.dtype != base.dtype:
        raise _fail("scatter_add", "needs base[N, ...], i32 index[R], rows[R, ...] of base's dtype", base, index, rows)
    return base.dtype, base.shape
