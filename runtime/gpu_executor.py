"""What the GPU executors share: loading a GPU artifact, device buffers, and running a program's schedule.

A GPU artifact (codegen/gpu_build.py) holds device code, the weights in their compiled layout and a manifest
with each program's schedule (kernel calls on buffer slots) and each kernel's launches. An executor

  * uploads every weight once (one device buffer per tensor),
  * allocates the KV cache (`max_context` rows per layer), the token/position/logits buffers and one arena for
    all intermediates (placed by liveness exactly as the CPU runtime does, runtime/native_executor.plan_arena),
  * binds every call's slots to (device buffer, byte offset) once, and
  * per forward step uploads tokens and positions, enqueues the program's launches back to back on one
    in-order queue (grid = the launch's trip count at this T and P, times its threads per iteration), and
    reads the logits back.

Subclasses (opencl_executor, cuda_executor, metal_executor) supply the device: `_open_device`, `_alloc`,
`_upload`, `_download`, `_prepare` (a launch with its bound buffers) and `_enqueue`.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from dzc.codegen.gpu import eval_host
from dzc.errors import ArtifactError, InputError
from dzc.runtime.executor import CompiledExecutor
from dzc.runtime.artifact import Artifact, map_safetensors, read_manifest, sha256_file
from dzc.runtime import artifact as art

GPU_TARGETS = ("opencl", "metal", "cuda")
_NP = {"f32": np.float32, "f16": np.float16, "i32": np.int32, "i64": np.int64, "u8": np.uint8, "i8": np.int8,
       "u16": np.uint16, "i16": np.int16, "u32": np.uint32, "bool": np.uint8}


def load_gpu_artifact(path: str | Path, verify: bool = True, map_weights: bool = True) -> Artifact:
    """Check a GPU artifact's format and file hashes and map its weights (no device is touched)."""
    path = Path(path)
    manifest = read_manifest(path)
    ver = manifest.get("format_version")
    if ver != art.FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {ver}, this dzc reads version {art.FORMAT_VERSION}; "
                            f"recompile with `dzc compile`")
    target = manifest.get("target", {}).get("name", "cpu")
    if target not in GPU_TARGETS:
        raise ArtifactError(f"{path}: compiled for target {target!r}, not a GPU target")
    for key in ("schedule", "launches", "slots"):
        if key not in manifest:
            raise ArtifactError(f"{path}: manifest lacks {key!r}; recompile the artifact with this dzc")
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: file {name} listed in the manifest is missing; recompile the artifact")
        if verify and sha256_file(f) != digest:
            raise ArtifactError(f"{f}: sha256 does not match the manifest (file modified or damaged); "
                                f"recompile the artifact")
    out = Artifact(path, manifest)
    if map_weights and (path / art.WEIGHTS).is_file():
        out.weights, mm = map_safetensors(path / art.WEIGHTS)
        out._maps.append(mm)
    return out


def executor_class(target: str):
    """The executor class of a GPU target, after checking this machine has such a device (DeviceError, one line)."""
    if target == "opencl":
        from dzc.runtime.opencl_executor import OpenCLExecutor as cls, pick_device
        pick_device()
    elif target == "cuda":
        from dzc.runtime.cuda_executor import CudaExecutor as cls, cuda_driver
        cuda_driver()
    elif target == "metal":
        from dzc.runtime.metal_executor import MetalExecutor as cls, metal_module
        metal_module()
    else:
        raise ArtifactError(f"unknown GPU target {target!r}")
    return cls


def open_gpu_executor(path: str | Path | Artifact, max_context: int = 2048, prefill_chunk: int = 256,
                      verify: bool = True, **kwargs):
    """The executor for a GPU artifact's target; DeviceError (one line) when this machine lacks that device."""
    artifact = path if isinstance(path, Artifact) else load_gpu_artifact(path, verify=verify)
    cls = executor_class(artifact.manifest["target"]["name"])
    return cls(artifact, max_context=max_context, prefill_chunk=prefill_chunk, **kwargs)


def gpu_executor_factory(artifact: Artifact, **kwargs) -> Callable[[int], "GpuExecutor"]:
    """`capacity -> executor` for LoadedModel.make_executor. Checks the device now; the first executor opens it,
    builds the device code and uploads the weights, later ones share those and own only cache, arena and I/O."""
    cls = executor_class(artifact.manifest["target"]["name"])
    first: list = []

    def make(capacity: int) -> "GpuExecutor":
        ex = cls(artifact, max_context=capacity, share=first[0] if first else None, **kwargs)
        if not first:
            first.append(ex)
        return ex
    return make


