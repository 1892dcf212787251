"""PTX for NVIDIA GPUs through LLVM's NVPTX back end (llvmlite), reusing the CPU's LLVM renderer.

Each launch (gpu.py) becomes `define ptx_kernel void @<kernel>[_<n>](ptr addrspace(1) %buf.g, ..., i64 %T,
i64 %P)`; pointers are cast to the generic space on entry (LLVM's address-space inference turns the loads back
into ld.global). A parallel loop's iteration is the global thread index ctaid.x * ntid.x + tid.x read through
`llvm.nvvm.read.ptx.sreg.*`; threads past the trip count return. Statements, expressions and vectors are the LLVM
renderer's (NVPTX legalises `<16 x float>` into scalar registers).

NVPTX has no libm: exp/log/sin/cos become small functions over the PTX approximations (ex2/lg2/sin/cos.approx)
with range reduction (exp: n = rint(x log2 e), 2^n * 2^(x log2 e - n) with the product split in two; sin/cos:
reduction modulo 2 pi in two parts), within a few float32 ulps of libm on the ranges models use.

Cooperative form: a launch whose parallel body reduces (c_style.coop_plan: GEMV rows, norms, expert sums) also
gets `<name>_coop`, one warp per iteration: reduction loops strided over the 32 lanes and combined with
`llvm.nvvm.shfl.sync.bfly` butterflies, map loops strided, other stores on lane 0, `__syncwarp`
(`llvm.nvvm.bar.warp.sync`) before later reads. The CUDA runtime uses it unless DZC_CUDA_COOP=0.

Targets: sm_80 (PTX ISA 7.0) and sm_90 (PTX ISA 8.0); `ptxas -arch=sm_80|sm_90` assembles both.
"""
from __future__ import annotations

import dataclasses

from dzc.codegen.c_style import GpuSource, coop_plan
from dzc.codegen.gpu import Launch, split_launches
from dzc.codegen.kir import DT, E, F32, I64, Loop, Module, Var, walk_stmts
from dzc.codegen.llvm import LLVMRenderer, _Fn, _float_lit, ty

WARP = 32
from dzc.codegen.target import Target
from dzc.errors import CompileError

ARCHS = {"sm_80": "+ptx70", "sm_90": "+ptx80"}

_MATH = r"""
define internal float @dzc.exp.f32(float %x) alwaysinline {
  %t = fmul float %x, 0x3FF7154760000000
  %n = call float @llvm.rint.f32(float %t)
  %nn = fneg float %n
  %r0 = call float @llvm.fma.f32(float %x, float 0x3FF7154760000000, float %nn)
  %r = call float @llvm.fma.f32(float %x, float 0x3E54AE0C00000000, float %r0)
  %a = call float @llvm.nvvm.ex2.approx.f(float %r)
  %b = call float @llvm.nvvm.ex2.approx.f(float %n)
  %y = fmul float %a, %b
  ret float %y
}
define internal float @dzc.log.f32(float %x) alwaysinline {
  %l = call float @llvm.nvvm.lg2.approx.f(float %x)
  %y = fmul float %l, 0x3FE62E4300000000
  ret float %y
}
define internal float @dzc.reduce2pi(float %x) alwaysinline {
  %q = fmul float %x, 0x3FC45F3060000000
  %k = call float @llvm.rint.f32(float %q)
  %nk = fneg float %k
  %r0 = call float @llvm.fma.f32(float %nk, float 0x401921FB60000000, float %x)
  %r = call float @llvm.fma.f32(float %nk, float 0xBE8777A5C0000000, float %r0)
  ret float %r
}
define internal float @dzc.sin.f32(float %x) alwaysinline {
  %r = call float @dzc.reduce2pi(float %x)
  %y = call float @llvm.nvvm.sin.approx.f(float %r)
  ret float %y
}
define internal float @dzc.cos.f32(float %x) alwaysinline {
  %r = call float @dzc.reduce2pi(float %x)
  %y = call float @llvm.nvvm.cos.approx.f(float %r)
  ret float %y
}
declare float @llvm.nvvm.ex2.approx.f(float)
declare float @llvm.nvvm.lg2.approx.f(float)
declare float @llvm.nvvm.sin.approx.f(float)
declare float @llvm.nvvm.cos.approx.f(float)
"""


