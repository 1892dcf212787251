"""The one interface between the generate loop and whatever runs the model (interpreter or native code)."""
from __future__ import annotations

from typing import Protocol

import numpy as np


class ModelExecutor(Protocol):
    """Runs the model's forward pass over a KV cache it owns.

    `forward` appends `token_ids` at positions `position .. position+len-1` and returns float32 logits of shape
    [len(token_ids), vocab_size]; row i is the distribution for the token after `token_ids[i]`.
    """

    vocab_size: int
    max_context: int
    kv_cache_bytes_per_token: int

    @property
    def position(self) -> int: ...

    def forward(self, token_ids: np.ndarray) -> np.ndarray: ...

    def reset(self) -> None: ...
