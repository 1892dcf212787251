"""The C-style renderer: kir kernels -> C-family GPU source. OpenCL C and Metal are thin dialects of it.

Every launch of a kernel (gpu.py: a top-level parallel loop, or a run of serial statements) becomes one device
function `<kernel>[_<n>](buffers..., T, P)`. A parallel loop's iteration is the global thread index:

    const long gid_ = <thread index>;  const long i = start + gid_ * step;  if (i < stop) { body }

(the runtime rounds grids up, hence the guard; a cooperative launch has exactly one group per iteration and no
guard, so its barriers are never under a branch).

Expressions are written as typed `const` temporaries, one per kir node (a DAG node used twice is computed once),
and reused while valid: temporaries that read memory or mutable registers are forgotten after any store,
assignment, branch or loop, as in the LLVM renderer. Vectors keep their lane counts (gpu.legalize_lanes first
splits anything wider than the dialect's widest vector). Loads and stores of vectors use the dialect's unaligned
forms (OpenCL vloadN/vstoreN, Metal packed types).

Cooperative reductions (`group > 1`): when a parallel loop's body reduces over an inner loop (GEMV row sums,
norms, softmax sums), a whole group of `group` threads takes one iteration. Reduction loops are strided over the
group's lanes and each accumulator is combined with the dialect's group reduction (Metal: simd_sum/simd_max, plus
threadgroup memory across simdgroups; OpenCL: a local-memory tree). Loops that only write distinct elements are
strided too; other stores run on lane 0; barriers order writes before later reads. `coop_plan` decides whether a
body qualifies; kernels that do not keep one thread per iteration. Dialects with `dual = True` (OpenCL) emit
both forms (`<name>` and `<name>_coop`, the latter as `Launch.alt`) and the runtime picks per device; others
(Metal) emit only the cooperative one.

Dialects override the class attributes and a few hooks (signature, thread/group/lane index, barrier, group
reduction, vector load/store, and the spellings of compares, selects, casts, bitcasts, splats, lanes, slices and
vector constructors); everything else is shared.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Optional

import numpy as np

from dzc.codegen import kir
from dzc.codegen.gpu import Launch, c_name, legalize_lanes, split_launches, written_buffers
from dzc.codegen.kir import (
    DT, E, I64, Assign, Buf, If, Let, Local, Loop, Module, Store, Var, walk_expr, walk_stmts, stmt_exprs)
from dzc.errors import CompileError

_INFIX = {"add": "+", "sub": "-", "mul": "*", "div": "/", "and": "&", "or": "|", "xor": "^", "shl": "<<",
          "shr": ">>", "lt": "<", "le": "<=", "eq": "==", "ne": "!="}
_C_TYPES = {"bool": "bool", "i8": "char", "u8": "uchar", "i16": "short", "u16": "ushort", "i32": "int",
            "u32": "uint", "i64": "long", "f16": "half", "f32": "float"}
RESERVED = frozenset("""auto break case char const continue default do double else enum extern float for goto if
inline int long register restrict return short signed sizeof static struct switch typedef union unsigned void
volatile while bool true false half uchar ushort uint ulong kernel global local constant private device thread
threadgroup vertex fragment sampler texture read_only write_only read_write image2d_t namespace using template
class this new delete operator public protected private friend virtual explicit exp log sqrt sin cos fma fmax fmin
max min select fmod simd_sum simd_max barrier INFINITY NAN""".split())


def float_literal(v: float, suffix: str = "f") -> str:
    """The shortest decimal that rounds to the same float32 (inf/nan as INFINITY/NAN)."""
    if math.isnan(v):
        return "NAN"
    if math.isinf(v):
        return "INFINITY" if v > 0 else "(-INFINITY)"
    f = np.float32(v)
    for p in range(1, 10):
        s = "%.*g" % (p, float(f))
        if np.float32(float(s)) == f:
            break
    if "e" not in s and "." not in s and "n" not in s:
        s += ".0"
    return s + suffix


@dataclass
class GpuSource:
    """What a C-style or PTX render produces: device code text plus each kir kernel's launches."""

    target: str
    source: str
    launches: dict[str, list[Launch]]               # kir kernel name -> its launches, in order
    entries: dict[str, list[kir.Call]] = field(default_factory=dict)

    def manifest(self) -> dict:
        return {"target": self.target,
                "launches": {k: [l.manifest() for l in ls] for k, ls in self.launches.items()}}


