"""Programs + weights -> an artifact folder (see runtime/artifact.py for the layout).

    compile_model({"prefill": pre, "decode": dec}, store, config, "out/", cpu=None, progress=print)

Steps (each reported through `progress(stage, done, total, detail)`): lower every program to kernels, render
LLVM IR, optimise and emit an object for the target, link lib.so with the system C compiler (cross targets keep
the object: lib.o), pack every weight into its compiled layout (64-byte aligned safetensors), copy the tokenizer
files, write manifest.json with the sha256 of every file.
"""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import time
from pathlib import Path
from typing import Any, Callable, Mapping, Optional

import numpy as np

from dzc.codegen.build import emit_object, find_cc, link_shared
from dzc.codegen.kir import Module
from dzc.codegen.layout import Packed, pack_weight, rows_cols
from dzc.codegen.llvm import render_llvm
from dzc.codegen.lower import Lowerer
from dzc.codegen.printer import module_text
from dzc.codegen.target import Target, cpu_target
from dzc.codegen.values import SlotTable
from dzc.errors import CompileError
from dzc.ir.node import WeightRef
from dzc.ir.printer import format_program
from dzc.ir.program import Program
from dzc.runtime import artifact as art

Progress = Callable[..., None]

_ST_DTYPE = {"f32": "F32", "f16": "F16", "bf16": "BF16", "fp8": "F8_E4M3", "i8": "I8", "i4": "U8"}


def _quiet(*args, **kwargs) -> None:
    pass


def lower_programs(programs: Mapping[str, Program], store, target: Target,
                   options: Optional[dict] = None) -> tuple[Module, SlotTable]:
    module, slots = Module(), SlotTable()
    for name, prog in programs.items():
        low = Lowerer(prog, store, target, module, slots, options)
        module.entries[name] = low.run()
    return module, slots


def ir_hash(programs: Mapping[str, Program]) -> str:
    h = hashlib.sha256()
    for name in sorted(programs):
        h.update(format_program(programs[name]).encode())
    return h.hexdigest()


def _config_dict(config: Any) -> dict:
    if config is None:
        return {}
    if hasattr(config, "to_dict"):
        try:
            return config.to_dict()
        except Exception:
            pass
    out = {}
    for k, v in vars(config).items():
        try:
            json.dumps(v)
            out[k] = v
        except TypeError:
            continue
    return out


def _slot_json(s) -> dict:
    info = {k: v for k, v in s.info.items()}
    return {"index": s.index, "name": s.name, "kind": s.kind, "dtype": s.dtype.name,
            "sizes": [p.to_json() for p in s.sizes], "program": s.program, "live": list(s.live), "info": info}


def _groups(slots: SlotTable) -> dict[str, list]:
    groups: dict[str, list] = {}
    for s in slots.slots:
        if s.kind == "weight":
            groups.setdefault(s.name.rsplit(":", 1)[0], []).append(s)
    return groups


def slot_tensor(s) -> tuple[str, tuple, int]:
    """(safetensors dtype, shape, bytes) of a weight slot's packed array (what `pack_group` produces)."""
    info = s.info
    pk = Packed(**info["packed"])
    if "stack" in info:
        E, N, K = info["shape"]
    else:
        E, (N, K) = 1, (rows_cols(tuple(info["shape"])) if info["shape"] else (1, 1))
    if info["part"] == "data":
        rows, cols = pk.data_shape(N, K)
        shape, dt = (E * rows, cols), ("U8" if pk.tile else _ST_DTYPE[pk.kind])
    else:
        rows, cols = pk.scale_shape(N, K)
        shape, dt = (E * rows, cols), ("F16" if pk.scale == "f16" else "F32")
    return dt, shape, shape[0] * shape[1] * s.dtype.itemsize


