"""Render kernels to LLVM IR text for CPUs (x86-64 AVX-512/AVX2, AArch64 NEON, Apple M-series).

Text rather than llvmlite's builder: function attributes such as "prefer-vector-width" and fast-math flags on
single instructions are plain spellings here. Vector lanes map to `<N x T>`; mutable registers are allocas that
mem2reg promotes.

Threads: an entry `dzc_<prog>` forks once, through libgomp's `GOMP_parallel`, and every thread of the team runs
the whole schedule (`dzc_<prog>.team`). Each kernel's top-level statements are phases: a parallel loop whose trip
count allows two grains is shared by the team (each thread a contiguous share of 7/8 of the iterations, then the
last 1/8 claimed in pieces from a shared counter, so a thread that finishes its share first takes more of the
tail); everything else runs on thread 0 alone. A barrier (`GOMP_barrier`) ends every shared phase and precedes
one that follows work of thread 0 alone; back-to-back thread-0 phases need none. A decode step of a few hundred
kernels thus pays about one 0.3 us barrier where a fork and join per parallel loop cost about 1 us, and the
threads leave each barrier together instead of the worker waking late. `dzc_num_threads` (an exported i32) sizes
the team.
"""
from __future__ import annotations

import struct
from typing import Callable, Optional

from dzc.codegen.kir import (
    DT, E, I64, Assign, Buf, If, Kernel, Let, Local, Loop, Module, Prefetch, Store, Var, walk_expr, stmt_exprs,
    walk_stmts)
from dzc.codegen.target import Target
from dzc.errors import CompileError

_SCALAR_TY = {"bool": "i1", "i8": "i8", "u8": "i8", "i16": "i16", "u16": "i16", "i32": "i32", "u32": "i32",
              "i64": "i64", "f16": "half", "f32": "float"}
_MEM_TY = dict(_SCALAR_TY, bool="i8")


def ty(dt: DT, mem: bool = False) -> str:
    base = (_MEM_TY if mem else _SCALAR_TY)[dt.name]
    return base if dt.count == 1 else f"<{dt.count} x {base}>"


def _suffix(dt: DT) -> str:
    base = {"f32": "f32", "f16": "f16"}.get(dt.name, "i" + str(dt.bits))
    return base if dt.count == 1 else f"v{dt.count}{base}"


def _float_lit(v: float, name: str) -> str:
    if name == "f16":
        import numpy as np
        return "0xH%04X" % int(np.array(v, np.float16).view(np.uint16))
    as32 = struct.unpack("<f", struct.pack("<f", v))[0]
    return "0x%016X" % struct.unpack("<Q", struct.pack("<d", as32))[0]


# What the entry hands the team: the buffer table, T, P and the two counters that shared phases claim tail pieces
# from (alternately: a phase resets the counter of the next one, which nobody can touch before its end barrier).
_CTX_TY = "{ ptr, i64, i64, [2 x i64] }"
# Each thread's view of the team: thread id, team size, the counters, shared phases so far, and whether the last
# phase was shared (then the threads are in step and a shared phase needs no barrier first). Values at team start.
_TEAM = (("tid", "i64", "%tid"), ("nth", "i64", "%nth"), ("ctrs", "ptr", "%ctrs"), ("phase", "i64", "0"),
         ("shared", "i8", "1"))
_TEAM_TY = "{ " + ", ".join(t for _, t, _ in _TEAM) + " }"
_READ_ONCE = ("tid", "nth", "ctrs")     # fields a kernel loads at entry; the others change phase by phase
TAIL = 8           # the last 1/TAIL of a shared loop's iterations is claimed in pieces
PIECES_PER_GRAIN = 4


class _Fn:
    """State while one LLVM function body is written."""

    def __init__(self) -> None:
        self.lines: list[str] = []
        self.allocas: list[str] = []
        self.n = 0
        self.block = "entry"
        self.env: list[dict[str, tuple[str, DT, bool]]] = [{}]   # name -> (value or alloca, type, mutable)
        self.memo: list[dict[int, tuple[str, bool]]] = [{}]

    def tmp(self, base: str = "t") -> str:
        self.n += 1
        return f"%{base}{self.n}"

    def label(self, base: str) -> str:
        self.n += 1
        return f"{base}{self.n}"

    def emit(self, line: str) -> None:
        self.lines.append("  " + line)

    def start_block(self, name: str) -> None:
        self.lines.append(f"{name}:")
        self.block = name

    def push(self) -> None:
        self.env.append({})
        self.memo.append({})

    def pop(self) -> None:
        self.env.pop()
        self.memo.pop()

    def lookup(self, name: str) -> tuple[str, DT, bool]:
        for scope in reversed(self.env):
            if name in scope:
                return scope[name]
        raise CompileError(f"kernel uses undefined name {name!r}")


