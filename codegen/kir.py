"""The kernel representation every code generator renders (LLVM for CPUs and NVPTX, C-style for OpenCL/Metal).

A `Kernel` is a function over buffer pointers and the run-time integers `T` and `P`. Its body is a short list of
structured statements (`Loop`, `Store`, `Let`, `Var`/`Assign` for mutable registers, `If`, `Local` arrays) over
typed expressions `E`. Every expression has a `DT`: a scalar element type and a lane count, so kernels say
explicitly when they compute on `<16 x float>` vectors; a renderer maps lanes to its native vector type (or
scalarises them). Indices are i64 element offsets (not bytes).

Parallelism is one marker: a top-level `Loop(parallel=True)` whose iterations may run on different threads (CPU:
a phase the libgomp team shares; GPU renderers: the global thread index). Its body may read only the kernel's parameters and
its own loop variable, so a renderer can outline it without capturing anything else.

A `Module` is what one compile produces: the kernels and, per program, the schedule (`Call`s of kernels on buffer
slots) that the entry function `dzc_<program>(void **buffers, int64 T, int64 P)` runs back to back.
"""
from __future__ import annotations

import math
import struct
from dataclasses import dataclass, field
from typing import Any, Iterator, Optional, Sequence, Union

# ---- element types ------------------------------------------------------------------------------------------------
SCALARS = ("bool", "i8", "u8", "i16", "u16", "i32", "u32", "i64", "f16", "f32")
_BYTES = {"bool": 1, "i8": 1, "u8": 1, "i16": 2, "u16": 2, "i32": 4, "u32": 4, "i64": 8, "f16": 2, "f32": 4}


@dataclass(frozen=True)
class DT:
    """A scalar type name plus a lane count (count 1 = scalar)."""

    name: str
    count: int = 1

    def __post_init__(self) -> None:
        assert self.name in SCALARS, self.name

    def vec(self, n: int) -> "DT":
        return DT(self.name, n)

    @property
    def scalar(self) -> "DT":
        return DT(self.name, 1)

    @property
    def is_float(self) -> bool:
        return self.name in ("f16", "f32")

    @property
    def is_signed(self) -> bool:
        return self.name in ("i8", "i16", "i32", "i64")

    @property
    def is_int(self) -> bool:
        return not self.is_float and self.name != "bool"

    @property
    def itemsize(self) -> int:
        return _BYTES[self.name]

    @property
    def bits(self) -> int:
        return 1 if self.name == "bool" else 8 * _BYTES[self.name]

    def __str__(self) -> str:
        return self.name if self.count == 1 else f"{self.name}x{self.count}"


BOOL, I8, U8, I16, U16, I32, U32, I64, F16, F32 = (DT(n) for n in SCALARS)


# ---- buffers --------------------------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Buf:
    """A pointer parameter of a kernel (`local=False`) or a stack array declared by `Local` (`local=True`)."""

    name: str
    dtype: DT
    local: bool = False

    def __getitem__(self, index: "Operand") -> "E":
        return load(self, index)


# ---- expressions ----------------------------------------------------------------------------------------------------
Operand = Union["E", int, float, bool]

UNARY_OPS = ("neg", "exp", "log", "sqrt", "sin", "cos", "not", "round")   # round: to nearest, ties to even
BINARY_OPS = ("add", "sub", "mul", "div", "mod", "max", "min", "and", "or", "xor", "shl", "shr")
COMPARE_OPS = ("lt", "le", "eq", "ne")


