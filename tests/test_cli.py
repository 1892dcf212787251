"""`dzc run` end to end, and every bad input the CLI promises to reject with one line and a non-zero exit."""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from dzc.cli import main
from tiny_models import (copy_checkpoint, hf_greedy, push_offsets_past_end, rewrite_header, safetensors_files,
                         set_header_length, truncate_file)


def run_cli(capsys, *argv: str) -> tuple[int, str, str]:
    code = main([str(a) for a in argv])
    out, err = capsys.readouterr()
    return code, out, err


def assert_one_line_error(code: int, err: str, *needles: str) -> None:
    assert code != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("dzc: error: "), err
    for needle in needles:
        assert needle in lines[0], (needle, lines[0])


def test_json_output_contract_and_dumped_logits(capsys, tmp_path, tiny_qlora_yarn):
    dump = tmp_path / "logits.npy"
    code, out, _ = run_cli(capsys, "run", tiny_qlora_yarn, "--prompt-ids", "5,17,42,99", "--max-tokens", "6",
                           "--temperature", "0", "--ignore-eos", "--json", "--dump-logits", dump)
    assert code == 0
    result = json.loads(out)
    tokens, logits = hf_greedy(tiny_qlora_yarn, [5, 17, 42, 99], 6)
    assert result["token_ids"] == tokens and result["finish_reason"] == "length"
    for key in ("prompt_tokens", "generated_tokens", "prefill_tokens_per_s", "decode_tokens_per_s",
                "kv_cache_bytes_per_token"):
        assert key in result["stats"]
    assert result["stats"]["prompt_tokens"] == 4 and result["stats"]["generated_tokens"] == 6
    saved = np.load(dump)
    assert saved.dtype == np.float32 and saved.shape == logits.shape
    np.testing.assert_allclose(saved, logits, atol=1e-3, rtol=0)


def test_streams_text_and_stops_on_max_tokens(capsys, tiny_qlora_yarn):
    code, out, err = run_cli(capsys, "run", tiny_qlora_yarn, "--prompt", "Once upon", "--max-tokens", "4",
                             "--seed", "3")
    assert code == 0 and out.startswith("Once upon") and "generated 4 tok" in err


