"""Compiled artifacts: an OUT folder that a fresh process loads and runs without recompiling.

    OUT/manifest.json          format + dzc version, model config, target (triple, cpu, required CPU features),
                               IR hash, the buffer table (slots), entry points, and the sha256 of every file
    OUT/lib.so                 the compiled kernels + entry functions (lib.o for cross targets, or when no cc)
    OUT/weights.safetensors    every weight in its compiled layout, 64-byte aligned, memory-mapped at load
    OUT/tokenizer*.json ...    copied from the checkpoint when present

`load_artifact(path)` checks the format version, every file's hash (a tampered file is named), the target and the
CPU features the code needs, then maps the weights. It never imports llvmlite when lib.so is there.
"""
from __future__ import annotations

import hashlib
import json
import mmap
import os
import platform
import struct
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Optional

import numpy as np

from dzc.errors import ArtifactError, DeviceError

FORMAT = "dzc-artifact"
FORMAT_VERSION = 1
ALIGN = 64
PAD_PREFIX = "__pad."
MANIFEST = "manifest.json"
WEIGHTS = "weights.safetensors"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "generation_config.json",
                   "tokenizer.model")

_NP_TO_ST = {np.dtype(np.float32): "F32", np.dtype(np.float16): "F16", np.dtype(np.uint16): "BF16",
             np.dtype(np.uint8): "U8", np.dtype(np.int8): "I8", np.dtype(np.int32): "I32"}
_ST_TO_NP = {"F32": np.float32, "F16": np.float16, "BF16": np.uint16, "U8": np.uint8, "F8_E4M3": np.uint8,
             "I8": np.int8, "I32": np.int32}


def dzc_version() -> str:
    try:
        from importlib.metadata import version
        return version("dzc")
    except Exception:
        return "0.1.0"


def sha256_file(path: Path, chunk: int = 1 << 24) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size == 0:
            return h.hexdigest()
        with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as mm:
            for i in range(0, size, chunk):
                h.update(mm[i:i + chunk])
    return h.hexdigest()


SAMPLE_CHUNK = 1 << 16
SAMPLE_COUNT = 256
FULL_HASH_LIMIT = 1 << 26      # verify="auto" hashes files up to 64 MiB fully (<0.1 s), bigger ones by sampled fingerprint