# ---- cooperative plans ----------------------------------------------------------------------------------------------
@dataclass
class CoopPlan:
    """How a parallel body runs on a group: per top-level statement index, one of
    'all' (every lane, redundantly), 'reduce' (strided reduction loop), 'map' (strided store loop),
    'lane0' (stores done by lane 0); `reductions[idx]` = {var name: 'add' | 'max'}; `barrier_after` indices."""

    modes: list[str]
    reductions: dict[int, dict[str, str]]
    barrier_after: set[int]


def _reads(stmts: list) -> set[str]:
    out: set[str] = set()
    for st in walk_stmts(stmts):
        for e in stmt_exprs(st):
            for x in walk_expr(e):
                if x.op == "load" and not x.arg.local:
                    out.add(x.arg.name)
    return out


def _vars_read(e: E) -> set[str]:
    return {x.arg for x in walk_expr(e) if x.op == "var"}


def _reduction_form(a: Assign) -> Optional[tuple[str, E]]:
    """acc = acc + X | X + acc | fma(X, Y, acc) | max(acc, X) | max(X, acc): (op, X-ish expression)."""
    v, name = a.value, a.name

    def is_acc(x: E) -> bool:
        return x.op == "var" and x.arg == name
    if v.op == "add" and v.dtype.is_float or v.op == "add" and v.dtype.is_int:
        if is_acc(v.src[0]):
            return "add", v.src[1]
        if is_acc(v.src[1]):
            return "add", v.src[0]
    if v.op == "fma" and is_acc(v.src[2]):
        return "add", E("mul", v.dtype, v.src[:2])
    if v.op == "max":
        if is_acc(v.src[0]):
            return "max", v.src[1]
        if is_acc(v.src[1]):
            return "max", v.src[0]
    return None


def _plan_reduce(loop: Loop, outer_vars: set[str]) -> Optional[dict[str, str]]:
    """A loop whose only effects are reductions into outer accumulators (and its own registers)."""
    ops: dict[str, str] = {}
    inner = {st.name for st in walk_stmts(loop.body) if isinstance(st, (Let, Var))}
    for st in walk_stmts(loop.body):
        if isinstance(st, Store) or isinstance(st, Local):
            return None
        if isinstance(st, Assign) and st.name not in inner:
            if st.name not in outer_vars:
                return None
            form = _reduction_form(st)
            if form is None or ops.get(st.name, form[0]) != form[0]:
                return None
            ops[st.name] = form[0]
    if not ops:
        return None
    # accumulators are read only by their own update
    for st in walk_stmts(loop.body):
        for e in stmt_exprs(st):
            used = _vars_read(e) & set(ops)
            if not used:
                continue
            if isinstance(st, Assign) and st.name in ops:
                form = _reduction_form(st)
                if form is not None and not (_vars_read(form[1]) & set(ops)):
                    continue
            return None
    return ops


def _depends(e: E, name: str) -> bool:
    return name in _vars_read(e)


def _plan_map(loop: Loop, outer_vars: set[str]) -> bool:
    """A loop whose iterations write distinct elements (every store index uses the loop variable) and that reads
    what it writes only at the same index; it assigns no outer register."""
    inner = {st.name for st in walk_stmts(loop.body) if isinstance(st, (Let, Var))}
    stores: dict[str, set[str]] = {}
    from dzc.codegen.printer import expr_text
    for st in walk_stmts(loop.body):
        if isinstance(st, Assign) and st.name not in inner:
            return False
        if isinstance(st, Local):
            return False
        if isinstance(st, Store):
            if st.buf.local or not _depends(st.index, loop.var):
                return False
            stores.setdefault(st.buf.name, set()).add(expr_text(st.index) + f"#{st.value.dtype.count}")
    if not stores:
        return False
    for st in walk_stmts(loop.body):
        for e in stmt_exprs(st):
            for x in walk_expr(e):
                if x.op == "load" and x.arg.name in stores:
                    if expr_text(x.src[0]) + f"#{x.dtype.count}" not in stores[x.arg.name]:
                        return False
    return True


