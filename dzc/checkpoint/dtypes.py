"""Exact numpy conversions between checkpoint storage formats and float32.

numpy has no bfloat16 or float8 type, so checkpoints keep them as raw bits (bf16 as uint16, fp8 as uint8)
and these functions decode/encode the bits. "Exact" means: decoding is lossless (every bf16/fp16/e4m3 value
is a float32), encoding rounds to nearest, ties to even, like hardware and torch, and block dequantization
is one float32 multiply per element (fp8 value * block scale), the same product DeepSeek's kernels form.

float8_e4m3fn: 1 sign, 4 exponent (bias 7), 3 mantissa bits; no infinities; 0x7f/0xff are NaN; the largest
finite value is 448 (0x7e). Subnormals are m/8 * 2^-6.
"""
from __future__ import annotations

import math

import numpy as np

from dzc.errors import CheckpointError

E4M3_MAX = 448.0


# ---- bfloat16 ------------------------------------------------------------------------------------------------------
def bf16_to_f32(bits: np.ndarray) -> np.ndarray:
    """bf16 stored as uint16 -> float32 (lossless: bf16 is the top half of a float32)."""
    bits = np.asarray(bits)
    if bits.dtype != np.uint16:
        raise TypeError(f"bf16 data must be stored as uint16, got {bits.dtype}")
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


def f32_to_bf16(x: np.ndarray) -> np.ndarray:
    """float32 -> bf16 bits (uint16), round to nearest even; NaN stays a (quiet) NaN, overflow becomes inf."""
    x = np.ascontiguousarray(x, dtype=np.float32)
    bits = x.view(np.uint32)
    rounded = bits + (np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1)))
    out = (rounded >> np.uint32(16)).astype(np.uint16)
    nan = np.isnan(x)
    if nan.any():
        out[nan] = ((bits[nan] >> np.uint32(16)) | np.uint32(0x0040)).astype(np.uint16)  # keep sign, force quiet
    return out


# ---- float16 (numpy has it natively; wrappers keep the storage-format vocabulary uniform) --------------------------
def f16_to_f32(x: np.ndarray) -> np.ndarray:
    """float16 (or its uint16 bits) -> float32, lossless."""
    x = np.asarray(x)
    if x.dtype == np.uint16:
        x = x.view(np.float16)
    return x.astype(np.float32)


def f32_to_f16(x: np.ndarray) -> np.ndarray:
    """float32 -> float16, round to nearest even (numpy's cast); overflow gives inf, as intended."""
    with np.errstate(over="ignore"):
        return np.asarray(x, dtype=np.float32).astype(np.float16)


# ---- float8_e4m3fn -------------------------------------------------------------------------------------------------
def _e4m3_table() -> np.ndarray:
    table = np.empty(256, dtype=np.float32)
    for code in range(256):
        sign = -1.0 if code & 0x80 else 1.0
        exp, man = (code >> 3) & 0xF, code & 0x7
        if exp == 0xF and man == 0x7:
            table[code] = np.nan
        elif exp == 0:
            table[code] = sign * math.ldexp(man / 8.0, -6)
        else:
            table[code] = sign * math.ldexp(1.0 + man / 8.0, exp - 7)
    return table


E4M3_TO_F32: np.ndarray = _e4m3_table()
E4M3_TO_F32.setflags(write=False)
# Codes 0..126 are the non-negative finite values in increasing order; encoding searches them.
_E4M3_POSITIVE = E4M3_TO_F32[:127].astype(np.float64)


def e4m3_to_f32(codes: np.ndarray) -> np.ndarray:
    """float8_e4m3fn stored as uint8 -> float32 via the 256-entry table (lossless)."""
    codes = np.asarray(codes)
    if codes.dtype != np.uint8:
        raise TypeError(f"float8 data must be stored as uint8, got {codes.dtype}")
    return E4M3_TO_F32[codes]


