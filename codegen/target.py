"""What the code generators know about a machine: triple, CPU, features, vector width and register count.

`host_target()` describes this machine; `cpu_target(cpu=..., triple=...)` a cross target (x86-64-v3, aarch64
linux, arm64-apple-macosx with cpu apple-m1). Lowering reads `vector_width` (f32 lanes of one native vector) and
`vector_regs` to size register tiles; the LLVM renderer puts triple/cpu/features on every function.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from dzc.errors import CompileError

_LLVM_READY = {"native": False, "all": False}


def llvm_binding(all_targets: bool = False):
    import llvmlite.binding as llvm
    if not _LLVM_READY["native"]:
        llvm.initialize_native_target()
        llvm.initialize_native_asmprinter()
        _LLVM_READY["native"] = True
    if all_targets and not _LLVM_READY["all"]:
        llvm.initialize_all_targets()
        llvm.initialize_all_asmprinters()
        _LLVM_READY["all"] = True
    return llvm


@dataclass(frozen=True)
class Target:
    """A compile target for the CPU backend. `name` is the dzc target family ("cpu")."""

    triple: str
    cpu: str
    features: str = ""                 # LLVM feature string, e.g. "+avx2,+fma"
    vector_width: int = 4              # f32 lanes in one native vector register
    vector_regs: int = 16              # architectural vector registers
    host: bool = False
    name: str = "cpu"
    required_features: tuple[str, ...] = field(default=())   # CPU flags a machine needs to run the code

    @property
    def arch(self) -> str:
        return self.triple.split("-")[0]

    @property
    def is_apple(self) -> bool:
        return "apple" in self.triple

    @property
    def int8_dot(self) -> bool:
        """AVX-512 VNNI (vpdpbusd on 16 i32 lanes): int8 weights with int8 activations run as integer dot products."""
        return self.vector_width == 16 and "avx512vnni" in _feature_set(self.features)

    @property
    def denormals_fast(self) -> bool:
        """f32 arithmetic on subnormal operands at full speed. Measured on Zen 4 (no slowdown with every weight
        subnormal); Intel cores take microcode assists, so the fp8 GEMV keeps the f16 route there."""
        return self.arch == "x86_64" and self.cpu.startswith("znver")

    def describe(self) -> str:
        return f"{self.triple} cpu={self.cpu} vector={self.vector_width}xf32"


def _feature_set(features: str) -> set[str]:
    return {f[1:] for f in features.split(",") if f.startswith("+")}


def _x86_width(feats: set[str]) -> tuple[int, int]:
    if "avx512f" in feats:
        return 16, 32
    if "avx2" in feats or "avx" in feats:
        return 8, 16
    return 4, 16


# CPU flags (as /proc/cpuinfo spells them) that kernels compiled with these LLVM features need, by LLVM name.
_X86_REQUIRED = {"avx512f": "avx512f", "avx512bw": "avx512bw", "avx512vl": "avx512vl", "avx512dq": "avx512dq",
                 "avx512vnni": "avx512_vnni", "avx2": "avx2", "fma": "fma", "f16c": "f16c", "avx": "avx",
                 "bmi2": "bmi2"}


def _required(arch: str, feats: set[str]) -> tuple[str, ...]:
    if arch in ("x86_64", "x86-64"):
        return tuple(flag for name, flag in _X86_REQUIRED.items() if name in feats)
    if arch in ("aarch64", "arm64"):
        return ("asimd",)
    return ()


def host_target() -> Target:
    llvm = llvm_binding()
    triple = llvm.get_default_triple()
    cpu = llvm.get_host_cpu_name()
    features = llvm.get_host_cpu_features().flatten()
    feats = _feature_set(features)
    arch = triple.split("-")[0]
    if arch == "x86_64":
        width, regs = _x86_width(feats)
    else:
        width, regs = 4, 32
    return Target(triple, cpu, features, width, regs, True, required_features=_required(arch, feats))


_CROSS_DEFAULTS = {
    "aarch64": "generic", "arm64": "apple-m1", "x86_64": "x86-64-v3",
}


def cpu_target(cpu: str | None = None, triple: str | None = None) -> Target:
    """The host, or a named CPU (`--cpu`) and/or triple (`--triple`). Cross targets compile to objects only."""
    if cpu is None and triple is None:
        return host_target()
    llvm = llvm_binding(all_targets=True)
    host = llvm.get_default_triple()
    if triple is None:
        triple = "arm64-apple-macosx14.0.0" if cpu and cpu.startswith("apple-") else host
    arch = triple.split("-")[0]
    if cpu is None:
        cpu = _CROSS_DEFAULTS.get(arch, "generic")
    try:
        target = llvm.Target.from_triple(triple)
        tm = target.create_target_machine(cpu=cpu, features="", opt=2)
    except RuntimeError as exc:
        raise CompileError(f"unknown target triple {triple!r} ({exc}); try x86_64-unknown-linux-gnu, "
                           f"aarch64-unknown-linux-gnu or arm64-apple-macosx14.0.0") from None
    del tm
    if arch == "x86_64":
        levels = {"x86-64-v4": 16, "x86-64-v3": 8, "x86-64-v2": 4, "x86-64": 4}
        if cpu in levels:
            width = levels[cpu]
        else:
            width = 16 if any(k in cpu for k in ("skylake-avx512", "icelake", "sapphirerapids", "emeraldrapids",
                                                 "cascadelake", "cooperlake", "tigerlake", "znver4", "znver5",
                                                 "graniterapids")) else 8
        regs = 32 if width == 16 else 16
        feats = {16: {"avx512f", "avx512bw", "avx512vl", "avx512dq", "avx2", "fma", "f16c", "avx"},
                 8: {"avx2", "fma", "f16c", "avx", "bmi2"}, 4: set()}[width]
    else:
        width, regs, feats = 4, 32, {"asimd"}
    is_host = triple == host and cpu == llvm.get_host_cpu_name()
    return Target(triple, cpu, "", width, regs, is_host, required_features=_required(arch, feats))
