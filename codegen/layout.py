"""Compiled weight layouts: what bytes the CPU kernels read for each storage format, and how to produce them.

A weight [.., N, K] (leading dims flatten into rows; 1-D weights are one row) is stored as parts:

  f32   data f32[N, K]
  bf16  data u16[N, K]                      (top half of an f32; kernels widen by zext + shl 16)
        paired (`pair` = V, CPU targets, K a multiple of 2V): in each 2V elements of a row, 32-bit word j holds
        element j in its low half and element j + V in its high one, so one load of V words yields both vectors
        with one shift (w << 16) and one mask (w & 0xFFFF0000): no widening shuffle, which competes with the fma
        for the vector ports (bf16 decode 1.2x on Emerald Rapids)
        striped (`stripe` = S rows, paired matrices whose N is whole stripes): data u16[N/S, K/2V, S, 2V], the
        2V-element chunks of a stripe's rows side by side, so a GEMV tile of S rows reads one contiguous range
        (one hardware-prefetch stream, not S): isolated GEMVs over 1 GB of matrices streamed 1.02-1.07x faster
        than over plain paired rows, bf16 model decode 1.03x (Emerald Rapids, 2 threads, paired A/B)
  f16   data f16[N, K]
  fp8   data u8[N, K] e4m3 codes            scale f32[ceil(N/br), ceil(K/bc)] = block scale * 256
        (kernels sign-extend a code to 16 bits, shift left 7 and clear bit 14: the f16 with the same exponent
        and mantissa bits, exactly value/256; the 256 is folded into the scale; then widen to f32)
  i8    data i8[N, K]                       scale f32|f16[N, ceil(K/g)]          W = q * s
  i4    data u8[N, ceil(K/g) * g/2]         scale f32|f16[N, ceil(K/g)]          W = (nibble - 8) * s
        (in each g=32 group, byte j holds element j in its low nibble and element j+16 in its high one)

Row-tiled integer layouts (`tile` = 16, for AVX-512 VNNI targets and weights whose consumers quantize their
input to int8, WeightFormat.act = 8): rows go in tiles of 16 so one 64-byte load feeds one vpdpbusd that advances
16 output rows by 4 (i8) or, after a nibble split, 8 (i4) K elements against a broadcast quad of the int8 input.
K is padded to whole groups, N to whole tiles (padding is zero weight, zero scale):

  i8/t16  data u8[Nt, Kp/4, 16, 4]  = q + 128 (offset-binary: vpdpbusd multiplies unsigned by signed bytes)
  i4/t16  data u8[Nt, Kp/8, 16, 4]  byte j of lane r in octet o: element 8o+j low nibble, 8o+4+j high (v + 8)
          scale f32|f16[Nt, Kp/g, 16]

The kernels subtract offset * sum(input quad values) per 32 elements, which the input quantizer precomputes.

MoE experts are stacked: one tensor per projection and part with a leading expert axis [E, N, K].

`pack_weight` reads the weight store: a quantize pass's encoded parts when present (codes and scales are taken
exactly, whatever that codec's own byte layout: codes are recovered from the exact f32 values and the scales),
otherwise the f32 values, quantized here when the format asks for it.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Mapping, Optional

import numpy as np

from dzc.checkpoint.dtypes import f32_to_bf16, f32_to_e4m3, quantize_fp8_blocks, scale_shape
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
    tile: int = 0              # rows interleaved per tile for integer dot products (0: plain rows)
    pair: int = 0              # bf16: lanes V of the paired layout (0: plain rows)
    stripe: int = 0            # paired bf16: rows whose chunks are stored together (0: row after row)

    @property
    def data_dt(self) -> DT:
        if self.tile:
            return U8
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
        if self.kind == "i4":
            return -(-K // self.group) * self.group // 2
        return -(-K // self.group) * self.group if self.tile else K

    def scale_cols(self, K: int) -> int:
        return -(-K // self.group) if self.group else 0

    def scale_rows(self, N: int) -> int:
        return -(-N // self.rblock) if self.group else 0

    def tiles(self, N: int) -> int:
        return -(-N // self.tile)

    def data_shape(self, N: int, K: int) -> tuple[int, int]:
        """The 2-D shape of one matrix's `data` part (tiled layouts: one row per tile)."""
        if self.tile:
            return self.tiles(N), self.tile * self.row_elems(K)
        return N, self.row_elems(K)

    def scale_shape(self, N: int, K: int) -> tuple[int, int]:
        if self.tile:
            return self.tiles(N), self.tile * self.scale_cols(K)
        return self.scale_rows(N), self.scale_cols(K)

    def to_json(self) -> dict:
        return {"kind": self.kind, "group": self.group, "rblock": self.rblock, "scale": self.scale, "tile": self.tile,
                "pair": self.pair, "stripe": self.stripe}

    def __str__(self) -> str:
        text = self.kind + (f"/{self.rblock}x{self.group}:{self.scale}" if self.group else "")
        return (text + (f"/t{self.tile}" if self.tile else "") + (f"/p{self.pair}" if self.pair else "")
                + (f"/s{self.stripe}" if self.stripe else ""))


VNNI_TILE = 16


