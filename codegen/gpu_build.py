"""Programs + weights -> a GPU artifact folder (`--target opencl | metal | cuda`).

The same lowering as the CPU (codegen/lower.py: kernels, schedule, buffer slots) with a GPU vector width, then a
GPU renderer instead of LLVM-for-CPU:

    opencl   kernels.cl           OpenCL C 1.2 source, built by the driver at load time (codegen/opencl.py)
    metal    kernels.metal        Metal Shading Language, compiled by Metal at load time (codegen/metal.py)
    cuda     kernels.sm_80.ptx    PTX per architecture; the runtime loads the newest one the device runs
             kernels.sm_90.ptx    (codegen/ptx.py)

The manifest has the CPU artifact's keys (config, slots, caches, weights, hashes) plus `schedule` (per program,
the kernel calls with their buffer slots: what the CPU entry function does natively) and `launches` (per kernel,
its device functions with their grid-size expressions and threads per iteration). Weights are packed exactly
as for the CPU (weights.safetensors), so every target reads the same bytes.
"""
from __future__ import annotations

import json
import os
import time
from pathlib import Path
from typing import Any, Mapping, Optional

from dzc.codegen.kir import Module
from dzc.codegen.printer import module_text
from dzc.codegen.target import Target
from dzc.errors import CompileError
from dzc.ir.program import Program

GPU_TARGETS = ("opencl", "metal", "cuda")
# f32 lanes per vector load in the lowered kernels. OpenCL: 8 (float16 would unroll less, but PoCL on x86 CPUs
# without AVX-512 in its LLVM's view, e.g. Zen 4 compiled as znver3, mis-passes float16 to its builtins: wrong
# results, or an abort in instruction selection; float8 is native to AVX2 and AVX-512 alike); Metal: 4, its widest
# native vector; CUDA: 4 (NVPTX splits vectors into scalar registers; 4 keeps register tiles small).
# `options={"vector_width": n}`.
DEFAULT_VECTOR = {"opencl": 8, "metal": 4, "cuda": 4}
CUDA_ARCHS = ("sm_80", "sm_90")
_TRIPLES = {"opencl": "spir64-unknown-unknown", "metal": "air64-apple-macosx", "cuda": "nvptx64-nvidia-cuda"}


def gpu_target(name: str, vector_width: Optional[int] = None) -> Target:
    """The `Target` the lowering sees for a GPU family: its vector width (lanes per load) and a large register
    file (so the GEMM micro-kernel picks its wide tile)."""
    if name not in GPU_TARGETS:
        raise CompileError(f"unknown GPU target {name!r}; choose one of {', '.join(GPU_TARGETS)}")
    v = vector_width or DEFAULT_VECTOR[name]
    if v not in (1, 2, 4, 8, 16):
        raise CompileError(f"GPU vector width must be 1, 2, 4, 8 or 16, got {v}")
    return Target(_TRIPLES[name], "generic", "", v, 32, False, name=name)


def render_device_code(module: Module, target: str, options: Optional[dict] = None) -> tuple[dict[str, str], dict]:
    """{file name: text} and the launch table {kernel: [launch manifest]} for one GPU target."""
    opts = options or {}
    coop = opts.get("coop")
    if target == "opencl":
        from dzc.codegen.opencl import render_opencl
        src = render_opencl(module, coop=coop, fp16=bool(opts.get("fp16", False)))
        return {"kernels.cl": src.source}, src.manifest()["launches"]
    if target == "metal":
        from dzc.codegen.metal import render_metal
        src = render_metal(module, coop=coop)
        return {"kernels.metal": src.source}, src.manifest()["launches"]
    if target == "cuda":
        from dzc.codegen.ptx import render_ptx
        files, launches = {}, None
        for arch in opts.get("archs", CUDA_ARCHS):
            src = render_ptx(module, arch)
            files[f"kernels.{arch}.ptx"] = src.source
            launches = src.manifest()["launches"]
        return files, launches
    raise CompileError(f"unknown GPU target {target!r}")


def schedule_json(module: Module) -> dict:
    return {prog: [[c.kernel, list(c.slots)] for c in calls] for prog, calls in module.entries.items()}


def compile_gpu_model(programs: Mapping[str, Program], weights, config: Any, out_dir: str | Path, *,
                      target: str, quant: Optional[str] = None, progress=None,
                      tokenizer_dir: Optional[str | Path] = None, vocab_size: Optional[int] = None,
                      options: Optional[dict] = None, **_ignored) -> Path:
    """Like codegen.compile.compile_model, for a GPU target. `options`: vector_width (lanes per load, default 4),
    coop (cooperative reductions, default on), fp16 (OpenCL native half), archs (CUDA, default sm_80 + sm_90)."""
    from dzc.codegen import compile as cc
    from dzc.runtime import artifact as art
    progress = progress or cc._quiet
    opts = dict(options or {})
    t0 = time.time()
    tgt = gpu_target(target, opts.pop("vector_width", None))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for f in out.iterdir():
        if f.name == art.MANIFEST or f.name.startswith("kernels.") or f.name in ("lib.so", "lib.o", art.WEIGHTS):
            f.unlink()
    progress("lower", 0, len(programs), "")
    module, slots = cc.lower_programs(programs, weights, tgt, options)
    progress("lower", len(programs), len(programs), f"{len(module.kernels)} kernels")
    if os.environ.get("DZC_DEBUG", "") in ("kernels", "all"):
        (out / "kernels.txt").write_text(module_text(module))
    progress("render", 0, 1, target)
    files, launches = render_device_code(module, target, opts)
    for name, text in files.items():
        (out / name).write_text(text)
    progress("render", 1, 1, ", ".join(files))
    tensors = cc.pack_slots(slots, weights, progress)
    art.write_aligned_safetensors(out / art.WEIGHTS, tensors, {"format": "dzc-compiled-weights"}, progress)
    copied = cc.copy_tokenizer(tokenizer_dir, out)
    vocab_size = cc.resolve_vocab_size(vocab_size, config, programs)
    device_files = sorted(files)
    all_files = device_files + [art.WEIGHTS] + copied
    manifest = {
        "format": art.FORMAT, "format_version": art.FORMAT_VERSION, "dzc_version": art.dzc_version(),
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "config": cc._config_dict(config), "vocab_size": int(vocab_size), "quant": quant,
        "target": {"name": target, "device_code": device_files, "vector_width": tgt.vector_width,
                   "coop": opts.get("coop", True) is not False, "fp16": bool(opts.get("fp16", False))},
        "ir_hash": cc.ir_hash(programs), "library": device_files[0],
        "entries": {name: f"dzc_{name}" for name in programs},
        "caches": {s.name: s.info["width"] for s in slots.slots if s.kind == "cache"},
        "slots": [cc._slot_json(s) for s in slots.slots],
        "kernels": {k.name: k.kind for k in module.kernels.values()},
        "schedule": schedule_json(module),
        "launches": launches,
        "files": {f: art.sha256_file(out / f) for f in all_files},
        "compile_seconds": round(time.time() - t0, 2),
    }
    (out / art.MANIFEST).write_text(json.dumps(manifest, indent=1))
    progress("done", 1, 1, str(out))
    return out
