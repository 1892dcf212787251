"""Build IR by running ordinary model code on symbolic tensors.

`Tensor` wraps a `Node` and overloads Python operators, so `dzc/model` reads like numpy code while each
operation appends a typed node. Python scalars become f32/i32 constants of the other operand's dtype.
"""
from __future__ import annotations

from typing import Sequence, Union

from dzc.ir.dtypes import DType
from dzc.ir.infer import make
from dzc.ir.node import Node, WeightFormat, WeightRef
from dzc.ir.ops import Op
from dzc.ir.shapes import Dim, Shape

Operand = Union["Tensor", int, float]


class Tensor:
    __slots__ = ("node",)

    def __init__(self, node: Node) -> None:
        self.node = node

    # ---- type information
    @property
    def shape(self) -> Shape:
        return self.node.shape

    @property
    def dtype(self) -> DType:
        return self.node.dtype

    @property
    def ndim(self) -> int:
        return self.node.ndim

    # ---- construction helpers
    def _apply(self, op: Op, *others: Operand, arg=None) -> "Tensor":
        src = [self.node] + [self._lift(o).node for o in others]
        return Tensor(make(op, src, arg))

    def _lift(self, value: Operand) -> "Tensor":
        return value if isinstance(value, Tensor) else const(value, self.dtype)

    # ---- elementwise
    def __add__(self, o: Operand) -> "Tensor": return self._apply(Op.ADD, o)
    def __radd__(self, o: Operand) -> "Tensor": return self._lift(o)._apply(Op.ADD, self)
    def __sub__(self, o: Operand) -> "Tensor": return self._apply(Op.SUB, o)
    def __rsub__(self, o: Operand) -> "Tensor": return self._lift(o)._apply(Op.SUB, self)
    def __mul__(self, o: Operand) -> "Tensor": return self._apply(Op.MUL, o)
    def __rmul__(self, o: Operand) -> "Tensor": return self._lift(o)._apply(Op.MUL, self)
    def __truediv__(self, o: Operand) -> "Tensor": return self._apply(Op.DIV, o)
    def __rtruediv__(self, o: Operand) -> "Tensor": return self._lift(o)._apply(Op.DIV, self)
    def __neg__(self) -> "Tensor": return self._apply(Op.NEG)
    def __lt__(self, o: Operand) -> "Tensor": return self._apply(Op.CMPLT, o)  # type: ignore[override]
    def __matmul__(self, o: "Tensor") -> "Tensor": return self._apply(Op.MATMUL, o)

    def maximum(self, o: Operand) -> "Tensor": return self._apply(Op.MAX, o)
    def exp(self) -> "Tensor": return self._apply(Op.EXP)
    def log(self) -> "Tensor": return self._apply(Op.LOG)
    def sqrt(self) -> "Tensor": return self._apply(Op.SQRT)
    def rsqrt(self) -> "Tensor": return self._apply(Op.RSQRT)
    def reciprocal(self) -> "Tensor": return self._apply(Op.RECIP)
    def sigmoid(self) -> "Tensor": return self._apply(Op.SIGMOID)
    def silu(self) -> "Tensor": return self._apply(Op.SILU)
    def cos(self) -> "Tensor": return self._apply(Op.COS)
    def sin(self) -> "Tensor": return self._apply(Op.SIN)
    def cast(self, dtype: DType) -> "Tensor": return self if dtype == self.dtype else self._apply(Op.CAST, arg=dtype)

    def where(self, if_true: Operand, if_false: Operand) -> "Tensor":
        """self is a bool mask."""
        t = if_true if isinstance(if_true, Tensor) else None
        f = if_false if isinstance(if_false, Tensor) else None
        like = (t or f)
        assert like is not None, "where needs at least one tensor branch"
        return Tensor(make(Op.WHERE, [self.node, like._lift(if_true).node, like._lift(if_false).node]))

    # ---- reductions (keepdims)
    def sum(self, axis: int = -1) -> "Tensor": return self._apply(Op.SUM, arg=axis)
    def max(self, axis: int = -1) -> "Tensor": return self._apply(Op.RMAX, arg=axis)

    def mean(self, axis: int = -1) -> "Tensor":
        n = self.shape[axis]
        assert isinstance(n, int), "mean over a symbolic axis"
        return self.sum(axis) * (1.0 / n)

    def softmax(self, axis: int = -1) -> "Tensor":
        e = (self - self.max(axis)).exp()
        return e / e.sum(axis)

    # ---- movement
    def reshape(self, *shape: Dim) -> "Tensor": return self._apply(Op.RESHAPE, arg=tuple(shape))
    def permute(self, *order: int) -> "Tensor": return self._apply(Op.PERMUTE, arg=tuple(order))
    def expand(self, *shape: Dim) -> "Tensor": return self._apply(Op.EXPAND, arg=tuple(shape))

    def transpose(self, a: int = -2, b: int = -1) -> "Tensor":
        order = list(range(self.ndim))
        order[a], order[b] = order[b], order[a]
        return self.permute(*order)

    def slice(self, axis: int, start: Dim, stop: Dim) -> "Tensor":
        return self._apply(Op.SLICE, arg=(axis, start, stop))

    def split(self, axis: int, sizes: Sequence[int]) -> list["Tensor"]:
        out, start = [], 0
        for size in sizes:
            out.append(self.slice(axis, start, start + size))
            start += size
        return out


# ---- leaves and multi-operand ops
def input_(name: str, dtype: DType, shape: Shape) -> Tensor:
    return Tensor(Node(Op.INPUT, dtype, tuple(shape), (), name))


def weight(name: str, fmt: WeightFormat, shape: Shape) -> Tensor:
    """Weights compute as f32 whatever their storage: kernels dequantize in registers (the format is a layout)."""
    return Tensor(Node(Op.WEIGHT, DType.F32, tuple(shape), (), WeightRef(name, fmt)))


def const(value: Union[int, float], dtype: DType = DType.F32) -> Tensor:
    value = float(value) if dtype.is_float else int(value)
    return Tensor(Node(Op.CONST, dtype, (), (), value))


def arange(n: Dim) -> Tensor:
    return Tensor(Node(Op.ARANGE, DType.I32, (n,), ()))


def concat(tensors: Sequence[Tensor], axis: int) -> Tensor:
    return Tensor(make(Op.CONCAT, [t.node for t in tensors], axis))


def gather(table: Tensor, idx: Tensor) -> Tensor:
    return Tensor(make(Op.GATHER, [table.node, idx.node]))


def take(x: Tensor, idx: Tensor) -> Tensor:
    return Tensor(make(Op.TAKE, [x.node, idx.node]))


def topk(x: Tensor, k: int) -> Tensor:
    return Tensor(make(Op.TOPK, [x.node], k))


def linear(x: Tensor, w: Tensor) -> Tensor:
    return Tensor(make(Op.LINEAR, [x.node, w.node]))


def moe(x: Tensor, idx: Tensor, w: Tensor, experts: Sequence[tuple[Tensor, Tensor, Tensor]]) -> Tensor:
    src = [x.node, idx.node, w.node] + [t.node for e in experts for t in e]
    return Tensor(make(Op.MOE, src, len(experts)))
