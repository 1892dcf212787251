"""Tiny DeepSeek-V3 checkpoints compiled for the GPU targets.

OpenCL is executed (PoCL on CPU machines, skipped when there is no OpenCL platform): logits equal the
interpreter's within 1e-4 and transformers' fp32 within 1e-3, 16 greedy tokens equal HF's, cached decode equals
recomputation, in both launch forms (one thread per iteration, and cooperative work groups as GPUs run them).
Metal is rendered and type-checked (libclang + codegen/metal_shim.h); CUDA is rendered to PTX and assembled
for sm_80 and sm_90 with ptxas. Without a device, opening those artifacts is a one-line DeviceError.
"""
from __future__ import annotations

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from dzc.checkpoint.loader import Checkpoint
from dzc.codegen.compile import compile_model
from dzc.driver import run_passes
from dzc.driver import open_model, trace_checkpoint
from dzc.errors import DeviceError
from dzc.runtime.interp_executor import InterpreterExecutor

from tiny_models import assert_close as _close, executor_greedy, hf_greedy, hf_logits

PROMPT = [0, 5, 17, 42, 99, 7, 250, 3, 11, 64, 200]
MODELS = ["tiny_qlora_yarn", "tiny_fp8_sharded"]


def _opencl_ok() -> bool:
    try:
        from dzc.runtime.opencl_executor import opencl_devices
        return bool(opencl_devices())
    except Exception:
        return False


needs_opencl = pytest.mark.skipif(not _opencl_ok(), reason="no OpenCL platform")


@pytest.fixture(autouse=True)
def _pocl_cache(monkeypatch, tmp_path_factory):
    monkeypatch.setenv("POCL_CACHE_DIR", str(tmp_path_factory.getbasetemp() / "pocl-cache"))


class Built:
    """A checkpoint traced and passed once for a target; `compile(out)` writes the artifact."""

    def __init__(self, ckpt, target):
        ck = Checkpoint.open(ckpt)
        programs, store = trace_checkpoint(ck)
        self.ckpt, self.config, self.store, self.target = ckpt, ck.config, store, target
        self.programs = run_passes(programs, store, ck.config, target)
        self.tokenizer_dir = ck.tokenizer_dir

    def compile(self, out):
        return compile_model(self.programs, self.store, self.config, out, target=self.target,
                             tokenizer_dir=self.tokenizer_dir)

    def interp(self, ctx=64):
        return InterpreterExecutor(self.programs["prefill"], self.programs["decode"], self.store,
                                   self.config.vocab_size, ctx)


# ---- OpenCL: executed -------------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module", params=MODELS)
def opencl(request, tmp_path_factory):
    if not _opencl_ok():
        pytest.skip("no OpenCL platform")
    built = Built(request.getfixturevalue(request.param), "opencl")
    out = built.compile(tmp_path_factory.mktemp("opencl-" + request.param))
    model = open_model(out)                    # the CLI's path: manifest target -> OpenCL executor
    built.dir, built.executor = out, model.make_executor(64)
    return built


def test_opencl_artifact_records_its_target(opencl):
    m = json.loads((opencl.dir / "manifest.json").read_text())
    assert m["target"]["name"] == "opencl" and m["target"]["device_code"] == ["kernels.cl"]
    assert set(m["schedule"]) == {"prefill", "prefill_last", "decode"}
    assert all(k in m["launches"] for calls in m["schedule"].values() for k, _ in calls)


def test_opencl_logits_match_interpreter_and_hf(opencl):
    ex = opencl.executor
    ex.reset()
    got = ex.forward(np.array(PROMPT))
    _close(got, opencl.interp().forward(np.array(PROMPT)), 1e-4)
    _close(got, hf_logits(opencl.ckpt, PROMPT), 1e-3)


def test_opencl_last_only_prefill(opencl):
    ex = opencl.executor
    ex.reset()
    full = ex.forward(np.array(PROMPT))
    ex.reset()
    _close(ex.forward(np.array(PROMPT), last_only=True), full[-1:], 1e-5)


def test_opencl_greedy_tokens_match_hf(opencl):
    want, _ = hf_greedy(opencl.ckpt, PROMPT, 16)
    assert executor_greedy(opencl.executor, PROMPT, 16) == list(want)


def test_opencl_cache_decode_equals_recompute(opencl):
    ex = opencl.executor
    ex.reset()
    ex.forward(np.array(PROMPT[:6]))
    steps = np.stack([ex.forward(np.array([t]))[0] for t in PROMPT[6:]])
    assert ex.position == len(PROMPT)
    ex.reset()
    _close(steps, ex.forward(np.array(PROMPT))[6:], 1e-4)