def coop_plan(loop: Loop) -> Optional[CoopPlan]:
    """Whether (and how) a parallel loop's body can run cooperatively (module doc); None: keep one thread."""
    body = loop.body
    outer_vars: set[str] = set()
    modes: list[str] = []
    reductions: dict[int, dict[str, str]] = {}
    for n, st in enumerate(body):
        if isinstance(st, (Let, Var)):
            modes.append("all")
            if isinstance(st, Var):
                outer_vars.add(st.name)
            continue
        if isinstance(st, Local):
            return None
        if isinstance(st, Loop):
            red = _plan_reduce(st, outer_vars)
            if red is not None:
                modes.append("reduce")
                reductions[n] = red
                continue
            if _plan_map(st, outer_vars):
                modes.append("map")
                continue
        has_store = any(isinstance(s, Store) for s in walk_stmts([st]))
        assigns = any(isinstance(s, Assign) and s.name in outer_vars for s in walk_stmts([st]))
        if isinstance(st, Assign):
            modes.append("all")
        elif has_store and assigns:
            return None
        elif has_store:
            modes.append("lane0")
        else:
            modes.append("all")
    if not any(m in ("reduce", "map") for m in modes):
        return None
    barrier_after: set[int] = set()
    for n, st in enumerate(body):
        if modes[n] in ("map", "lane0"):
            written = written_buffers([st])
            if written & _reads(body[n + 1:]):
                barrier_after.add(n)
    return CoopPlan(modes, reductions, barrier_after)


# ---- the renderer ---------------------------------------------------------------------------------------------------
class _Scope:
    def __init__(self) -> None:
        self.names: dict[str, tuple[str, DT, bool]] = {}
        self.memo: dict[int, tuple[E, str, bool]] = {}