class E:
    """An expression: op, result type, operands and a static argument. Immutable; build with the helpers below
    or Python operators (`a + b`, `a * 2`, `a < b`, `a // b`, `a % b`, `a & b`, `a << 3`)."""

    __slots__ = ("op", "dtype", "src", "arg")

    def __init__(self, op: str, dtype: DT, src: tuple = (), arg: Any = None) -> None:
        object.__setattr__(self, "op", op)
        object.__setattr__(self, "dtype", dtype)
        object.__setattr__(self, "src", tuple(src))
        object.__setattr__(self, "arg", arg)

    def __setattr__(self, name: str, value: Any) -> None:
        raise AttributeError("kernel expressions are immutable")

    def __repr__(self) -> str:
        return f"E({self.op}, {self.dtype}, arg={self.arg!r}, nsrc={len(self.src)})"

    # arithmetic
    def __add__(self, o: Operand) -> "E": return alu("add", self, o)
    def __radd__(self, o: Operand) -> "E": return alu("add", o, self)
    def __sub__(self, o: Operand) -> "E": return alu("sub", self, o)
    def __rsub__(self, o: Operand) -> "E": return alu("sub", o, self)
    def __mul__(self, o: Operand) -> "E": return alu("mul", self, o)
    def __rmul__(self, o: Operand) -> "E": return alu("mul", o, self)
    def __truediv__(self, o: Operand) -> "E": return alu("div", self, o)
    def __rtruediv__(self, o: Operand) -> "E": return alu("div", o, self)
    def __floordiv__(self, o: Operand) -> "E": return alu("div", self, o)
    def __mod__(self, o: Operand) -> "E": return alu("mod", self, o)
    def __and__(self, o: Operand) -> "E": return alu("and", self, o)
    def __or__(self, o: Operand) -> "E": return alu("or", self, o)
    def __xor__(self, o: Operand) -> "E": return alu("xor", self, o)
    def __lshift__(self, o: Operand) -> "E": return alu("shl", self, o)
    def __rshift__(self, o: Operand) -> "E": return alu("shr", self, o)
    def __neg__(self) -> "E": return unary("neg", self)
    def __lt__(self, o: Operand) -> "E": return alu("lt", self, o)
    def __le__(self, o: Operand) -> "E": return alu("le", self, o)
    def __gt__(self, o: Operand) -> "E": return alu("lt", o, self)
    def __ge__(self, o: Operand) -> "E": return alu("le", o, self)

    def eq(self, o: Operand) -> "E": return alu("eq", self, o)
    def ne(self, o: Operand) -> "E": return alu("ne", self, o)
    def cast(self, dt: DT) -> "E": return cast(self, dt)

    __hash__ = object.__hash__


def const(value: Union[int, float, bool], dtype: DT) -> E:
    if dtype.is_float:
        value = float(value)
    elif dtype.name == "bool":
        value = bool(value)
    else:
        value = int(value)
    c = E("const", dtype.scalar, (), value)
    return c if dtype.count == 1 else E("bcast", dtype, (c,))


def _lift(x: Operand, like: Optional[E]) -> E:
    if isinstance(x, E):
        return x
    if like is None:
        return const(x, F32 if isinstance(x, float) else I64)
    return const(x, like.dtype.scalar)


def _unify(a: E, b: E) -> tuple[E, E]:
    if a.dtype.count != b.dtype.count:
        if a.dtype.count == 1:
            a = bcast(a, b.dtype.count)
        elif b.dtype.count == 1:
            b = bcast(b, a.dtype.count)
        else:
            raise TypeError(f"lane counts differ: {a.dtype} vs {b.dtype}")
    if a.dtype.name != b.dtype.name:
        raise TypeError(f"operand types differ: {a.dtype} vs {b.dtype}")
    return a, b


def alu(op: str, a: Operand, b: Operand) -> E:
    ea = a if isinstance(a, E) else None
    eb = b if isinstance(b, E) else None
    a, b = _lift(a, eb), _lift(b, ea)
    a, b = _unify(a, b)
    folded = _fold(op, a, b)
    if folded is not None:
        return folded
    dtype = BOOL.vec(a.dtype.count) if op in COMPARE_OPS else a.dtype
    return E(op, dtype, (a, b))