def ptx_target(arch: str = "sm_90") -> Target:
    if arch not in ARCHS:
        raise CompileError(f"unknown CUDA architecture {arch!r}; choose one of {', '.join(ARCHS)}")
    return Target("nvptx64-nvidia-cuda", arch, ARCHS[arch], vector_width=4, vector_regs=64, name="cuda")


class PTXRenderer(LLVMRenderer):
    """Module -> NVPTX LLVM IR (launch kernels only; the host runtime runs the schedule)."""

    def __init__(self, arch: str = "sm_90", coop: bool = True) -> None:
        super().__init__(ptx_target(arch))
        self.arch = arch
        self.coop = coop
        self.launches: dict[str, list[Launch]] = {}

    def render(self, module: Module) -> str:
        for k in module.kernels.values():
            ls = split_launches(k)
            self.launches[k.name] = ls
            for l in ls:
                self._launch(l)
                plan = coop_plan(l.loop) if self.coop and l.loop is not None else None
                if plan is not None and self._warp_reducible(l.loop, plan):
                    l.alt = dataclasses.replace(l, name=l.name + "_coop", coop=plan, group=WARP)
                    self._launch(l.alt)
        self.decls["llvm.rint.f32"] = "declare float @llvm.rint.f32(float)"
        self.decls["llvm.fma.f32"] = "declare float @llvm.fma.f32(float, float, float)"
        head = [f'target triple = "{self.target.triple}"', ""] + sorted(self.decls.values())
        for name in ("tid", "ntid", "ctaid"):
            head.append(f"declare i32 @llvm.nvvm.read.ptx.sreg.{name}.x()")
        return "\n".join(head) + "\n" + _MATH + "\n" + "\n\n".join(self.funcs) + "\n\nattributes #0 = { nounwind }\n"

    def _launch(self, l: Launch) -> None:
        self.kernel = None
        self.fn = fn = _Fn()
        sig = []
        for p in l.params:
            if p.buf is None:
                sig.append(f"i64 %{p.name}")
                fn.env[0][p.name] = (f"%{p.name}", I64, False)
            else:
                sig.append(f"ptr addrspace(1) %{p.buf.name}.g")
                fn.emit(f"%{p.buf.name} = addrspacecast ptr addrspace(1) %{p.buf.name}.g to ptr")
        self._body(l.prelude)
        if l.loop is None:
            self._serial(l.body)
        elif l.group > 1:
            self._warp_loop(l)
        else:
            self._grid_loop(l.loop)
        self._finish(f"define ptx_kernel void @{l.name}({', '.join(sig)}) #0 {{")

    def _serial(self, body: list) -> None:
        """A serial launch runs on thread 0 of block 0 only."""
        fn = self.fn
        gid = fn.tmp("gid")
        fn.emit(f"{gid} = add i64 {self._sreg('ctaid')}, {self._sreg('tid')}")
        c = fn.tmp("c")
        fn.emit(f"{c} = icmp eq i64 {gid}, 0")
        then, done = fn.label("serial"), fn.label("done")
        fn.emit(f"br i1 {c}, label %{then}, label %{done}")
        fn.start_block(then)
        fn.push()
        self._body(body)
        fn.pop()
        fn.emit(f"br label %{done}")
        fn.start_block(done)

    def _grid_loop(self, s: Loop) -> None:
        fn = self.fn
        regs = {name: self._sreg(name) for name in ("ctaid", "ntid", "tid")}
        blk, gid = fn.tmp("blk"), fn.tmp("gid")
        fn.emit(f"{blk} = mul nuw nsw i64 {regs['ctaid']}, {regs['ntid']}")
        fn.emit(f"{gid} = add nuw nsw i64 {blk}, {regs['tid']}")
        start, stop = self.val(s.start), self.val(s.stop)
        scaled = fn.tmp()
        fn.emit(f"{scaled} = mul nsw i64 {gid}, {s.step}")
        iv = fn.tmp(s.var + ".")
        fn.emit(f"{iv} = add nsw i64 {start}, {scaled}")
        c = fn.tmp("c")
        fn.emit(f"{c} = icmp slt i64 {iv}, {stop}")
        body, done = fn.label("body"), fn.label("done")
        fn.emit(f"br i1 {c}, label %{body}, label %{done}")
        fn.start_block(body)
        fn.push()
        fn.env[-1][s.var] = (iv, I64, False)
        self._body(s.body)
        fn.pop()
        fn.emit(f"br label %{done}")
        fn.start_block(done)

    # ---- cooperative launches: one warp per iteration ------------------------------------------------------------
    @staticmethod
    def _warp_reducible(loop: Loop, plan) -> bool:
        types = {st.name: st.init.dtype for st in walk_stmts(loop.body) if isinstance(st, Var)}
        return all(types[name].name in ("f32", "i32") for red in plan.reductions.values() for name in red)

    def _sreg(self, name: str) -> str:
        fn = self.fn
        r32, r64 = fn.tmp(name), fn.tmp(name)
        fn.emit(f"{r32} = call i32 @llvm.nvvm.read.ptx.sreg.{name}.x()")
        fn.emit(f"{r64} = zext i32 {r32} to i64")
        return r64

    def _warp_loop(self, l: Launch) -> None:
        """c_style.py's cooperative scheme with a warp per iteration: lane-strided reduction and map loops,
        butterfly shuffles to combine accumulators, lane-0 stores, __syncwarp before later reads. The grid is
        exactly one block of 32 per iteration, so there is no guard."""
        fn, s, plan = self.fn, l.loop, l.coop
        gid, lane = self._sreg("ctaid"), self._sreg("tid")
        start = self.val(s.start)
        scaled, iv = fn.tmp(), fn.tmp(s.var + ".")
        fn.emit(f"{scaled} = mul nsw i64 {gid}, {s.step}")
        fn.emit(f"{iv} = add nsw i64 {start}, {scaled}")
        fn.env[-1][s.var] = (iv, I64, False)
        is0 = fn.tmp("lane0")
        fn.emit(f"{is0} = icmp eq i64 {lane}, 0")
        for n, st in enumerate(s.body):
            mode = plan.modes[n]
            if mode == "all":
                self._stmt(st)
            elif mode in ("reduce", "map"):
                red = plan.reductions.get(n, {}) if mode == "reduce" else {}
                for name, op in sorted(red.items()):
                    slot, dt, _ = fn.lookup(name)
                    cur, sel = fn.tmp(), fn.tmp()
                    fn.emit(f"{cur} = load {ty(dt)}, ptr {slot}")
                    fn.emit(f"{sel} = select i1 {is0}, {ty(dt)} {cur}, {ty(dt)} {self._identity(dt, op)}")
                    fn.emit(f"store {ty(dt)} {sel}, ptr {slot}")
                lo, off = fn.tmp("lo"), fn.tmp()
                fn.emit(f"{off} = mul nsw i64 {lane}, {st.step}")
                fn.emit(f"{lo} = add nsw i64 {self.val(st.start)}, {off}")
                self._loop(st.var, lo, self.val(st.stop), st.step * WARP, st.body)
                for name, op in sorted(red.items()):
                    slot, dt, _ = fn.lookup(name)
                    cur = fn.tmp()
                    fn.emit(f"{cur} = load {ty(dt)}, ptr {slot}")
                    fn.emit(f"store {ty(dt)} {self._warp_reduce(cur, dt, op)}, ptr {slot}")
                self._purge()
            else:   # lane0
                then, done = fn.label("lane0"), fn.label("lane0.end")
                fn.emit(f"br i1 {is0}, label %{then}, label %{done}")
                fn.start_block(then)
                fn.push(); self._stmt(st); fn.pop()
                fn.emit(f"br label %{done}")
                fn.start_block(done)
                self._purge()
            if n in plan.barrier_after:
                fn.emit("call void @llvm.nvvm.bar.warp.sync(i32 -1)")
                self.decls["bar.warp.sync"] = "declare void @llvm.nvvm.bar.warp.sync(i32)"

    def _identity(self, dt: DT, op: str) -> str:
        if op == "add":
            one = _float_lit(0.0, dt.name) if dt.is_float else "0"
        else:
            one = _float_lit(float("-inf"), dt.name) if dt.is_float else str(-2 ** 31)
        if dt.count == 1:
            return one
        return "<" + ", ".join(f"{ty(dt.scalar)} {one}" for _ in range(dt.count)) + ">"

    def _warp_reduce(self, v: str, dt: DT, op: str) -> str:
        fn = self.fn
        lanes = []
        for i in range(dt.count):
            if dt.count == 1:
                x = v
            else:
                x = fn.tmp()
                fn.emit(f"{x} = extractelement {ty(dt)} {v}, i64 {i}")
            t, sfx = ty(dt.scalar), ("f32" if dt.is_float else "i32")
            self.decls[f"shfl.{sfx}"] = f"declare {t} @llvm.nvvm.shfl.sync.bfly.{sfx}(i32, {t}, i32, i32)"
            for offset in (16, 8, 4, 2, 1):
                o, c = fn.tmp("sh"), fn.tmp()
                fn.emit(f"{o} = call {t} @llvm.nvvm.shfl.sync.bfly.{sfx}(i32 -1, {t} {x}, i32 {offset}, i32 31)")
                if op == "add":
                    fn.emit(f"{c} = {'fadd' if dt.is_float else 'add'} {t} {x}, {o}")
                else:
                    f = "llvm.maxnum.f32" if dt.is_float else "llvm.smax.i32"
                    self.decls[f] = f"declare {t} @{f}({t}, {t})"
                    fn.emit(f"{c} = call {t} @{f}({t} {x}, {t} {o})")
                x = c
            lanes.append(x)
        if dt.count == 1:
            return lanes[0]
        out = "poison"
        for i, x in enumerate(lanes):
            nxt = fn.tmp()
            fn.emit(f"{nxt} = insertelement {ty(dt)} {out}, {ty(dt.scalar)} {x}, i64 {i}")
            out = nxt
        return out

    def _compute(self, e: E) -> str:
        if e.op in ("exp", "log", "sin", "cos"):
            return self._libm(e.op, e.dtype, self.val(e.src[0]))
        return super()._compute(e)

    def _libm(self, op: str, dt: DT, x: str) -> str:
        fn = self.fn
        if dt.count == 1:
            return self._libm_scalar(op, dt, x)
        out = "poison"
        for i in range(dt.count):
            lane = fn.tmp()
            fn.emit(f"{lane} = extractelement {ty(dt)} {x}, i64 {i}")
            r = self._libm_scalar(op, dt.scalar, lane)
            nxt = fn.tmp()
            fn.emit(f"{nxt} = insertelement {ty(dt)} {out}, {ty(dt.scalar)} {r}, i64 {i}")
            out = nxt
        return out

    def _libm_scalar(self, op: str, dt: DT, x: str) -> str:
        fn = self.fn
        if dt.name == "f16":
            w = fn.tmp()
            fn.emit(f"{w} = fpext half {x} to float")
            r = self._libm_scalar(op, F32, w)
            out = fn.tmp()
            fn.emit(f"{out} = fptrunc float {r} to half")
            return out
        if dt.name != "f32":
            raise CompileError(f"{op} of {dt} has no PTX lowering")
        out = fn.tmp()
        fn.emit(f"{out} = call float @dzc.{op}.f32(float {x})")
        return out


def render_ptx_ir(module: Module, arch: str = "sm_90", coop: bool = True) -> tuple[str, dict[str, list[Launch]]]:
    r = PTXRenderer(arch, coop)
    text = r.render(module)
    return text, r.launches


def render_ptx(module: Module, arch: str = "sm_90", opt: int = 3, coop: bool = True) -> GpuSource:
    """Module -> PTX assembly text for `arch` (llvmlite's NVPTX target)."""
    from dzc.codegen.build import optimize
    text, launches = render_ptx_ir(module, arch, coop)
    mod, tm = optimize(text, ptx_target(arch), opt)
    return GpuSource("cuda", tm.emit_assembly(mod), launches, dict(module.entries))
