"""Element types of IR values and weight storage."""
from __future__ import annotations

from enum import Enum

import numpy as np


class DType(Enum):
    """An element type. Activations are f32/i32/bool; the rest occur only as weight storage."""

    F32 = "f32"
    F16 = "f16"
    BF16 = "bf16"
    FP8E4M3 = "fp8e4m3"
    I8 = "i8"
    I4 = "i4"
    I32 = "i32"
    BOOL = "bool"

    def __str__(self) -> str:
        return self.value

    @property
    def is_float(self) -> bool:
        return self in (DType.F32, DType.F16, DType.BF16, DType.FP8E4M3)

    @property
    def bits(self) -> int:
        return _BITS[self]

    @property
    def numpy(self) -> np.dtype:
        """The numpy dtype the interpreter computes this type in (storage types compute as f32)."""
        return np.dtype(_NUMPY.get(self, np.float32))


_BITS = {DType.F32: 32, DType.F16: 16, DType.BF16: 16, DType.FP8E4M3: 8, DType.I8: 8, DType.I4: 4,
         DType.I32: 32, DType.BOOL: 8}
_NUMPY = {DType.I32: np.int32, DType.BOOL: np.bool_}
