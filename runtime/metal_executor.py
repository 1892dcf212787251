"""`--target metal`: run a GPU artifact's Metal Shading Language kernels on macOS through PyObjC (`import Metal`).

The library is compiled from kernels.metal at load (`newLibraryWithSource`, fast math off so exp/log match the
other targets), one compute pipeline per device function. Buffers are shared-storage MTLBuffers (Apple GPUs
share memory with the CPU, so uploads and downloads are copies into `contents()`). A forward step encodes every
launch into one compute encoder (serial dispatch: each dispatch sees the previous one's writes), commits and
waits. Launch sizes: one thread per iteration in threadgroups of up to 256, or for cooperative launches one
threadgroup per iteration (32 threads, or up to the manifest's group size when the pipeline allows it, with
16 bytes of threadgroup memory per simdgroup).

PyObjC's Metal bindings are imported only here and only on macOS; elsewhere opening a Metal artifact raises a
one-line DeviceError. This path is type-checked on Linux (codegen/metal.py: check_msl) but only runs on a Mac.
"""
from __future__ import annotations

import struct
import sys
from typing import Any

import numpy as np

from dzc.errors import CompileError, DeviceError
from dzc.runtime.gpu_executor import GpuExecutor

SIMD = 32


def metal_module():
    if sys.platform != "darwin":
        raise DeviceError("this artifact targets Metal, which needs macOS with an Apple GPU; "
                          "recompile with --target cpu or --target opencl")
    try:
        import Metal
    except ImportError:
        raise DeviceError("the Metal runtime needs PyObjC's Metal bindings (pip install 'dzc[metal]')") from None
    return Metal


class MetalExecutor(GpuExecutor):
    target = "metal"
    shared_attrs = ("mtl", "device", "library", "queue", "_pipelines")

    def _open_device(self) -> None:
        mtl = self.mtl = metal_module()
        self.device = mtl.MTLCreateSystemDefaultDevice()
        if self.device is None:
            raise DeviceError("no Metal device on this Mac")
        opts = mtl.MTLCompileOptions.new()
        try:
            opts.setFastMathEnabled_(False)
        except AttributeError:
            pass
        src = self.device_code("kernels.metal")
        library, err = self.device.newLibraryWithSource_options_error_(src, opts, None)
        if library is None:
            first = str(err.localizedDescription()).splitlines()[0] if err is not None else "unknown error"
            raise CompileError(f"{self.artifact.path}/kernels.metal does not compile on {self.device.name()}: {first}")
        self.library = library
        self.queue = self.device.newCommandQueue()
        self._pipelines: dict[str, Any] = {}
        self._pending: list = []

    def _pipeline(self, name: str) -> Any:
        p = self._pipelines.get(name)
        if p is None:
            fn = self.library.newFunctionWithName_(name)
            if fn is None:
                raise CompileError(f"{self.artifact.path}/kernels.metal has no kernel {name}")
            p, err = self.device.newComputePipelineStateWithFunction_error_(fn, None)
            if p is None:
                raise CompileError(f"Metal cannot build pipeline {name}: {err.localizedDescription()}")
            self._pipelines[name] = p
        return p

    def _alloc(self, nbytes: int) -> Any:
        buf = self.device.newBufferWithLength_options_(int(nbytes), self.mtl.MTLResourceStorageModeShared)
        if buf is None:
            raise DeviceError(f"cannot allocate {nbytes} bytes on {self.device.name()}")
        return buf

    def _view(self, buf: Any, offset: int, nbytes: int) -> np.ndarray:
        mem = buf.contents().as_buffer(buf.length())
        return np.frombuffer(mem, dtype=np.uint8, count=nbytes, offset=offset)

    def _upload(self, buf: Any, offset: int, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data)
        self._view(buf, offset, data.nbytes)[:] = data.view(np.uint8).reshape(-1)

    def _download(self, buf: Any, offset: int, out: np.ndarray) -> None:
        out.view(np.uint8).reshape(-1)[:] = self._view(buf, offset, out.nbytes)

    def _prepare(self, launch: dict, bindings: list) -> Any:
        pso = self._pipeline(launch["name"])
        limit = int(pso.maxTotalThreadsPerThreadgroup())
        group = int(launch.get("group", 1))
        if group > 1:
            if group > SIMD:
                group = max(SIMD, min(group, limit) // SIMD * SIMD)
            elif limit < group:
                raise DeviceError(f"Metal pipeline {launch['name']} allows {limit} threads per group, needs {group}")
        else:
            group = 0
        width = max(1, min(256, limit))
        return (pso, bindings, group, width)

    def _run(self, prog: str, ids: np.ndarray) -> None:
        self._cmd = self.queue.commandBuffer()
        self._enc = self._cmd.computeCommandEncoder()
        try:
            super()._run(prog, ids)
        finally:
            self._enc = None

    def _enqueue(self, prepared: Any, launch: dict, T: int, P: int, iterations: int) -> None:
        mtl, enc = self.mtl, self._enc
        pso, bindings, group, width = prepared
        enc.setComputePipelineState_(pso)
        for i, (buf, off) in enumerate(bindings):
            enc.setBuffer_offset_atIndex_(buf, off, i)
        n = len(bindings)
        enc.setBytes_length_atIndex_(struct.pack("<q", T), 8, n)
        enc.setBytes_length_atIndex_(struct.pack("<q", P), 8, n + 1)
        if group:
            if group > SIMD:
                enc.setThreadgroupMemoryLength_atIndex_(16 * (group // SIMD), 0)
            enc.dispatchThreadgroups_threadsPerThreadgroup_(mtl.MTLSizeMake(iterations, 1, 1),
                                                            mtl.MTLSizeMake(group, 1, 1))
        else:
            enc.dispatchThreadgroups_threadsPerThreadgroup_(mtl.MTLSizeMake(-(-iterations // width), 1, 1),
                                                            mtl.MTLSizeMake(width, 1, 1))

    def _finish(self) -> None:
        enc, cmd = getattr(self, "_enc", None), getattr(self, "_cmd", None)
        if enc is not None:
            enc.endEncoding()
            cmd.commit()
            cmd.waitUntilCompleted()
            if cmd.error() is not None:
                raise DeviceError(f"Metal command buffer failed: {cmd.error().localizedDescription()}")
            self._enc = self._cmd = None
