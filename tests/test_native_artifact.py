"""Artifacts: what load_artifact refuses, that loading is cheap and compiler-free, and cross-target objects."""
from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dzc.codegen.compile import compile_model, lower_programs
from dzc.codegen.build import emit_assembly
from dzc.codegen.llvm import render_llvm
from dzc.codegen.target import cpu_target
from dzc.errors import ArtifactError, DeviceError
from dzc.ir import quant
from dzc.ir.dtypes import DType
from dzc.ir.infer import make
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.ir.shapes import T
from dzc.ir.tracer import Tensor, gather, input_, linear, weight
from dzc.ir.weights import WeightStore
from dzc.runtime.artifact import MANIFEST, WEIGHTS, load_artifact, map_safetensors
from dzc.runtime.native_executor import NativeExecutor

VOCAB, H = 50, 40


def _programs():
    """A two-layer toy LM: embedding -> rmsnorm -> linear (bf16) -> logits; enough to exercise the artifact."""
    out = {}
    for name, n in (("prefill", T), ("decode", 1)):
        tokens = input_("tokens", DType.I32, (n,))
        positions = input_("positions", DType.I32, (n,))
        h = gather(weight("emb", quant.F32, (VOCAB, H)), tokens) + positions.cast(DType.F32).reshape(n, 1) * 0.01
        h = Tensor(make(Op.RMSNORM, [h.node, weight("norm", quant.F32, (H,)).node], 1e-6))
        logits = linear(h, weight("head", quant.BF16, (VOCAB, H)))
        out[name] = Program(name, (tokens.node, positions.node), (("logits", logits.node),))
    return out


def _store():
    rng = np.random.default_rng(0)
    vals = {"emb": rng.standard_normal((VOCAB, H)).astype(np.float32), "norm": np.ones(H, np.float32)}
    store = WeightStore(vals.__getitem__)
    head = rng.standard_normal((VOCAB, H)).astype(np.float32)
    store.define_encoded("head", quant.BF16, quant.encode(head, quant.BF16), quant.codec_for(quant.BF16))
    return store


@pytest.fixture(scope="module")
def artifact(tmp_path_factory):
    out = tmp_path_factory.mktemp("art") / "toy"
    compile_model(_programs(), _store(), None, out, vocab_size=VOCAB)
    return out


def _copy(src: Path, tmp_path: Path) -> Path:
    dst = tmp_path / "copy"
    shutil.copytree(src, dst)
    return dst


def test_layout_and_weights_aligned(artifact):
    man = json.loads((artifact / MANIFEST).read_text())
    assert man["format"] == "dzc-artifact" and man["library"] == "lib.so"
    assert set(man["files"]) == {"lib.so", WEIGHTS}
    assert man["target"]["name"] == "cpu" and man["target"]["triple"]
    tensors, _ = map_safetensors(artifact / WEIGHTS)
    for arr in tensors.values():
        assert arr.ctypes.data % 64 == 0
    from safetensors import safe_open   # a standard reader accepts the aligned file (alignment pads included)
    with safe_open(str(artifact / WEIGHTS), framework="np") as f:
        assert {k for k in f.keys() if not k.startswith("__pad.")} == set(tensors)


def test_runs_and_matches_interpreter(artifact):
    from dzc.runtime.interp_executor import InterpreterExecutor
    progs = _programs()
    ref = InterpreterExecutor(progs["prefill"], progs["decode"], _store(), VOCAB, 32)
    ex = NativeExecutor(artifact, max_context=32, threads=2)
    for ids in ([3, 1, 4, 1, 5], [9], [2, 6]):
        np.testing.assert_allclose(ex.forward(np.array(ids)), ref.forward(np.array(ids)), atol=2e-5)


@pytest.mark.parametrize("victim", ["lib.so", WEIGHTS])
def test_tampered_file_is_refused(artifact, tmp_path, victim):
    art = _copy(artifact, tmp_path)
    data = bytearray((art / victim).read_bytes())
    data[len(data) // 2] ^= 0x55
    (art / victim).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match=victim.replace(".", r"\.")):
        load_artifact(art)


