"""Compile any program for OpenCL and run it on numpy inputs, like `codegen.runner.NativeProgram` does for the CPU.

    outs = OpenCLProgram(program, store).run({"x": x, "tokens": ids})

Used by tests to run every kernel kind on a real OpenCL device (PoCL on CPUs) against the interpreter, and to
hold the other GPU targets to the same kernels: `checks=("metal", "cuda")` also renders the module as Metal
(type-checked with codegen.metal.check_msl) and as PTX for sm_80 and sm_90 (assembled with ptxas), raising
CompileError on the first problem. Inputs and cache rows work as in NativeProgram.
"""
from __future__ import annotations

import shutil
import subprocess
import tempfile
from pathlib import Path
from typing import Mapping, Optional, Sequence

import numpy as np

from dzc.codegen.compile import lower_programs, pack_slots
from dzc.codegen.gpu import eval_host
from dzc.codegen.gpu_build import gpu_target
from dzc.codegen.kir import Module
from dzc.codegen.opencl import render_opencl
from dzc.errors import CompileError
from dzc.ir.program import Program
from dzc.runtime.native_executor import _NP, plan_arena, poly_eval


def ptxas(ptx: str, arch: str) -> None:
    """Assemble PTX with ptxas (CompileError with its first message on failure)."""
    exe = shutil.which("ptxas")
    if exe is None:
        raise CompileError("ptxas is not on PATH (install the CUDA toolkit to assemble PTX)")
    with tempfile.TemporaryDirectory() as tmp:
        src = Path(tmp) / "k.ptx"
        src.write_text(ptx)
        proc = subprocess.run([exe, f"-arch={arch}", str(src), "-o", str(Path(tmp) / "k.cubin")],
                              capture_output=True, text=True)
    if proc.returncode != 0:
        raise CompileError(f"ptxas -arch={arch} rejects the PTX: {(proc.stderr or proc.stdout).strip()[:500]}")


def check_targets(module: Module, checks: Sequence[str]) -> None:
    """Render `module` for each named non-executed target and check it (module doc)."""
    if "metal" in checks:
        from dzc.codegen.metal import check_msl, render_metal
        errors = check_msl(render_metal(module).source)
        if errors:
            raise CompileError(f"generated Metal does not type-check: {errors[0]} (+{len(errors) - 1} more)")
    if "cuda" in checks:
        from dzc.codegen.ptx import ARCHS, render_ptx
        for arch in ARCHS:
            ptxas(render_ptx(module, arch).source, arch)


class OpenCLProgram:
    def __init__(self, program: Program, store, coop: Optional[bool] = None, vector_width: Optional[int] = None,
                 checks: Sequence[str] = (), device: Optional[str] = None) -> None:
        from dzc.runtime.opencl_executor import _cl, pick_device
        self.program = program
        self.module, self.slots = lower_programs({program.name: program}, store, gpu_target("opencl", vector_width))
        check_targets(self.module, checks)
        self.source = render_opencl(self.module)
        self.launches = self.source.manifest()["launches"]
        self.weights = {name: arr for name, (_, arr) in pack_slots(self.slots, store).items()}
        cl = self.cl = _cl()
        self.device = pick_device(device)
        self.coop = bool(self.device.type & cl.device_type.GPU) if coop is None else coop
        self.context = cl.Context([self.device])
        self.queue = cl.CommandQueue(self.context)
        self.cl_program = cl.Program(self.context, self.source.source).build(options=["-cl-std=CL1.2"])

    def _buffer(self, arr: np.ndarray):
        cl = self.cl
        arr = np.ascontiguousarray(arr)
        if arr.nbytes == 0:
            return cl.Buffer(self.context, cl.mem_flags.READ_WRITE, size=64)
        buf = cl.Buffer(self.context, cl.mem_flags.READ_WRITE, size=max(64, arr.nbytes))
        cl.enqueue_copy(self.queue, buf, arr)
        return buf

    def run(self, inputs: Mapping[str, np.ndarray], cache_rows: Optional[Mapping[str, int]] = None,
            coop: Optional[bool] = None) -> dict[str, np.ndarray]:
        """Run once (`coop` overrides the constructor's choice of launch forms for this run)."""
        cl = self.cl
        coop = self.coop if coop is None else coop
        from dzc.codegen.runner import NativeProgram, run_env
        env = run_env(self.program, inputs, cache_rows)
        slots = [NativeProgram._slot_json(s) for s in self.slots.slots]
        total, offsets = plan_arena(slots, {self.program.name: env})
        arena = cl.Buffer(self.context, cl.mem_flags.READ_WRITE, size=max(64, total))
        binding: dict[int, tuple] = {}
        host: dict[int, np.ndarray] = {}
        for s, js in zip(self.slots.slots, slots):
            dt = np.dtype(_NP[js["dtype"]])
            if s.kind == "weight":
                arr = self.weights[s.name]
            elif s.kind in ("input", "cache"):
                arr = np.ascontiguousarray(inputs[s.name], dtype=dt)
            elif s.kind == "output":
                arr = np.zeros(max(1, max(poly_eval(p, env) for p in js["sizes"])), dt)
            else:
                if s.index in offsets:
                    binding[s.index] = (arena, offsets[s.index])
                continue
            host[s.index] = arr
            binding[s.index] = (self._buffer(arr), 0)
        for call in self.module.entries[self.program.name]:
            for launch in self.launches[call.kernel]:
                if coop and "coop" in launch:
                    launch = launch["coop"]
                n = eval_host(launch["iterations"], env["T"], env["P"])
                if n <= 0:
                    continue
                k = cl.Kernel(self.cl_program, launch["name"])
                args: list = []
                for slot in call.slots:
                    buf, off = binding[slot]
                    args += [buf, np.int64(off)]
                k.set_args(*args, np.int64(env["T"]), np.int64(env["P"]))
                g = launch["group"]
                cl.enqueue_nd_range_kernel(self.queue, k, (n * g,), (g,) if g > 1 else None)
        self.queue.finish()
        result = {}
        from dzc.codegen.runner import _shape
        for name, node in self.program.outputs:
            slot = next(s for s in self.slots.slots if s.name == name and s.kind in ("output", "cache"))
            arr = host[slot.index]
            cl.enqueue_copy(self.queue, arr, binding[slot.index][0])
            shape = tuple(int(d) for d in _shape(node, env))
            if slot.kind == "output":
                result[name] = arr[: int(np.prod(shape))].reshape(shape).copy()
            else:
                p = env["P"]
                result[name] = arr[p: p + shape[0]].copy()
        return result
