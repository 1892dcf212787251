"""What every GPU target shares: kernels split into launches, host-side grid sizes, legal vector widths.

A kir `Kernel` becomes one or more *launches*, in order:

  * each top-level `Loop(parallel=True)` is one launch whose global thread index is the loop's iteration number
    (`i = start + gid * step`, threads with `i >= stop` do nothing);
  * each maximal run of other top-level statements is one launch of a single thread.

Top-level `Let`s whose values depend only on T, P and constants are a *prelude* copied into every launch (a
parallel loop's bounds may use them). The runtime enqueues a kernel's launches back to back on one in-order
queue, so their order is the statements' order.

`Launch.iterations` is the loop's trip count as a host expression (`host_expr`, JSON over T and P), which the
runtimes evaluate with `eval_host` to size the grid; `Launch.group > 1` asks for that many threads per
iteration (cooperative reductions; see c_style.py). A launch may carry `alt`, a cooperative variant of itself
that a runtime prefers on GPUs (OpenCL keeps both: on CPU devices one thread per iteration is faster).

`legalize_lanes(kernel, max_lanes)` rewrites vectors wider than a target's widest native vector (OpenCL 8,
Metal 4) into chunks of at most that many lanes, so renderers only ever see native vector types.
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any, Optional

from dzc.codegen import kir
from dzc.codegen.kir import (
    DT, E, Assign, If, Kernel, Let, Local, Loop, Param, Prefetch, Store, Var, walk_expr, walk_stmts,
    stmt_exprs)
from dzc.errors import CompileError


# ---- host-side integer expressions (grid sizes) ---------------------------------------------------------------------
_HOST_OPS = ("add", "sub", "mul", "div", "mod", "max", "min")


def host_expr(e: E, env: Optional[dict[str, E]] = None) -> Any:
    """A kir integer expression over T, P and constants as JSON: ints, "T"/"P", or [op, a, b]."""
    env = env or {}
    if e.op == "const" and e.dtype.is_int:
        return int(e.arg)
    if e.op == "var":
        if e.arg in ("T", "P"):
            return e.arg
        if e.arg in env:
            return host_expr(env[e.arg], env)
    if e.op == "cast" and e.dtype.is_int and e.src[0].dtype.is_int:
        return host_expr(e.src[0], env)
    if e.op in _HOST_OPS and e.dtype.count == 1:
        return [e.op, host_expr(e.src[0], env), host_expr(e.src[1], env)]
    raise CompileError(f"a GPU grid size must depend only on T and P; got {e.op!r} ({e.arg!r})")


def eval_host(j: Any, T: int, P: int) -> int:
    """Evaluate a `host_expr` with C semantics (division truncates toward zero)."""
    if isinstance(j, int):
        return j
    if j == "T":
        return T
    if j == "P":
        return P
    op, a, b = j[0], eval_host(j[1], T, P), eval_host(j[2], T, P)
    if op == "add": return a + b
    if op == "sub": return a - b
    if op == "mul": return a * b
    if op == "max": return max(a, b)
    if op == "min": return min(a, b)
    q = abs(a) // abs(b) * (1 if (a >= 0) == (b >= 0) else -1)
    return q if op == "div" else a - q * b


def trip_count(loop: Loop) -> E:
    span = loop.stop - loop.start
    return span if loop.step == 1 else (span + (loop.step - 1)) // loop.step


# ---- launches -------------------------------------------------------------------------------------------------------
_IDENT = re.compile(r"[^A-Za-z0-9_]")


def c_name(name: str) -> str:
    out = _IDENT.sub("_", name)
    return out if out and not out[0].isdigit() else "k_" + out


@dataclass
class Launch:
    """One device kernel launch: a parallel loop (`loop`) or a single thread running `body`."""

    name: str                    # device function name
    kernel: str                  # the kir kernel it belongs to
    params: list[Param]
    prelude: list                # pure top-level Lets (T/P only), emitted first in every launch
    body: list                   # [loop] for a parallel launch, the statements for a serial one
    loop: Optional[Loop] = None
    iterations: Any = 1          # host_expr of the trip count
    group: int = 1               # threads per iteration (>1: cooperative reduction)
    coop: Any = None             # the cooperative plan (c_style.coop_plan), when group > 1
    shared: int = 0              # bytes of threadgroup memory the runtime provides (Metal)
    alt: Optional["Launch"] = None   # a cooperative variant (same iterations, group > 1)

    def grid(self, T: int, P: int) -> int:
        return max(0, eval_host(self.iterations, T, P))

    def manifest(self) -> dict:
        out = {"name": self.name, "iterations": self.iterations, "group": self.group, "shared": self.shared}
        if self.alt is not None:
            out["coop"] = self.alt.manifest()
        return out


def _pure_tp(e: E, known: set[str]) -> bool:
    for x in walk_expr(e):
        if x.op == "load":
            return False
        if x.op == "var" and x.arg not in ("T", "P") and x.arg not in known:
            return False
    return True


def _names_used(stmts: list) -> set[str]:
    out: set[str] = set()
    for st in walk_stmts(stmts):
        for e in stmt_exprs(st):
            for x in walk_expr(e):
                if x.op == "var":
                    out.add(x.arg)
                elif x.op == "load" and x.arg.local:
                    out.add(x.arg.name)
        if isinstance(st, Assign):
            out.add(st.name)
        if isinstance(st, Store) and st.buf.local:
            out.add(st.buf.name)
    return out


def _names_defined(stmts: list) -> set[str]:
    out: set[str] = set()
    for st in stmts:
        if isinstance(st, (Let, Var)):
            out.add(st.name)
        elif isinstance(st, Local):
            out.add(st.buf.name)
    return out


def strip_hints(body: list) -> list:
    """The statements without CPU prefetch hints (GPU renderers ignore them)."""
    out = []
    for s in body:
        if isinstance(s, Prefetch):
            continue
        if isinstance(s, Loop):
            s = Loop(s.var, s.start, s.stop, strip_hints(s.body), s.step, s.parallel, s.grain)
        elif isinstance(s, If):
            s = If(s.cond, strip_hints(s.then), strip_hints(s.orelse))
        out.append(s)
    return out


def split_launches(k: Kernel) -> list[Launch]:
    """Cut a kernel into launches (module doc). Serial runs that share names across a parallel loop are an error.
    Prefetch hints are dropped."""
    k = Kernel(k.name, k.params, strip_hints(k.body), k.kind)
    prelude: list = []
    known: set[str] = set()
    groups: list[tuple[str, list]] = []
    for st in k.body:
        if isinstance(st, Let) and _pure_tp(st.value, known) and not groups:
            prelude.append(st)
            known.add(st.name)
            continue
        if isinstance(st, Loop) and st.parallel:
            groups.append(("par", [st]))
        elif groups and groups[-1][0] == "ser":
            groups[-1][1].append(st)
        else:
            groups.append(("ser", [st]))
    defined_before: set[str] = set()
    for kind, stmts in groups:
        if kind == "ser":
            leak = (_names_used(stmts) - _names_defined(stmts)) & defined_before
            if leak:
                raise CompileError(f"kernel {k.name}: names {sorted(leak)} cross a parallel loop; GPU targets "
                                   f"cannot share registers between launches")
            defined_before |= _names_defined(stmts)
    base = "dzc_" + c_name(k.name)     # never a builtin's name (OpenCL/Metal have exp, step, clamp, ...)
    out = []
    for n, (kind, stmts) in enumerate(groups):
        name = base if len(groups) == 1 else f"{base}_{n}"
        if kind == "par":
            loop = stmts[0]
            env = {st.name: st.value for st in prelude}
            out.append(Launch(name, k.name, k.params, prelude, stmts, loop, host_expr(trip_count(loop), env)))
        else:
            out.append(Launch(name, k.name, k.params, prelude, stmts))
    if not out:
        out.append(Launch(base, k.name, k.params, prelude, []))
    return out


def written_buffers(stmts: list) -> set[str]:
    return {st.buf.name for st in walk_stmts(stmts) if isinstance(st, Store) and not st.buf.local}


# ---- vector legalisation --------------------------------------------------------------------------------------------
# Two renderer-internal ops appear only after legalisation: "vec" (concatenate lanes of its operands, in order)
# and "vslice" (lanes [arg, arg + count) of its operand).

def vec(parts: list[E]) -> E:
    n = sum(p.dtype.count for p in parts)
    return parts[0] if len(parts) == 1 else E("vec", parts[0].dtype.scalar.vec(n), tuple(parts))


def vslice(x: E, start: int, count: int) -> E:
    if start == 0 and count == x.dtype.count:
        return x
    return E("vslice", x.dtype.scalar.vec(count), (x,), start)


class _Legalizer:
    def __init__(self, max_lanes: int) -> None:
        self.m = max_lanes
        self.memo: dict[int, tuple[E, list[E]]] = {}
        self.wide: dict[str, DT] = {}            # names of split Vars/Lets -> original type

    def sizes(self, n: int) -> list[int]:
        return [min(self.m, n - s) for s in range(0, n, self.m)]

    def chunks(self, e: E) -> list[E]:
        hit = self.memo.get(id(e))
        if hit is not None:
            return hit[1]
        out = self._chunks(e)
        self.memo[id(e)] = (e, out)
        return out

    def one(self, e: E) -> E:
        c = self.chunks(e)
        assert len(c) == 1, (e, len(c))
        return c[0]

    def _chunks(self, e: E) -> list[E]:
        op, dt = e.op, e.dtype
        sizes = self.sizes(dt.count)
        if op == "const":
            return [e]
        if op == "var":
            if e.arg in self.wide:
                return [kir.var(f"{e.arg}__{j}", dt.scalar.vec(n)) for j, n in enumerate(sizes)]
            return [e]
        if op == "load":
            idx = self.one(e.src[0])
            if len(sizes) == 1:
                return [e if idx is e.src[0] else kir.load(e.arg, idx, dt.count)]
            return [kir.load(e.arg, idx + j * self.m, n) for j, n in enumerate(sizes)]
        if op == "bcast":
            x = self.one(e.src[0])
            return [kir.bcast(x, n) for n in sizes]
        if op in ("vreduce_add", "vreduce_max"):
            parts = [E(op, dt, (c,)) if c.dtype.count > 1 else c for c in self.chunks(e.src[0])]
            acc = parts[0]
            for p in parts[1:]:
                acc = acc + p if op == "vreduce_add" else kir.maximum(acc, p)
            return [acc]
        if op == "gep":
            src = self.chunks(e.src[0])
            return [kir.lane(src[e.arg // self.m], e.arg % self.m) if len(src) > 1 else E("gep", dt, (src[0],), e.arg)]
        if op == "bitcast":
            return self._bitcast(e)
        if op == "vslice":
            return self._slice(self.chunks(e.src[0]), e.arg, dt.count)
        if op == "vec":
            flat = [c for s in e.src for c in self.chunks(s)]
            return self._regroup(flat, sizes)
        srcs = [self.chunks(s) for s in e.src]
        if len(sizes) == 1 and all(len(s) == 1 for s in srcs):
            new = tuple(s[0] for s in srcs)
            return [e if all(a is b for a, b in zip(new, e.src)) else E(op, dt, new, e.arg)]
        out = []
        for j, n in enumerate(sizes):
            parts = tuple(s[j] if len(s) > 1 else s[0] for s in srcs)
            out.append(E(op, dt.scalar.vec(n), parts, e.arg))
        return out

    def _slice(self, chunks: list[E], start: int, count: int) -> list[E]:
        """Lanes [start, start+count) of a chunked value, as chunks of at most m lanes."""
        pieces, pos = [], 0
        for c in chunks:
            n = c.dtype.count
            lo, hi = max(start, pos), min(start + count, pos + n)
            if lo < hi:
                pieces.append(vslice(c, lo - pos, hi - lo))
            pos += n
        return self._regroup(pieces, self.sizes(count))

    def _regroup(self, pieces: list[E], sizes: list[int]) -> list[E]:
        out, cur, have = [], [], 0
        queue = list(pieces)
        for n in sizes:
            cur, have = [], 0
            while have < n:
                p = queue.pop(0)
                take = min(p.dtype.count, n - have)
                cur.append(vslice(p, 0, take))
                if take < p.dtype.count:
                    queue.insert(0, vslice(p, take, p.dtype.count - take))
                have += take
            out.append(vec(cur))
        return out

    def _bitcast(self, e: E) -> list[E]:
        src = self.chunks(e.src[0])
        dst = e.dtype
        bd, bs = dst.bits, e.src[0].dtype.bits
        if len(src) == 1 and dst.count <= self.m:
            return [E("bitcast", dst, (src[0],))]
        pieces: list[E] = []          # bitcast slices of the source, each at most m destination lanes
        for c in src:
            n = c.dtype.count
            if bs >= bd:
                step = max(1, min(n, self.m * bd // bs))
            else:
                if (n * bs) % bd:
                    raise CompileError(f"cannot split bitcast {e.src[0].dtype} -> {dst} into {self.m}-lane vectors")
                step = n
            for s in range(0, n, step):
                piece = vslice(c, s, step)
                pieces.append(E("bitcast", dst.scalar.vec(step * bs // bd), (piece,)))
        return self._regroup(pieces, self.sizes(dst.count))

    # ---- statements ------------------------------------------------------------------------------------------------
    def stmts(self, body: list) -> list:
        out: list = []
        for s in body:
            out.extend(self.stmt(s))
        return out

    def stmt(self, s) -> list:
        if isinstance(s, Loop):
            return [Loop(s.var, self.one(s.start), self.one(s.stop), self.stmts(s.body), s.step, s.parallel, s.grain)]
        if isinstance(s, If):
            return [If(self.one(s.cond), self.stmts(s.then), self.stmts(s.orelse))]
        if isinstance(s, Local):
            return [s]
        if isinstance(s, Prefetch):
            return []
        if isinstance(s, Store):
            idx = self.one(s.index)
            vals = self.chunks(s.value)
            if len(vals) == 1:
                return [Store(s.buf, idx, vals[0])]
            out, off = [], 0
            for v in vals:
                out.append(Store(s.buf, idx + off, v))
                off += v.dtype.count
            return out
        if isinstance(s, (Let, Var, Assign)):
            value = s.init if isinstance(s, Var) else s.value
            vals = self.chunks(value)
            if isinstance(s, Assign):
                if s.name not in self.wide:
                    return [Assign(s.name, vals[0])]
                return [Assign(f"{s.name}__{j}", v) for j, v in enumerate(vals)]
            if len(vals) == 1 and value.dtype.count <= self.m:
                return [type(s)(s.name, vals[0])]
            self.wide[s.name] = value.dtype
            return [type(s)(f"{s.name}__{j}", v) for j, v in enumerate(vals)]
        raise CompileError(f"unknown kernel statement {s!r}")


def legalize_lanes(k: Kernel, max_lanes: int) -> Kernel:
    """The same kernel with no value wider than `max_lanes` lanes (module doc)."""
    widest = 1
    for st in walk_stmts(k.body):
        for e in stmt_exprs(st):
            for x in walk_expr(e):
                widest = max(widest, x.dtype.count)
    if widest <= max_lanes:
        return k
    return Kernel(k.name, k.params, _Legalizer(max_lanes).stmts(k.body), k.kind)