class LLVMRenderer:
    """Module -> LLVM IR text. One instance per render."""

    def __init__(self, target: Target, profile: bool = False) -> None:
        self.target = target
        self.profile = profile
        self.decls: dict[str, str] = {}
        self.funcs: list[str] = []
        self.fn: _Fn = _Fn()
        self.kernel: Optional[Kernel] = None

    # ---- module -----------------------------------------------------------------------------------------------
    def render(self, module: Module) -> str:
        for k in module.kernels.values():
            self._kernel(k)
        for prog, calls in module.entries.items():
            self._entry(prog, calls, module)
        attrs = [f'"target-cpu"="{self.target.cpu}"']
        if self.target.features:
            attrs.append(f'"target-features"="{self.target.features}"')
        width = self.target.vector_width * 32
        attrs += [f'"prefer-vector-width"="{width}"', f'"min-legal-vector-width"="{width}"']
        head = [f'target triple = "{self.target.triple}"', "",
                "@dzc_num_threads = global i32 1", "declare void @GOMP_parallel(ptr, ptr, i32, i32)",
                "declare void @GOMP_barrier()", "declare i32 @omp_get_thread_num()",
                "declare i32 @omp_get_num_threads()"]
        head += sorted(self.decls.values())
        tail = [f"attributes #0 = {{ nounwind {' '.join(attrs)} }}",
                f"attributes #1 = {{ noinline nounwind {' '.join(attrs)} }}"]
        return "\n".join(head) + "\n\n" + "\n\n".join(self.funcs) + "\n\n" + "\n".join(tail) + "\n"

    def _entry(self, prog: str, calls: list, module: Module) -> None:
        """`dzc_<prog>(buffers, T, P)` forks the team once; `dzc_<prog>.team(ctx)` is what every thread runs."""
        team = f"@dzc_{prog}.team"
        self.funcs.append("\n".join([
            f"define void @dzc_{prog}(ptr %buffers, i64 %T, i64 %P) #0 {{", "entry:",
            f"  %ctx = alloca {_CTX_TY}, align 64",
            "  store ptr %buffers, ptr %ctx", f"  %ctx.T = getelementptr inbounds {_CTX_TY}, ptr %ctx, i32 0, i32 1",
            "  store i64 %T, ptr %ctx.T", f"  %ctx.P = getelementptr inbounds {_CTX_TY}, ptr %ctx, i32 0, i32 2",
            "  store i64 %P, ptr %ctx.P", f"  %ctx.c = getelementptr inbounds {_CTX_TY}, ptr %ctx, i32 0, i32 3",
            "  store [2 x i64] zeroinitializer, ptr %ctx.c",
            "  %cap = load i32, ptr @dzc_num_threads", "  %many = icmp sgt i32 %cap, 1",
            "  br i1 %many, label %fork, label %alone",
            "fork:", f"  call void @GOMP_parallel(ptr {team}, ptr %ctx, i32 %cap, i32 0)", "  ret void",
            "alone:", f"  call void {team}(ptr %ctx)", "  ret void", "}"]))
        lines = [f"define internal void {team}(ptr %ctx) #0 {{", "entry:",
                 f"  %team = alloca {_TEAM_TY}, align 8",
                 "  %buffers = load ptr, ptr %ctx"]
        for i, name in ((1, "T"), (2, "P")):
            lines += [f"  %{name}.p = getelementptr inbounds {_CTX_TY}, ptr %ctx, i32 0, i32 {i}",
                      f"  %{name} = load i64, ptr %{name}.p"]
        lines += [f"  %ctrs = getelementptr inbounds {_CTX_TY}, ptr %ctx, i32 0, i32 3",
                  "  %tid32 = call i32 @omp_get_thread_num()", "  %nth32 = call i32 @omp_get_num_threads()",
                  "  %tid = sext i32 %tid32 to i64", "  %nth = sext i32 %nth32 to i64"]
        for i, (name, t, v) in enumerate(_TEAM):
            lines += [f"  %team.{name} = getelementptr inbounds {_TEAM_TY}, ptr %team, i32 0, i32 {i}",
                      f"  store {t} {v}, ptr %team.{name}"]
        loaded: dict[int, str] = {}
        n = 0
        if self.profile:   # thread 0's cycles per call accumulate in dzc_profile_<prog>[i] (DZC_PROFILE=1 builds)
            self.decls[f"prof.{prog}"] = f"@dzc_profile_{prog} = global [{max(1, len(calls))} x i64] zeroinitializer"
            self.decls["llvm.readcyclecounter"] = "declare i64 @llvm.readcyclecounter()"
            lines.append("  %first = icmp eq i64 %tid, 0")
        for ci, call in enumerate(calls):
            if self.profile:
                lines.append(f"  %c{ci}.0 = call i64 @llvm.readcyclecounter()")
            kernel = module.kernels[call.kernel]
            args = []
            for slot in call.slots:
                if slot not in loaded:
                    n += 1
                    lines.append(f"  %s{n}.p = getelementptr inbounds ptr, ptr %buffers, i64 {slot}")
                    lines.append(f"  %s{n} = load ptr, ptr %s{n}.p, align 8")
                    loaded[slot] = f"%s{n}"
                args.append(f"ptr {loaded[slot]}")
            args += ["i64 %T", "i64 %P"]
            assert len(args) == len(kernel.params), (call.kernel, len(args), len(kernel.params))
            lines.append(f"  call void @{call.kernel}({', '.join(args)}, ptr %team)")
            if self.profile:
                lines += [f"  %c{ci}.1 = call i64 @llvm.readcyclecounter()",
                          f"  br i1 %first, label %prof{ci}, label %next{ci}", f"prof{ci}:",
                          f"  %c{ci}.d = sub i64 %c{ci}.1, %c{ci}.0",
                          f"  %c{ci}.p = getelementptr inbounds [{len(calls)} x i64], ptr @dzc_profile_{prog}, i64 0, i64 {ci}",
                          f"  %c{ci}.o = load i64, ptr %c{ci}.p",
                          f"  %c{ci}.n = add i64 %c{ci}.o, %c{ci}.d",
                          f"  store i64 %c{ci}.n, ptr %c{ci}.p", f"  br label %next{ci}", f"next{ci}:"]
        lines += ["  ret void", "}"]
        self.funcs.append("\n".join(lines))

    # ---- kernels ------------------------------------------------------------------------------------------------
    def _signature(self, k: Kernel) -> list[tuple[str, str]]:
        return [("ptr", f"%{p.name}") if p.buf is not None else ("i64", f"%{p.name}") for p in k.params]

    def _bind_params(self, k: Kernel) -> None:
        for p in k.params:
            if p.buf is None:
                self.fn.env[0][p.name] = (f"%{p.name}", I64, False)

    def _kernel(self, k: Kernel) -> None:
        """A kernel run by every thread of the team: parallel loops are shared phases, runs of other top-level
        statements are phases of thread 0 (see the module docstring)."""
        self.kernel = k
        self.fn = fn = _Fn()
        self._bind_params(k)
        for i, (name, t, _) in enumerate(_TEAM):
            fn.emit(f"%team.{name}.p = getelementptr inbounds {_TEAM_TY}, ptr %dzc.team, i32 0, i32 {i}")
            if name in _READ_ONCE:
                fn.emit(f"%team.{name} = load {t}, ptr %team.{name}.p")
        serial: list = []
        for s in k.body:
            if isinstance(s, Loop) and s.parallel:
                if serial:
                    self._thread0_phase(serial)
                    serial = []
                self._shared_phase(s)
            else:
                serial.append(s)
        if serial:
            self._thread0_phase(serial)
        self._finish(f"define internal void @{k.name}(" +
                     ", ".join(f"{t} {n}" for t, n in self._signature(k)) + ", ptr %dzc.team) #1 {")

    def _if(self, cond: str, then: Callable[[], None], orelse: Optional[Callable[[], None]] = None) -> None:
        fn = self.fn
        yes, no, done = fn.label("then"), fn.label("else"), fn.label("endif")
        fn.emit(f"br i1 {cond}, label %{yes}, label %{no if orelse else done}")
        for label, emit in ((yes, then), (no, orelse)):
            if emit is not None:
                fn.start_block(label)
                emit()
                fn.emit(f"br label %{done}")
        fn.start_block(done)

    def _scoped(self, body: list) -> None:
        self.fn.push()
        self._body(body)
        self.fn.pop()

    def _barrier(self) -> None:
        self.fn.emit("call void @GOMP_barrier()")

    def _thread0_phase(self, body: list) -> None:
        fn = self.fn
        first = fn.tmp("first")
        fn.emit(f"{first} = icmp eq i64 %team.tid, 0")
        self._if(first, lambda: self._scoped(body))
        fn.emit("store i8 0, ptr %team.shared.p")
        self._purge()

    def _shared_phase(self, s: Loop) -> None:
        """A parallel loop: shared by up to niter/grain threads (thread 0 alone below two grains)."""
        fn = self.fn
        self._check_closed(s)
        start, stop = self.val(s.start), self.val(s.stop)
        span, niter = fn.tmp("span"), fn.tmp("niter")
        fn.emit(f"{span} = sub i64 {stop}, {start}")
        fn.emit(f"{span}.r = add i64 {span}, {s.step - 1}")
        fn.emit(f"{niter} = sdiv i64 {span}.r, {s.step}")
        want, users, shared = fn.tmp("want"), fn.tmp("users"), fn.tmp("shared")
        fn.emit(f"{want} = sdiv i64 {niter}, {max(1, s.grain)}")
        self.decls["llvm.smin.i64"] = "declare i64 @llvm.smin.i64(i64, i64)"
        self.decls["llvm.smax.i64"] = "declare i64 @llvm.smax.i64(i64, i64)"
        fn.emit(f"{users}.c = call i64 @llvm.smin.i64(i64 {want}, i64 %team.nth)")
        fn.emit(f"{users} = call i64 @llvm.smax.i64(i64 {users}.c, i64 1)")
        fn.emit(f"{shared} = icmp sgt i64 {users}, 1")
        # In step after a shared phase; after thread 0's work, wait for it. A shared phase resets the other
        # counter for the next one (no thread can reach that before this phase's end barrier).
        was = fn.tmp("was")
        fn.emit(f"{was} = load i8, ptr %team.shared.p")
        fn.emit(f"{was}.b = icmp eq i8 {was}, 0")
        fn.emit(f"{was}.w = and i1 {shared}, {was}.b")
        self._if(f"{was}.w", self._barrier)
        phase, ctr = fn.tmp("phase"), fn.tmp("ctr")
        fn.emit(f"{phase} = load i64, ptr %team.phase.p")
        fn.emit(f"{phase}.s = and i64 {phase}, 1")
        fn.emit(f"{ctr} = getelementptr inbounds i64, ptr %team.ctrs, i64 {phase}.s")
        fn.emit(f"{phase}.o = xor i64 {phase}.s, 1")
        fn.emit(f"{ctr}.o = getelementptr inbounds i64, ptr %team.ctrs, i64 {phase}.o")
        fn.emit(f"{shared}.0 = icmp eq i64 %team.tid, 0")
        fn.emit(f"{shared}.r = and i1 {shared}, {shared}.0")
        self._if(f"{shared}.r", lambda: fn.emit(f"store i64 0, ptr {ctr}.o"))
        active = fn.tmp("active")
        fn.emit(f"{active} = icmp slt i64 %team.tid, {users}")
        self._if(active, lambda: self._claimed_ranges(s, start, niter, users, shared, ctr))

        def end() -> None:
            self._barrier()
            fn.emit(f"{phase}.n = add i64 {phase}, 1")
            fn.emit(f"store i64 {phase}.n, ptr %team.phase.p")
        self._if(shared, end)
        fn.emit(f"{shared}.b = zext i1 {shared} to i8")
        fn.emit(f"store i8 {shared}.b, ptr %team.shared.p")
        self._purge()

    def _claimed_ranges(self, s: Loop, start: str, niter: str, users: str, shared: str, ctr: str) -> None:
        """This thread's contiguous share of (TAIL-1)/TAIL of the iterations, then pieces of the tail claimed
        from `ctr` until none is left (alone: all iterations, no claims)."""
        fn = self.fn
        piece = max(1, s.grain // PIECES_PER_GRAIN)
        part, share, lo, hi, tail = (fn.tmp(x) for x in ("part", "share", "lo", "hi", "tail"))
        fn.emit(f"{part} = mul i64 {niter}, {TAIL - 1}")
        fn.emit(f"{part}.d = sdiv i64 {part}, {TAIL}")
        fn.emit(f"{share}.s = sdiv i64 {part}.d, {users}")
        fn.emit(f"{share} = select i1 {shared}, i64 {share}.s, i64 {niter}")
        fn.emit(f"{lo} = mul i64 %team.tid, {share}")
        fn.emit(f"{hi} = add i64 {lo}, {share}")
        fn.emit(f"{tail} = mul i64 {share}, {users}")
        entry, rng = fn.block, fn.label("range")
        fn.emit(f"br label %{rng}")
        fn.start_block(rng)
        rlo, rhi = fn.tmp("rlo"), fn.tmp("rhi")
        phis = len(fn.lines)
        fn.lines += ["", ""]

        def bind(it: str) -> None:
            x, y = fn.tmp(s.var + "."), fn.tmp()
            fn.emit(f"{y} = mul nsw i64 {it}, {s.step}")
            fn.emit(f"{x} = add nsw i64 {start}, {y}")
            fn.env[-1][s.var] = (x, I64, False)
        self._loop(s.var + "it", rlo, rhi, 1, s.body, bind=bind)
        claim, done = fn.label("claim"), fn.label("claimed")
        fn.emit(f"br i1 {shared}, label %{claim}, label %{done}")
        fn.start_block(claim)
        got, nlo, nhi, more = (fn.tmp(x) for x in ("got", "nlo", "nhi", "more"))
        fn.emit(f"{got} = atomicrmw add ptr {ctr}, i64 {piece} monotonic")
        fn.emit(f"{nlo} = add i64 {tail}, {got}")
        fn.emit(f"{nhi}.e = add i64 {nlo}, {piece}")
        fn.emit(f"{nhi} = call i64 @llvm.smin.i64(i64 {nhi}.e, i64 {niter})")
        fn.emit(f"{more} = icmp slt i64 {nlo}, {niter}")
        fn.emit(f"br i1 {more}, label %{rng}, label %{done}")
        fn.lines[phis] = f"  {rlo} = phi i64 [ {lo}, %{entry} ], [ {nlo}, %{claim} ]"
        fn.lines[phis + 1] = f"  {rhi} = phi i64 [ {hi}, %{entry} ], [ {nhi}, %{claim} ]"
        fn.start_block(done)

    def _finish(self, header: str) -> None:
        fn = self.fn
        text = [header, "entry:"] + ["  " + a for a in fn.allocas] + fn.lines + ["  ret void", "}"]
        self.funcs.append("\n".join(text))

    def _body(self, body: list) -> None:
        for s in body:
            self._stmt(s)

    def _stmt(self, s) -> None:
        fn = self.fn
        if isinstance(s, Loop):
            if s.parallel:
                where = self.kernel.name if self.kernel else "?"
                raise CompileError(f"kernel {where}: a parallel loop below the top level (kir allows them only there)")
            self._loop(s.var, self.val(s.start), self.val(s.stop), s.step, s.body)
        elif isinstance(s, Store):
            self._store(s)
        elif isinstance(s, Let):
            fn.env[-1][s.name] = (self.val(s.value), s.value.dtype, False)
        elif isinstance(s, Var):
            slot = f"%{s.name}.addr"
            fn.allocas.append(f"{slot} = alloca {ty(s.init.dtype)}")
            init = self.val(s.init)
            fn.emit(f"store {ty(s.init.dtype)} {init}, ptr {slot}")
            fn.env[-1][s.name] = (slot, s.init.dtype, True)
        elif isinstance(s, Assign):
            slot, dt, mutable = fn.lookup(s.name)
            assert mutable, s.name
            v = self.val(s.value)
            fn.emit(f"store {ty(dt)} {v}, ptr {slot}")
            self._purge()
        elif isinstance(s, If):
            orelse = (lambda: self._scoped(s.orelse)) if s.orelse else None
            self._if(self.val(s.cond), lambda: self._scoped(s.then), orelse)
            self._purge()
        elif isinstance(s, Prefetch):
            p = self._ptr(s.buf, s.index, inbounds=False)
            self.decls["llvm.prefetch.p0"] = "declare void @llvm.prefetch.p0(ptr, i32, i32, i32)"
            # locality 2 (prefetcht1: into L2, not L1): a GEMV tile ahead is 8 rows x K weights, too much to park in
            # L1 next to the tile being read; the L2 version streamed fp8 decode 1.6x and bf16 1.2x faster (Zen 4)
            fn.emit(f"call void @llvm.prefetch.p0(ptr {p}, i32 0, i32 2, i32 1)")
        elif isinstance(s, Local):
            slot = f"%{s.buf.name}"
            fn.allocas.append(f"{slot} = alloca {ty(s.buf.dtype, mem=True)}, i64 {s.size}, align 64")
            fn.env[-1][s.buf.name] = (slot, s.buf.dtype, False)
        else:
            raise CompileError(f"unknown kernel statement {s!r}")

    def _purge(self) -> None:
        for scope in self.fn.memo:
            for key in [k for k, (_, impure) in scope.items() if impure]:
                del scope[key]

    def _loop(self, name: str, start: str, stop: str, step: int, body: list, bind=None) -> None:
        fn = self.fn
        head, bodyl, latch, exit_ = fn.label("head"), fn.label("body"), fn.label("latch"), fn.label("exit")
        pred = fn.block
        iv, nxt = fn.tmp(name + "."), fn.tmp(name + ".next")
        fn.emit(f"br label %{head}")
        fn.start_block(head)
        fn.emit(f"{iv} = phi i64 [ {start}, %{pred} ], [ {nxt}, %{latch} ]")
        c = fn.tmp("c")
        fn.emit(f"{c} = icmp slt i64 {iv}, {stop}")
        fn.emit(f"br i1 {c}, label %{bodyl}, label %{exit_}")
        fn.start_block(bodyl)
        fn.push()
        if bind is None:
            fn.env[-1][name] = (iv, I64, False)
        else:
            bind(iv)
        self._body(body)
        fn.pop()
        fn.emit(f"br label %{latch}")
        fn.start_block(latch)
        fn.emit(f"{nxt} = add nsw i64 {iv}, {step}")
        fn.emit(f"br label %{head}")
        fn.start_block(exit_)
        self._purge()

    def _check_closed(self, s: Loop) -> None:
        """A parallel body may read only kernel params, its variable and names it defines itself."""
        k = self.kernel
        allowed = {p.name for p in k.params} | {s.var}
        defined = set()
        for st in walk_stmts(s.body):
            if isinstance(st, Loop):
                defined.add(st.var)
            elif isinstance(st, (Let, Var)):
                defined.add(st.name)
            elif isinstance(st, Local):
                defined.add(st.buf.name)
        for st in walk_stmts(s.body):
            for e in stmt_exprs(st):
                for x in walk_expr(e):
                    if x.op == "var" and x.arg not in allowed | defined:
                        raise CompileError(f"kernel {k.name}: parallel loop reads {x.arg!r} from outside")

    # ---- stores and expressions ------------------------------------------------------------------------------
    def _ptr(self, buf: Buf, index: E, inbounds: bool = True) -> str:
        """Address of buf[index]; a prefetch may point past the buffer's end, so its GEP is not `inbounds`."""
        fn = self.fn
        if buf.local:
            base = fn.lookup(buf.name)[0]
        else:
            base = f"%{buf.name}"
            for scope in fn.env:
                if scope.get(buf.name):
                    base = scope[buf.name][0]
        idx = self.val(index)
        p = fn.tmp("p")
        gep = "getelementptr inbounds" if inbounds else "getelementptr"
        fn.emit(f"{p} = {gep} {ty(buf.dtype.scalar, mem=True)}, ptr {base}, i64 {idx}")
        return p

    def _store(self, s: Store) -> None:
        fn = self.fn
        v = self.val(s.value)
        dt = s.value.dtype
        if dt.name == "bool":
            z = fn.tmp()
            fn.emit(f"{z} = zext {ty(dt)} {v} to {ty(dt, mem=True)}")
            v = z
        p = self._ptr(s.buf, s.index)
        fn.emit(f"store {ty(dt, mem=True)} {v}, ptr {p}, align {dt.itemsize}")
        self._purge()

    def _impure(self, e: E) -> bool:
        if e.op == "load":
            return True
        if e.op == "var":
            for scope in reversed(self.fn.env):
                if e.arg in scope:
                    return scope[e.arg][2]
            return False
        return False

    def val(self, e: E) -> str:
        fn = self.fn
        key = id(e)
        for depth, scope in enumerate(reversed(fn.memo)):
            hit = scope.get(key)
            if hit is not None and (depth == 0 or not hit[1]):
                return hit[0]
        impure = self._impure(e) or any(self._impure_deep(s) for s in e.src)
        out = self._compute(e)
        fn.memo[-1][key] = (out, impure)
        return out

    def _impure_deep(self, e: E) -> bool:
        stack, seen = [e], set()
        while stack:
            x = stack.pop()
            if id(x) in seen:
                continue
            seen.add(id(x))
            if self._impure(x):
                return True
            stack.extend(x.src)
        return False

    def _intrinsic(self, name: str, dt: DT, nargs: int, ret: Optional[DT] = None) -> str:
        full = f"llvm.{name}.{_suffix(dt)}"
        r = ty(ret or dt)
        self.decls[full] = f"declare {r} @{full}({', '.join([ty(dt)] * nargs)})"
        return f"@{full}"

    def _compute(self, e: E) -> str:
        fn, op, dt = self.fn, e.op, e.dtype
        if op == "const":
            if dt.is_float:
                return _float_lit(e.arg, dt.name)
            if dt.name == "bool":
                return "true" if e.arg else "false"
            return str(int(e.arg))
        if op == "var":
            value, vdt, mutable = fn.lookup(e.arg)
            if not mutable:
                return value
            out = fn.tmp("r")
            fn.emit(f"{out} = load {ty(vdt)}, ptr {value}")
            return out
        if op == "load":
            p = self._ptr(e.arg, e.src[0])
            out = fn.tmp("ld")
            fn.emit(f"{out} = load {ty(dt, mem=True)}, ptr {p}, align {dt.itemsize}")
            if dt.name == "bool":
                b = fn.tmp()
                zero = "0" if dt.count == 1 else "zeroinitializer"
                fn.emit(f"{b} = icmp ne {ty(dt, mem=True)} {out}, {zero}")
                return b
            return out
        args = [self.val(s) for s in e.src]
        out = fn.tmp()
        sdt = e.src[0].dtype if e.src else dt
        t = ty(sdt)
        if op in ("add", "sub", "mul"):
            ins = ("f" + op) if sdt.is_float else op
            fn.emit(f"{out} = {ins} {t} {args[0]}, {args[1]}")
        elif op in ("div", "mod"):
            if sdt.is_float:
                ins = "fdiv" if op == "div" else "frem"
            else:
                ins = ("s" if sdt.is_signed else "u") + ("div" if op == "div" else "rem")
            fn.emit(f"{out} = {ins} {t} {args[0]}, {args[1]}")
        elif op in ("max", "min"):
            if sdt.is_float:
                f = self._intrinsic("maxnum" if op == "max" else "minnum", sdt, 2)
            else:
                f = self._intrinsic(("s" if sdt.is_signed else "u") + op, sdt, 2)
            fn.emit(f"{out} = call {t} {f}({t} {args[0]}, {t} {args[1]})")
        elif op in ("and", "or", "xor", "shl"):
            fn.emit(f"{out} = {op} {t} {args[0]}, {args[1]}")
        elif op == "shr":
            fn.emit(f"{out} = {'ashr' if sdt.is_signed else 'lshr'} {t} {args[0]}, {args[1]}")
        elif op in ("lt", "le", "eq", "ne"):
            if sdt.is_float:
                pred = {"lt": "olt", "le": "ole", "eq": "oeq", "ne": "une"}[op]
                fn.emit(f"{out} = fcmp {pred} {t} {args[0]}, {args[1]}")
            else:
                pred = {"lt": "lt", "le": "le"}.get(op)
                pred = (("s" if sdt.is_signed else "u") + pred) if pred else op
                fn.emit(f"{out} = icmp {pred} {t} {args[0]}, {args[1]}")
        elif op == "neg":
            if sdt.is_float:
                fn.emit(f"{out} = fneg {t} {args[0]}")
            else:
                fn.emit(f"{out} = sub {t} {'0' if sdt.count == 1 else 'zeroinitializer'}, {args[0]}")
        elif op == "not":
            ones = "true" if sdt.count == 1 else "<" + ", ".join(["i1 true"] * sdt.count) + ">"
            fn.emit(f"{out} = xor {t} {args[0]}, {ones}")
        elif op in ("exp", "log", "sqrt", "sin", "cos", "round"):
            f = self._intrinsic("roundeven" if op == "round" else op, sdt, 1)
            fn.emit(f"{out} = call {t} {f}({t} {args[0]})")
        elif op == "fma":
            f = self._intrinsic("fma", sdt, 3)
            fn.emit(f"{out} = call {t} {f}({t} {args[0]}, {t} {args[1]}, {t} {args[2]})")
        elif op == "where":
            t = ty(dt)
            fn.emit(f"{out} = select {ty(e.src[0].dtype)} {args[0]}, {t} {args[1]}, {t} {args[2]}")
        elif op == "cast":
            ins = _cast_ins(sdt, dt)
            if ins is None:
                return self._cast_to_bool(sdt, args[0], out)
            fn.emit(f"{out} = {ins} {t} {args[0]} to {ty(dt)}")
        elif op == "bitcast":
            fn.emit(f"{out} = bitcast {t} {args[0]} to {ty(dt)}")
        elif op == "bcast":
            v1 = fn.tmp()
            fn.emit(f"{v1} = insertelement <1 x {ty(sdt)}> poison, {ty(sdt)} {args[0]}, i64 0")
            fn.emit(f"{out} = shufflevector <1 x {ty(sdt)}> {v1}, <1 x {ty(sdt)}> poison, "
                    f"<{dt.count} x i32> zeroinitializer")
        elif op == "vreduce_add":
            if sdt.is_float:
                f = f"llvm.vector.reduce.fadd.{_suffix(sdt)}"
                self.decls[f] = f"declare {ty(dt)} @{f}({ty(dt)}, {t})"
                fn.emit(f"{out} = call reassoc {ty(dt)} @{f}({ty(dt)} {_float_lit(-0.0, dt.name)}, {t} {args[0]})")
            else:
                f = f"llvm.vector.reduce.add.{_suffix(sdt)}"
                self.decls[f] = f"declare {ty(dt)} @{f}({t})"
                fn.emit(f"{out} = call {ty(dt)} @{f}({t} {args[0]})")
        elif op == "vreduce_max":
            kind = "fmax" if sdt.is_float else ("smax" if sdt.is_signed else "umax")
            f = f"llvm.vector.reduce.{kind}.{_suffix(sdt)}"
            self.decls[f] = f"declare {ty(dt)} @{f}({t})"
            fn.emit(f"{out} = call {ty(dt)} @{f}({t} {args[0]})")
        elif op == "dot4":
            if dt.count != 16 or not self.target.int8_dot:
                raise CompileError(f"dot4 on {dt} needs AVX-512 VNNI with 16 i32 lanes (target {self.target.cpu})")
            f = "llvm.x86.avx512.vpdpbusd.512"
            self.decls[f] = f"declare <16 x i32> @{f}(<16 x i32>, <16 x i32>, <16 x i32>)"
            a, b = fn.tmp(), fn.tmp()
            fn.emit(f"{a} = bitcast {ty(e.src[1].dtype)} {args[1]} to <16 x i32>")
            fn.emit(f"{b} = bitcast {ty(e.src[2].dtype)} {args[2]} to <16 x i32>")
            fn.emit(f"{out} = call <16 x i32> @{f}(<16 x i32> {args[0]}, <16 x i32> {a}, <16 x i32> {b})")
        elif op == "gep":
            fn.emit(f"{out} = extractelement {t} {args[0]}, i64 {e.arg}")
        else:
            raise CompileError(f"LLVM renderer: unknown kernel op {op!r}")
        return out

    def _cast_to_bool(self, src: DT, v: str, out: str) -> str:
        zero = "zeroinitializer" if src.count > 1 else ("0.0" if src.is_float else "0")
        self.fn.emit(f"{out} = {'fcmp une' if src.is_float else 'icmp ne'} {ty(src)} {v}, {zero}")
        return out


def _cast_ins(src: DT, dst: DT) -> Optional[str]:
    if dst.name == "bool":
        return None
    if src.is_float and dst.is_float:
        return "fpext" if dst.bits > src.bits else ("fptrunc" if dst.bits < src.bits else "bitcast")
    if src.is_float:
        return "fptosi" if dst.is_signed else "fptoui"
    if dst.is_float:
        return "sitofp" if src.is_signed else "uitofp"
    if dst.bits > src.bits:
        return "sext" if src.is_signed else "zext"
    if dst.bits < src.bits:
        return "trunc"
    return "bitcast"


def render_llvm(module: Module, target: Target, profile: Optional[bool] = None) -> str:
    if profile is None:
        import os
        profile = os.environ.get("DZC_PROFILE", "") == "1"
    return LLVMRenderer(target, profile).render(module)
