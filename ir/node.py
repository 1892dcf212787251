"""The one node type of the IR.

A `Node` is an immutable, typed SSA value: `op`, `dtype`, `shape`, `src` (operand nodes) and `arg` (static
data). Nodes are hash-consed: constructing the same (op, dtype, shape, src, arg) twice returns the same object,
so identity is equality and common-subexpression elimination falls out of construction.
"""
from __future__ import annotations

import weakref
from dataclasses import dataclass
from typing import Any, Optional

from dzc.ir.dtypes import DType
from dzc.ir.ops import Op
from dzc.ir.shapes import Shape


@dataclass(frozen=True)
class WeightFormat:
    """How a weight is stored: element type, quantization block and layout. Part of the weight's IR type.

    `block` is the scale block (rows, cols) for block-scaled formats (FP8 128x128, int8/int4 (1, 32) groups) and
    None for plain floats. `layout` names the arrangement kernels read ("rowmajor" = [N, K], K contiguous).
    `act` is part of the consuming op's semantics: 0 keeps its input in f32; 8 means a LINEAR (or expert
    projection) reading this weight first rounds each input row to int8 per 32 consecutive elements
    (ir/quant.py: quantize_activations), so integer dot-product instructions compute it exactly. Printed `+a8`.
    """

    dtype: DType
    block: Optional[tuple[int, int]] = None
    layout: str = "rowmajor"
    act: int = 0

    def __str__(self) -> str:
        text = str(self.dtype)
        if self.block:
            text += f"<{self.block[0]}x{self.block[1]}>"
        if self.layout != "rowmajor":
            text += f"@{self.layout}"
        if self.act:
            text += f"+a{self.act}"
        return text


@dataclass(frozen=True)
class WeightRef:
    """A named weight. `name` is its key in the weight store (the checkpoint name unless a pass derived it)."""

    name: str
    fmt: WeightFormat

    def __str__(self) -> str:
        return f'"{self.name}" {self.fmt}'


@dataclass(frozen=True)
class FusedBody:
    """The body of a KERNEL node: an elementwise graph whose leaves are INPUT nodes named "in0".."inK-1"
    (typed like the KERNEL's operands, in order) plus CONSTs, and whose value is `out`. Shapes broadcast."""

    out: "Node"

    def __str__(self) -> str:
        return "fused"


class Node:
    __slots__ = ("op", "dtype", "shape", "src", "arg", "__weakref__")
    _cache: "weakref.WeakValueDictionary[tuple, Node]" = weakref.WeakValueDictionary()

    op: Op
    dtype: DType
    shape: Shape
    src: tuple["Node", ...]
    arg: Any

    def __new__(cls, op: Op, dtype: DType, shape: Shape, src: tuple["Node", ...] = (), arg: Any = None) -> "Node":
        key = (op, dtype, tuple(shape), tuple(id(s) for s in src), _hashable(arg))
        hit = cls._cache.get(key)
        if hit is not None:
            return hit
        node = object.__new__(cls)
        object.__setattr__(node, "op", op)
        object.__setattr__(node, "dtype", dtype)
        object.__setattr__(node, "shape", tuple(shape))
        object.__setattr__(node, "src", tuple(src))
        object.__setattr__(node, "arg", arg)
        cls._cache[key] = node
        return node

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("IR nodes are immutable; build a new node instead")

    def __reduce__(self):  # nodes are rebuilt through the cache, never copied
        return (Node, (self.op, self.dtype, self.shape, self.src, self.arg))

    @property
    def ndim(self) -> int:
        return len(self.shape)

    def replace(self, **changes: Any) -> "Node":
        fields = dict(op=self.op, dtype=self.dtype, shape=self.shape, src=self.src, arg=self.arg)
        fields.update(changes)
        return Node(**fields)

    def __repr__(self) -> str:
        return f"Node({self.op.name}, {self.dtype}, {list(self.shape)}, arg={self.arg!r}, nsrc={len(self.src)})"


def _hashable(arg: Any) -> Any:
    # CONST args distinguish 1 from 1.0 and -0.0 from 0.0: keep the type in the key.
    if isinstance(arg, float):
        return (float, arg.hex())
    if isinstance(arg, (list, tuple)):
        return tuple(_hashable(a) for a in arg)
    return arg
