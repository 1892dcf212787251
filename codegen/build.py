"""LLVM IR text -> optimised object -> shared library (AOT), and loading it back.

`emit_object` runs the O3 pipeline for the target machine and writes a relocatable, position-independent object.
`link_shared` turns it into `lib.so` with the system C compiler (`cc -shared ... -lgomp -lm`). `load_library`
opens it with ctypes after loading libgomp with RTLD_GLOBAL. Without a C compiler, `load_object` links the saved
object in-process with LLVM's ORC JIT (same code, no cc).
"""
from __future__ import annotations

import ctypes
import ctypes.util
import os
import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Optional

from dzc.codegen.target import Target, llvm_binding
from dzc.errors import CompileError

_GOMP: list = []


def load_libgomp() -> None:
    """libgomp must be global before generated code (or an ORC-linked object) resolves GOMP_parallel."""
    if _GOMP:
        return
    for name in ("libgomp.so.1", "libgomp.so", "libgomp.1.dylib", "libomp.dylib"):
        try:
            _GOMP.append(ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL))
            return
        except OSError:
            continue
    raise CompileError("libgomp (GNU OpenMP runtime) not found; install libgomp1 (apt) or gcc")


def target_machine(target: Target, opt: int = 3):
    llvm = llvm_binding(all_targets=not target.host)
    try:
        t = llvm.Target.from_triple(target.triple)
    except RuntimeError as exc:
        raise CompileError(f"LLVM has no target for triple {target.triple!r}: {exc}") from None
    return t.create_target_machine(cpu=target.cpu, features=target.features, opt=opt, reloc="pic",
                                   codemodel="default")


def optimize(ir_text: str, target: Target, opt: int = 3):
    """Parse, verify and optimise; returns (module, target machine)."""
    llvm = llvm_binding(all_targets=not target.host)
    try:
        mod = llvm.parse_assembly(ir_text)
        mod.verify()
    except RuntimeError as exc:
        if os.environ.get("DZC_DUMP_BAD_IR"):
            Path(os.environ["DZC_DUMP_BAD_IR"]).write_text(ir_text)
        raise CompileError(f"generated LLVM IR does not verify (a dzc bug): {str(exc).splitlines()[0]}") from None
    tm = target_machine(target, opt)
    mod.triple = target.triple
    mod.data_layout = str(tm.target_data)
    pto = llvm.create_pipeline_tuning_options(speed_level=opt)
    pto.loop_vectorization = os.environ.get("DZC_AUTOVEC", "0") == "1"
    pto.slp_vectorization = True
    pb = llvm.create_pass_builder(tm, pto)
    mpm = pb.getModulePassManager()
    mpm.run(mod, pb)
    return mod, tm


def emit_object(ir_text: str, target: Target, opt: int = 3) -> bytes:
    mod, tm = optimize(ir_text, target, opt)
    return tm.emit_object(mod)


def emit_assembly(ir_text: str, target: Target, opt: int = 3) -> str:
    mod, tm = optimize(ir_text, target, opt)
    return tm.emit_assembly(mod)


def find_cc() -> Optional[str]:
    for name in (os.environ.get("CC"), "cc", "gcc", "clang"):
        if name and shutil.which(name):
            return shutil.which(name)
    return None


def link_shared(obj: bytes, out: Path, target: Target) -> Path:
    """Link an object into a shared library with the system C compiler."""
    cc = find_cc()
    if cc is None:
        raise CompileError("no C compiler (cc/gcc/clang) to link lib.so; the artifact keeps lib.o for ORC loading")
    out = Path(out)
    with tempfile.TemporaryDirectory() as tmp:
        o = Path(tmp) / "kernels.o"
        o.write_bytes(obj)
        cmd = [cc, "-shared", "-o", str(out), str(o), "-lgomp", "-lm"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            raise CompileError(f"linking {out.name} failed: {proc.stderr.strip().splitlines()[-1] if proc.stderr else cmd}")
    return out


def load_library(path: Path) -> ctypes.CDLL:
    load_libgomp()
    try:
        return ctypes.CDLL(str(path))
    except OSError as exc:
        raise CompileError(f"{path}: cannot load compiled library ({exc})") from None


class OrcLibrary:
    """An object file linked in-process by ORC; `address(name)` gives symbol addresses (no cc needed)."""

    def __init__(self, obj_path: Path, symbols: list[str]) -> None:
        load_libgomp()
        llvm = llvm_binding()
        builder = llvm.JITLibraryBuilder().add_object_file(str(obj_path))
        gomp = _GOMP[0]
        libm = ctypes.CDLL(ctypes.util.find_library("m") or "libm.so.6")
        for name in ("GOMP_parallel", "GOMP_barrier", "omp_get_thread_num", "omp_get_num_threads"):
            builder = builder.import_symbol(name, ctypes.cast(getattr(gomp, name), ctypes.c_void_p).value)
        libc = ctypes.CDLL(None)
        for lib, names in ((libm, ("expf", "logf", "sinf", "cosf", "sqrtf", "fmodf", "exp", "log", "sin", "cos")),
                           (libc, ("memset", "memcpy", "memmove"))):
            for name in names:
                builder = builder.import_symbol(name, ctypes.cast(getattr(lib, name), ctypes.c_void_p).value)
        for s in symbols:
            builder = builder.export_symbol(s)
        self._lljit = llvm.create_lljit_compiler()
        self._rt = builder.link(self._lljit, "dzc")

    def address(self, name: str) -> int:
        return self._rt[name]