def f32_to_e4m3(x: np.ndarray) -> np.ndarray:
    """float32 -> float8_e4m3fn codes (uint8): round to nearest even, saturate to +-448 (inf too); NaN -> 0x7f."""
    x = np.asarray(x, dtype=np.float32)
    mag = np.abs(x.astype(np.float64))  # float64 makes the neighbour distances below exact
    mag_c = np.minimum(mag, E4M3_MAX)
    hi = np.searchsorted(_E4M3_POSITIVE, mag_c, side="left")  # first value >= mag
    hi = np.minimum(hi, 126)
    lo = np.maximum(hi - 1, 0)
    d_hi = _E4M3_POSITIVE[hi] - mag_c
    d_lo = mag_c - _E4M3_POSITIVE[lo]
    # Nearest; on a tie the even code (mantissa LSB 0) wins. hi == lo + 1, so exactly one of them is even.
    take_lo = (d_lo < d_hi) | ((d_lo == d_hi) & (lo % 2 == 0))
    code = np.where(take_lo & (hi > 0), lo, hi).astype(np.uint8)
    code |= np.where(np.signbit(x), np.uint8(0x80), np.uint8(0))
    code[np.isnan(x)] = 0x7F
    return code


# ---- block-scaled FP8 (DeepSeek-V3 weights) ------------------------------------------------------------------------
def scale_shape(shape: tuple[int, int], block: tuple[int, int]) -> tuple[int, int]:
    """Shape of the per-block scale grid of a [M, N] weight: [ceil(M/b0), ceil(N/b1)] (edge blocks may be ragged)."""
    return (-(-shape[0] // block[0]), -(-shape[1] // block[1]))


def _expand_scales(scale_inv: np.ndarray, shape: tuple[int, int], block: tuple[int, int]) -> np.ndarray:
    rows = np.repeat(np.asarray(scale_inv, dtype=np.float32), block[0], axis=0)[: shape[0]]
    return np.repeat(rows, block[1], axis=1)[:, : shape[1]]


def dequantize_fp8_blocks(q: np.ndarray, scale_inv: np.ndarray, block: tuple[int, int] = (128, 128)) -> np.ndarray:
    """W[i, j] = e4m3(q[i, j]) * scale_inv[i // b0, j // b1] in float32.

    `scale_inv` is a multiplier despite its name (DeepSeek's naming: the inverse of the quantization scale).
    """
    q = np.asarray(q)
    scale_inv = np.asarray(scale_inv)
    if q.ndim != 2:
        raise CheckpointError(f"FP8 block dequantization needs a 2-D weight, got shape {list(q.shape)}")
    want = scale_shape(q.shape, block)
    if scale_inv.shape != want:
        raise CheckpointError(f"weight_scale_inv has shape {list(scale_inv.shape)}, expected {list(want)} for a "
                              f"{list(q.shape)} weight in {block[0]}x{block[1]} blocks")
    return e4m3_to_f32(q) * _expand_scales(scale_inv, q.shape, block)


def quantize_fp8_blocks(w: np.ndarray, block: tuple[int, int] = (128, 128)) -> tuple[np.ndarray, np.ndarray]:
    """float32 [M, N] -> (e4m3 codes uint8 [M, N], scale_inv float32 grid): scale = block amax / 448.

    All-zero blocks get scale 1 (any value works; 1 keeps the division finite).
    """
    w = np.asarray(w, dtype=np.float32)
    if w.ndim != 2:
        raise ValueError(f"FP8 block quantization needs a 2-D weight, got shape {list(w.shape)}")
    gm, gn = scale_shape(w.shape, block)
    padded = np.zeros((gm * block[0], gn * block[1]), dtype=np.float32)
    padded[: w.shape[0], : w.shape[1]] = np.abs(w)
    amax = padded.reshape(gm, block[0], gn, block[1]).max(axis=(1, 3))
    scale = np.where(amax > 0, amax / np.float32(E4M3_MAX), np.float32(1.0)).astype(np.float32)
    q = f32_to_e4m3(w / _expand_scales(scale, w.shape, block))
    return q, scale
