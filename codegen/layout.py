"""Compiled weight layouts: what bytes the CPU kernels read for each storage format, and how to produce them.

A weight [.., N, K] (leading dims flatten into rows; 1-D weights are one row) is stored as parts:

  f32   data f32[N, K]
  bf16  data u16[N, K]                      (top half of an f32; kernels widen by zext + shl 16)
  f16   data f16[N, K]
  fp8   data u8[N, K] e4m3 codes            scale f32[ceil(N/br), ceil(K/bc)] = block scale * 256
        (kernels sign-extend a code to 16 bits, shift left 7 and clear bit 14: the f16 with the same exponent
        and mantissa bits, exactly value/256; the 256 is folded into the scale; then widen to f32)
  i8    data i8[N, K]                       scale f32|f16[N, ceil(K/g)]          W = q * s
  i4    data u8[N, ceil(K/g) * g/2]         scale f32|f16[N, ceil(K/g)]          W = (nibble - 8) * s
        (in each g=32 group, byte j holds element j in its low nibble and element j+16 in its high one)

MoE experts are stacked: one tensor per projection and part with a leading expert axis [E, N, K].

`pack_weight` reads the weight store: a quantize pass's encoded parts when present (codes and scales are taken
exactly, whatever that codec's own byte layout: codes are recovered from the exact f32 values and the scales),
otherwise the f32 values, quantized here when the format asks for it.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from dzc.checkpoint.dtypes import E4M3_TO_F32, f32_to_bf16, f32_to_e4m3, quantize_fp8_blocks, scale_shape
from dzc.codegen.kir import DT, F16, F32, I8, U8, U16
from dzc.errors import CompileError
from dzc.ir.dtypes import DType
from dzc.ir.node import WeightFormat, WeightRef


@dataclass(frozen=True)
class Packed:
    """The compiled layout of one weight: `kind` plus its scale block (rows `rblock`, K-group `group`)."""

    kind: str                  # f32 | bf16 | f16 | fp8 | i8 | i4
    group: int = 0             # K elements per scale (0: no scales)
    rblock: int = 1            # rows per scale
    scale: str = ""            # f32 | f16

    @property
    def data_dt(self) -> DT:
        return {"f32": F32, "bf16": U16, "f16": F16, "fp8": I8, "i8": I8, "i4": U8}[self.kind]

    @property
    def scale_dt(self) -> Optional[DT]:
        return {"f32": F32, "f16": F16}.get(self.scale)

    @property
    def parts(self) -> tuple[str, ...]:
        return ("data", "scale") if self.group else ("data",)

    @property
    def bytes_per_weight(self) -> float:
        base = {"f32": 4, "bf16": 2, "f16": 2, "fp8": 1, "i8": 1, "i4": 0.5}[self.kind]
        if self.group:
            base += {"f32": 4, "f16": 2}[self.scale] / (self.group * self.rblock)
        return base

    def row_elems(self, K: int) -> int:
        """Elements of `data` per weight row."""
        return -(-K // self.group) * self.group // 2 if self.kind == "i4" else K

    def scale_cols(self, K: int) -> int:
        return -(-K // self.group) if self.group else 0

    def scale_rows(self, N: int) -> int:
        return -(-N // self.rblock) if self.group else 0

    def to_json(self) -> dict:
        return {"kind": self.kind, "group": self.group, "rblock": self.rblock, "scale": self.scale}

    def __str__(self) -> str:
        return self.kind + (f"/{self.rblock}x{self.group}:{self.scale}" if self.group else "")


def rows_cols(shape: tuple) -> tuple[int, int]:
    if len(shape) == 1:
        return 1, int(shape[0])
    rows = 1
    for d in shape[:-1]:
        rows *= int(d)
    return rows, int(shape[-1])


def _int_scales_dtype(parts: Optional[Mapping[str, np.ndarray]]) -> str:
    if parts:
        for a in parts.values():
            if a.dtype == np.float16:
                return "f16"
        return "f32"
    return "f16"


def packed_format(fmt: WeightFormat, parts: Optional[Mapping[str, np.ndarray]] = None,
                  shape: Optional[tuple] = None) -> Packed:
    """The compiled layout for a weight of format `fmt`. Block-FP8 matrices stacked in a batch whose row count is
    not a multiple of the block rows cannot share one flattened scale grid: they are stored as exact f32."""
    d = fmt.dtype
    if d == DType.FP8E4M3 and shape is not None and len(shape) > 2:
        rb = (fmt.block or (128, 128))[0]
        if int(shape[-2]) % rb:
            return Packed("f32")
    if d == DType.F32:
        return Packed("f32")
    if d == DType.BF16:
        return Packed("bf16")
    if d == DType.F16:
        return Packed("f16")
    if d == DType.FP8E4M3:
        rb, cb = fmt.block or (128, 128)
        return Packed("fp8", group=cb, rblock=rb, scale="f32")
    if d in (DType.I8, DType.I4):
        rb, g = fmt.block or (1, 32)
        if rb != 1:
            raise CompileError(f"{d} weights need per-row K-group scales (block (1, g)), got block {fmt.block}")
        if d == DType.I4 and g % 32:
            raise CompileError(f"int4 weights need a K-group that is a multiple of 32, got {g}")
        return Packed("i8" if d == DType.I8 else "i4", group=g, rblock=1, scale=_int_scales_dtype(parts))
    raise CompileError(f"the CPU backend has no kernels for weight storage {fmt}")


def _expand(scale: np.ndarray, rows: int, cols: int, rb: int, cb: int) -> np.ndarray:
    return np.repeat(np.repeat(scale, rb, axis=0)[:rows], cb, axis=1)[:, :cols]


def _find_scales(parts: Mapping[str, np.ndarray], want: tuple[int, int], kind: str = "") -> Optional[np.ndarray]:
    blocks = parts.get("blocks")
    if blocks is not None and kind in ("i8", "i4"):
        # ir/quant.py's k32-blocked layout: per 32-group one block = f32 scale, then the group's values
        B = 36 if kind == "i8" else 20
        raw = np.ascontiguousarray(blocks).reshape(want[0], want[1], B)[:, :, :4]
        return np.ascontiguousarray(raw).view(np.float32).reshape(want).copy()
    for a in parts.values():
        if a.dtype.kind == "f" and a.size == want[0] * want[1]:
            return np.asarray(a, dtype=np.float32).reshape(want)
    return None


def pack_weight(store, ref: WeightRef, shape: tuple) -> tuple[Packed, dict[str, np.ndarray]]:
    """The weight's parts in its compiled layout (see module doc)."""
    enc = store.encoded(ref.name) if hasattr(store, "encoded") else None
    parts = enc[1] if enc else None
    fmt = enc[0] if enc else ref.fmt
    pk = packed_format(fmt, parts, shape)
    N, K = rows_cols(shape)
    if pk.kind in ("bf16", "f16") and parts:
        for a in parts.values():
            if a.dtype in (np.uint16, np.float16) and a.size == N * K:
                dt = np.uint16 if pk.kind == "bf16" else np.float16
                return pk, {"data": np.ascontiguousarray(a).view(dt).reshape(N, K)}
    w = np.ascontiguousarray(f32_uncached(store, ref.name, enc), dtype=np.float32).reshape(N, K)
    return pk, pack_array(pk, w, parts)