def test_runs_as_a_process_without_traceback(tmp_path):
    proc = subprocess.run([sys.executable, "-m", "dzc", "run", str(tmp_path / "missing")],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode != 0 and "Traceback" not in proc.stderr
    assert proc.stderr.strip().startswith("dzc: error: ") and "does not exist" in proc.stderr


def _damaged(tmp_path: Path, fixture: Path, damage) -> Path:
    folder = copy_checkpoint(fixture, tmp_path / "ckpt")
    damage(folder)
    return folder


def _edit_config(edit):
    def damage(folder: Path) -> None:
        path = folder / "config.json"
        cfg = json.loads(path.read_text())
        edit(cfg)
        path.write_text(json.dumps(cfg))
    return damage


def _reshape_tensor(name: str, shape=None, dtype=None):
    def edit(header):
        if shape is not None:
            header[name]["shape"] = shape
        if dtype is not None:
            header[name]["dtype"] = dtype
    return lambda folder: rewrite_header(safetensors_files(folder)[0], edit)  # tiny_qlora_yarn has one file


BAD_CHECKPOINTS = {
    "truncated": (lambda f: truncate_file(safetensors_files(f)[0], 1000), ["model.safetensors"]),
    "bad header length": (lambda f: set_header_length(safetensors_files(f)[0], 1 << 40), ["header"]),
    "offsets past end": (lambda f: push_offsets_past_end(safetensors_files(f)[0], "model.norm.weight"), ["model.norm.weight"]),
    "invalid config json": (lambda f: (f / "config.json").write_text("{not json"), ["config.json"]),
    "missing config key": (_edit_config(lambda c: c.pop("kv_lora_rank")), ["kv_lora_rank"]),
    "nonsensical config key": (_edit_config(lambda c: c.update(num_experts_per_tok=1000)), ["num_experts_per_tok"]),
    "other architecture": (_edit_config(lambda c: c.update(model_type="llama", architectures=["LlamaForCausalLM"])), ["deepseek_v3"]),
    "wrong shape": (_reshape_tensor("model.norm.weight", shape=[7, 2]), ["model.norm.weight"]),
    "wrong dtype": (_reshape_tensor("model.norm.weight", dtype="I32"), ["model.norm.weight"]),
}


@pytest.mark.parametrize("case", sorted(BAD_CHECKPOINTS))
def test_damaged_checkpoint_is_rejected(capsys, tmp_path, tiny_qlora_yarn, case):
    damage, needles = BAD_CHECKPOINTS[case]
    folder = _damaged(tmp_path, tiny_qlora_yarn, damage)
    code, _, err = run_cli(capsys, "run", folder, "--prompt-ids", "1,2,3", "--max-tokens", "2")
    assert_one_line_error(code, err, *needles)


def test_missing_shard_is_rejected(capsys, tmp_path, tiny_fp8_sharded):
    folder = _damaged(tmp_path, tiny_fp8_sharded, lambda f: safetensors_files(f)[1].unlink())
    code, _, err = run_cli(capsys, "run", folder, "--prompt-ids", "1,2,3")
    assert_one_line_error(code, err, safetensors_files(tiny_fp8_sharded)[1].name)


def test_empty_folder_and_missing_path(capsys, tmp_path):
    (tmp_path / "empty").mkdir()
    assert_one_line_error(*run_cli(capsys, "run", tmp_path / "empty", "--prompt-ids", "1")[::2], "empty")
    assert_one_line_error(*run_cli(capsys, "run", tmp_path / "nope", "--prompt-ids", "1")[::2], "does not exist")


def test_text_prompt_without_tokenizer(capsys, tmp_path, tiny_qlora_yarn):
    folder = _damaged(tmp_path, tiny_qlora_yarn, lambda f: (f / "tokenizer.json").unlink())
    code, _, err = run_cli(capsys, "run", folder, "--prompt", "hello")
    assert_one_line_error(code, err, "tokenizer", "--prompt-ids")


def test_bad_prompts(capsys, tiny_qlora_yarn):
    code, _, err = run_cli(capsys, "run", tiny_qlora_yarn, "--prompt-ids", "1,2,100000")
    assert_one_line_error(code, err, "100000", "vocabulary")
    code, _, err = run_cli(capsys, "run", tiny_qlora_yarn, "--prompt-ids", ",".join(["5"] * 40), "--max-context", "16")
    assert_one_line_error(code, err, "context")
    code, _, err = run_cli(capsys, "run", tiny_qlora_yarn, "--prompt-ids", "1,x")
    assert_one_line_error(code, err, "--prompt-ids")


def test_compile_prints_and_dumps_like_dzc_ir(capsys, tmp_path, tiny_qlora_yarn):
    code, out, _ = run_cli(capsys, "compile", tiny_qlora_yarn, "-o", tmp_path / "art", "--print-after", "absorb-mla",
                           "--dump-dir", tmp_path / "dumps")
    assert code == 0 and "mla_attention" in out
    for phase in ("prefill", "decode"):
        dumps = sorted(p.name for p in (tmp_path / "dumps" / phase).iterdir())
        assert dumps[0] == "00-input.ir" and any(name.endswith("-absorb-mla.ir") for name in dumps)
    code, _, err = run_cli(capsys, "compile", tiny_qlora_yarn, "-o", tmp_path / "art2", "--print-after", "nope")
    assert_one_line_error(code, err, "'nope' is not a pass")


def test_run_verify_full_catches_what_sampling_skips(capsys, tmp_path, tiny_bf16, monkeypatch):
    import json

    import dzc.runtime.artifact as A
    art = tmp_path / "art"
    assert run_cli(capsys, "compile", tiny_bf16, "-o", art)[0] == 0
    monkeypatch.setattr(A, "FULL_HASH_LIMIT", 1024)            # every file counts as big
    monkeypatch.setattr(A, "SAMPLE_COUNT", 2)
    monkeypatch.setattr(A, "SAMPLE_CHUNK", 64)
    man = json.loads((art / A.MANIFEST).read_text())
    man["file_samples"] = {f: A.sample_sha256(art / f) for f in man["files"]}
    (art / A.MANIFEST).write_text(json.dumps(man))
    weights = art / "weights.safetensors"
    data = bytearray(weights.read_bytes())
    data[len(data) // 2 + 1] ^= 1                              # between the two sampled chunks
    weights.write_bytes(bytes(data))
    args = ("run", art, "--prompt-ids", "1,2", "--max-tokens", "1", "--json")
    assert run_cli(capsys, *args)[0] == 0                      # auto: the fingerprint does not see it
    code, _, err = run_cli(capsys, *args, "--verify", "full")
    assert_one_line_error(code, err, "weights.safetensors")