class GpuExecutor(CompiledExecutor):
    """ModelExecutor over a GPU artifact (see runtime/executor.py for the protocol)."""

    target = ""

    shared_attrs: tuple[str, ...] = ()      # device state a second executor of the same artifact reuses

    def __init__(self, artifact: str | Path | Artifact, max_context: int = 2048, prefill_chunk: int = 256,
                 verify: bool = True, threads: Optional[int] = None, share: Optional["GpuExecutor"] = None,
                 **device_options: Any) -> None:
        self.artifact = artifact if isinstance(artifact, Artifact) else load_gpu_artifact(artifact, verify=verify)
        m = self.artifact.manifest
        got = m["target"]["name"]
        if got != self.target:
            raise ArtifactError(f"{self.artifact.path}: compiled for {got}, not {self.target}")
        self.vocab_size = int(m["vocab_size"])
        self.max_context = int(max_context)
        if self.max_context < 1:
            raise InputError(f"max_context must be at least 1, got {max_context}")
        self.prefill_chunk = max(1, min(int(prefill_chunk), self.max_context))
        self.programs = set(m["schedule"])
        self.device_options = device_options
        if share is not None:       # same device, program and weights; its own cache, arena and I/O buffers
            for name in self.shared_attrs + ("weight_buffers", "weight_bytes"):
                setattr(self, name, getattr(share, name))
        else:
            self._open_device()
            self._upload_weights()
        self._setup_buffers()
        self._prepare_schedule()
        self._length = 0

    # ---- device interface (subclasses) -----------------------------------------------------------------------
    def _open_device(self) -> None: raise NotImplementedError
    def _alloc(self, nbytes: int) -> Any: raise NotImplementedError
    def _upload(self, buf: Any, offset: int, data: np.ndarray) -> None: raise NotImplementedError
    def _download(self, buf: Any, offset: int, out: np.ndarray) -> None: raise NotImplementedError
    def _prepare(self, launch: dict, bindings: list[tuple[Any, int]]) -> Any: raise NotImplementedError
    def _enqueue(self, prepared: Any, launch: dict, T: int, P: int, iterations: int) -> None:
        raise NotImplementedError
    def _finish(self) -> None: pass

    def _variant(self, launch: dict) -> dict:
        """Which of a launch's forms to run: the cooperative one (`launch["coop"]`) when the device is a GPU."""
        return launch.get("coop", launch) if self.use_coop else launch

    use_coop = True

    def device_code(self, name: str) -> str:
        return (self.artifact.path / name).read_text()

    # ---- setup -----------------------------------------------------------------------------------------------
    def _upload_weights(self) -> None:
        art_ = self.artifact
        self.weight_buffers: dict[int, Any] = {}
        self.weight_bytes = 0
        for s in art_.slots:
            if s["kind"] != "weight":
                continue
            arr = art_.weights.get(s["name"])
            if arr is None:
                raise ArtifactError(f"{art_.path}: weights file lacks tensor {s['name']!r}; recompile the artifact")
            buf = self._alloc(max(64, arr.nbytes))
            if arr.nbytes:
                self._upload(buf, 0, np.ascontiguousarray(arr))
            self.weight_bytes += arr.nbytes
            self.weight_buffers[s["index"]] = buf

    def _setup_buffers(self) -> None:
        from dzc.runtime.native_executor import plan_arena, poly_eval
        art_, slots = self.artifact, self.artifact.slots
        ctx, tmax = self.max_context, self.prefill_chunk
        env = {"T": tmax, "P": ctx}
        envs = {p: ({"T": 1, "P": ctx} if p == "decode" else env) for p in self.programs}
        total, offsets = plan_arena(slots, envs)
        self.arena_bytes = total
        self.arena = self._alloc(max(64, total))
        self.bindings: dict[int, tuple[Any, int]] = {}
        self.inputs: dict[str, tuple[Any, np.dtype]] = {}
        self.outputs: dict[str, tuple[Any, np.dtype]] = {}
        self.cache_widths: dict[str, tuple[int, int]] = {}
        for s in slots:
            i, kind, dt = s["index"], s["kind"], np.dtype(_NP[s["dtype"]])
            if kind == "weight":
                self.bindings[i] = (self.weight_buffers[i], 0)
            elif kind == "cache":
                width = int(s["info"]["width"])
                self.cache_widths[s["name"]] = (width, dt.itemsize)
                self.bindings[i] = (self._alloc(max(64, ctx * width * dt.itemsize)), 0)
            elif kind in ("input", "output"):
                n = max(poly_eval(p, env) for p in s["sizes"])
                buf = self._alloc(max(64, n * dt.itemsize))
                (self.inputs if kind == "input" else self.outputs)[s["name"]] = (buf, dt)
                self.bindings[i] = (buf, 0)
            elif kind == "arena":
                if i in offsets:
                    self.bindings[i] = (self.arena, offsets[i])
            else:
                raise ArtifactError(f"{art_.path}: unknown buffer kind {kind!r} in the manifest")
        for name in ("tokens", "positions"):
            if name not in self.inputs:
                raise ArtifactError(f"{art_.path}: the compiled programs take no '{name}' input")
        if "logits" not in self.outputs:
            raise ArtifactError(f"{art_.path}: the compiled programs produce no 'logits'")
        self.kv_cache_bytes_per_token = int(sum(w * b for w, b in self.cache_widths.values()))

    def _prepare_schedule(self) -> None:
        m = self.artifact.manifest
        self.runs: dict[str, list[tuple[Any, dict]]] = {}
        for prog, calls in m["schedule"].items():
            seq = []
            for kernel, slots in calls:
                launches = m["launches"].get(kernel)
                if launches is None:
                    raise ArtifactError(f"{self.artifact.path}: kernel {kernel!r} has no launches in the manifest")
                try:
                    bound = [self.bindings[s] for s in slots]
                except KeyError as exc:
                    raise ArtifactError(f"{self.artifact.path}: kernel {kernel} uses unplaced buffer slot {exc}") from None
                for launch in launches:
                    launch = self._variant(launch)
                    seq.append((self._prepare(launch, bound), launch))
            self.runs[prog] = seq

    def _run(self, prog: str, ids: np.ndarray) -> None:
        t, p = len(ids), self._length
        self._upload(self.inputs["tokens"][0], 0, ids.astype(np.int32))
        self._upload(self.inputs["positions"][0], 0, np.arange(p, p + t, dtype=np.int32))
        for prepared, launch in self.runs[prog]:
            n = eval_host(launch["iterations"], t, p)
            if n > 0:
                self._enqueue(prepared, launch, t, p, n)
        self._finish()
        self._length += t

    def _logits(self, t: int) -> np.ndarray:
        logits = np.empty(t * self.vocab_size, np.float32)
        self._download(self.outputs["logits"][0], 0, logits)
        return logits.reshape(t, self.vocab_size)
