"""The one interface between the generate loop and whatever runs the model (interpreter or native code)."""
from __future__ import annotations

from typing import Collection, Protocol

import numpy as np

from dzc.errors import InputError


class ModelExecutor(Protocol):
    """Runs the model's forward pass over a KV cache it owns.

    `forward` appends `token_ids` at positions `position .. position+len-1` and returns float32 logits of shape
    [len(token_ids), vocab_size]; row i is the distribution for the token after `token_ids[i]`. With `last_only`
    it returns the last row alone ([1, vocab_size]), all that generation needs, and may skip computing the rest.
    """

    vocab_size: int
    max_context: int
    kv_cache_bytes_per_token: int

    @property
    def position(self) -> int: ...

    def forward(self, token_ids: np.ndarray, last_only: bool = False) -> np.ndarray: ...

    def reset(self) -> None: ...


class CompiledExecutor:
    """The forward loop every compiled back end shares: check the ids, then run `decode` for a single token and
    `prefill` in chunks of at most `prefill_chunk` tokens (the size its buffers were planned for); for `last_only`,
    `prefill_last` where the artifact has it (its lm_head runs on each chunk's last row only).

    Subclasses set `vocab_size`, `max_context`, `programs` and `prefill_chunk`, and implement `_run(program, ids)`
    (one native call or one queue of launches, advancing `_length`) and `_logits(t)` ([t, vocab] float32).
    """

    vocab_size: int
    max_context: int
    programs: Collection[str]  # names of the compiled programs ("prefill", "decode")
    prefill_chunk: int
    _length: int = 0

    @property
    def position(self) -> int:
        return self._length

    def reset(self) -> None:
        self._length = 0

    def forward(self, token_ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        ids = np.asarray(token_ids).reshape(-1)
        n = len(ids)
        if n == 0:
            return np.zeros((0, self.vocab_size), np.float32)
        if self._length + n > self.max_context:
            raise InputError(f"{self._length + n} tokens exceed the context of {self.max_context}; "
                             f"use a larger --max-context")
        if ids.min() < 0 or ids.max() >= self.vocab_size:
            bad = int(ids[(ids < 0) | (ids >= self.vocab_size)][0])
            raise InputError(f"token id {bad} is outside the vocabulary (0..{self.vocab_size - 1})")
        ids = ids.astype(np.int32)
        out = np.empty((1 if last_only else n, self.vocab_size), np.float32)
        prefill = "prefill_last" if last_only and "prefill_last" in self.programs else "prefill"
        done = 0
        while done < n:
            if n - done == 1 and "decode" in self.programs:
                prog, t = "decode", 1
            else:
                prog, t = prefill, min(self.prefill_chunk, n - done)
            self._run(prog, ids[done:done + t])
            if not last_only:
                out[done:done + t] = self._logits(t)
            elif done + t == n:
                out[0] = self._logits(t if prog == "prefill" else 1)[-1]
            done += t
        return out

    def _run(self, prog: str, ids: np.ndarray) -> None:
        raise NotImplementedError

    def _logits(self, t: int) -> np.ndarray:
        raise NotImplementedError
