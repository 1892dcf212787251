"""`--target cpu`: run a compiled artifact. One forward step is one native call (`dzc_prefill` or `dzc_decode`).

At construction the executor loads lib.so (no compiler involved), maps the weights, allocates the KV cache with
`max_context` rows per layer, the token/position/logits buffers and one arena for all intermediates (placed by
liveness from the artifact's buffer table, sized for `prefill_chunk` new tokens and `max_context` cached ones), and
fills the buffer table once. `forward` writes tokens and positions, calls the entry, and returns the logits rows.
"""
from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Optional

import numpy as np

from dzc.errors import ArtifactError, InputError
from dzc.runtime.executor import CompiledExecutor
from dzc.runtime.artifact import Artifact, load_artifact

_NP = {"f32": np.float32, "f16": np.float16, "i32": np.int32, "i64": np.int64, "u8": np.uint8, "i8": np.int8,
       "u16": np.uint16, "i16": np.int16, "u32": np.uint32, "bool": np.bool_}
ALIGN = 64


def poly_eval(terms: list, env: dict) -> int:
    total = 0
    for names, coef in terms:
        v = coef
        for n in names:
            v *= env[n]
        total += v
    return total


def plan_arena(slots: list[dict], envs: dict[str, dict]) -> tuple[int, dict[int, int]]:
    """Place every arena slot at an offset so that slots of one program whose live ranges overlap never share
    bytes. Greedy by size (largest first, lowest fitting offset). Programs never run at once: they share the arena."""
    offsets: dict[int, int] = {}
    total = 0
    for prog, env in envs.items():
        items = []
        for s in slots:
            if s["kind"] != "arena" or s["program"] != prog or s["live"][0] is None:
                continue
            nbytes = max(poly_eval(p, env) for p in s["sizes"]) * np.dtype(_NP[s["dtype"]]).itemsize
            nbytes = max(ALIGN, -(-nbytes // ALIGN) * ALIGN)
            items.append((nbytes, s["live"][0], s["live"][1], s["index"]))
        items.sort(key=lambda t: (-t[0], t[1], t[3]))
        placed: list[tuple[int, int, int, int]] = []   # offset, size, first, last
        for size, first, last, index in items:
            conflicts = sorted((o, sz) for o, sz, f, l in placed if not (l < first or last < f))
            off = 0
            for o, sz in conflicts:
                if off + size <= o:
                    break
                off = max(off, o + sz)
            placed.append((off, size, first, last))
            offsets[index] = off
            total = max(total, off + size)
    return total, offsets


def _aligned_empty(nbytes: int, dtype=np.uint8) -> np.ndarray:
    raw = np.zeros(nbytes + ALIGN, dtype=np.uint8)
    start = (-raw.ctypes.data) % ALIGN
    return raw[start:start + nbytes].view(dtype) if nbytes else raw[:0].view(dtype)


class NativeExecutor(CompiledExecutor):
    """ModelExecutor over a compiled CPU artifact (see runtime/executor.py for the protocol)."""

    def __init__(self, artifact: str | Path | Artifact, max_context: int = 2048, threads: Optional[int] = None,
                 prefill_chunk: int = 256, verify: bool | str = "auto") -> None:
        self.artifact = artifact if isinstance(artifact, Artifact) else load_artifact(artifact, verify=verify)
        m = self.artifact.manifest
        self.vocab_size = int(m["vocab_size"])
        self.max_context = int(max_context)
        if self.max_context < 1:
            raise InputError(f"max_context must be at least 1, got {max_context}")
        self.prefill_chunk = max(1, min(int(prefill_chunk), self.max_context))
        self.programs = set(m["entries"])
        self._lib = self._load_library()
        self._entries = {}
        for prog in self.programs:
            fn = getattr(self._lib, f"dzc_{prog}") if not isinstance(self._lib, _OrcLib) else self._lib.entry(prog)
            fn.argtypes = [ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64]
            fn.restype = None
            self._entries[prog] = fn
        self.set_threads(threads)
        self._setup_buffers()
        self._length = 0

    # ---- setup -------------------------------------------------------------------------------------------------
    def _load_library(self):
        art = self.artifact
        path = art.library_path
        if path.suffix == ".so" or path.suffix == ".dylib":
            from dzc.codegen.build import load_library   # imports ctypes only
            return load_library(path)
        return _OrcLib(path, list(self.programs))

    def set_threads(self, threads: Optional[int]) -> None:
        if threads is None:
            try:
                threads = len(os.sched_getaffinity(0))
            except AttributeError:
                threads = os.cpu_count() or 1
        self.threads = max(1, int(threads))
        if isinstance(self._lib, _OrcLib):
            self._lib.set_threads(self.threads)
        else:
            ctypes.c_int.in_dll(self._lib, "dzc_num_threads").value = self.threads

    def _setup_buffers(self) -> None:
        art, slots = self.artifact, self.artifact.slots
        Tmax, ctx = self.prefill_chunk, self.max_context
        env = {"T": Tmax, "P": ctx}
        envs = {p: ({"T": 1, "P": ctx} if p == "decode" else env) for p in self.programs}
        self._arrays: dict[int, np.ndarray] = {}
        self.caches: dict[str, np.ndarray] = {}
        self.inputs: dict[str, np.ndarray] = {}
        self.outputs: dict[str, np.ndarray] = {}
        total, offsets = plan_arena(slots, envs)
        self.arena = _aligned_empty(total)
        self.arena_bytes = total
        table = (ctypes.c_void_p * max(1, len(slots)))()
        for s in slots:
            i, kind, dt = s["index"], s["kind"], np.dtype(_NP[s["dtype"]])
            if kind == "weight":
                arr = art.weights.get(s["name"])
                if arr is None:
                    raise ArtifactError(f"{art.path}: weights file lacks tensor {s['name']!r}; recompile the artifact")
                ptr = arr.ctypes.data
            elif kind == "cache":
                arr = _aligned_empty(ctx * s["info"]["width"] * dt.itemsize, dt).reshape(ctx, s["info"]["width"])
                self.caches[s["name"]] = arr
                ptr = arr.ctypes.data
            elif kind in ("input", "output"):
                n = max(poly_eval(p, env) for p in s["sizes"])
                arr = _aligned_empty(max(1, n) * dt.itemsize, dt)
                (self.inputs if kind == "input" else self.outputs)[s["name"]] = arr
                ptr = arr.ctypes.data
            elif kind == "arena":
                if i not in offsets:
                    continue
                ptr = self.arena.ctypes.data + offsets[i]
            else:
                raise ArtifactError(f"{art.path}: unknown buffer kind {kind!r} in the manifest")
            self._arrays[i] = arr if kind != "arena" else self.arena
            table[i] = ptr
        self._table = table
        for name in ("tokens", "positions"):
            if name not in self.inputs:
                raise ArtifactError(f"{art.path}: the compiled programs take no '{name}' input")
        if "logits" not in self.outputs:
            raise ArtifactError(f"{art.path}: the compiled programs produce no 'logits'")
        self.kv_cache_bytes_per_token = int(sum(a.shape[1] * a.itemsize for a in self.caches.values()))

    def _run(self, prog: str, ids: np.ndarray) -> None:
        t, p = len(ids), self._length
        self.inputs["tokens"][:t] = ids
        self.inputs["positions"][:t] = np.arange(p, p + t, dtype=np.int32)
        self._entries[prog](self._table, t, p)
        self._length += t

    def _logits(self, t: int) -> np.ndarray:
        return self.outputs["logits"][: t * self.vocab_size].reshape(t, self.vocab_size)


class _OrcLib:
    """Fallback when the artifact holds lib.o (no C compiler at compile time): link it in-process with ORC."""

    def __init__(self, obj: Path, programs: list[str]) -> None:
        from dzc.codegen.build import OrcLibrary
        self._orc = OrcLibrary(obj, [f"dzc_{p}" for p in programs] + ["dzc_num_threads"])

    def entry(self, prog: str):
        proto = ctypes.CFUNCTYPE(None, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64)
        return proto(self._orc.address(f"dzc_{prog}"))

    def set_threads(self, n: int) -> None:
        ctypes.c_int.from_address(self._orc.address("dzc_num_threads")).value = n