def sample_sha256(path: Path) -> str:
    """sha256 over the file size and SAMPLE_COUNT evenly spaced 64 KiB chunks (the whole file when small).

    A cheap tamper/corruption check for multi-GB weight files: reads at most 16 MiB."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        h.update(str(size).encode())
        if size <= SAMPLE_CHUNK * SAMPLE_COUNT:
            h.update(f.read())
            return h.hexdigest()
        step = (size - SAMPLE_CHUNK) // (SAMPLE_COUNT - 1)
        for i in range(SAMPLE_COUNT):
            f.seek(i * step if i < SAMPLE_COUNT - 1 else size - SAMPLE_CHUNK)   # first and last bytes included
            h.update(f.read(SAMPLE_CHUNK))
    return h.hexdigest()


# ---- aligned safetensors ------------------------------------------------------------------------------------------------
def write_aligned_safetensors(path: Path, tensors: Mapping[str, tuple[str, np.ndarray]],
                              metadata: Optional[Mapping[str, str]] = None, progress=None) -> None:
    """Write {name: (safetensors dtype, array)}; see `write_aligned_stream`."""
    specs = [(name, dt, tuple(arr.shape), arr.nbytes) for name, (dt, arr) in tensors.items()]
    write_aligned_stream(path, specs, (arr for _, arr in tensors.values()), metadata, progress)


def write_aligned_stream(path: Path, specs: list, arrays, metadata: Optional[Mapping[str, str]] = None,
                         progress=None) -> None:
    """Write tensors described by `specs` [(name, dtype, shape, nbytes)] whose data `arrays` yields in the same
    order (so a caller can produce one weight at a time). The data section and every tensor are 64-byte aligned;
    the gaps are U8 tensors named `__pad.<n>`, so standard readers (which require the tensors to tile the data
    section) accept the file."""
    header: dict[str, Any] = {"__metadata__": dict(metadata or {})}
    offset = 0
    pads = 0
    for name, dt, shape, nbytes in specs:
        start = -(-offset // ALIGN) * ALIGN
        if start > offset:
            header[f"{PAD_PREFIX}{pads}"] = {"dtype": "U8", "shape": [start - offset], "data_offsets": [offset, start]}
            pads += 1
        header[name] = {"dtype": dt, "shape": list(shape), "data_offsets": [start, start + nbytes]}
        offset = start + nbytes
    blob = json.dumps(header, separators=(",", ":")).encode()
    blob += b" " * ((-(8 + len(blob))) % ALIGN)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(blob)))
        f.write(blob)
        pos = 0
        for i, ((name, dt, shape, nbytes), arr) in enumerate(zip(specs, arrays)):
            start = header[name]["data_offsets"][0]
            if start > pos:
                f.write(b"\0" * (start - pos))
            data = np.ascontiguousarray(arr)
            if data.nbytes != nbytes or tuple(data.shape) != tuple(shape):
                raise ArtifactError(f"{path}: tensor {name} has {data.nbytes} bytes {list(data.shape)}, "
                                    f"expected {nbytes} {list(shape)} (a dzc bug)")
            f.write(memoryview(data).cast("B") if data.size else b"")
            pos = start + nbytes
            if progress:
                progress("write", i + 1, len(specs), name)


def map_safetensors(path: Path) -> tuple[dict[str, np.ndarray], mmap.mmap]:
    """Zero-copy read-only arrays of every tensor (the mapping stays alive as long as the arrays)."""
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        if size < 8:
            raise ArtifactError(f"{path}: too short for a safetensors file; rebuild the artifact with dzc compile")
        (n,) = struct.unpack("<Q", f.read(8))
        if n > size - 8:
            raise ArtifactError(f"{path}: header length {n} exceeds the file; the file is damaged")
        header = json.loads(f.read(n))
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    base = 8 + n
    out = {}
    for name, e in header.items():
        if name == "__metadata__" or name.startswith(PAD_PREFIX):
            continue
        dt = np.dtype(_ST_TO_NP[e["dtype"]])
        b0, b1 = e["data_offsets"]
        count = (b1 - b0) // dt.itemsize
        arr = np.frombuffer(mm, dtype=dt, count=count, offset=base + b0) if count else np.zeros(0, dt)
        out[name] = arr.reshape(e["shape"])
    return out, mm


# ---- host CPU features -----------------------------------------------------------------------------------------------------
def host_cpu_flags() -> set[str]:
    """CPU feature flags of this machine (/proc/cpuinfo spelling; 'asimd' on ARM)."""
    flags: set[str] = set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key = line.split(":", 1)[0].strip().lower()
                if key in ("flags", "features"):
                    flags.update(line.split(":", 1)[1].split())
    except OSError:
        pass
    mach = platform.machine().lower()
    if mach in ("arm64", "aarch64"):
        flags.add("asimd")
    return flags


def host_arch() -> str:
    m = platform.machine().lower()
    return {"amd64": "x86_64", "arm64": "aarch64"}.get(m, m)


def _arch_of_triple(triple: str) -> str:
    a = triple.split("-")[0]
    return {"arm64": "aarch64"}.get(a, a)


# ---- loading --------------------------------------------------------------------------------------------------------------------
@dataclass
class Artifact:
    path: Path
    manifest: dict
    weights: dict = field(default_factory=dict)     # tensor name -> read-only array (mmap)
    _maps: list = field(default_factory=list)

    @property
    def config(self) -> dict:
        return self.manifest.get("config", {})

    @property
    def slots(self) -> list[dict]:
        return self.manifest["slots"]

    @property
    def library_path(self) -> Path:
        return self.path / self.manifest["library"]


def read_manifest(path: Path) -> dict:
    mpath = Path(path) / MANIFEST
    if not mpath.is_file():
        raise ArtifactError(f"{path}: no {MANIFEST}; not a dzc artifact (build one with `dzc compile`)")
    try:
        manifest = json.loads(mpath.read_text())
    except (OSError, ValueError) as exc:
        raise ArtifactError(f"{mpath}: unreadable ({exc}); rebuild the artifact with `dzc compile`") from None
    if not isinstance(manifest, dict) or manifest.get("format") != FORMAT:
        raise ArtifactError(f"{mpath}: not a dzc artifact manifest")
    return manifest


def load_artifact(path: str | Path, verify: bool | str = "auto", map_weights: bool = True) -> Artifact:
    """Open and check an artifact. verify: "full" (sha256 of every file), "auto" (full for files up to 64 MiB,
    the sampled fingerprint for bigger ones, so opening a large model stays fast), False (sizes only)."""
    path = Path(path)
    if verify is True:
        verify = "full"
    manifest = read_manifest(path)
    ver = manifest.get("format_version")
    if ver != FORMAT_VERSION:
        raise ArtifactError(f"{path}: artifact format version {ver}, this dzc reads version {FORMAT_VERSION}; "
                            f"recompile with `dzc compile`")
    target = manifest.get("target", {})
    if target.get("name", "cpu") != "cpu":
        raise DeviceError(f"{path}: compiled for target '{target.get('name')}', which this CPU runtime cannot run; "
                          f"recompile with --target cpu")
    samples = manifest.get("file_samples", {})
    sizes = manifest.get("file_sizes", {})
    for name, digest in manifest.get("files", {}).items():
        f = path / name
        if not f.is_file():
            raise ArtifactError(f"{path}: file {name} listed in the manifest is missing; recompile the artifact")
        size = f.stat().st_size
        if name in sizes and size != sizes[name]:
            raise ArtifactError(f"{f}: {size} bytes, the manifest says {sizes[name]} (file modified or truncated); "
                                f"recompile the artifact")
        if not verify:
            continue
        if verify == "auto" and size > FULL_HASH_LIMIT and name in samples:
            ok = sample_sha256(f) == samples[name]
        else:
            ok = sha256_file(f) == digest
        if not ok:
            raise ArtifactError(f"{f}: sha256 does not match the manifest (file modified or damaged); "
                                f"recompile the artifact")
    triple = target.get("triple", "")
    if triple and _arch_of_triple(triple) != host_arch():
        raise ArtifactError(f"{path}: compiled for {triple} ({target.get('cpu')}), this machine is {host_arch()}; "
                            f"recompile without --cpu/--triple")
    required = target.get("required_features", [])
    have = host_cpu_flags()
    missing = [f for f in required if f not in have]
    if missing and have:
        raise ArtifactError(f"{path}: compiled for cpu {target.get('cpu')} but this CPU lacks {', '.join(missing)}; "
                            f"recompile on this machine (or with --cpu matching it)")
    art = Artifact(path, manifest)
    if map_weights and (path / WEIGHTS).is_file():
        art.weights, mm = map_safetensors(path / WEIGHTS)
        art._maps.append(mm)
    return art


def open_artifact_model(path: str | Path, max_context: Optional[int] = None, threads: Optional[int] = None,
                        verify: str = "auto"):
    """A compiled artifact as the driver's LoadedModel: config and tokenizer from the folder, native executors.
    verify: "auto" / "full" as load_artifact (GPU artifacts are always hashed fully)."""
    from dzc.checkpoint.config import ModelConfig
    from dzc.driver import LoadedModel, _capacity
    from dzc.runtime.native_executor import NativeExecutor
    path = Path(path)
    make = None
    if read_manifest(path).get("target", {}).get("name", "cpu") != "cpu":   # opencl / metal / cuda
        from dzc.runtime.gpu_executor import gpu_executor_factory, load_gpu_artifact
        art = load_gpu_artifact(path)
        make = gpu_executor_factory(art)        # DeviceError here when this machine lacks the device
    else:
        art = load_artifact(path, verify=verify)
    cfg = ModelConfig.from_dict(art.config, source=str(path / MANIFEST))
    gen = path / "generation_config.json"
    if gen.is_file():
        try:
            cfg = cfg.with_generation_config(json.loads(gen.read_text()), source=str(gen))
        except ValueError:
            pass
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from dzc.runtime.tokenizer import Tokenizer
        tokenizer = Tokenizer.from_dir(path)
    capacity = _capacity(cfg, max_context)
    if threads is None:
        threads = art.manifest.get("threads")
    return LoadedModel(name=path.name, config=cfg, tokenizer=tokenizer, eos_ids=cfg.eos_token_ids,
                       max_context=capacity,
                       make_executor=make or (lambda n: NativeExecutor(art, max_context=n, threads=threads)))