def _fold(op: str, a: E, b: E) -> Optional[E]:
    """Light algebra on integer index math, so printed kernels stay readable (x*1, x+0, constant folding)."""
    if not a.dtype.is_int or a.dtype.count != 1:
        return None
    ca = a.arg if a.op == "const" else None
    cb = b.arg if b.op == "const" else None
    if ca is not None and cb is not None and op in ("add", "sub", "mul", "max", "min"):
        v = {"add": ca + cb, "sub": ca - cb, "mul": ca * cb, "max": max(ca, cb), "min": min(ca, cb)}[op]
        return const(v, a.dtype)
    if ca is not None and cb is not None and op in ("div", "mod") and cb > 0 and ca >= 0:
        return const(ca // cb if op == "div" else ca % cb, a.dtype)
    if op == "add" and ca == 0: return b
    if op in ("add", "sub") and cb == 0: return a
    if op == "mul" and (ca == 1): return b
    if op in ("mul", "div") and cb == 1: return a
    if op == "mul" and (ca == 0 or cb == 0): return const(0, a.dtype)
    if op == "mod" and cb == 1: return const(0, a.dtype)
    return None


def unary(op: str, x: E) -> E:
    return E(op, x.dtype, (x,))


def where(c: E, a: Operand, b: Operand) -> E:
    ea = a if isinstance(a, E) else None
    eb = b if isinstance(b, E) else None
    a, b = _lift(a, eb), _lift(b, ea)
    a, b = _unify(a, b)
    if c.dtype.count != a.dtype.count:
        if c.dtype.count == 1:
            c = bcast(c, a.dtype.count)
        else:
            a, b = bcast(a, c.dtype.count), bcast(b, c.dtype.count)
    return E("where", a.dtype, (c, a, b))


def fma(a: E, b: E, c: E) -> E:
    a, b = _unify(a, b)
    a, c = _unify(a, c)
    b, c = _unify(b, c)
    return E("fma", a.dtype, (a, b, c))


def cast(x: E, dt: DT) -> E:
    dt = dt.vec(x.dtype.count) if dt.count == 1 else dt
    if dt == x.dtype:
        return x
    if x.op == "const" and dt.count == 1:
        v = x.arg
        if dt.is_float:
            return const(float(v), dt)
        if dt.name == "bool":
            return const(bool(v), dt)
        if isinstance(v, float) and not math.isfinite(v):
            return E("cast", dt, (x,))
        return const(int(v), dt)
    return E("cast", dt, (x,))


def bitcast(x: E, dt: DT) -> E:
    dt = dt.vec(x.dtype.count) if dt.count == 1 else dt
    assert dt.bits * dt.count == x.dtype.bits * x.dtype.count, (x.dtype, dt)
    return E("bitcast", dt, (x,))


def bcast(x: E, n: int) -> E:
    assert x.dtype.count == 1
    return x if n == 1 else E("bcast", x.dtype.vec(n), (x,))


def load(buf: Buf, index: Operand, lanes: int = 1) -> E:
    """Load `lanes` consecutive elements of `buf` starting at element `index` (lanes > 1: one vector load)."""
    return E("load", buf.dtype.vec(lanes), (_lift(index, None),), buf)


def dot4(acc: E, a: E, b: E) -> E:
    """Integer dot products of byte quads: acc[i] + sum_j a[4i+j] * b[4i+j] for i32 lanes i, a's bytes unsigned
    (u8), b's signed (i8). One AVX-512 VNNI vpdpbusd for 16 lanes; renderers without it must not be handed one."""
    assert acc.dtype.name == "i32" and a.dtype == U8.vec(4 * acc.dtype.count) and b.dtype == I8.vec(4 * acc.dtype.count)
    return E("dot4", acc.dtype, (acc, a, b))


def reduce_add(x: E) -> E:
    return x if x.dtype.count == 1 else E("vreduce_add", x.dtype.scalar, (x,))


def reduce_max(x: E) -> E:
    return x if x.dtype.count == 1 else E("vreduce_max", x.dtype.scalar, (x,))


def lane(x: E, i: int) -> E:
    return E("gep", x.dtype.scalar, (x,), i)


def var(name: str, dtype: DT = I64) -> E:
    """A loop variable, a kernel scalar parameter (T, P), a `Let` name or a mutable `Var`."""
    return E("var", dtype, (), name)


def maximum(a: Operand, b: Operand) -> E: return alu("max", a, b)
def minimum(a: Operand, b: Operand) -> E: return alu("min", a, b)
def exp(x: E) -> E: return unary("exp", x)
def log(x: E) -> E: return unary("log", x)
def sqrt(x: E) -> E: return unary("sqrt", x)
def round_even(x: E) -> E: return unary("round", x)
def sin(x: E) -> E: return unary("sin", x)
def cos(x: E) -> E: return unary("cos", x)


def f32(v: float) -> E: return const(v, F32)
def i64(v: int) -> E: return const(v, I64)


def float_bits(value: float) -> int:
    """IEEE bits of a float32 value (renderers spell float constants exactly)."""
    return struct.unpack("<I", struct.pack("<f", value))[0]


# ---- statements -------------------------------------------------------------------------------------------------------
@dataclass
class Loop:
    """for var in range(start, stop, step): body. `parallel` only at a kernel's top level; `grain` is the least
    number of iterations worth a thread (the CPU renderer shares the loop only when the trip count allows two)."""

    var: str
    start: E
    stop: E
    body: list
    step: int = 1
    parallel: bool = False
    grain: int = 1


@dataclass
class Store:
    buf: Buf
    index: E
    value: E


@dataclass
class Let:
    """Bind an immutable name to a value for the rest of the enclosing block."""

    name: str
    value: E


@dataclass
class Var:
    """Declare a mutable register (accumulator) with an initial value."""

    name: str
    init: E


@dataclass
class Assign:
    name: str
    value: E


@dataclass
class If:
    cond: E
    then: list
    orelse: list = field(default_factory=list)


@dataclass
class Local:
    """A stack array of `size` elements of `buf.dtype`, addressable as `buf` for the rest of the block."""

    buf: Buf
    size: int


@dataclass
class Prefetch:
    """A hint that `buf[index]` will be read soon, into L2 (CPU targets; renderers may ignore it)."""

    buf: Buf
    index: E


Stmt = Union[Loop, Store, Let, Var, Assign, If, Local, Prefetch]


@dataclass
class Param:
    """A kernel parameter: a buffer pointer (`buf`) or an i64 scalar (`name` T / P)."""

    name: str
    buf: Optional[Buf] = None


@dataclass
class Kernel:
    name: str
    params: list[Param]
    body: list
    kind: str = ""          # what op it implements (for stats and printing)

    def buffers(self) -> list[Buf]:
        return [p.buf for p in self.params if p.buf is not None]


@dataclass
class Call:
    """Run `kernel` with its buffer params bound to slots (indices into the entry function's buffer table)."""

    kernel: str
    slots: list[int]


@dataclass
class Module:
    kernels: dict[str, Kernel] = field(default_factory=dict)
    entries: dict[str, list[Call]] = field(default_factory=dict)   # program name -> schedule

    def add(self, kernel: Kernel) -> str:
        """Add a kernel, reusing an identical one (same body text) under its existing name."""
        from dzc.codegen.printer import kernel_text
        key = (kernel.kind, kernel_text(kernel, name=False))
        by_text = self.__dict__.setdefault("_by_text", {})
        if key in by_text:
            return by_text[key]
        name, n = kernel.name, 1
        while name in self.kernels:
            n += 1
            name = f"{kernel.name}_{n}"
        kernel.name = name
        self.kernels[name] = kernel
        by_text[key] = name
        return name


# ---- walking ----------------------------------------------------------------------------------------------------------
def walk_stmts(body: Sequence) -> Iterator:
    for s in body:
        yield s
        if isinstance(s, Loop):
            yield from walk_stmts(s.body)
        elif isinstance(s, If):
            yield from walk_stmts(s.then)
            yield from walk_stmts(s.orelse)


def walk_expr(e: E, seen: Optional[set] = None) -> Iterator[E]:
    seen = set() if seen is None else seen
    stack = [e]
    while stack:
        x = stack.pop()
        if id(x) in seen:
            continue
        seen.add(id(x))
        yield x
        stack.extend(x.src)


def stmt_exprs(s) -> list[E]:
    if isinstance(s, Loop):
        return [s.start, s.stop]
    if isinstance(s, Store):
        return [s.index, s.value]
    if isinstance(s, (Let, Var, Assign)):
        return [s.value if not isinstance(s, Var) else s.init]
    if isinstance(s, If):
        return [s.cond]
    if isinstance(s, Prefetch):
        return [s.index]
    return []