def pack_group(members: list, store) -> dict[str, np.ndarray]:
    """The packed parts (data, scale) of one weight or one stacked expert projection."""
    info = members[0].info
    pk = Packed(**info["packed"])
    if "stack" in info:
        E, N, K = info["shape"]
        parts: dict[str, list] = {}
        for name in info["stack"]:
            got_pk, p = pack_weight(store, WeightRef(name, _fmt_of(store, name, pk)), (N, K), pk)
            if got_pk != pk:
                raise CompileError(f"expert weight {name} is stored as {got_pk}, others as {pk}; "
                                   f"experts of one MoE layer must share a format")
            for part, arr in p.items():
                parts.setdefault(part, []).append(arr)
        return {part: np.concatenate(arrs, axis=0) for part, arrs in parts.items()}
    got_pk, packed = pack_weight(store, WeightRef(info["weight"], _fmt_of(store, info["weight"], pk)),
                                 tuple(info["shape"]), pk)
    if got_pk != pk:
        raise CompileError(f"weight {info['weight']}: layout changed between lowering and packing")
    return packed


def pack_slots(slots: SlotTable, store, progress: Progress = _quiet) -> dict[str, tuple[str, np.ndarray]]:
    """Every weight slot's array in its compiled layout, keyed by slot name (all in memory: small models)."""
    specs, arrays = packed_stream(slots, store, progress)
    return {name: (dt, arr) for (name, dt, _, _), arr in zip(specs, arrays)}


def packed_stream(slots: SlotTable, store, progress: Progress = _quiet):
    """(specs, generator of arrays): weights packed one group at a time, in spec order."""
    groups = _groups(slots)
    specs = []
    for members in groups.values():
        for s in members:
            dt, shape, nbytes = slot_tensor(s)
            specs.append((s.name, dt, shape, nbytes))

    def arrays():
        for i, (key, members) in enumerate(groups.items()):
            packed = pack_group(members, store)
            for s in members:
                arr = np.ascontiguousarray(packed[s.info["part"]])
                want = max(p.value() for p in s.sizes)
                if arr.size != want:
                    raise CompileError(f"weight {s.name}: packed {arr.size} elements, kernels expect {want}")
                yield arr
            progress("pack", i + 1, len(groups), key)
    return specs, arrays()


def _fmt_of(store, name: str, pk: Packed):
    from dzc.ir.dtypes import DType
    from dzc.ir.node import WeightFormat
    enc = store.encoded(name) if hasattr(store, "encoded") else None
    if enc:
        return enc[0]
    kind = {"f32": DType.F32, "bf16": DType.BF16, "f16": DType.F16, "fp8": DType.FP8E4M3, "i8": DType.I8,
            "i4": DType.I4}[pk.kind]
    return WeightFormat(kind, (pk.rblock, pk.group) if pk.group else None)