def test_big_files_checked_by_sampled_fingerprint(artifact, tmp_path, monkeypatch):
    import dzc.runtime.artifact as A
    art = _copy(artifact, tmp_path)
    monkeypatch.setattr(A, "FULL_HASH_LIMIT", 1024)           # every file counts as big
    monkeypatch.setattr(A, "SAMPLE_COUNT", 4)
    monkeypatch.setattr(A, "SAMPLE_CHUNK", 64)
    man = json.loads((art / MANIFEST).read_text())
    man["file_samples"] = {f: A.sample_sha256(art / f) for f in man["files"]}
    (art / MANIFEST).write_text(json.dumps(man))
    load_artifact(art)
    data = bytearray((art / WEIGHTS).read_bytes())
    data[-1] ^= 1                                             # the last byte is always sampled
    (art / WEIGHTS).write_bytes(bytes(data))
    with pytest.raises(ArtifactError, match="weights.safetensors"):
        load_artifact(art)
    (art / WEIGHTS).write_bytes(bytes(data[:-1]))             # truncation: caught by the size check
    with pytest.raises(ArtifactError, match="bytes"):
        load_artifact(art, verify=False)


def test_missing_file_version_features_and_device(artifact, tmp_path):
    art = _copy(artifact, tmp_path)
    man = json.loads((art / MANIFEST).read_text())

    def write(m):
        (art / MANIFEST).write_text(json.dumps(m))

    write(dict(man, format_version=999))
    with pytest.raises(ArtifactError, match="format version 999"):
        load_artifact(art)
    write(dict(man, target=dict(man["target"], required_features=["avx2", "dzc_fake_feature"])))
    with pytest.raises(ArtifactError, match="lacks dzc_fake_feature"):
        load_artifact(art)
    write(dict(man, target=dict(man["target"], name="cuda")))
    with pytest.raises(DeviceError) as err:
        load_artifact(art)
    assert "\n" not in str(err.value)
    write(man)
    (art / "lib.so").unlink()
    with pytest.raises(ArtifactError, match="lib.so"):
        load_artifact(art)
    with pytest.raises(ArtifactError, match="not a dzc artifact"):
        load_artifact(tmp_path)


def test_cold_start_without_compiler(artifact):
    code = f"""
import sys, time
t0 = time.perf_counter()
import numpy as np
from dzc.runtime.native_executor import NativeExecutor
ex = NativeExecutor({str(artifact)!r}, max_context=32, threads=1)
ex.forward(np.array([1, 2, 3]))
dt = time.perf_counter() - t0
assert 'llvmlite' not in sys.modules, 'loading imported llvmlite'
print(dt)
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert float(out.stdout.strip().splitlines()[-1]) < 2.0   # imports included; the load itself is ms


def test_orc_fallback_without_cc(artifact, tmp_path):
    """An artifact holding only lib.o (compiled where no C compiler exists) still runs, linked by ORC."""
    from dzc.codegen.build import emit_object
    from dzc.codegen.target import host_target
    from dzc.runtime.artifact import sha256_file
    art = _copy(artifact, tmp_path)
    module, _ = lower_programs(_programs(), _store(), host_target())
    (art / "lib.o").write_bytes(emit_object(render_llvm(module, host_target()), host_target()))
    (art / "lib.so").unlink()
    man = json.loads((art / MANIFEST).read_text())
    man["library"] = "lib.o"
    man["files"] = {"lib.o": sha256_file(art / "lib.o"), WEIGHTS: man["files"][WEIGHTS]}
    (art / MANIFEST).write_text(json.dumps(man))
    a = NativeExecutor(art, max_context=16, threads=1).forward(np.array([4, 2]))
    b = NativeExecutor(artifact, max_context=16, threads=1).forward(np.array([4, 2]))
    np.testing.assert_allclose(a, b, atol=1e-6)


@pytest.mark.parametrize("cpu,triple,magic,vector", [
    (None, "aarch64-unknown-linux-gnu", b"\x7fELF", "fmla\tv"),
    ("apple-m1", "arm64-apple-macosx14.0.0", b"\xcf\xfa\xed\xfe", "fmla.4s"),
    ("x86-64-v3", "x86_64-unknown-linux-gnu", b"\x7fELF", "ymm"),
])
def test_cross_target_objects(tmp_path, cpu, triple, magic, vector):
    out = compile_model(_programs(), _store(), None, tmp_path / "x", cpu=cpu, triple=triple, vocab_size=VOCAB)
    man = json.loads((out / MANIFEST).read_text())
    assert man["target"]["triple"] == triple
    lib = out / man["library"]
    assert lib.read_bytes()[:4] == magic
    tgt = cpu_target(cpu=cpu, triple=triple)
    module, _ = lower_programs(_programs(), _store(), tgt)
    asm = emit_assembly(render_llvm(module, tgt), tgt)
    assert vector in asm
    if "x86" in triple:
        assert "zmm" not in asm
