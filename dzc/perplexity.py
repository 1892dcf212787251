"""Perplexity over a text file, scored the way llama.cpp's llama-perplexity scores it.

The token stream is cut into non-overlapping chunks of `context` tokens; each chunk runs from an empty KV cache
and only the tokens in its second half are scored (each then has at least context/2 tokens of history), so
numbers are comparable across tools that use the same protocol. The running estimate after each chunk and the
final value with its standard error are reported.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Optional, Sequence

import numpy as np

from dzc.errors import InputError
from dzc.runtime.executor import ModelExecutor


@dataclass(frozen=True)
class PerplexityResult:
    perplexity: float
    stderr: float          # standard error of the perplexity (delta method on the mean NLL)
    scored_tokens: int
    chunks: int
    running: tuple[float, ...]  # estimate after each chunk


def token_nll(logits: np.ndarray, targets: np.ndarray) -> np.ndarray:
    """Negative log-likelihood of each target under its row of logits, in float64."""
    x = logits.astype(np.float64)
    m = x.max(axis=-1, keepdims=True)
    log_z = m[:, 0] + np.log(np.exp(x - m).sum(axis=-1))
    return log_z - x[np.arange(len(targets)), targets]


def perplexity(executor: ModelExecutor, ids: Sequence[int], context: int,
               on_chunk: Optional[Callable[[int, float], None]] = None) -> PerplexityResult:
    if context < 4:
        raise InputError(f"--context must be at least 4 tokens, got {context}")
    if context > executor.max_context:
        raise InputError(f"--context {context} is larger than the model's context of {executor.max_context}")
    tokens = np.asarray(ids, dtype=np.int32)
    n_chunks = len(tokens) // context
    if n_chunks == 0:
        raise InputError(f"the text has {len(tokens)} tokens, fewer than one chunk of --context {context}")
    first = context // 2
    nll: list[np.ndarray] = []
    running: list[float] = []
    for c in range(n_chunks):
        chunk = tokens[c * context:(c + 1) * context]
        executor.reset()
        logits = executor.forward(chunk)
        # row i predicts token i+1: score predictions of tokens first+1 .. context-1
        nll.append(token_nll(logits[first:-1], chunk[first + 1:]))
        running.append(math.exp(float(np.concatenate(nll).mean())))
        if on_chunk is not None:
            on_chunk(c + 1, running[-1])
    all_nll = np.concatenate(nll)
    mean = float(all_nll.mean())
    sem = float(all_nll.std(ddof=1) / math.sqrt(len(all_nll))) if len(all_nll) > 1 else 0.0
    ppl = math.exp(mean)
    return PerplexityResult(ppl, ppl * sem, len(all_nll), n_chunks, tuple(running))
