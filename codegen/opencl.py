"""OpenCL C 1.2 dialect of the C-style renderer.

Buffers arrive as `(__global uchar *base, long byte_offset)` pairs (the runtime binds arena and weight-blob
offsets without sub-buffer alignment rules) and are cast to typed pointers on entry. Vectors are OpenCL's
`floatN` (N <= 16), loaded and stored with `vloadN`/`vstoreN` (element alignment suffices). Vector booleans are
`intN` masks (0 / -1), as OpenCL comparisons produce them.

Half precision: without `cl_khr_fp16` (PoCL, many CPUs) `half` is storage only. f16 values then live in float
registers: loads use `vload_half[N]`, stores `vstore_half[N]_rte`, bit patterns convert through the same
builtins on a private variable, and a cast to f16 rounds to half precision; f16 arithmetic runs in f32.
`OpenCLRenderer(fp16=True)` uses native `half` instead (devices that report cl_khr_fp16).
"""
from __future__ import annotations

from typing import Optional

from dzc.codegen.c_style import CStyleRenderer, GpuSource, _INFIX
from dzc.codegen.gpu import Launch
from dzc.codegen.kir import DT, Buf, Module
from dzc.errors import CompileError

_SIGNED_OF_BITS = {8: "char", 16: "short", 32: "int", 64: "long"}