class CStyleRenderer:
    """Module -> C-family source. One instance per render."""

    target = "c"
    max_lanes = 16
    fp16 = True                       # half arithmetic in registers (else f16 values live in float registers)
    group_size = 32                   # threads per iteration for cooperative launches (0: never cooperate)
    dual = False                      # emit both a one-thread and a cooperative function per eligible launch
    kernel_prefix = "void"
    header = ""

    def __init__(self, coop: Optional[bool] = None) -> None:
        self.coop = (self.group_size > 1) if coop is None else coop
        self.helpers: dict[str, str] = {}
        self.lines: list[str] = []
        self.scopes: list[_Scope] = []
        self.n = 0
        self.indent = 1
        self.launch: Optional[Launch] = None

    # ---- module ---------------------------------------------------------------------------------------------------
    def render(self, module: Module) -> GpuSource:
        funcs, launches = [], {}
        for k in module.kernels.values():
            kk = legalize_lanes(k, self.max_lanes)
            ls = split_launches(kk)
            for l in ls:
                plan = coop_plan(l.loop) if self.coop and l.loop is not None else None
                if plan is not None and not self._reducible(l.loop, plan):
                    plan = None
                if plan is not None and self.dual:
                    alt = dataclasses.replace(l, name=l.name + "_coop", coop=plan)
                    alt.group = self.group_for(alt)
                    l.alt = alt
                    funcs.append(self.render_launch(l))
                    funcs.append(self.render_launch(alt))
                    continue
                if plan is not None:
                    l.coop = plan
                    l.group = self.group_for(l)
                funcs.append(self.render_launch(l))
            launches[k.name] = ls
        parts = [self.header.rstrip("\n")] if self.header else []
        parts += [h.rstrip("\n") for _, h in sorted(self.helpers.items())]
        text = "\n\n".join(parts + funcs) + "\n"
        return GpuSource(self.target, text, launches, dict(module.entries))

    def group_for(self, launch: Launch) -> int:
        return self.group_size

    def _reducible(self, loop: Loop, plan: CoopPlan) -> bool:
        types = {st.name: st.init.dtype for st in walk_stmts(loop.body) if isinstance(st, Var)}
        return all(self.can_group_reduce(types[name]) for red in plan.reductions.values() for name in red)

    def can_group_reduce(self, dt: DT) -> bool:
        return dt.name != "bool"

    def render_launch(self, l: Launch) -> str:
        self.launch, self.lines, self.scopes, self.n, self.indent = l, [], [_Scope()], 0, 1
        self.scope_decls: list[str] = []
        written = written_buffers(l.body)
        for p in l.params:
            if p.buf is None:
                self.bind(p.name, p.name, I64)
            else:
                self.bind(p.buf.name, self.ident(p.buf.name), p.buf.dtype)
        sig, prologue = self.signature(l, written)
        for st in l.prelude:
            self.stmt(st)
        if l.loop is None:        # a serial launch: one thread, whatever block size the runtime picks
            self.emit(f"if ({self.thread_index()} == 0) {{")
            self.push()
            self.body(l.body)
            self.pop()
            self.emit("}")
        else:
            self.parallel(l)
        head = f"{self.kernel_prefix} {l.name}(" + ", ".join(sig) + ") {"
        decls = ["  " + s for s in prologue + self.scope_decls]
        return "\n".join([head] + decls + self.lines + ["}"])

    # ---- names and scopes -----------------------------------------------------------------------------------------
    def ident(self, name: str) -> str:
        s = c_name(name)
        return s + "_" if s in RESERVED else s

    def bind(self, name: str, cname: str, dt: DT, mutable: bool = False) -> None:
        self.scopes[-1].names[name] = (cname, dt, mutable)

    def lookup(self, name: str) -> tuple[str, DT, bool]:
        for sc in reversed(self.scopes):
            if name in sc.names:
                return sc.names[name]
        raise CompileError(f"kernel uses undefined name {name!r}")

    def tmp(self) -> str:
        self.n += 1
        return f"t_{self.n}"

    def emit(self, line: str) -> None:
        self.lines.append("  " * self.indent + line)

    def push(self) -> None:
        self.scopes.append(_Scope())
        self.indent += 1

    def pop(self) -> None:
        self.scopes.pop()
        self.indent -= 1

    def purge(self) -> None:
        for sc in self.scopes:
            for key in [k for k, (_, _, impure) in sc.memo.items() if impure]:
                del sc.memo[key]

    # ---- types ----------------------------------------------------------------------------------------------------
    def scalar_name(self, name: str) -> str:
        if name == "f16" and not self.fp16:
            return "float"
        return _C_TYPES[name]

    def rtype(self, dt: DT) -> str:
        """Register type."""
        base = self.scalar_name(dt.name)
        return base if dt.count == 1 else self.vector_name(base, dt)

    def vector_name(self, base: str, dt: DT) -> str:
        return f"{base}{dt.count}"

    def mtype(self, dt: DT) -> str:
        """Element type in memory (buffers)."""
        return "uchar" if dt.name == "bool" else _C_TYPES[dt.name]

    # ---- statements -----------------------------------------------------------------------------------------------
    def body(self, stmts: list) -> None:
        for st in stmts:
            self.stmt(st)

    def stmt(self, s) -> None:
        if isinstance(s, Loop):
            if s.parallel:
                raise CompileError("parallel loops only at a kernel's top level")
            self.loop(s)
        elif isinstance(s, Store):
            self.store(s.buf, s.index, s.value)
            self.purge()
        elif isinstance(s, Let):
            v = self.val(s.value)
            if s.value.op == "var" and self._impure(s.value):   # a snapshot of a mutable register
                t = self.tmp()
                self.emit(f"const {self.rtype(s.value.dtype)} {t} = {v};")
                v = t
            self.bind(s.name, v, s.value.dtype)
        elif isinstance(s, Var):
            v = self.val(s.init)
            name = self.ident(s.name)
            self.emit(f"{self.rtype(s.init.dtype)} {name} = {v};")
            self.bind(s.name, name, s.init.dtype, True)
        elif isinstance(s, Assign):
            name, dt, mutable = self.lookup(s.name)
            assert mutable, s.name
            self.emit(f"{name} = {self.val(s.value)};")
            self.purge()
        elif isinstance(s, If):
            self.emit(f"if ({self.val(s.cond)}) {{")
            self.push(); self.body(s.then); self.pop()
            if s.orelse:
                self.emit("} else {")
                self.push(); self.body(s.orelse); self.pop()
            self.emit("}")
            self.purge()
        elif isinstance(s, Local):
            name = self.ident(s.buf.name)
            self.emit(f"{self.local_decl(s.buf.dtype)} {name}[{s.size}];")
            self.bind(s.buf.name, name, s.buf.dtype)
        else:
            raise CompileError(f"unknown kernel statement {s!r}")

    def local_decl(self, dt: DT) -> str:
        return self.scalar_name(dt.name) if dt.name != "bool" else "uchar"

    def loop(self, s: Loop, lane_stride: Optional[tuple[str, int]] = None) -> None:
        start, stop = self.val(s.start), self.val(s.stop)
        v = self.ident(s.var)
        if lane_stride is None:
            self.emit(f"for (long {v} = {start}; {v} < {stop}; {v} += {s.step}) {{")
        else:
            lane, w = lane_stride
            stride = self.group_stride(w)
            inc = stride if s.step == 1 else f"{stride} * {s.step}"
            self.emit(f"for (long {v} = {start} + {lane} * {s.step}; {v} < {stop}; {v} += {inc}) {{")
        self.push()
        self.bind(s.var, v, I64)
        self.body(s.body)
        self.pop()
        self.emit("}")
        self.purge()

    def parallel(self, l: Launch) -> None:
        s = l.loop
        gid = "gid_"
        if l.group > 1:
            self.emit(f"const long {gid} = {self.group_index()};")
            self.emit(f"const long lane_ = {self.lane_index()};")
        else:
            self.emit(f"const long {gid} = {self.thread_index()};")
        start, stop = self.val(s.start), self.val(s.stop)
        v = self.ident(s.var)
        step = "" if s.step == 1 else f" * {s.step}"
        self.emit(f"const long {v} = {start} + {gid}{step};")
        if l.group > 1:
            # one group per iteration, never padded by the runtime: no guard, so every barrier is reached by
            # the whole group outside any branch (PoCL miscompiles barriers under even uniform branches)
            self.bind(s.var, v, I64)
            self.coop_body(l)
            return
        self.emit(f"if ({v} < {stop}) {{")
        self.push()
        self.bind(s.var, v, I64)
        self.body(s.body)
        self.pop()
        self.emit("}")

    # ---- cooperative bodies ---------------------------------------------------------------------------------------
    def coop_body(self, l: Launch) -> None:
        plan: CoopPlan = l.coop
        w = l.group
        for n, st in enumerate(l.loop.body):
            mode = plan.modes[n]
            if mode == "all":
                self.stmt(st)
            elif mode == "reduce":
                red = plan.reductions[n]
                for name, op in sorted(red.items()):
                    cname, dt, _ = self.lookup(name)
                    ident = self.const(0, dt) if op == "add" else self.lowest(dt)
                    self.emit(f"if (lane_ != 0) {cname} = {ident};")
                self.loop(st, ("lane_", w))
                for name, op in sorted(red.items()):
                    cname, dt, _ = self.lookup(name)
                    self.group_reduce(cname, dt, op, w)
                self.purge()
            elif mode == "map":
                self.loop(st, ("lane_", w))
            else:  # lane0
                self.emit("if (lane_ == 0) {")
                self.push(); self.stmt(st); self.pop()
                self.emit("}")
                self.purge()
            if n in plan.barrier_after:
                self.emit(self.barrier() + ";")

    def group_stride(self, w: int) -> str:
        """Threads per group as the kernel sees it (a literal, or a launch-time value in dialects that allow it)."""
        return str(w)

    def lowest(self, dt: DT) -> str:
        if dt.is_float:
            return self.bcast_text(dt, "(-INFINITY)")
        lo = {"i8": -128, "i16": -32768, "i32": -2**31, "i64": -2**63}.get(dt.name, 0)
        return self.const(lo, dt)

    def group_reduce(self, cname: str, dt: DT, op: str, w: int) -> None:
        raise CompileError(f"{self.target}: no group reduction")

    # ---- dialect hooks --------------------------------------------------------------------------------------------
    def signature(self, l: Launch, written: set[str]) -> tuple[list[str], list[str]]:
        raise NotImplementedError

    def thread_index(self) -> str:
        raise NotImplementedError

    def group_index(self) -> str:
        raise NotImplementedError

    def lane_index(self) -> str:
        raise NotImplementedError

    def barrier(self) -> str:
        raise NotImplementedError

    # ---- memory ---------------------------------------------------------------------------------------------------
    def buf_ref(self, buf: Buf) -> str:
        return self.lookup(buf.name)[0]

    def store(self, buf: Buf, index: E, value: E) -> None:
        p, i, v = self.buf_ref(buf), self.val(index), self.val(value)
        dt = value.dtype
        if dt.name == "bool":
            v = self.cast_text(v, dt, DT("u8", dt.count))
            dt = DT("u8", dt.count)
        self.emit(self.store_text(buf, p, i, v, dt) + ";")

    def store_text(self, buf: Buf, p: str, i: str, v: str, dt: DT) -> str:
        raise NotImplementedError

    def load_text(self, buf: Buf, p: str, i: str, dt: DT) -> str:
        raise NotImplementedError

    # ---- expressions ----------------------------------------------------------------------------------------------
    def _impure(self, e: E) -> bool:
        for x in walk_expr(e):
            if x.op == "load":
                return True
            if x.op == "var":
                for sc in reversed(self.scopes):
                    if x.arg in sc.names:
                        if sc.names[x.arg][2]:
                            return True
                        break
        return False

    def val(self, e: E) -> str:
        key = id(e)
        for depth, sc in enumerate(reversed(self.scopes)):
            hit = sc.memo.get(key)
            if hit is not None and (depth == 0 or not hit[2]):
                return hit[1]
        text = self.expr(e)
        if e.op in ("const", "var") or (e.op == "bcast" and e.src[0].op == "const") or text.isidentifier():
            out = text
        else:
            out = self.tmp()
            self.emit(f"const {self.rtype(e.dtype)} {out} = {text};")
        self.scopes[-1].memo[key] = (e, out, self._impure(e))
        return out

    def const(self, v, dt: DT) -> str:
        s = dt.scalar
        if s.is_float:
            text = float_literal(float(v))
            if s.name == "f16" and self.fp16:
                text = f"(half){text}"
        elif s.name == "bool":
            text = "true" if v else "false"
        elif s.name == "i64":
            text = f"{int(v)}L" if int(v) != -2**63 else "(-9223372036854775807L - 1L)"
        elif s.name == "u32":
            text = f"{int(v)}u"
        elif s.name == "i32":
            text = str(int(v)) if int(v) != -2**31 else "(-2147483647 - 1)"
        else:
            text = f"(({self.scalar_name(s.name)}){int(v)})"
        return text if dt.count == 1 else self.bcast_text(dt, text)

    def expr(self, e: E) -> str:
        op, dt = e.op, e.dtype
        if op == "const":
            return self.const(e.arg, dt)
        if op == "var":
            return self.lookup(e.arg)[0]
        if op == "load":
            buf = e.arg
            return self.load_text(buf, self.buf_ref(buf), self.val(e.src[0]), dt)
        a = [self.val(s) for s in e.src]
        sdt = e.src[0].dtype if e.src else dt
        if op in ("lt", "le", "eq", "ne"):
            return self.compare_text(op, a[0], a[1], sdt)
        if op in ("and", "or", "xor") and sdt.name == "bool":
            return self.bool_logic(op, a[0], a[1], sdt)
        if op in _INFIX:
            return self.narrow(f"({a[0]} {_INFIX[op]} {a[1]})", dt)
        if op == "mod":
            return f"fmod({a[0]}, {a[1]})" if sdt.is_float else f"({a[0]} % {a[1]})"
        if op in ("max", "min"):
            return f"{('f' if sdt.is_float else '') + op}({a[0]}, {a[1]})"
        if op == "neg":
            return self.narrow(f"(-{a[0]})", dt)
        if op == "not":
            return self.bool_not(a[0], sdt)
        if op in ("exp", "log", "sqrt", "sin", "cos"):
            return self.math(op, a[0], sdt)
        if op == "round":
            return self.math("rint", a[0], sdt)
        if op == "fma":
            return f"fma({a[0]}, {a[1]}, {a[2]})"
        if op == "where":
            return self.select_text(a[0], a[1], a[2], dt)
        if op == "cast":
            return self.cast_text(a[0], sdt, dt)
        if op == "bitcast":
            return self.bitcast_text(a[0], sdt, dt)
        if op == "bcast":
            return self.bcast_text(dt, a[0])
        if op == "gep":
            return self.lane_text(a[0], sdt, e.arg)
        if op == "vslice":
            return self.slice_text(a[0], sdt, e.arg, dt.count)
        if op == "vec":
            return self.vec_text(dt, a)
        if op in ("vreduce_add", "vreduce_max"):
            return self.hreduce(a[0], sdt, "add" if op == "vreduce_add" else "max")
        raise CompileError(f"{self.target} renderer: unknown kernel op {op!r}")

    def math(self, op: str, x: str, dt: DT) -> str:
        return f"{op}({x})"

    def narrow(self, text: str, dt: DT) -> str:
        """C promotes scalar char/short arithmetic to int: truncate back to the kir type."""
        if dt.count == 1 and dt.is_int and dt.bits < 32:
            return f"(({self.scalar_name(dt.name)}){text})"
        return text

    def hreduce(self, x: str, dt: DT, op: str) -> str:
        name = f"dzc_h{op}_{self.rtype(dt)}"
        if name not in self.helpers:
            self.helpers[name] = self.hreduce_helper(name, dt, op)
        return f"{name}({x})"

    def hreduce_helper(self, name: str, dt: DT, op: str) -> str:
        comb = (lambda a, b: f"({a} + {b})") if op == "add" else (
            lambda a, b: f"{'fmax' if dt.is_float else 'max'}({a}, {b})")
        terms = [self.lane_text("v", dt, i) for i in range(dt.count)]
        while len(terms) > 1:
            terms = [comb(terms[i], terms[i + 1]) if i + 1 < len(terms) else terms[i]
                     for i in range(0, len(terms), 2)]
        return f"{self.helper_prefix()}{self.rtype(dt.scalar)} {name}({self.rtype(dt)} v) {{ return {terms[0]}; }}"

    def helper_prefix(self) -> str:
        return "static inline "

    # spelled by dialects
    def compare_text(self, op: str, a: str, b: str, sdt: DT) -> str:
        return f"({a} {_INFIX[op]} {b})"

    def bool_logic(self, op: str, a: str, b: str, sdt: DT) -> str:
        return f"({a} {_INFIX[op]} {b})"

    def bool_not(self, a: str, sdt: DT) -> str:
        return f"(!{a})"

    def select_text(self, c: str, a: str, b: str, dt: DT) -> str:
        return f"({c} ? {a} : {b})"

    def cast_text(self, x: str, src: DT, dst: DT) -> str:
        raise NotImplementedError

    def bitcast_text(self, x: str, src: DT, dst: DT) -> str:
        raise NotImplementedError

    def bcast_text(self, dt: DT, x: str) -> str:
        raise NotImplementedError

    def lane_text(self, x: str, dt: DT, i: int) -> str:
        raise NotImplementedError

    def slice_text(self, x: str, dt: DT, start: int, count: int) -> str:
        raise NotImplementedError

    def vec_text(self, dt: DT, parts: list[str]) -> str:
        raise NotImplementedError

