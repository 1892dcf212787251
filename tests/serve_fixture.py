"""Test-only: a tiny random DeepSeek-V3 served through the interpreter, and a `dzc serve` stand-in around it.

`tiny_served_model()` builds a ServedModel in about 50 ms: 2 layers (one dense, one MoE), hidden size 32, a
byte-level tokenizer (256 byte tokens + 5 special tokens, no merges) with a small chat template. The output
head favours lowercase letters and spaces so that generated text is readable and stop strings are easy to
pick. Run as a script it is `dzc serve` with this model in place of a real loader:

    python tests/serve_fixture.py serve tiny-model --port 0 [--api-key K] [--rate-limit 5/min] ...

DZC_TEST_FORWARD_DELAY_MS makes every forward pass sleep that long (the GIL is released while sleeping), so
tests can catch a generation in the middle without a big model.
"""
from __future__ import annotations

import argparse
import os
import sys
import time
from pathlib import Path

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:  # so `import tests.serve_fixture` and the script both work
    sys.path.insert(0, str(ROOT))

from dzc.checkpoint.config import ModelConfig  # noqa: E402
from dzc.ir.dtypes import DType  # noqa: E402
from dzc.ir.node import WeightFormat  # noqa: E402
from dzc.ir.ops import Op  # noqa: E402
from dzc.ir.weights import WeightStore  # noqa: E402
from dzc.model import deepseek_v3  # noqa: E402
from dzc.runtime.interp_executor import InterpreterExecutor  # noqa: E402
from dzc.runtime.server import ServedModel  # noqa: E402
from dzc.runtime.tokenizer import Tokenizer  # noqa: E402