@needs_opencl
def test_opencl_cooperative_form(tiny_qlora_yarn, tmp_path):
    """The work-group-per-iteration kernels (GPU form; Metal shares their structure) on the same device."""
    from dzc.runtime.gpu_executor import open_gpu_executor
    out = Built(tiny_qlora_yarn, "opencl").compile(tmp_path / "art")
    ex = open_gpu_executor(out, max_context=32, coop=True)
    assert ex.use_coop and any(l.get("group", 1) > 1 for _, l in ex.runs["decode"])
    got = ex.forward(np.array(PROMPT))
    got = np.concatenate([got, ex.forward(np.array([int(got[-1].argmax())]))])
    want_ids = PROMPT + [int(got[-2].argmax())]
    _close(got, hf_logits(tiny_qlora_yarn, want_ids), 1e-3)


def test_opencl_without_platform_is_one_line_error(monkeypatch):
    from dzc.runtime import opencl_executor
    monkeypatch.setattr(opencl_executor, "opencl_devices", lambda: [])
    with pytest.raises(DeviceError, match="no OpenCL platform") as err:
        opencl_executor.pick_device()
    assert "\n" not in str(err.value)


# ---- Metal and CUDA: compiled and checked --------------------------------------------------------------------------------
@pytest.mark.parametrize("model", MODELS)
def test_metal_kernels_typecheck(model, request, tmp_path):
    pytest.importorskip("clang.cindex")
    from dzc.codegen.metal import check_msl
    out = Built(request.getfixturevalue(model), "metal").compile(tmp_path / "art")
    src = (out / "kernels.metal").read_text()
    assert src.count("kernel void") >= 30
    assert "simd_sum" in src and "threadgroup_barrier" in src
    assert check_msl(src) == []


@pytest.mark.skipif(shutil.which("ptxas") is None, reason="ptxas not on PATH")
@pytest.mark.parametrize("model", ["tiny_qlora_yarn"])
def test_ptx_assembles_for_sm80_and_sm90(model, request, tmp_path):
    """Every launch of a whole model. (FP8's kernels are assembled per kernel kind in test_gpu_kernels.py: the
    tiny FP8 model's ~5.8 MB of PTX takes ptxas ~16 s per architecture on this 2-core machine.)"""
    from dzc.codegen.gpu_runner import ptxas
    out = Built(request.getfixturevalue(model), "cuda").compile(tmp_path / "art")
    m = json.loads((out / "manifest.json").read_text())
    assert m["target"]["device_code"] == ["kernels.sm_80.ptx", "kernels.sm_90.ptx"]
    for arch in ("sm_80", "sm_90"):
        ptx = (out / f"kernels.{arch}.ptx").read_text()
        assert f".target {arch}" in ptx
        names = {l["name"] for ls in m["launches"].values() for l in ls}
        coop = {l["coop"]["name"] for ls in m["launches"].values() for l in ls if "coop" in l}
        assert coop, "GEMV and norm launches get a warp-per-iteration form"
        assert ptx.count(".visible .entry") == len(names | coop)
        assert all(f".entry {n}(" in ptx for n in names | coop)
        ptxas(ptx, arch)


@pytest.fixture(scope="module")
def cuda_artifact(tiny_qlora_yarn, tmp_path_factory):
    return Built(tiny_qlora_yarn, "cuda").compile(tmp_path_factory.mktemp("cuda"))


def test_cuda_runtime_without_device(cuda_artifact, tiny_qlora_yarn):
    from dzc.runtime.cuda_executor import cuda_driver
    try:
        cuda_driver()
    except DeviceError as exc:
        assert "no CUDA device" in str(exc) and "\n" not in str(exc)
        with pytest.raises(DeviceError, match="no CUDA device"):
            open_model(cuda_artifact)
        return
    ex = open_model(cuda_artifact).make_executor(64)          # a machine with a GPU: run it for real
    _close(ex.forward(np.array(PROMPT)), hf_logits(tiny_qlora_yarn, PROMPT), 1e-3)


def test_dzc_run_reports_a_missing_device_in_one_line(cuda_artifact):
    from dzc.runtime.cuda_executor import cuda_driver
    try:
        cuda_driver()
        pytest.skip("this machine has a CUDA device")
    except DeviceError:
        pass
    proc = subprocess.run([sys.executable, "-m", "dzc", "run", str(cuda_artifact), "--prompt", "hi"],
                          capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and "no CUDA device" in lines[0], proc.stderr


@pytest.mark.skipif(sys.platform == "darwin", reason="Metal runs on macOS")
def test_metal_artifact_needs_macos(tiny_qlora_yarn, tmp_path):
    out = Built(tiny_qlora_yarn, "metal").compile(tmp_path / "art")
    with pytest.raises(DeviceError, match="Metal, which needs macOS") as err:
        open_model(out)
    assert "\n" not in str(err.value)
