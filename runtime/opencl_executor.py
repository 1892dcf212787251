"""`--target opencl`: run a GPU artifact's OpenCL C kernels through pyopencl (any OpenCL 1.2 device; PoCL on CPUs).

Device choice: `DZC_OPENCL_DEVICE=<substring>` picks the first device whose platform or device name contains it;
otherwise the first GPU, else the first device of any kind. Launches with a cooperative form (a work group per
iteration, see codegen/c_style.py) use it on GPUs and the one-thread form on CPU devices; `DZC_OPENCL_COOP=1|0`
or `OpenCLExecutor(..., coop=True|False)` overrides. The program is built once per executor (`-cl-std=CL1.2`);
each call of the schedule gets its own `cl.Kernel` with its buffers and byte offsets bound once, so a forward step
only sets T and P and enqueues. Every buffer is a plain `cl.Buffer`; slots inside the arena are (arena, offset).
"""
from __future__ import annotations

import os
import time
from typing import Any

import numpy as np

from dzc.errors import CompileError, DeviceError
from dzc.runtime.gpu_executor import GpuExecutor


def _cl():
    try:
        import pyopencl as cl
    except ImportError:
        raise DeviceError("the OpenCL runtime needs pyopencl (pip install 'dzc[opencl]')") from None
    return cl


def opencl_devices() -> list:
    """Every OpenCL device on this machine ([] when there is no platform)."""
    cl = _cl()
    try:
        platforms = cl.get_platforms()
    except cl.Error:
        return []
    out = []
    for p in platforms:
        try:
            out.extend(p.get_devices())
        except cl.Error:
            continue
    return out


def pick_device(want: str | None = None):
    devices = opencl_devices()
    if not devices:
        raise DeviceError("no OpenCL platform on this machine; install a driver (or pip install pocl-binary-distribution)")
    cl = _cl()
    want = want if want is not None else os.environ.get("DZC_OPENCL_DEVICE")
    if want:
        for d in devices:
            if want.lower() in (d.name + " " + d.platform.name).lower():
                return d
        names = "; ".join(f"{d.platform.name}: {d.name}" for d in devices)
        raise DeviceError(f"no OpenCL device matches DZC_OPENCL_DEVICE={want!r} (have: {names})")
    for d in devices:
        if d.type & cl.device_type.GPU:
            return d
    return devices[0]


class OpenCLExecutor(GpuExecutor):
    target = "opencl"
    shared_attrs = ("cl", "device", "context", "queue", "program", "build_seconds", "max_group", "use_coop")

    def _open_device(self) -> None:
        cl = self.cl = _cl()
        self.device = pick_device(self.device_options.get("device"))
        self.context = cl.Context([self.device])
        self.queue = cl.CommandQueue(self.context)
        t = time.perf_counter()
        src = self.device_code("kernels.cl")
        try:
            options = ["-cl-std=CL1.2"] + list(self.device_options.get("build_options", ()))
            self.program = cl.Program(self.context, src).build(options=options)
        except cl.RuntimeError as exc:
            first = next((l for l in str(exc).splitlines() if "error" in l.lower()), str(exc).splitlines()[0])
            raise CompileError(f"{self.artifact.path}/kernels.cl does not build on {self.device.name}: "
                               f"{first.strip()}") from None
        self.build_seconds = time.perf_counter() - t
        self.max_group = int(self.device.max_work_group_size)
        coop = self.device_options.get("coop", os.environ.get("DZC_OPENCL_COOP"))
        if coop is None:
            self.use_coop = bool(self.device.type & cl.device_type.GPU)
        else:
            self.use_coop = str(coop).lower() not in ("0", "false", "no", "off")

    def _alloc(self, nbytes: int) -> Any:
        try:
            return self.cl.Buffer(self.context, self.cl.mem_flags.READ_WRITE, size=int(nbytes))
        except self.cl.Error as exc:
            raise DeviceError(f"cannot allocate {nbytes} bytes on {self.device.name}: {exc}") from None

    def _upload(self, buf: Any, offset: int, data: np.ndarray) -> None:
        self.cl.enqueue_copy(self.queue, buf, np.ascontiguousarray(data), dst_offset=offset)

    def _download(self, buf: Any, offset: int, out: np.ndarray) -> None:
        self.cl.enqueue_copy(self.queue, out, buf, src_offset=offset)

    def _prepare(self, launch: dict, bindings: list) -> Any:
        group = int(launch.get("group", 1))
        if group > self.max_group:
            raise DeviceError(f"kernel {launch['name']} needs work groups of {group}, {self.device.name} allows "
                              f"{self.max_group}; recompile with coop off")
        k = self.cl.Kernel(self.program, launch["name"])
        args: list = []
        for buf, off in bindings:
            args += [buf, np.int64(off)]
        args += [np.int64(0), np.int64(0)]
        k.set_args(*args)
        return (k, len(args) - 2)

    def _enqueue(self, prepared: Any, launch: dict, T: int, P: int, iterations: int) -> None:
        k, ti = prepared
        k.set_arg(ti, np.int64(T))
        k.set_arg(ti + 1, np.int64(P))
        group = int(launch.get("group", 1))
        if group > 1:
            self.cl.enqueue_nd_range_kernel(self.queue, k, (iterations * group,), (group,))
        else:
            self.cl.enqueue_nd_range_kernel(self.queue, k, (iterations,), None)

    def _finish(self) -> None:
        self.queue.finish()
