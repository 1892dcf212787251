"""Where weight values live while compiling and interpreting.

A `WeightStore` maps weight names to arrays. Checkpoint weights load lazily through a loader function (the
checkpoint is memory-mapped; nothing is read until a weight is used). Passes that fold weight-only subgraphs
or change a weight's format `define` new entries; the interpreter reads every weight as exact float32 through
`f32`, whatever its storage format, by asking the format's codec.
"""
from __future__ import annotations

from typing import Callable, Mapping, Protocol

import numpy as np

from dzc.ir.node import WeightFormat


class Codec(Protocol):
    """Turns a stored representation (a dict of arrays) into exact float32 values."""

    def decode(self, parts: Mapping[str, np.ndarray], fmt: WeightFormat) -> np.ndarray: ...


class WeightStore:
    def __init__(self, loader: Callable[[str], np.ndarray]) -> None:
        self._loader = loader
        self._f32: dict[str, np.ndarray] = {}
        self._encoded: dict[str, tuple[WeightFormat, dict[str, np.ndarray], Codec]] = {}

    def f32(self, name: str) -> np.ndarray:
        """The weight's exact float32 value (dequantized when stored quantized). Cached."""
        hit = self._f32.get(name)
        if hit is None:
            if name in self._encoded:
                fmt, parts, codec = self._encoded[name]
                hit = codec.decode(parts, fmt)
            else:
                hit = np.ascontiguousarray(self._loader(name), dtype=np.float32)
            self._f32[name] = hit
        return hit

    def define(self, name: str, value: np.ndarray) -> None:
        """Add a float32 weight computed at compile time (e.g. a folded transpose or split)."""
        self._f32[name] = np.ascontiguousarray(value, dtype=np.float32)

    def define_encoded(self, name: str, fmt: WeightFormat, parts: dict[str, np.ndarray], codec: Codec) -> None:
        """Add a weight stored in a quantized format; `f32` decodes it exactly through `codec`."""
        self._encoded[name] = (fmt, parts, codec)
        self._f32.pop(name, None)

    def encoded(self, name: str) -> tuple[WeightFormat, dict[str, np.ndarray]] | None:
        hit = self._encoded.get(name)
        return None if hit is None else (hit[0], hit[1])

    def __contains__(self, name: str) -> bool:
        return name in self._f32 or name in self._encoded