def f32_uncached(store, name: str, enc=None) -> np.ndarray:
    """The weight's exact f32 value without filling WeightStore's cache (which would end up holding every weight
    of the model in f32 while the artifact is packed). Falls back to `store.f32` for other store types."""
    cache = getattr(store, "_f32", None)
    if cache is not None and name in cache:
        return cache[name]
    encoded = getattr(store, "_encoded", None)
    if encoded is not None and name in encoded:
        fmt, parts, codec = encoded[name]
        return codec.decode(parts, fmt)
    loader = getattr(store, "_loader", None)
    if loader is not None:
        return loader(name)
    return store.f32(name)


def pack_array(pk: Packed, w: np.ndarray, parts: Optional[Mapping[str, np.ndarray]] = None) -> dict[str, np.ndarray]:
    """Encode an f32 [N, K] matrix in layout `pk`. With a codec's `parts`, its scales are reused exactly."""
    N, K = w.shape
    if pk.kind == "f32":
        return {"data": w}
    if pk.kind == "bf16":
        return {"data": f32_to_bf16(w)}
    if pk.kind == "f16":
        return {"data": w.astype(np.float16)}
    gs = (pk.scale_rows(N), pk.scale_cols(K))
    scales = _find_scales(parts, gs, pk.kind) if parts else None
    if pk.kind == "fp8":
        codes = None
        if parts and scales is not None:
            for a in parts.values():
                if a.dtype == np.uint8 and a.size == N * K:
                    codes = np.ascontiguousarray(a).reshape(N, K)
            if codes is None:
                codes = f32_to_e4m3(w / _expand(scales, N, K, pk.rblock, pk.group))
        else:
            codes, scales = quantize_fp8_blocks(w, (pk.rblock, pk.group))
        return {"data": codes, "scale": (scales.astype(np.float32) * np.float32(256.0))}
    qmax = 127 if pk.kind == "i8" else 7
    if scales is None:
        pad = np.zeros((N, gs[1] * pk.group), np.float32)
        pad[:, :K] = np.abs(w)
        amax = pad.reshape(N, gs[1], pk.group).max(axis=2)
        scales = np.where(amax > 0, amax / qmax, 1.0).astype(np.float32)
        if pk.scale == "f16":
            scales = scales.astype(np.float16).astype(np.float32)
            scales[scales == 0] = 1.0
    full = _expand(scales, N, K, 1, pk.group)
    q = np.clip(np.rint(w / full), -qmax - (1 if pk.kind == "i4" else 0), qmax).astype(np.int8)
    sc = scales.astype(np.float16 if pk.scale == "f16" else np.float32)
    if pk.kind == "i8":
        return {"data": q, "scale": sc}
    g = pk.group
    padded = np.zeros((N, gs[1] * g), np.int8)
    padded[:, :K] = q
    nib = (padded + 8).astype(np.uint8).reshape(N, gs[1], g // 32, 2, 16)   # [.., half, j]
    packed = (nib[..., 0, :] | (nib[..., 1, :] << 4)).reshape(N, gs[1] * g // 2)
    return {"data": packed, "scale": sc}


def unpack_array(pk: Packed, parts: Mapping[str, np.ndarray], N: int, K: int) -> np.ndarray:
    """The exact f32 values the kernels compute with (tests and the reference path)."""
    d = parts["data"]
    if pk.kind == "f32":
        return np.asarray(d, np.float32).reshape(N, K)
    if pk.kind == "bf16":
        return (d.astype(np.uint32) << 16).view(np.float32).reshape(N, K)
    if pk.kind == "f16":
        return d.astype(np.float32).reshape(N, K)
    s = np.asarray(parts["scale"], np.float32)
    if pk.kind == "fp8":
        return (E4M3_TO_F32[d.reshape(N, K)] / np.float32(256)) * _expand(s, N, K, pk.rblock, pk.group)
    if pk.kind == "i8":
        return d.reshape(N, K).astype(np.float32) * _expand(s, N, K, 1, pk.group)
    g = pk.group
    b = d.reshape(N, -1, g // 32, 16)
    lo, hi = (b & 15).astype(np.int8) - 8, (b >> 4).astype(np.int8) - 8
    q = np.stack([lo, hi], axis=3).reshape(N, -1)[:, :K]
    return q.astype(np.float32) * _expand(s, N, K, 1, g)


def fp8_scale_shape(N: int, K: int, block=(128, 128)) -> tuple[int, int]:
    return scale_shape((N, K), block)
