"""Metal Shading Language dialect of the C-style renderer.

Kernels are `kernel void f(device T *a [[buffer(i)]], ..., constant long &T [[buffer(n)]], ...)`; buffers a
launch only reads are `device const T *`. The runtime binds byte offsets with setBuffer:offset:. A parallel
loop's iteration is `thread_position_in_grid`. Vectors are Metal's 2-4 lane types (wider kir vectors are split
by gpu.legalize_lanes); vector loads and stores go through `packed_*` types, which need only element alignment.
`half` is native. Vector booleans are `boolN`.

Cooperative launches (c_style.py) replace the one-thread form whenever a body qualifies and give each parallel
iteration a threadgroup: one simdgroup (32 threads) reduces with `simd_sum` / `simd_max`; launches whose
iteration count depends only on T (norms and softmax over a few rows at decode) ask for 256 threads and add one
partial per simdgroup in threadgroup memory (`threadgroup float4 *red_ [[threadgroup(0)]]`, 16 bytes per
simdgroup, set by the runtime) and a barrier. Those kernels read their group size from
`threads_per_threadgroup`, so the runtime may launch fewer threads (a multiple of 32) when a pipeline allows
fewer; one-simdgroup kernels always get exactly 32.

Metal cannot be compiled or run on Linux: `check_msl` type-checks the source with libclang as C++17 against
codegen/metal_shim.h (address spaces, half, vector types and constructors, the builtins used here). It catches
wrong types, address-space mixups and bad vector constructors, not MSL-only overload rules.
"""
from __future__ import annotations

import re
import tempfile
from pathlib import Path
from typing import Optional

from dzc.codegen.c_style import CStyleRenderer, GpuSource, _INFIX
from dzc.codegen.gpu import Launch
from dzc.codegen.kir import DT, Buf, Module
from dzc.errors import CompileError

SIMD = 32
SHIM = Path(__file__).with_name("metal_shim.h")
# attribute spellings the renderer emits (check_msl verifies nothing else appears in [[...]])
ATTRIBUTES = ("buffer", "threadgroup", "thread_position_in_grid", "threadgroup_position_in_grid",
              "thread_position_in_threadgroup", "thread_index_in_simdgroup", "simdgroup_index_in_threadgroup",
              "threads_per_threadgroup", "simdgroups_per_threadgroup")


def _uses_t_only(j) -> bool:
    if isinstance(j, int):
        return True
    if j == "T":
        return True
    if j == "P":
        return False
    return all(_uses_t_only(x) for x in j[1:])


