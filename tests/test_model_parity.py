"""The traced model on the interpreter equals transformers' DeepseekV3ForCausalLM in fp32 on every tiny fixture."""
from __future__ import annotations

import numpy as np
import pytest

from dzc.driver import open_model
from dzc.runtime.generate import generate_all
from dzc.runtime.sampling import SamplingParams
from tiny_models import hf_greedy, hf_logits

FIXTURES = ["tiny_qlora_yarn", "tiny_direct_q_plain_rope", "tiny_fp8_sharded", "tiny_bf16"]
PROMPT = [5, 17, 42, 99, 7, 120, 3, 11]


@pytest.fixture(params=FIXTURES)
def checkpoint(request):
    return request.getfixturevalue(request.param)


def test_prefill_logits_match_hf(checkpoint):
    model = open_model(checkpoint)
    ours = model.make_executor(64).forward(np.array(PROMPT))
    np.testing.assert_allclose(ours, hf_logits(checkpoint, PROMPT), atol=1e-3, rtol=0)


def test_greedy_16_tokens_and_logits_match_hf(checkpoint):
    model = open_model(checkpoint)
    params = SamplingParams(max_tokens=16, temperature=0, ignore_eos=True)
    result = generate_all(model.make_executor(64), PROMPT, params, eos_ids=(), capture_logits=True)
    ref_tokens, ref_logits = hf_greedy(checkpoint, PROMPT, 16)
    assert result.token_ids == ref_tokens
    np.testing.assert_allclose(result.logits, ref_logits, atol=1e-3, rtol=0)


def test_cached_decode_equals_full_recomputation(tiny_qlora_yarn):
    model = open_model(tiny_qlora_yarn)
    seq = PROMPT + [30, 31, 32, 33]
    cached = model.make_executor(64)
    cached.forward(np.array(PROMPT))
    steps = [cached.forward(np.array([t]))[0] for t in seq[len(PROMPT):]]
    full = model.make_executor(64).forward(np.array(seq))[len(PROMPT):]
    np.testing.assert_allclose(np.stack(steps), full, atol=1e-5, rtol=0)


def test_chunked_prefill_equals_one_prefill(tiny_fp8_sharded):
    model = open_model(tiny_fp8_sharded)
    a = model.make_executor(64)
    first, second = a.forward(np.array(PROMPT[:5])), a.forward(np.array(PROMPT[5:]))
    whole = model.make_executor(64).forward(np.array(PROMPT))
    np.testing.assert_allclose(np.concatenate([first, second]), whole, atol=1e-5, rtol=0)


def test_positions_beyond_original_context_are_finite(tiny_qlora_yarn):
    """YaRN models must run past original_max_position_embeddings."""
    model = open_model(tiny_qlora_yarn)
    limit = model.config.rope.original_max_position_embeddings
    ids = (np.arange(limit + 8) % 200).astype(np.int32)
    ours = model.make_executor(limit + 8).forward(ids)
    np.testing.assert_allclose(ours[-4:], hf_logits(tiny_qlora_yarn, ids)[-4:], atol=1e-3, rtol=0)


def test_sampling_is_reproducible_by_seed(tiny_bf16):
    model = open_model(tiny_bf16)
    run = lambda seed: generate_all(model.make_executor(64), PROMPT, SamplingParams(
        max_tokens=12, temperature=1.0, top_k=50, top_p=0.9, seed=seed, ignore_eos=True)).token_ids
    assert run(7) == run(7)
    assert run(7) != run(8)
