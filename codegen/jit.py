"""Compile a kernel Module for this machine and call its entries from Python (tests, tools, the compile check)."""
from __future__ import annotations

import ctypes
import tempfile
from pathlib import Path
from typing import Optional, Sequence

import numpy as np

from dzc.codegen.build import emit_object, link_shared, load_library
from dzc.codegen.kir import Module
from dzc.codegen.llvm import render_llvm
from dzc.codegen.target import Target, host_target


class JitModule:
    """A module compiled to a temporary shared library. `run(entry, arrays, T, P)` passes the arrays as slots."""

    def __init__(self, module: Module, target: Optional[Target] = None, threads: int = 1) -> None:
        self.target = target or host_target()
        self.ir = render_llvm(module, self.target)
        obj = emit_object(self.ir, self.target)
        self._dir = tempfile.TemporaryDirectory(prefix="dzc-jit-")
        self.lib = load_library(link_shared(obj, Path(self._dir.name) / "lib.so", self.target))
        self.set_threads(threads)

    def set_threads(self, n: int) -> None:
        ctypes.c_int.in_dll(self.lib, "dzc_num_threads").value = int(n)

    def run(self, entry: str, arrays: Sequence[np.ndarray], T: int = 1, P: int = 0) -> None:
        for a in arrays:
            assert a.flags.c_contiguous
        table = (ctypes.c_void_p * max(1, len(arrays)))(*[a.ctypes.data for a in arrays])
        getattr(self.lib, f"dzc_{entry}")(table, ctypes.c_int64(T), ctypes.c_int64(P))
