"""Sampling: greedy, each filter, penalties, seeds and parameter checks."""
from __future__ import annotations

import time

import numpy as np
import pytest

from dzc.errors import InputError
from dzc.runtime.sampling import Sampler, SamplingParams

# Probabilities 0.5, 0.3, 0.15, 0.05 (temperature 1): the filters' cut points are easy to reason about.
PROBS = np.array([0.5, 0.3, 0.15, 0.05])
LOGITS = np.log(PROBS).astype(np.float32)


def candidates(logits=LOGITS, generated=(), prompt_ids=(), **params) -> dict[int, float]:
    ids, probs = Sampler(SamplingParams(**params), prompt_ids).candidates(np.asarray(logits, np.float32), generated)
    return dict(zip(ids.tolist(), probs.tolist()))


def softmax(x) -> np.ndarray:
    e = np.exp(np.asarray(x, np.float64) - np.max(x))
    return e / e.sum()


def test_greedy_is_argmax_lowest_id_on_ties():
    sampler = Sampler(SamplingParams(temperature=0))
    assert sampler.sample(np.array([0.1, 3.0, -1.0, 3.0], np.float32), []) == 1
    assert sampler.sample(LOGITS, []) == 0


def test_no_filter_keeps_the_softmax():
    got = candidates(temperature=1.0)
    assert np.allclose([got[i] for i in range(4)], PROBS)


def test_temperature_scales_logits():
    got = candidates(temperature=0.5)
    assert np.allclose([got[i] for i in range(4)], softmax(LOGITS / 0.5))


def test_top_k_keeps_exactly_k():
    logits = np.random.default_rng(0).standard_normal(1000).astype(np.float32)
    got = candidates(logits, top_k=7)
    assert set(got) == set(np.argsort(-logits)[:7].tolist())
    assert np.allclose(list(got.values()), softmax(logits[list(got)]))


@pytest.mark.parametrize("top_p, kept", [(0.4, {0}), (0.7, {0, 1}), (0.85, {0, 1, 2}), (0.99, {0, 1, 2, 3})])
def test_top_p(top_p, kept):
    got = candidates(top_p=top_p)
    assert set(got) == kept
    assert np.allclose(list(got.values()), PROBS[sorted(kept)] / PROBS[sorted(kept)].sum())


def test_top_p_on_a_flat_distribution_beyond_the_sorted_head():
    logits = np.random.default_rng(1).standard_normal(5000).astype(np.float32) * 0.1
    probs = softmax(logits)
    descending = np.sort(probs)[::-1]
    expected = int(np.searchsorted(np.cumsum(descending), 0.9)) + 1  # tokens needed to reach 0.9
    assert expected > 1024
    assert len(candidates(logits, top_p=0.9)) == expected


def test_top_p_applies_after_top_k():
    # After top-k=2 the distribution is 0.625 / 0.375, so top-p 0.6 keeps one token (0.5 of the full softmax
    # would not have reached 0.6).
    assert set(candidates(top_k=2, top_p=0.6)) == {0}


@pytest.mark.parametrize("min_p, kept", [(0.05, {0, 1, 2, 3}), (0.25, {0, 1, 2}), (0.5, {0, 1}), (1.0, {0})])
def test_min_p(min_p, kept):
    assert set(candidates(min_p=min_p)) == kept


def test_repetition_penalty_hf_semantics():
    logits = [2.0, -2.0, 1.0, 0.5]
    got = candidates(logits, generated=[1], prompt_ids=[0, 0], repetition_penalty=2.0)
    assert np.allclose([got[i] for i in range(4)], softmax([1.0, -4.0, 1.0, 0.5]))


def test_frequency_and_presence_penalties_count_generated_tokens():
    got = candidates(np.zeros(4), generated=[1, 1, 2], prompt_ids=[3], frequency_penalty=0.5, presence_penalty=0.25)
    assert np.allclose([got[i] for i in range(4)], softmax([0.0, -1.25, -0.75, 0.0]))


def test_penalties_also_steer_greedy():
    sampler = Sampler(SamplingParams(temperature=0, repetition_penalty=3.0))
    assert sampler.sample(np.array([2.0, 1.0], np.float32), [0]) == 1


def draws(seed, n=64, **params) -> list[int]:
    sampler = Sampler(SamplingParams(seed=seed, **params))
    logits = np.zeros(50, np.float32)
    return [sampler.sample(logits, []) for _ in range(n)]


def test_seed_reproducibility():
    assert draws(7) == draws(7)
    assert draws(7) != draws(8)


def test_draws_follow_the_filtered_distribution():
    sampler = Sampler(SamplingParams(seed=0, top_p=0.85))
    counts = np.bincount([sampler.sample(LOGITS, []) for _ in range(3000)], minlength=4)
    assert counts[3] == 0
    assert np.allclose(counts[:3] / 3000, PROBS[:3] / PROBS[:3].sum(), atol=0.03)


def test_sampling_a_full_vocabulary_is_fast():
    logits = (np.random.default_rng(2).standard_normal(129280) * 4).astype(np.float32)
    params = SamplingParams(seed=0, top_k=50, top_p=0.9, min_p=0.02, repetition_penalty=1.1, frequency_penalty=0.2)
    generated = list(range(0, 129280, 257))
    for p in (params, SamplingParams(seed=0, top_p=0.9)):
        sampler = Sampler(p, prompt_ids=range(300))
        best = min(_timed(lambda: sampler.sample(logits, generated)) for _ in range(5))
        assert best < 0.02, f"{p}: {best * 1e3:.1f} ms per token"


def _timed(fn) -> float:
    start = time.perf_counter()
    fn()
    return time.perf_counter() - start


@pytest.mark.parametrize("field, value", [
    ("max_tokens", 0), ("temperature", -0.1), ("temperature", float("nan")), ("top_k", -1), ("top_k", 2.5),
    ("top_p", 0.0), ("top_p", 1.5), ("min_p", -0.1), ("repetition_penalty", 0.0), ("frequency_penalty", 2.5),
    ("presence_penalty", -3), ("seed", -1), ("stop", ["ok", ""]), ("stop", "STOP"), ("stop_token_ids", [-1]),
    ("ignore_eos", "yes"),
])
def test_validate_names_the_parameter(field, value):
    with pytest.raises(InputError) as err:
        SamplingParams(**{field: value}).validate()
    message = str(err.value)
    assert f"sampling parameter {field}=" in message and "must be" in message and "\n" not in message


def test_defaults_are_valid():
    SamplingParams().validate()
    SamplingParams(temperature=0, seed=3, stop=["\n\n"], stop_token_ids=[1]).validate()
