"""`--target interp`: run the traced programs with the numpy interpreter over a preallocated KV cache."""
from __future__ import annotations

from typing import Mapping

import numpy as np

from dzc.errors import InputError
from dzc.ir.interpreter import Interpreter
from dzc.ir.program import Program
from dzc.ir.weights import WeightStore


class KVCache:
    """Per-layer latent and k_pe rows for `capacity` tokens, allocated once; programs see views [0, P)."""

    def __init__(self, shapes: Mapping[str, int], capacity: int) -> None:
        self.capacity = capacity
        self.buffers = {name: np.zeros((capacity, width), np.float32) for name, width in shapes.items()}
        self.length = 0

    @property
    def bytes_per_token(self) -> int:
        return sum(b.shape[1] * b.itemsize for b in self.buffers.values())

    def views(self) -> dict[str, np.ndarray]:
        return {name: buf[: self.length] for name, buf in self.buffers.items()}

    def append(self, rows: Mapping[str, np.ndarray], n: int) -> None:
        for name, buf in self.buffers.items():
            buf[self.length: self.length + n] = rows[name]
        self.length += n


def cache_shapes(program: Program) -> dict[str, int]:
    """Cache inputs are the program inputs named cache.*; their last dim is the row width."""
    return {node.arg: int(node.shape[-1]) for node in program.inputs if node.arg.startswith("cache.")}


class InterpreterExecutor:
    def __init__(self, prefill: Program, decode: Program, weights: WeightStore, vocab_size: int,
                 max_context: int) -> None:
        self.programs = {"prefill": prefill, "decode": decode}
        self.interpreter = Interpreter(weights)
        self.vocab_size = vocab_size
        self.max_context = max_context
        self.cache = KVCache(cache_shapes(decode), max_context)
        self.kv_cache_bytes_per_token = self.cache.bytes_per_token

    @property
    def position(self) -> int:
        return self.cache.length

    def reset(self) -> None:
        self.cache.length = 0

    def forward(self, token_ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        ids = np.asarray(token_ids, dtype=np.int32).reshape(-1)
        n, start = len(ids), self.cache.length
        if start + n > self.max_context:
            raise InputError(f"{start + n} tokens exceed the context of {self.max_context}; use a larger --max-context")
        program = self.programs["decode" if n == 1 else "prefill"]
        inputs = {"tokens": ids, "positions": np.arange(start, start + n, dtype=np.int32), **self.cache.views()}
        out = self.interpreter.run(program, inputs)
        self.cache.append(out, n)
        return out["logits"][-1:] if last_only else out["logits"]
