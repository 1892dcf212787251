"""A small DSL for writing kernels: `with kb.loop(...) as i:` blocks append statements to the current body.

    kb = KernelBuilder("scale", kind="elementwise")
    x, y = kb.buf("x", F32), kb.buf("y", F32)
    with kb.loop(0, kb.T * 4, parallel=True) as i:
        kb.store(y, i, x[i] * 2.0)
    kernel = kb.build()

Every kernel gets the scalar parameters T and P after its buffers, so all kernels share one calling convention.
"""
from __future__ import annotations

from contextlib import contextmanager
from typing import Iterator

from dzc.codegen.kir import (
    Assign, Buf, DT, E, I64, If, Kernel, Let, Local, Loop, Operand, Param, Prefetch, Store, Var, _lift, var)


class Reg:
    """A mutable register declared with `KernelBuilder.reg`; read it as `.v`, write it with `kb.set`."""

    def __init__(self, name: str, dtype: DT) -> None:
        self.name = name
        self.dtype = dtype

    @property
    def v(self) -> E:
        return var(self.name, self.dtype)


class KernelBuilder:
    def __init__(self, name: str, kind: str = "") -> None:
        self.name = name
        self.kind = kind
        self.bufs: list[Buf] = []
        self._stack: list[list] = [[]]
        self._count = 0
        self.T = var("T", I64)
        self.P = var("P", I64)

    def fresh(self, base: str) -> str:
        self._count += 1
        return f"{base}{self._count}"

    def buf(self, name: str, dtype: DT) -> Buf:
        b = Buf(name, dtype)
        self.bufs.append(b)
        return b

    def emit(self, stmt) -> None:
        self._stack[-1].append(stmt)

    @contextmanager
    def loop(self, start: Operand, stop: Operand, step: int = 1, parallel: bool = False, grain: int = 1,
             name: str = "i") -> Iterator[E]:
        if parallel:
            assert len(self._stack) == 1, "parallel loops only at the kernel's top level"
        body: list = []
        v = self.fresh(name)
        self._stack.append(body)
        try:
            yield var(v, I64)
        finally:
            self._stack.pop()
        self.emit(Loop(v, _lift(start, None), _lift(stop, None), body, step, parallel, grain))

    @contextmanager
    def if_(self, cond: E) -> Iterator[None]:
        body: list = []
        self._stack.append(body)
        try:
            yield
        finally:
            self._stack.pop()
        self.emit(If(cond, body))

    @contextmanager
    def if_else(self, cond: E) -> Iterator[tuple]:
        """with kb.if_else(c) as (then, orelse): with then: ...; with orelse: ..."""
        node = If(cond, [], [])

        @contextmanager
        def branch(body: list) -> Iterator[None]:
            self._stack.append(body)
            try:
                yield
            finally:
                self._stack.pop()
        yield branch(node.then), branch(node.orelse)
        self.emit(node)

    def let(self, value: Operand, name: str = "v") -> E:
        value = _lift(value, None)
        if value.op in ("const", "var"):
            return value
        n = self.fresh(name)
        self.emit(Let(n, value))
        return var(n, value.dtype)

    def reg(self, init: Operand, name: str = "acc") -> Reg:
        init = _lift(init, None)
        r = Reg(self.fresh(name), init.dtype)
        self.emit(Var(r.name, init))
        return r

    def set(self, reg: Reg, value: Operand) -> None:
        value = _lift(value, reg.v)
        assert value.dtype == reg.dtype, (value.dtype, reg.dtype)
        self.emit(Assign(reg.name, value))

    def local(self, dtype: DT, size: int, name: str = "tmp") -> Buf:
        b = Buf(self.fresh(name), dtype, local=True)
        self.emit(Local(b, size))
        return b

    def store(self, buf: Buf, index: Operand, value: Operand) -> None:
        index = _lift(index, None)
        value = _lift(value, None) if not isinstance(value, E) else value
        if not isinstance(value, E) or value.dtype.name != buf.dtype.name:
            raise TypeError(f"store of {getattr(value, 'dtype', value)} into {buf.name}: {buf.dtype}")
        self.emit(Store(buf, index, value))

    def prefetch(self, buf: Buf, index: Operand) -> None:
        self.emit(Prefetch(buf, _lift(index, None)))

    def build(self) -> Kernel:
        assert len(self._stack) == 1
        params = [Param(b.name, b) for b in self.bufs] + [Param("T"), Param("P")]
        return Kernel(self.name, params, self._stack[0], self.kind)
