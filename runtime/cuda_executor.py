"""`--target cuda`: run a GPU artifact's PTX through the CUDA driver API (cuda-python's `cuda.bindings.driver`).

The driver JIT-compiles the artifact's PTX for the device at load (`cuModuleLoadData`): kernels.sm_90.ptx on
compute capability 9.x and newer, kernels.sm_80.ptx on 8.x. Buffers are `cuMemAlloc` allocations; a slot inside
the arena is the arena's device address plus its offset. Each call of the schedule keeps a prepared argument
block (device pointers, T, P) and launches with `cuLaunchKernel` on one stream: 128 threads per block, or for a
launch's cooperative form (codegen/ptx.py) one 32-thread block per iteration (`DZC_CUDA_COOP=0` turns it off).

cuda.bindings is imported only when an executor is made; without it, or when `cuInit` fails (no driver, no GPU),
opening the artifact raises a one-line DeviceError.
"""
from __future__ import annotations

import os
from typing import Any

import numpy as np

from dzc.errors import ArtifactError, DeviceError
from dzc.runtime.gpu_executor import GpuExecutor

BLOCK = 128


def cuda_driver():
    """cuda.bindings.driver after a successful cuInit, else DeviceError."""
    try:
        from cuda.bindings import driver
    except ImportError:
        raise DeviceError("no CUDA device: the cuda runtime needs cuda-python (pip install 'dzc[cuda]')") from None
    try:
        err, = driver.cuInit(0)
    except Exception:    # cuda-python raises when libcuda (the NVIDIA driver) cannot be loaded
        raise DeviceError("no CUDA device: the NVIDIA driver (libcuda) is not installed on this machine") from None
    if err != driver.CUresult.CUDA_SUCCESS:
        raise DeviceError(f"no CUDA device: cuInit failed ({_name(driver, err)})")
    return driver


def _name(driver, err) -> str:
    try:
        e, s = driver.cuGetErrorName(err)
        return s.decode() if isinstance(s, bytes) else str(s)
    except Exception:
        return str(err)


class CudaExecutor(GpuExecutor):
    target = "cuda"
    shared_attrs = ("cu", "device", "context", "module", "stream", "_functions", "use_coop")

    def _check(self, result, what: str):
        err, *rest = result if isinstance(result, tuple) else (result,)
        if err != self.cu.CUresult.CUDA_SUCCESS:
            raise DeviceError(f"CUDA {what} failed: {_name(self.cu, err)}")
        return rest[0] if len(rest) == 1 else rest

    def _open_device(self) -> None:
        cu = self.cu = cuda_driver()
        ordinal = int(self.device_options.get("device", 0))
        count = self._check(cu.cuDeviceGetCount(), "cuDeviceGetCount")
        if count == 0:
            raise DeviceError("no CUDA device: the driver reports no GPU")
        if ordinal >= count:
            raise DeviceError(f"CUDA device {ordinal} does not exist ({count} found)")
        self.device = self._check(cu.cuDeviceGet(ordinal), "cuDeviceGet")
        self.context = self._check(cu.cuDevicePrimaryCtxRetain(self.device), "cuDevicePrimaryCtxRetain")
        self._check(cu.cuCtxSetCurrent(self.context), "cuCtxSetCurrent")
        attr = cu.CUdevice_attribute
        major = self._check(cu.cuDeviceGetAttribute(attr.CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR, self.device),
                            "cuDeviceGetAttribute")
        files = self.artifact.manifest["target"]["device_code"]
        want = "kernels.sm_90.ptx" if major >= 9 else "kernels.sm_80.ptx"
        if want not in files:
            want = next((f for f in files if f.endswith(".ptx")), None)
            if want is None:
                raise ArtifactError(f"{self.artifact.path}: no PTX in the artifact")
        if major < 8:
            raise DeviceError(f"CUDA device has compute capability {major}.x; dzc's PTX needs 8.0 (sm_80) or newer")
        ptx = self.device_code(want).encode() + b"\0"
        self.module = self._check(cu.cuModuleLoadData(ptx), f"loading {want}")
        self.stream = self._check(cu.cuStreamCreate(0), "cuStreamCreate")
        self._functions: dict[str, Any] = {}
        coop = self.device_options.get("coop", os.environ.get("DZC_CUDA_COOP"))
        self.use_coop = coop is None or str(coop).lower() not in ("0", "false", "no", "off")

    def _alloc(self, nbytes: int) -> Any:
        return int(self._check(self.cu.cuMemAlloc(int(nbytes)), f"cuMemAlloc({nbytes})"))

    def _upload(self, buf: Any, offset: int, data: np.ndarray) -> None:
        data = np.ascontiguousarray(data)
        self._check(self.cu.cuMemcpyHtoD(buf + offset, data.ctypes.data, data.nbytes), "cuMemcpyHtoD")

    def _download(self, buf: Any, offset: int, out: np.ndarray) -> None:
        self._check(self.cu.cuStreamSynchronize(self.stream), "cuStreamSynchronize")
        self._check(self.cu.cuMemcpyDtoH(out.ctypes.data, buf + offset, out.nbytes), "cuMemcpyDtoH")

    def _function(self, name: str) -> Any:
        f = self._functions.get(name)
        if f is None:
            f = self._functions[name] = self._check(self.cu.cuModuleGetFunction(self.module, name.encode()),
                                                    f"cuModuleGetFunction({name})")
        return f

    def _prepare(self, launch: dict, bindings: list) -> Any:
        values = np.array([buf + off for buf, off in bindings] + [0, 0], dtype=np.uint64)
        pointers = np.array([values.ctypes.data + 8 * i for i in range(len(values))], dtype=np.uint64)
        return (self._function(launch["name"]), values, pointers)

    def _enqueue(self, prepared: Any, launch: dict, T: int, P: int, iterations: int) -> None:
        f, values, pointers = prepared
        values[-2], values[-1] = T, P
        group = int(launch.get("group", 1))
        if group > 1:
            grid, block = iterations, group
        else:
            grid, block = -(-iterations // BLOCK), BLOCK
        self._check(self.cu.cuLaunchKernel(f, grid, 1, 1, block, 1, 1, int(launch.get("shared", 0)), self.stream,
                                           pointers.ctypes.data, 0), f"launching {launch['name']}")

    def _finish(self) -> None:
        self._check(self.cu.cuStreamSynchronize(self.stream), "cuStreamSynchronize")