def for_target(pk: Packed, target, act: int, shape: tuple) -> Packed:
    """`pk`, row-tiled when the target has int8 dot products and the consumers quantize their input (act=8). A
    batch of matrices ([B, N, K], tiled as one [B*N, K]) only when N is whole tiles: no tile mixes two matrices.
    bf16 matrices are paired on CPU targets where K is whole pairs of vectors, and striped by the rows of a decode
    GEMV tile (gemv_rows) where N is whole stripes."""
    V = target.vector_width
    if pk.kind == "bf16" and target.name == "cpu" and len(shape) >= 2 and int(shape[-1]) % (2 * V) == 0:
        S = gemv_rows(target)
        return dataclasses.replace(pk, pair=V, stripe=S if int(shape[-2]) % S == 0 else 0)
    if len(shape) > 2 and int(shape[-2]) % VNNI_TILE:
        return pk
    if act == 8 and pk.kind in ("i8", "i4") and pk.group % 32 == 0 and getattr(target, "int8_dot", False):
        return dataclasses.replace(pk, tile=VNNI_TILE)
    return pk


def gemv_rows(target) -> int:
    """Weight rows per decode GEMV tile: one accumulator each, 8 where the target has 32 vector registers."""
    return 8 if target.vector_regs >= 32 else 4


def rows_cols(shape: tuple) -> tuple[int, int]:
    if len(shape) == 1:
        return 1, int(shape[0])
    rows = 1
    for d in shape[:-1]:
        rows *= int(d)
    return rows, int(shape[-1])


def _int_scales_dtype(parts: Optional[Mapping[str, np.ndarray]], kind: str) -> str:
    """f16 when every group scale is a float16 value (ir/quant.py rounds them so; any layout), else f32."""
    if not parts:
        return "f16"
    if "scale" in parts:
        s = np.asarray(parts["scale"])
    elif "blocks" in parts:
        B = 36 if kind == "i8" else 20
        s = np.ascontiguousarray(np.asarray(parts["blocks"]).reshape(-1, B)[:, :4]).view("<f4")
    else:
        return "f32"
    return "f16" if s.dtype == np.float16 or np.array_equal(s.astype(np.float16).astype(s.dtype), s) else "f32"


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
        kind = "i8" if d == DType.I8 else "i4"
        return Packed(kind, group=g, rblock=1, scale=_int_scales_dtype(parts, kind))
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


def pack_weight(store, ref: WeightRef, shape: tuple, chosen: Optional[Packed] = None
                ) -> tuple[Packed, dict[str, np.ndarray]]:
    """The weight's parts in its compiled layout (see module doc); tiles and pairs as the lowering chose
    (`chosen`, from for_target)."""
    enc = store.encoded(ref.name) if hasattr(store, "encoded") else None
    parts = enc[1] if enc else None
    fmt = enc[0] if enc else ref.fmt
    pk = packed_format(fmt, parts, shape)
    if chosen is not None:
        pk = dataclasses.replace(pk, tile=chosen.tile, pair=chosen.pair, stripe=chosen.stripe)
    N, K = rows_cols(shape)
    if pk.kind in ("bf16", "f16") and parts:
        for a in parts.values():
            if a.dtype in (np.uint16, np.float16) and a.size == N * K:
                dt = np.uint16 if pk.kind == "bf16" else np.float16
                return pk, {"data": _paired(pk, np.ascontiguousarray(a).view(dt).reshape(N, K))}
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
        return {"data": _paired(pk, f32_to_bf16(w))}
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
    if pk.tile:
        return _tiled(pk, q, sc, K)
    if pk.kind == "i8":
        return {"data": q, "scale": sc}
    g = pk.group
    padded = np.zeros((N, gs[1] * g), np.int8)
    padded[:, :K] = q
    nib = (padded + 8).astype(np.uint8).reshape(N, gs[1], g // 32, 2, 16)   # [.., half, j]
    packed = (nib[..., 0, :] | (nib[..., 1, :] << 4)).reshape(N, gs[1] * g // 2)
    return {"data": packed, "scale": sc}


def _paired(pk: Packed, data: np.ndarray) -> np.ndarray:
    """bf16 codes [N, K] in the paired (and striped) layout (module doc) when `pk.pair`, else as they are."""
    if not pk.pair:
        return data
    N, K, V = data.shape[0], data.shape[1], pk.pair
    S = pk.stripe or 1
    chunks = data.reshape(N // S, S, K // (2 * V), 2, V).transpose(0, 2, 1, 4, 3)    # [stripe, chunk, row, V, 2]
    return np.ascontiguousarray(chunks).reshape(N, K)


def _tiled(pk: Packed, q: np.ndarray, sc: np.ndarray, K: int) -> dict[str, np.ndarray]:
    """int8 values q[N, K] and scales sc[N, G] in the row-tiled layout (module doc)."""
    N, t = q.shape[0], pk.tile
    Nt, Kp = pk.tiles(N), pk.scale_cols(K) * pk.group
    qp = np.zeros((Nt * t, Kp), np.int16)
    qp[:N, :K] = q
    if pk.kind == "i8":
        data = (qp + 128).astype(np.uint8).reshape(Nt, t, Kp // 4, 4).transpose(0, 2, 1, 3)
    else:
        nib = (qp + 8).astype(np.uint8).reshape(Nt, t, Kp // 8, 2, 4)
        data = (nib[..., 0, :] | (nib[..., 1, :] << 4)).transpose(0, 2, 1, 3)
    scp = np.zeros((Nt * t, sc.shape[1]), sc.dtype)
    scp[:N] = sc
    return {"data": np.ascontiguousarray(data).reshape(pk.data_shape(N, K)),
            "scale": np.ascontiguousarray(scp.reshape(Nt, t, -1).transpose(0, 2, 1)).reshape(pk.scale_shape(N, K))}


def fp8_scale_shape(N: int, K: int, block=(128, 128)) -> tuple[int, int]:
    return scale_shape((N, K), block)