SPECIALS = ("<s>", "</s>", "<|system|>", "<|user|>", "<|assistant|>")
CHAT_TEMPLATE = ("{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
MAX_CONTEXT = 512


def tiny_tokenizer() -> Tokenizer:
    vocab = {token: i for i, token in enumerate(SPECIALS)}
    for char in pre_tokenizers.ByteLevel.alphabet():
        vocab[char] = len(vocab)
    backend = tokenizers.Tokenizer(models.BPE(vocab=vocab, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens([tokenizers.AddedToken(s, special=True) for s in SPECIALS])
    return Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "</s>"}, add_bos_token=True,
                     chat_template=CHAT_TEMPLATE, source="tests/serve_fixture.py")


def tiny_config(vocab_size: int) -> ModelConfig:
    return ModelConfig.from_dict(dict(
        model_type="deepseek_v3", architectures=["DeepseekV3ForCausalLM"], vocab_size=vocab_size, hidden_size=32,
        intermediate_size=64, moe_intermediate_size=16, num_hidden_layers=2, num_attention_heads=2, q_lora_rank=16,
        kv_lora_rank=16, qk_rope_head_dim=8, qk_nope_head_dim=8, v_head_dim=8, n_routed_experts=4,
        n_shared_experts=1, num_experts_per_tok=2, n_group=2, topk_group=1, routed_scaling_factor=1.0,
        first_k_dense_replace=1, max_position_embeddings=MAX_CONTEXT, bos_token_id=0, eos_token_id=1))


class _SlowExecutor:
    """An executor that sleeps before every forward pass (to make generations long enough to interrupt)."""

    def __init__(self, inner: InterpreterExecutor, delay_s: float) -> None:
        self.inner, self.delay_s = inner, delay_s
        self.vocab_size, self.max_context = inner.vocab_size, inner.max_context
        self.kv_cache_bytes_per_token = inner.kv_cache_bytes_per_token

    @property
    def position(self) -> int:
        return self.inner.position

    def forward(self, token_ids, last_only=False):
        time.sleep(self.delay_s)
        return self.inner.forward(token_ids, last_only)

    def reset(self) -> None:
        self.inner.reset()


def tiny_served_model(name: str = "tiny-model", seed: int = 0, delay_ms: float = 0.0) -> ServedModel:
    tokenizer = tiny_tokenizer()
    config = tiny_config(tokenizer.vocab_size)
    fmt = lambda name: WeightFormat(DType.F32)  # noqa: E731
    prefill, decode = deepseek_v3.trace(config, fmt, "prefill"), deepseek_v3.trace(config, fmt, "decode")
    rng = np.random.default_rng(seed)
    values = dict(deepseek_v3.constants(config))
    for node in prefill.toposort():
        if node.op != Op.WEIGHT or node.arg.name in values:
            continue
        name_, shape = node.arg.name, node.shape
        values[name_] = (np.ones(shape, np.float32) if name_.endswith("norm.weight")
                         else rng.normal(0, 0.5, shape).astype(np.float32))
    head = values["lm_head.weight"]
    letters = [tokenizer.backend.token_to_id(c) for c in "abcdefghijklmnopqrstuvwxyz"]
    letters.append(tokenizer.backend.token_to_id("\u0120"))  # byte-level space
    mask = np.full(head.shape[0], 0.05, np.float32)
    mask[letters] = 1.0
    values["lm_head.weight"] = head * mask[:, None]
    weights = WeightStore(values.__getitem__)  # shared, read-only: every executor reads the same arrays
    for name_ in values:
        weights.f32(name_)

    def make_executor():
        executor = InterpreterExecutor(prefill, decode, weights, config.vocab_size, MAX_CONTEXT)
        return _SlowExecutor(executor, delay_ms / 1000) if delay_ms else executor

    return ServedModel(name=name, make_executor=make_executor, tokenizer=tokenizer, eos_ids=(tokenizer.eos_id,),
                       max_context=MAX_CONTEXT)


def main(argv: list[str] | None = None) -> int:
    from dzc.cli_serve import add_serve_parser, run_serve

    parser = argparse.ArgumentParser(prog="serve_fixture")
    add_serve_parser(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    delay = float(os.environ.get("DZC_TEST_FORWARD_DELAY_MS", "0"))
    return run_serve(args, lambda path: tiny_served_model(delay_ms=delay))


if __name__ == "__main__":
    sys.exit(main())


class ServerProcess:
    """`python tests/serve_fixture.py serve tiny-model --port 0 ...` as a child process on 127.0.0.1.

    Output goes to files in `log_dir` (a pipe nobody reads could fill up and stall the server). `url` is known
    once the announcement line appears and /health answers."""

    def __init__(self, *args: str, log_dir: Path, delay_ms: float = 0.0, startup_timeout: float = 60.0,
                 command: list[str] | None = None) -> None:
        """`command` replaces `python tests/serve_fixture.py serve tiny-model` (e.g. to serve a real folder)."""
        import subprocess

        log_dir.mkdir(parents=True, exist_ok=True)
        self.stdout_path, self.stderr_path = log_dir / "stdout.txt", log_dir / "stderr.txt"
        env = {**os.environ, "DZC_TEST_FORWARD_DELAY_MS": str(delay_ms), "PYTHONUNBUFFERED": "1"}
        env.pop("DZC_API_KEY", None)
        with open(self.stdout_path, "wb") as out, open(self.stderr_path, "wb") as err:
            command = command or [sys.executable, str(Path(__file__).resolve()), "serve", "tiny-model"]
            self.proc = subprocess.Popen(
                [*command, "--port", "0", *args],
                stdout=out, stderr=err, env=env, cwd=str(ROOT))
        self.url = self._wait_ready(startup_timeout)

    def _wait_ready(self, timeout: float) -> str:
        import re
        import urllib.request

        deadline = time.monotonic() + timeout
        url = None
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"the server exited with {self.proc.returncode}:\n{self.logs()}")
            if url is None:
                m = re.search(r"on (http://127\.0\.0\.1:\d+)", self.stdout_path.read_text(errors="replace"))
                url = m.group(1) if m else None
            if url is not None:
                try:
                    with urllib.request.urlopen(url + "/health", timeout=2) as response:
                        if response.status == 200:
                            return url
                except OSError:
                    pass
            time.sleep(0.05)
        self.stop()
        raise RuntimeError(f"the server did not start within {timeout} s:\n{self.logs()}")

    @property
    def pid(self) -> int:
        return self.proc.pid

    def logs(self) -> str:
        return self.stdout_path.read_text(errors="replace") + self.stderr_path.read_text(errors="replace")

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout=15)
            except Exception:
                self.proc.kill()
                self.proc.wait(timeout=5)