class OpenCLRenderer(CStyleRenderer):
    target = "opencl"
    max_lanes = 8        # not 16: see DEFAULT_VECTOR in codegen/gpu_build.py (PoCL and float16 on AVX2 hosts)
    fp16 = False
    group_size = 64
    dual = True
    kernel_prefix = "__kernel void"

    def __init__(self, coop: Optional[bool] = None, fp16: bool = False) -> None:
        super().__init__(coop)
        self.fp16 = fp16
        self.header = "#pragma OPENCL EXTENSION cl_khr_fp16 : enable\n" if fp16 else ""

    # ---- types ----------------------------------------------------------------------------------------------------
    def rtype(self, dt: DT) -> str:
        if dt.name == "bool" and dt.count > 1:
            return f"int{dt.count}"
        return super().rtype(dt)

    def _half_mem(self, buf: Buf) -> bool:
        return buf.dtype.name == "f16" and not self.fp16 and not buf.local

    def _elem_bits(self, dt: DT) -> int:
        """Bits of one element of the register type (f16 without fp16 lives in 32-bit floats)."""
        if dt.name == "f16" and not self.fp16:
            return 32
        if dt.name == "bool":
            return 32
        return dt.bits

    # ---- signature ------------------------------------------------------------------------------------------------
    def signature(self, l: Launch, written: set[str]) -> tuple[list[str], list[str]]:
        sig, pro = [], []
        for p in l.params:
            if p.buf is None:
                sig.append(f"long {p.name}")
                continue
            name = self.ident(p.buf.name)
            const = "" if p.buf.name in written else "const "
            sig += [f"__global {const}uchar *{name}_base", f"long {name}_off"]
            t = self.mtype(p.buf.dtype)
            pro.append(f"__global {const}{t} *{name} = (__global {const}{t} *)({name}_base + {name}_off);")
        return sig, pro

    def thread_index(self) -> str:
        return "(long)get_global_id(0)"

    def group_index(self) -> str:
        return "(long)get_group_id(0)"

    def lane_index(self) -> str:
        return "(long)get_local_id(0)"

    def barrier(self) -> str:
        return "barrier(CLK_LOCAL_MEM_FENCE | CLK_GLOBAL_MEM_FENCE)"

    def group_reduce(self, cname: str, dt: DT, op: str, w: int) -> None:
        t = self.rtype(dt)
        arr = f"red_{t}"
        decl = f"__local {t} {arr}[{w}];"
        if decl not in self.scope_decls:
            self.scope_decls.append(decl)
        comb = (lambda a, b: f"{a} + {b}") if op == "add" else (
            lambda a, b: f"{'fmax' if dt.is_float else 'max'}({a}, {b})")
        self.emit(f"{arr}[lane_] = {cname};")
        self.emit("barrier(CLK_LOCAL_MEM_FENCE);")
        self.emit(f"for (long s_ = {w // 2}; s_ > 0; s_ >>= 1) {{")
        self.emit(f"  if (lane_ < s_) {arr}[lane_] = {comb(f'{arr}[lane_]', f'{arr}[lane_ + s_]')};")
        self.emit("  barrier(CLK_LOCAL_MEM_FENCE);")
        self.emit("}")
        self.emit(f"{cname} = {arr}[0];")
        self.emit("barrier(CLK_LOCAL_MEM_FENCE);")

    # ---- memory ---------------------------------------------------------------------------------------------------
    def load_text(self, buf: Buf, p: str, i: str, dt: DT) -> str:
        n = dt.count
        if self._half_mem(buf):
            return f"vload_half({i}, {p})" if n == 1 else f"vload_half{n}(0, {p} + {i})"
        raw = f"{p}[{i}]" if n == 1 else f"vload{n}(0, {p} + {i})"
        if dt.name == "bool":
            return f"({raw} != 0)" if n == 1 else f"convert_int{n}({raw} != (uchar{n})(0))"
        return raw

    def store_text(self, buf: Buf, p: str, i: str, v: str, dt: DT) -> str:
        n = dt.count
        if self._half_mem(buf):
            return f"vstore_half_rte({v}, {i}, {p})" if n == 1 else f"vstore_half{n}_rte({v}, 0, {p} + {i})"
        return f"{p}[{i}] = {v}" if n == 1 else f"vstore{n}({v}, 0, {p} + {i})"

    # ---- expressions ----------------------------------------------------------------------------------------------
    def compare_text(self, op: str, a: str, b: str, sdt: DT) -> str:
        text = f"({a} {_INFIX[op]} {b})"
        if sdt.count > 1 and self._elem_bits(sdt) != 32:
            return f"convert_int{sdt.count}{text}"
        return text

    def bool_not(self, a: str, sdt: DT) -> str:
        return f"(!{a})" if sdt.count == 1 else f"(~{a})"

    def select_text(self, c: str, a: str, b: str, dt: DT) -> str:
        if dt.count == 1:
            return f"({c} ? {a} : {b})"
        bits = self._elem_bits(dt)
        mask = c if bits == 32 else f"convert_{_SIGNED_OF_BITS[bits]}{dt.count}({c})"
        return f"select({b}, {a}, {mask})"

    def cast_text(self, x: str, src: DT, dst: DT) -> str:
        n = dst.count
        if dst.name == "bool":
            zero = self.const(0, src)
            return self.compare_text("ne", x, zero, src)
        if src.name == "bool" and n > 1:
            x = f"(-{x})"
        to_half = dst.name == "f16" and not self.fp16
        t = self.rtype(DT("f32", n) if to_half else dst)
        if src.name == "f16" and not self.fp16 and (to_half or dst.name == "f32"):
            out = x
        elif n == 1:
            out = f"(({t}){x})"
        else:
            out = f"convert_{t}({x})"
        return self._round_half(out, n) if to_half else out

    def _round_half(self, x: str, n: int) -> str:
        sfx = "" if n == 1 else str(n)
        self._half_helpers(n)
        return f"dzc_rhalf{sfx}({x})"

    def _half_helpers(self, n: int) -> None:
        sfx = "" if n == 1 else str(n)
        f, u = ("float", "ushort") if n == 1 else (f"float{n}", f"ushort{n}")
        self.helpers[f"dzc_h2f{sfx}"] = (
            f"static inline {f} dzc_h2f{sfx}({u} b) {{ return vload_half{sfx}(0, (const half *)&b); }}")
        self.helpers[f"dzc_f2h{sfx}"] = (
            f"static inline {u} dzc_f2h{sfx}({f} v) {{ {u} b; vstore_half{sfx}_rte(v, 0, (half *)&b); return b; }}")
        self.helpers[f"dzc_rhalf{sfx}"] = (
            f"static inline {f} dzc_rhalf{sfx}({f} v) {{ return dzc_h2f{sfx}(dzc_f2h{sfx}(v)); }}")

    def bitcast_text(self, x: str, src: DT, dst: DT) -> str:
        if src.name == "bool" or dst.name == "bool":
            raise CompileError("bitcast of booleans has no OpenCL spelling")
        if not self.fp16 and "f16" in (src.name, dst.name):
            if src.name == dst.name:
                return x
            if src.name == "f16":           # float register -> half bits -> destination
                n = src.count
                self._half_helpers(n)
                bits = f"dzc_f2h{'' if n == 1 else n}({x})"
                return f"as_{self.rtype(dst)}({bits})" if dst.name != "u16" else bits
            n = dst.count
            self._half_helpers(n)
            u = "ushort" if n == 1 else f"ushort{n}"
            bits = x if src.name == "u16" and src.count == n else f"as_{u}({x})"
            return f"dzc_h2f{'' if n == 1 else n}({bits})"
        return f"as_{self.rtype(dst)}({x})"

    def bcast_text(self, dt: DT, x: str) -> str:
        if dt.name == "bool":
            return f"(int{dt.count})(-(int)({x}))"
        return f"(({self.rtype(dt)})({x}))"

    def lane_text(self, x: str, dt: DT, i: int) -> str:
        text = f"{x}.s{i:x}"
        return f"({text} != 0)" if dt.name == "bool" else text

    def slice_text(self, x: str, dt: DT, start: int, count: int) -> str:
        if count == 1:
            return self.lane_text(x, dt, start)
        return f"{x}.s" + "".join(f"{j:x}" for j in range(start, start + count))

    def vec_text(self, dt: DT, parts: list[str]) -> str:
        return f"(({self.rtype(dt)})({', '.join(parts)}))"


def render_opencl(module: Module, coop: Optional[bool] = None, fp16: bool = False) -> GpuSource:
    return OpenCLRenderer(coop=coop, fp16=fp16).render(module)
