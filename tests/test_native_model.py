"""Compiled tiny DeepSeek-V3 checkpoints on this CPU against the interpreter and transformers (fp32).

Each checkpoint fixture (tests/conftest.py) is traced, run through the pass pipeline for --target cpu and
compiled once per module; the same post-pipeline programs also run on the interpreter. Checked: logits equal the
interpreter's within 1e-4 (of the logits' scale) and HF's within 1e-3, 16 greedy tokens equal HF's, prefill then
token-by-token decode equals recomputing the whole sequence, int8 stays within 10% relative L2 of fp32.
"""
from __future__ import annotations

import numpy as np
import pytest

from dzc.checkpoint.loader import Checkpoint
from dzc.codegen.compile import compile_model
from dzc.driver import run_passes
from dzc.driver import trace_checkpoint
from dzc.runtime.interp_executor import InterpreterExecutor
from dzc.runtime.native_executor import NativeExecutor

from tiny_models import assert_close as _close, executor_greedy, hf_greedy, hf_logits

PROMPT = [0, 5, 17, 42, 99, 7, 250, 3, 11, 64, 200]


class Compiled:
    def __init__(self, ckpt, out, quant=None, passes=True, prefill_chunk=256):
        ck = Checkpoint.open(ckpt)
        programs, store = trace_checkpoint(ck)
        if passes:
            programs = run_passes(programs, store, ck.config, "cpu", quant)
        self.dir = compile_model(programs, store, ck.config, out, quant=quant, tokenizer_dir=ck.tokenizer_dir)
        self.ckpt, self.programs, self.store, self.config = ckpt, programs, store, ck.config
        self.prefill_chunk = prefill_chunk

    def native(self, ctx=64, threads=2):
        return NativeExecutor(self.dir, max_context=ctx, threads=threads, prefill_chunk=self.prefill_chunk)

    def interp(self, ctx=64):
        return InterpreterExecutor(self.programs["prefill"], self.programs["decode"], self.store,
                                   self.config.vocab_size, ctx)


@pytest.fixture(scope="module", params=["tiny_qlora_yarn", "tiny_direct_q_plain_rope", "tiny_fp8_sharded",
                                        "tiny_bf16"])
def compiled(request, tmp_path_factory):
    ckpt = request.getfixturevalue(request.param)
    return Compiled(ckpt, tmp_path_factory.mktemp("art-" + request.param))


def test_logits_match_interpreter_and_hf(compiled):
    ids = np.array(PROMPT)
    native = compiled.native().forward(ids)
    _close(native, compiled.interp().forward(ids), 1e-4)
    _close(native, hf_logits(compiled.ckpt, PROMPT), 1e-3)


def test_greedy_tokens_match_hf(compiled):
    want, _ = hf_greedy(compiled.ckpt, PROMPT, 16)
    assert executor_greedy(compiled.native(), PROMPT, 16) == list(want)


def test_cache_decode_equals_recompute(compiled):
    ex = compiled.native()
    ex.forward(np.array(PROMPT[:6]))
    steps = [ex.forward(np.array([t]))[0] for t in PROMPT[6:]]
    full = compiled.native().forward(np.array(PROMPT))
    _close(np.stack(steps), full[6:], 1e-4)
    assert ex.position == len(PROMPT)
    ex.reset()
    _close(ex.forward(np.array(PROMPT)), full, 1e-5)


def test_last_only_prefill(compiled):
    """forward(last_only=True) runs prefill_last (lm_head on the last row only): the last row of the full logits,
    and the cache it leaves decodes the same next token."""
    full = compiled.native().forward(np.array(PROMPT))
    ex = compiled.native()
    last = ex.forward(np.array(PROMPT), last_only=True)
    assert last.shape == (1, full.shape[1]) and "prefill_last" in ex.programs
    _close(last, full[-1:], 1e-5)
    nxt = int(last[0].argmax())
    _close(ex.forward(np.array([nxt])), compiled.native().forward(np.array(PROMPT + [nxt]))[-1:], 1e-4)


def test_chunked_prefill_and_threads(tiny_qlora_yarn, tmp_path):
    c = Compiled(tiny_qlora_yarn, tmp_path / "a", prefill_chunk=4)
    want = c.interp().forward(np.array(PROMPT))
    for threads in (1, 2):
        _close(c.native(threads=threads).forward(np.array(PROMPT)), want, 1e-4)
        _close(c.native(threads=threads).forward(np.array(PROMPT), last_only=True), want[-1:], 1e-4)


def test_traced_program_without_passes(tiny_qlora_yarn, tmp_path):
    c = Compiled(tiny_qlora_yarn, tmp_path / "raw", passes=False)
    ids = np.array(PROMPT)
    _close(c.native().forward(ids), c.interp().forward(ids), 1e-4)


def test_int8_close_to_fp32_and_int4_exact_to_its_interpreter(tiny_qlora_yarn, tmp_path):
    ref = hf_logits(tiny_qlora_yarn, PROMPT)
    c8 = Compiled(tiny_qlora_yarn, tmp_path / "i8", quant="int8")
    got = c8.native().forward(np.array(PROMPT))
    assert np.linalg.norm(got - ref) / np.linalg.norm(ref) < 0.10
    c4 = Compiled(tiny_qlora_yarn, tmp_path / "i4", quant="int4")
    _close(c4.native().forward(np.array(PROMPT)), c4.interp().forward(np.array(PROMPT)), 1e-4)


def test_executor_protocol_and_errors(tiny_qlora_yarn, tmp_path):
    from dzc.errors import InputError
    c = Compiled(tiny_qlora_yarn, tmp_path / "p")
    ex = c.native(ctx=12)
    assert ex.vocab_size == c.config.vocab_size and ex.max_context == 12
    assert ex.kv_cache_bytes_per_token == 4 * c.config.num_hidden_layers * (
        c.config.kv_lora_rank + c.config.qk_rope_head_dim)
    assert ex.forward(np.array([], np.int32)).shape == (0, c.config.vocab_size)
    with pytest.raises(InputError):
        ex.forward(np.array([c.config.vocab_size]))
    ex.forward(np.array(PROMPT))
    with pytest.raises(InputError):
        ex.forward(np.array([1, 2]))