class MetalRenderer(CStyleRenderer):
    target = "metal"
    max_lanes = 4
    fp16 = True
    group_size = SIMD
    kernel_prefix = "kernel void"
    header = "#include <metal_stdlib>\nusing namespace metal;\n"

    def group_for(self, launch: Launch) -> int:
        it = launch.iterations
        few = (isinstance(it, int) and it < 64) or (not isinstance(it, int) and _uses_t_only(it))
        group = 256 if few else SIMD
        launch.shared = 16 * (group // SIMD) if group > SIMD else 0
        return group

    # ---- types ----------------------------------------------------------------------------------------------------
    def vector_name(self, base: str, dt: DT) -> str:
        if dt.count > 4:
            raise CompileError(f"Metal has no {dt.count}-lane vectors (legalize first)")
        return f"{base}{dt.count}"

    def _space(self, buf: Buf) -> str:
        return "thread" if buf.local else "device"

    # ---- signature ------------------------------------------------------------------------------------------------
    def signature(self, l: Launch, written: set[str]) -> tuple[list[str], list[str]]:
        sig: list[str] = []
        n = 0
        for p in l.params:
            if p.buf is None:
                continue
            const = "" if p.buf.name in written else "const "
            sig.append(f"device {const}{self.mtype(p.buf.dtype)} *{self.ident(p.buf.name)} [[buffer({n})]]")
            n += 1
        for p in l.params:
            if p.buf is None:
                sig.append(f"constant long &{p.name} [[buffer({n})]]")
                n += 1
        if n > 31:
            raise CompileError(f"kernel {l.kernel} binds {n} buffers; Metal allows 31 per kernel")
        if l.group > 1:
            sig += ["uint tg_ [[threadgroup_position_in_grid]]", "uint tl_ [[thread_position_in_threadgroup]]",
                    "uint tn_ [[threads_per_threadgroup]]", "uint sl_ [[thread_index_in_simdgroup]]",
                    "uint sg_ [[simdgroup_index_in_threadgroup]]", "uint ns_ [[simdgroups_per_threadgroup]]"]
            if l.group > SIMD:
                sig.append("threadgroup float4 *red_ [[threadgroup(0)]]")
        else:
            sig.append("uint gid_t_ [[thread_position_in_grid]]")
        return sig, []

    def thread_index(self) -> str:
        return "(long)gid_t_"

    def group_stride(self, w: int) -> str:
        return "(long)tn_"

    def group_index(self) -> str:
        return "(long)tg_"

    def lane_index(self) -> str:
        return "(long)tl_"

    def barrier(self) -> str:
        return "threadgroup_barrier(mem_flags::mem_device | mem_flags::mem_threadgroup)"

    def can_group_reduce(self, dt: DT) -> bool:
        return dt.name in ("f32", "f16", "i32", "u32")

    def group_reduce(self, cname: str, dt: DT, op: str, w: int) -> None:
        fn = "simd_sum" if op == "add" else "simd_max"
        self.emit(f"{cname} = {fn}({cname});")
        if w > SIMD:
            t = self.rtype(dt)
            arr = f"((threadgroup {t} *)red_)"
            self.emit(f"if (sl_ == 0) {arr}[sg_] = {cname};")
            self.emit("threadgroup_barrier(mem_flags::mem_threadgroup);")
            self.emit(f"{cname} = {arr}[0];")
            comb = f"{cname} + {arr}[j_]" if op == "add" else f"{'fmax' if dt.is_float else 'max'}({cname}, {arr}[j_])"
            self.emit(f"for (uint j_ = 1; j_ < ns_; j_++) {cname} = {comb};")
            self.emit("threadgroup_barrier(mem_flags::mem_threadgroup);")

    # ---- memory ---------------------------------------------------------------------------------------------------
    def _packed_ptr(self, buf: Buf, p: str, i: str, dt: DT, const: bool) -> str:
        c = "const " if const else ""
        return f"(({self._space(buf)} {c}packed_{self.mtype(dt.scalar)}{dt.count} *)({p} + {i}))"

    def load_text(self, buf: Buf, p: str, i: str, dt: DT) -> str:
        n = dt.count
        if n == 1:
            raw = f"{p}[{i}]"
            return f"({raw} != 0)" if dt.name == "bool" else raw
        raw = f"{self.mtype(dt.scalar)}{n}(*{self._packed_ptr(buf, p, i, dt, True)})"
        if dt.name == "bool":
            return f"bool{n}({raw} != uchar{n}(0))"
        return raw

    def store_text(self, buf: Buf, p: str, i: str, v: str, dt: DT) -> str:
        if dt.count == 1:
            return f"{p}[{i}] = {v}"
        return f"*{self._packed_ptr(buf, p, i, dt, False)} = {v}"

    # ---- expressions ----------------------------------------------------------------------------------------------
    def compare_text(self, op: str, a: str, b: str, sdt: DT) -> str:
        text = f"({a} {_INFIX[op]} {b})"
        return text if sdt.count == 1 else f"bool{sdt.count}{text}"

    def bool_logic(self, op: str, a: str, b: str, sdt: DT) -> str:
        sym = {"and": "&&", "or": "||", "xor": "!="}[op]
        text = f"({a} {sym} {b})"
        return text if sdt.count == 1 else f"bool{sdt.count}{text}"

    def bool_not(self, a: str, sdt: DT) -> str:
        return f"(!{a})" if sdt.count == 1 else f"bool{sdt.count}(!{a})"

    def select_text(self, c: str, a: str, b: str, dt: DT) -> str:
        return f"({c} ? {a} : {b})" if dt.count == 1 else f"select({b}, {a}, {c})"

    def cast_text(self, x: str, src: DT, dst: DT) -> str:
        if dst.name == "bool":
            return self.compare_text("ne", x, self.const(0, src), src)
        t = self.rtype(dst)
        return f"(({t}){x})" if dst.count == 1 else f"{t}({x})"

    def bitcast_text(self, x: str, src: DT, dst: DT) -> str:
        return f"as_type<{self.rtype(dst)}>({x})"

    def bcast_text(self, dt: DT, x: str) -> str:
        return f"{self.rtype(dt)}({x})"

    def lane_text(self, x: str, dt: DT, i: int) -> str:
        return f"{x}.{'xyzw'[i]}"

    def slice_text(self, x: str, dt: DT, start: int, count: int) -> str:
        return f"{x}.{'xyzw'[start:start + count]}"

    def vec_text(self, dt: DT, parts: list[str]) -> str:
        return f"{self.rtype(dt)}({', '.join(parts)})"


def render_metal(module: Module, coop: Optional[bool] = None) -> GpuSource:
    return MetalRenderer(coop=coop).render(module)


# ---- type-checking on machines without Metal ---------------------------------------------------------------------------
def check_msl(source: str) -> list[str]:
    """Type-check MSL with libclang against metal_shim.h; returns error lines (empty: it checks). Raises
    CompileError when libclang is not installed (pip install libclang)."""
    try:
        import clang.cindex as ci
    except ImportError:
        raise CompileError("checking Metal source needs libclang (pip install libclang)") from None
    errors = [f"unknown attribute [[{a}]]" for a in sorted(set(re.findall(r"\[\[\s*(\w+)", source)))
              if a not in ATTRIBUTES]
    with tempfile.TemporaryDirectory() as tmp:
        inc = Path(tmp)
        (inc / "metal_stdlib").write_text(f'#include "{SHIM}"\n')
        path = inc / "kernels.metal"
        path.write_text(re.sub(r"\[\[[^\]]*\]\]", "", source))   # attributes: checked above
        tu = ci.Index.create().parse(str(path), args=[
            "-x", "c++", "-std=c++17", "-fsyntax-only", "-nostdinc", "-nostdinc++", f"-I{inc}",
            "-Wno-unknown-attributes", "-ferror-limit=0"])
        lines = source.splitlines()
        for d in tu.diagnostics:
            if d.severity < ci.Diagnostic.Error:
                continue
            loc = d.location
            where = ""
            if loc.file is not None and loc.file.name == str(path):
                where = f"line {loc.line}: {lines[loc.line - 1].strip()[:120]}"
            else:     # inside the shim: report the instantiating line of the kernel source
                for c in d.children:
                    if c.location.file is not None and c.location.file.name == str(path):
                        where = f"line {c.location.line}: {lines[c.location.line - 1].strip()[:120]}"
            errors.append(f"{d.spelling} ({where})")
    return errors
