"""Choosing the next token from a row of logits.

The order of the steps (the same list vLLM documents, though vLLM applies min-p before top-k/top-p):
  1. repetition_penalty (HF): logits of tokens seen in the prompt or the output are divided by the
     penalty when positive and multiplied by it when negative;
  2. frequency/presence penalty (OpenAI): logit -= count * frequency_penalty + (count > 0) * presence_penalty,
     counting generated tokens only;
  3. temperature: logits / temperature; below 1e-5 (0 included) sampling is greedy, the argmax of the
     penalised logits (lowest id on ties), with no filter and no draw;
  4. top-k keeps the k largest logits (exactly k; ties broken arbitrarily but deterministically);
  5. top-p keeps the most probable tokens until their mass, renormalised after top-k, reaches top_p; every
     token as probable as the one that reaches it stays too, so the threshold comes from sorting values
     (an argsort of 130k logits costs ~15 ms, the value sort ~1 ms, the top 1024 after a partition ~0.2 ms);
  6. min-p keeps tokens with probability >= min_p * the largest probability;
  7. one draw from numpy's Generator(PCG64(seed)), so a seed fixes the token sequence for a model and prompt.
Probabilities are computed in float64.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from dzc.errors import InputError

_GREEDY_BELOW = 1e-5  # smaller temperatures would overflow the scaled logits; they mean "greedy" anyway
_TOP_P_HEAD = 1024  # tokens sorted first when looking for the top-p threshold


@dataclass
class SamplingParams:
    """What to generate and when to stop. `validate` checks every field; generate calls it."""

    max_tokens: int = 256
    temperature: float = 1.0  # 0 (or below 1e-5) = greedy
    top_k: int = 0  # 0 = off
    top_p: float = 1.0  # 1 = off
    min_p: float = 0.0  # 0 = off
    repetition_penalty: float = 1.0  # 1 = off
    frequency_penalty: float = 0.0
    presence_penalty: float = 0.0
    seed: int | None = None  # None = fresh entropy on every Sampler
    stop: list[str] = field(default_factory=list)
    ignore_eos: bool = False
    stop_token_ids: list[int] = field(default_factory=list)

    def validate(self) -> None:
        """Raise InputError naming the first parameter outside its range."""
        for name, ok, allowed in _RULES:
            value = getattr(self, name)
            if not ok(value):
                raise InputError(f"sampling parameter {name}={value!r} is invalid: it must be {allowed}")

    @property
    def greedy(self) -> bool:
        return self.temperature < _GREEDY_BELOW


class Sampler:
    """Draws tokens for one sequence. Holds the random generator, so one Sampler serves one generation."""

    def __init__(self, params: SamplingParams, prompt_ids: Sequence[int] = ()) -> None:
        self.params = params
        self._rng = np.random.Generator(np.random.PCG64(params.seed))
        self._prompt_seen = np.unique(np.asarray(prompt_ids, dtype=np.int64))
        self._penalised = (
            params.repetition_penalty != 1 or params.frequency_penalty != 0 or params.presence_penalty != 0
        )

    def sample(self, logits: np.ndarray, generated: Sequence[int]) -> int:
        """The next token id, given float32 logits [V] for it and the tokens generated so far."""
        if self.params.greedy:  # the hot path of deterministic runs: no copy unless a penalty needs one
            return int(np.argmax(self._penalise(logits, generated) if self._penalised else logits))
        ids, weights = self._filtered(logits, generated)
        cdf = np.cumsum(weights, out=weights)
        # side="right" never lands on a zero-weight entry; min() guards a draw that rounds up to the total.
        choice = min(int(np.searchsorted(cdf, self._rng.random() * cdf[-1], side="right")), cdf.size - 1)
        return int(choice if ids is None else ids[choice])

    def candidates(self, logits: np.ndarray, generated: Sequence[int]) -> tuple[np.ndarray, np.ndarray]:
        """The token ids `sample` can draw and their float64 probabilities (summing to 1)."""
        if self.params.greedy:
            return np.array([self.sample(logits, generated)]), np.ones(1)
        ids, weights = self._filtered(logits, generated)
        return (np.arange(weights.size) if ids is None else ids), weights / weights.sum()

    def _filtered(self, logits: np.ndarray, generated: Sequence[int]) -> tuple[np.ndarray | None, np.ndarray]:
        """Unnormalised float64 weights of the tokens that survive the filters (the largest is 1) and their
        ids; ids None means the weights cover the whole vocabulary. Works in place where it can: at 130k
        entries a fresh temporary costs about as much in page faults as the arithmetic on it."""
        p = self.params
        x = self._penalise(logits, generated) if self._penalised else logits.astype(np.float64)
        x /= p.temperature
        ids = None
        if 0 < p.top_k < x.size:
            ids = np.argpartition(x, x.size - p.top_k)[x.size - p.top_k :]
            x = x[ids]
        x -= x.max()
        weights = np.exp(x, out=x)
        if p.top_p < 1 or p.min_p > 0:
            keep = np.ones(weights.size, dtype=bool)
            if p.top_p < 1:
                keep &= weights >= _top_p_threshold(weights, p.top_p)
            if p.min_p > 0:  # the top weight is 1, before and after top-p
                keep &= weights >= p.min_p
            kept = np.flatnonzero(keep)
            ids, weights = (kept if ids is None else ids[kept]), weights[kept]
        return ids, weights

    def _penalise(self, logits: np.ndarray, generated: Sequence[int]) -> np.ndarray:
        """A float64 copy of `logits` with the repetition, frequency and presence penalties applied."""
        p = self.params
        x = logits.astype(np.float64)
        out = np.asarray(generated, dtype=np.int64)
        if p.repetition_penalty != 1:
            seen = np.concatenate([self._prompt_seen, out])  # repeats are harmless: each write is the same value
            v = x[seen]
            x[seen] = np.where(v > 0, v / p.repetition_penalty, v * p.repetition_penalty)
        if out.size and (p.frequency_penalty != 0 or p.presence_penalty != 0):
            ids, counts = np.unique(out, return_counts=True)
            x[ids] -= counts * p.frequency_penalty + p.presence_penalty
        return x


def _top_p_threshold(weights: np.ndarray, top_p: float) -> float:
    """The weight of the token at which the mass of the heaviest tokens, taken in order, reaches top_p.
    Sorting all 130k weights costs ~1 ms; the heaviest 1024 (an O(V) partition) usually hold that mass, and
    only a flat distribution needs the full sort."""
    target = top_p * weights.sum()
    m = min(_TOP_P_HEAD, weights.size)
    head = np.sort(np.partition(weights, weights.size - m)[weights.size - m :])[::-1]
    cumulative = np.cumsum(head)
    if cumulative[-1] < target:  # a flat distribution: the threshold lies beyond the head
        head = np.sort(weights)[::-1]
        cumulative = np.cumsum(head)
    return float(head[min(int(np.searchsorted(cumulative, target)), head.size - 1)])


def _is_int(value: object) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def _is_real(value: object) -> bool:
    return isinstance(value, (int, float, np.floating)) and not isinstance(value, bool) and math.isfinite(value)


def _is_token_list(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(_is_int(t) and t >= 0 for t in value)


def _is_stop_list(value: object) -> bool:
    return isinstance(value, (list, tuple)) and all(isinstance(s, str) and s for s in value)


_RULES: list[tuple[str, Callable[[Any], bool], str]] = [
    ("max_tokens", lambda v: _is_int(v) and v >= 1, "an integer >= 1"),
    ("temperature", lambda v: _is_real(v) and v >= 0, "a finite number >= 0 (0 = greedy)"),
    ("top_k", lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 = off)"),
    ("top_p", lambda v: _is_real(v) and 0 < v <= 1, "a number in (0, 1] (1 = off)"),
    ("min_p", lambda v: _is_real(v) and 0 <= v <= 1, "a number in [0, 1] (0 = off)"),
    ("repetition_penalty", lambda v: _is_real(v) and v > 0, "a finite number > 0 (1 = off)"),
    ("frequency_penalty", lambda v: _is_real(v) and -2 <= v <= 2, "a number in [-2, 2] (0 = off)"),
    ("presence_penalty", lambda v: _is_real(v) and -2 <= v <= 2, "a number in [-2, 2] (0 = off)"),
    ("seed", lambda v: v is None or (_is_int(v) and v >= 0), "an integer >= 0, or unset for a random seed"),
    ("stop", _is_stop_list, "a list of non-empty strings"),
    ("ignore_eos", lambda v: isinstance(v, bool), "true or false"),
    ("stop_token_ids", _is_token_list, "a list of token ids >= 0"),
]