def compile_model(programs: Mapping[str, Program], weights, config: Any, out_dir: str | Path, *,
                  target: str = "cpu", quant: Optional[str] = None, cpu: Optional[str] = None,
                  triple: Optional[str] = None, threads: Optional[int] = None,
                  progress: Optional[Progress] = None, tokenizer_dir: Optional[str | Path] = None,
                  vocab_size: Optional[int] = None, options: Optional[dict] = None) -> Path:
    """Compile already traced-and-passed programs (prefill/decode) with their WeightStore into `out_dir`.

    `quant` is recorded only (the quantize pass chose the formats already); `threads` is the default thread
    count stored in the manifest (the executor can override it)."""
    progress = progress or _quiet
    if target != "cpu":
        from dzc.codegen.gpu_build import GPU_TARGETS, compile_gpu_model
        if target not in GPU_TARGETS:
            raise CompileError(f"unknown target {target!r}; choose cpu, {', '.join(GPU_TARGETS)}")
        return compile_gpu_model(programs, weights, config, out_dir, target=target, quant=quant, progress=progress,
                                 tokenizer_dir=tokenizer_dir, vocab_size=vocab_size, options=options)
    t0 = time.time()
    tgt = cpu_target(cpu=cpu, triple=triple)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in (art.MANIFEST, "lib.so", "lib.o", art.WEIGHTS):
        if (out / f).exists():
            (out / f).unlink()
    progress("lower", 0, len(programs), "")
    module, slots = lower_programs(programs, weights, tgt, options)
    progress("lower", len(programs), len(programs), f"{len(module.kernels)} kernels")
    if os.environ.get("DZC_DEBUG", "") in ("kernels", "all"):
        (out / "kernels.txt").write_text(module_text(module))
    ir_text = render_llvm(module, tgt)
    if os.environ.get("DZC_DEBUG", "") in ("llvm", "all"):
        (out / "kernels.ll").write_text(ir_text)
    progress("llvm", 0, 1, tgt.describe())
    obj = emit_object(ir_text, tgt)
    progress("llvm", 1, 1, f"{len(obj)} bytes of code")
    runnable = art._arch_of_triple(tgt.triple) == art.host_arch() and (tgt.host or _features_ok(tgt))
    if runnable and find_cc():
        link_shared(obj, out / "lib.so", tgt)
        library = "lib.so"
    else:
        (out / "lib.o").write_bytes(obj)
        library = "lib.o"
    progress("link", 1, 1, library)
    specs, arrays = packed_stream(slots, weights, progress)
    art.write_aligned_stream(out / art.WEIGHTS, specs, arrays, {"format": "dzc-compiled-weights"})
    copied = copy_tokenizer(tokenizer_dir, out)
    vocab_size = resolve_vocab_size(vocab_size, config, programs)
    files = [library, art.WEIGHTS] + copied
    progress("hash", 0, len(files), "")
    manifest = {
        "format": art.FORMAT, "format_version": art.FORMAT_VERSION, "dzc_version": art.dzc_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": _config_dict(config), "vocab_size": int(vocab_size), "quant": quant,
        "target": {"name": "cpu", "triple": tgt.triple, "cpu": tgt.cpu, "features": tgt.features,
                   "required_features": list(tgt.required_features), "vector_width": tgt.vector_width},
        "threads": threads, "ir_hash": ir_hash(programs), "library": library,
        "entries": {name: f"dzc_{name}" for name in programs},
        "caches": {s.name: s.info["width"] for s in slots.slots if s.kind == "cache"},
        "slots": [_slot_json(s) for s in slots.slots],
        "kernels": {k.name: k.kind for k in module.kernels.values()},
        "schedule": {name: [c.kernel for c in calls] for name, calls in module.entries.items()},
        "call_slots": {name: [c.slots for c in calls] for name, calls in module.entries.items()},
        "profile": os.environ.get("DZC_PROFILE", "") == "1",
        "files": {f: art.sha256_file(out / f) for f in files},
        "file_sizes": {f: (out / f).stat().st_size for f in files},
        "file_samples": {f: art.sample_sha256(out / f) for f in files},
        "compile_seconds": round(time.time() - t0, 2),
    }
    (out / art.MANIFEST).write_text(json.dumps(manifest, indent=1, sort_keys=False))
    progress("done", 1, 1, str(out))
    return out


def copy_tokenizer(tokenizer_dir: Optional[str | Path], out: Path) -> list[str]:
    """Copy the checkpoint's tokenizer files that exist into the artifact; returns their names."""
    copied = []
    if tokenizer_dir:
        for name in art.TOKENIZER_FILES:
            src = Path(tokenizer_dir) / name
            if src.is_file():
                shutil.copyfile(src, out / name)
                copied.append(name)
    return copied


def resolve_vocab_size(vocab_size: Optional[int], config: Any, programs: Mapping[str, Program]) -> int:
    """The explicit size, else the config's, else the width of the programs' logits."""
    if vocab_size is None:
        vocab_size = getattr(config, "vocab_size", None)
    if vocab_size is None:
        vocab_size = next(iter(programs.values())).output("logits").shape[-1]
    return int(vocab_size)


def _features_ok(tgt: Target) -> bool:
    have = art.host_cpu_flags()
    return all(f in have for f in tgt.required_features)
