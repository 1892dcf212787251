"""The generate loop: prefill the prompt, then one token per forward until a stop condition.

Host-side only: it drives any `ModelExecutor` (interpreter or native code) and owns sampling, detokenization
and stopping. Every input is checked before the executor runs. finish_reason is 'stop' for EOS (unless
ignore_eos), a stop token id or a stop string, and 'length' at max_tokens or when prompt + output fill the
executor's context. The token that stopped generation is in `token_ids` but its text is not shown (nor is
a stop string's text). Special tokens are left out of the text.
"""
from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Iterator, Sequence

import numpy as np

from dzc.errors import InputError
from dzc.runtime.executor import ModelExecutor
from dzc.runtime.sampling import Sampler, SamplingParams
from dzc.runtime.stopping import StopStringMatcher
from dzc.runtime.tokenizer import IncrementalDetokenizer, Tokenizer


@dataclass(frozen=True)
class GenerationStats:
    """Timings of one generation. Prefill is the prompt's forward plus the first sample (time to first token);
    decode is every later step, one forward and one sample each, so decode_tokens_per_s counts
    generated_tokens - 1 steps. Time the caller spends between events is not counted."""

    prompt_tokens: int
    generated_tokens: int
    prefill_seconds: float
    decode_seconds: float
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    kv_cache_bytes_per_token: int


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One generated token and the text it made visible. The last event has finish_reason and stats set.
    `logits` is the float32 row that chose this token, present only when capture_logits was asked for."""

    token_id: int
    text: str
    finish_reason: str | None = None
    stats: GenerationStats | None = None
    logits: np.ndarray | None = None


@dataclass(frozen=True)
class GenerationResult:
    token_ids: list[int]
    text: str
    finish_reason: str
    stats: GenerationStats
    logits: np.ndarray | None = None  # [generated, vocab] float32: row i chose token_ids[i]


def generate(
    executor: ModelExecutor,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    tokenizer: Tokenizer | None = None,
    eos_ids: Sequence[int] = (),
    capture_logits: bool = False,
) -> Iterator[StreamEvent]:
    """Stream one event per generated token. `eos_ids` end generation unless params.ignore_eos; when empty,
    the tokenizer's EOS is used. Without a tokenizer the events carry no text and stop strings are refused.
    Inputs are checked when this is called, before the executor is touched."""
    prompt = _check_inputs(executor, prompt_ids, params, tokenizer)
    eos = tuple(eos_ids) or ((tokenizer.eos_id,) if tokenizer is not None and tokenizer.eos_id is not None else ())
    stop_ids = frozenset(params.stop_token_ids) | (frozenset() if params.ignore_eos else frozenset(eos))
    return _run(executor, prompt, params, tokenizer, stop_ids, capture_logits)


def generate_all(
    executor: ModelExecutor,
    prompt_ids: Sequence[int],
    params: SamplingParams,
    tokenizer: Tokenizer | None = None,
    eos_ids: Sequence[int] = (),
    capture_logits: bool = False,
) -> GenerationResult:
    """Run `generate` to the end and collect its events."""
    events = list(generate(executor, prompt_ids, params, tokenizer, eos_ids, capture_logits))
    last = events[-1]
    return GenerationResult(
        token_ids=[e.token_id for e in events],
        text="".join(e.text for e in events),
        finish_reason=last.finish_reason,
        stats=last.stats,
        logits=np.stack([e.logits for e in events]) if capture_logits else None,
    )


def _check_inputs(
    executor: ModelExecutor, prompt_ids: Sequence[int], params: SamplingParams, tokenizer: Tokenizer | None
) -> np.ndarray:
    params.validate()
    prompt = np.asarray(prompt_ids)
    if prompt.ndim != 1 or prompt.size == 0:
        raise InputError("the prompt is empty: give at least one token")
    if not np.issubdtype(prompt.dtype, np.integer):
        raise InputError(f"prompt token ids must be integers, got {prompt.dtype} values")
    vocab, context = executor.vocab_size, executor.max_context
    bad = np.flatnonzero((prompt < 0) | (prompt >= vocab))
    if bad.size:
        i = int(bad[0])
        raise InputError(f"prompt token id {int(prompt[i])} at position {i} is outside the vocabulary [0, {vocab})")
    if prompt.size >= context:
        raise InputError(
            f"the prompt has {prompt.size} tokens but the context holds {context}; "
            "shorten it so at least one token can be generated"
        )
    bad_stop = [t for t in params.stop_token_ids if t >= vocab]
    if bad_stop:
        raise InputError(f"stop token id {bad_stop[0]} is outside the vocabulary [0, {vocab})")
    if params.stop and tokenizer is None:
        raise InputError("stop strings need a tokenizer to read the generated text; use stop token ids instead")
    return prompt.astype(np.int32)


def _run(
    executor: ModelExecutor,
    prompt: np.ndarray,
    params: SamplingParams,
    tokenizer: Tokenizer | None,
    stop_ids: frozenset[int],
    capture_logits: bool,
) -> Iterator[StreamEvent]:
    sampler = Sampler(params, prompt)
    detok = IncrementalDetokenizer(tokenizer, skip_special_tokens=True) if tokenizer is not None else None
    matcher = StopStringMatcher(params.stop) if params.stop else None
    # The last token to generate: max_tokens, or the one that makes prompt + output fill the context.
    budget = min(params.max_tokens, executor.max_context - prompt.size)
    sample, forward, now = sampler.sample, executor.forward, time.perf_counter
    generated: list[int] = []

    executor.reset()
    start = now()
    logits = forward(prompt, last_only=True)[0]
    token = sample(logits, generated)
    prefill_seconds = now() - start
    decode_seconds = 0.0
    while True:
        generated.append(token)
        text, finish, stopped_by_text = "", None, False
        if token in stop_ids:
            finish = "stop"
        elif detok is not None:
            text = detok.push(token)
            if matcher is not None:
                text, stopped_by_text = matcher.push(text)
                finish = "stop" if stopped_by_text else None
        if finish is None and len(generated) == budget:
            finish = "length"
        row = np.array(logits, dtype=np.float32) if capture_logits else None
        if finish is not None:
            if detok is not None and not stopped_by_text:
                text += _final_text(detok, matcher)
            stats = _stats(executor, prompt.size, len(generated), prefill_seconds, decode_seconds)
            yield StreamEvent(token, text, finish, stats, row)
            return
        yield StreamEvent(token, text, logits=row)
        start = now()
        logits = forward(np.array([token], dtype=np.int32))[0]
        token = sample(logits, generated)
        decode_seconds += now() - start


def _stats(executor: ModelExecutor, prompt: int, generated: int, prefill: float, decode: float) -> GenerationStats:
    steps = generated - 1
    return GenerationStats(
        prompt_tokens=prompt,
        generated_tokens=generated,
        prefill_seconds=prefill,
        decode_seconds=decode,
        prefill_tokens_per_s=prompt / prefill if prefill > 0 else 0.0,
        decode_tokens_per_s=steps / decode if steps > 0 and decode > 0 else 0.0,
        kv_cache_bytes_per_token=executor.kv_cache_bytes_per_token,
    )


def _final_text(detok: IncrementalDetokenizer, matcher: StopStringMatcher | None) -> str:
    """The text still held back when generation ends for a reason other than a stop string: unfinished
    characters (shown as U+FFFD) and text that looked like the start of a stop string."""
    tail = detok.flush()
    if matcher is None:
        return tail
    text, stopped = matcher.push(tail)
    return text if stopped else text + matcher.flush()
