"""Weight storage formats: one codec per element type, turning float32 values into stored parts and back.

A weight's storage is part of its IR type (`WeightFormat`: dtype + scale block + layout, see ir/node.py). Its
bytes are a dict of named numpy arrays, the *parts*. `encode(value, fmt)` rounds a float32 array into parts;
`decode(parts, fmt)` gives back float32 values *exactly* as a kernel computes them (one float32 multiply of
the stored integer/float by its scale, nothing else), so the interpreter and the code generators agree bit for
bit on what a quantized weight is. `relayout(parts, fmt, layout)` rearranges parts into another layout; it only
moves bytes, so decode(relayout(p)) == decode(p) always.

Conventions for every format
----------------------------
* A weight is an array [..., M, N]. Leading axes (e.g. the head axis of MLA's absorbed [H, a, b] matrices)
  are a batch: every format applies to each trailing [M, N] matrix independently, and batch is the outermost
  (slowest) axis of every part.
* For a LINEAR weight [N, K] (out features N, in features K, y = x @ W^T) the last axis is K, the reduction
  axis: "rowmajor" stores each output row's K values contiguously. Group scales always run along the last
  axis (for LINEAR weights: along K).
* Multi-byte values are little-endian; float32 is IEEE binary32, float16 IEEE binary16.
* Ragged edges are allowed everywhere: the last block/group along an axis may be shorter than the block.
* Some parts carry `shape` (int64 [ndim]): the logical weight shape, stored where the packed data cannot
  tell it (odd K for int4, padded groups in blocked layouts).

Formats (name for --quant / ctx.quant in brackets)
--------------------------------------------------
f32 [f32]              WeightFormat(F32)                 data:  float32 [..., M, N]
bf16 [bf16]            WeightFormat(BF16)                data:  uint16 [..., M, N], the top 16 bits of the
                                                                float32 (round to nearest, ties to even).
f16                    WeightFormat(F16)                 data:  uint16 [..., M, N], IEEE binary16 bits (RNE).
fp8e4m3<128x128>       WeightFormat(FP8E4M3, (b0, b1))   q: uint8 [..., M, N] float8_e4m3fn codes;
                       (DeepSeek-V3's checkpoint format)  scale_inv: float32 [..., ceil(M/b0), ceil(N/b1)];
                                                          W[i, j] = e4m3(q[i, j]) * scale_inv[i//b0, j//b1].
                                                          Encoding: scale = block amax / 448 (1 for an all-zero
                                                          block), codes round to nearest even.
i8<1x32> [int8]        WeightFormat(I8, (1, 32))         q: int8 [..., N, K] in [-127, 127];
                                                          scale: float16 [..., N, ceil(K/32)];
                                                          W[n, k] = float32(q[n, k]) * scale[n, k // 32].
                                                          Symmetric: scale = float16(group amax / 127) (1 for
                                                          a group whose scale rounds to 0); q = rint(W /
                                                          scale) (ties to even, clipped to [-127, 127]).
                                                          |error| <= scale / 2 (the group's largest value up to
                                                          qmax * scale * 2^-11 more: its float16 scale may round down).
i4<1x32> [int4]        WeightFormat(I4, (1, 32))         q: uint8 [..., N, ceil(K/2)]: byte j holds element
                                                          2j in its low nibble and 2j+1 in its high nibble;
                                                          scale: float16 [..., N, ceil(K/32)]; shape.
                                                          Nibbles are offset-binary: nibble = v + 8, so
                                                          v = nibble - 8 in [-8, 7]; W[n, k] = float32(v) *
                                                          scale[n, k // 32]. Symmetric: scale = f16(amax / 7),
                                                          v = rint(W / scale) in [-7, 7] (8 is never written;
                                                          padding nibbles past K are 8, i.e. zero).
                                                          |error| as for i8. Chosen over the
                                                          asymmetric (scale, min) variant: weights are centred on
                                                          zero, and one scale per group keeps the kernel to one
                                                          multiply and the group at 18 bytes.

Activations (WeightFormat.act)
------------------------------
act=8 (what --quant int8/int4 gives LINEAR and expert weights): the consuming op multiplies
quantize_activations(x) instead of x: per 32 consecutive input elements, amax = max|x|, q = rint(x * (127 /
amax)) (ties to even, 0 for an all-zero group), value = q * (amax / 127), all in float32. Integer dot-product
instructions then compute the product exactly (up to float32 summation order); the error is like the weights'.

Layouts (WeightFormat.layout; `select-layout` picks one per target)
-------------------------------------------------------------------
rowmajor       every format above, as listed. The default; the interpreter and GPU targets read it.
k32-blocked    i8<1x32> and i4<1x32> only (CPU kernels): one part `blocks`: uint8 [..., N, G * B] with
               G = ceil(K/32) and `shape`. Row n of matrix b starts at byte (b * N + n) * G * B; inside it,
               group g (elements k = 32g .. 32g+31) is one B-byte block at byte g * B:
                 i8 (B = 36):  bytes 0..3   the group's float32 scale (little-endian)
                               bytes 4..35  the 32 int8 values q[32g + i] at byte 4 + i
                 i4 (B = 20):  bytes 0..3   the group's float32 scale (little-endian)
                               bytes 4..19  byte 4 + i (i = 0..15) = nibble(32g + i) | nibble(32g + 16 + i) << 4
                                            (low nibbles are the group's first 16 values, high nibbles the
                                            last 16, so one 16-byte load + mask/shift yields 32 values in order)
               A ragged last group is padded with zero values (int8 0, nibble 8). B is a multiple of 4, so every
               scale is 4-byte aligned when a row is. One sequential pass over a row streams scale, then its
               32 values, then the next scale: a dot product never seeks.
"""
from __future__ import annotations

from typing import Callable, Mapping, Optional

import numpy as np

from dzc.checkpoint import dtypes as ck
from dzc.errors import IRError
from dzc.ir.dtypes import DType
from dzc.ir.node import WeightFormat

Parts = dict[str, np.ndarray]

F32 = WeightFormat(DType.F32)
BF16 = WeightFormat(DType.BF16)
F16 = WeightFormat(DType.F16)
FP8_BLOCK128 = WeightFormat(DType.FP8E4M3, (128, 128))
INT8_G32 = WeightFormat(DType.I8, (1, 32))
INT4_G32 = WeightFormat(DType.I4, (1, 32))

# --quant names -> the format every quantizable weight is re-encoded into. Integer weights come with int8
# activations (`act=8`): like llama.cpp's Q8_0/Q4 dot products, the input row is rounded per 32 elements so the
# CPU's integer dot-product instructions (AVX-512 VNNI) do the multiply-adds; the interpreter rounds identically.
QUANT_FORMATS: dict[str, WeightFormat] = {
    "f32": F32, "bf16": BF16,
    "int8": WeightFormat(DType.I8, (1, 32), act=8), "int4": WeightFormat(DType.I4, (1, 32), act=8)}

ACT_GROUP = 32      # elements of an input row that share one int8 activation scale
F16_MAX = 65504.0


def quantize_activations(x: np.ndarray) -> np.ndarray:
    """What an `act=8` weight's consumer multiplies: each row of x (last axis) rounded to int8 per ACT_GROUP
    elements and scaled back, in float32 step by step exactly as the kernels do it:
    amax = max|x| over the group; q = rint(x * (127 / amax)) (ties to even; q = 0 when amax = 0);
    value = q * (amax / 127). A ragged last group is its own group."""
    x = np.asarray(x, np.float32)
    K = x.shape[-1]
    G = -(-K // ACT_GROUP)
    pad = np.zeros(x.shape[:-1] + (G * ACT_GROUP,), np.float32)
    pad[..., :K] = x
    groups = pad.reshape(x.shape[:-1] + (G, ACT_GROUP))
    amax = np.abs(groups).max(axis=-1, keepdims=True)
    with np.errstate(divide="ignore"):
        inv = np.where(amax > 0, np.float32(127) / amax, np.float32(0)).astype(np.float32)
    q = np.rint(groups * inv)
    out = q * (amax / np.float32(127))
    return out.reshape(pad.shape)[..., :K].astype(np.float32)

ROWMAJOR = "rowmajor"
K32_BLOCKED = "k32-blocked"
LAYOUTS = (ROWMAJOR, K32_BLOCKED)


def with_layout(fmt: WeightFormat, layout: str) -> WeightFormat:
    return WeightFormat(fmt.dtype, fmt.block, layout, fmt.act)


def for_input(fmt: WeightFormat, x: np.ndarray) -> np.ndarray:
    """The input a LINEAR / expert projection with a weight of format `fmt` multiplies (see WeightFormat.act)."""
    return quantize_activations(x) if fmt.act == 8 else x


def same_encoding(a: WeightFormat, b: WeightFormat) -> bool:
    """Equal stored values: same element type and scale block (the layout only moves bytes; `act` is how
    consumers treat their input, not part of the stored weight)."""
    return a.dtype == b.dtype and a.block == b.block


# ---- the codec base: rowmajor encode/decode per dtype, layouts as byte permutations ------------------------------
class Codec:
    """Encodes float32 into one format's parts and decodes them exactly. Satisfies ir.weights.Codec."""

    dtype: DType
    layouts: tuple[str, ...] = (ROWMAJOR,)

    def check(self, fmt: WeightFormat) -> None:
        if fmt.dtype != self.dtype:
            raise IRError(f"codec for {self.dtype} cannot handle format {fmt}")
        if fmt.layout not in self.layouts:
            raise IRError(f"format {fmt}: layout {fmt.layout!r} is not defined for {self.dtype} "
                          f"(defined: {', '.join(self.layouts)})")

    def encode(self, value: np.ndarray, fmt: WeightFormat) -> Parts:
        self.check(fmt)
        value = np.ascontiguousarray(value, dtype=np.float32)
        if value.ndim < 1:
            raise IRError(f"cannot encode a scalar weight as {fmt}")
        return self.relayout(self._encode(value, fmt), with_layout(fmt, ROWMAJOR), fmt.layout)

    def decode(self, parts: Mapping[str, np.ndarray], fmt: WeightFormat) -> np.ndarray:
        self.check(fmt)
        rowmajor = self.relayout(dict(parts), fmt, ROWMAJOR)
        return np.ascontiguousarray(self._decode(rowmajor, fmt), dtype=np.float32)

    def relayout(self, parts: Parts, fmt: WeightFormat, layout: str) -> Parts:
        """`parts` (in fmt.layout) rearranged into `layout`; decoding them gives identical values."""
        self.check(fmt)
        self.check(with_layout(fmt, layout))
        if fmt.layout == layout:
            return dict(parts)
        rowmajor = parts if fmt.layout == ROWMAJOR else self._from_layout(parts, fmt)
        return rowmajor if layout == ROWMAJOR else self._to_layout(rowmajor, fmt, layout)

    # subclasses implement these on rowmajor parts
    def _encode(self, value: np.ndarray, fmt: WeightFormat) -> Parts:
        raise NotImplementedError

    def _decode(self, parts: Mapping[str, np.ndarray], fmt: WeightFormat) -> np.ndarray:
        raise NotImplementedError

    def _to_layout(self, parts: Parts, fmt: WeightFormat, layout: str) -> Parts:
        raise NotImplementedError

    def _from_layout(self, parts: Parts, fmt: WeightFormat) -> Parts:
        raise NotImplementedError


class _PlainCodec(Codec):
    """Unscaled floats: f32, bf16, f16 (block must be None)."""

    def __init__(self, dtype: DType, to_bits: Callable[[np.ndarray], np.ndarray],
                 from_bits: Callable[[np.ndarray], np.ndarray]) -> None:
        self.dtype, self._to_bits, self._from_bits = dtype, to_bits, from_bits

    def check(self, fmt: WeightFormat) -> None:
        super().check(fmt)
        if fmt.block is not None:
            raise IRError(f"format {fmt}: {self.dtype} takes no scale block")

    def _encode(self, value, fmt):
        return {"data": self._to_bits(value)}

    def _decode(self, parts, fmt):
        return self._from_bits(parts["data"])


def _f16_bits(x: np.ndarray) -> np.ndarray:
    return ck.f32_to_f16(x).view(np.uint16)


class _Fp8BlockCodec(Codec):
    """float8_e4m3fn codes with one float32 multiplier per (b0 x b1) block of the trailing matrix."""

    dtype = DType.FP8E4M3

    def check(self, fmt: WeightFormat) -> None:
        super().check(fmt)
        if fmt.block is None or len(fmt.block) != 2 or min(fmt.block) < 1:
            raise IRError(f"format {fmt}: FP8 needs a (rows, cols) scale block")

    def _encode(self, value, fmt):
        if value.ndim < 2:
            raise IRError(f"format {fmt} needs a weight of rank >= 2, got shape {list(value.shape)}")
        mats = value.reshape((-1,) + value.shape[-2:])
        pairs = [ck.quantize_fp8_blocks(m, fmt.block) for m in mats]
        lead = value.shape[:-2]
        q = np.stack([p[0] for p in pairs]).reshape(value.shape)
        s = np.stack([p[1] for p in pairs])
        return {"q": q, "scale_inv": s.reshape(lead + s.shape[1:])}

    def _decode(self, parts, fmt):
        q, s = np.asarray(parts["q"]), np.asarray(parts["scale_inv"], dtype=np.float32)
        mats = q.reshape((-1,) + q.shape[-2:])
        scales = s.reshape((-1,) + s.shape[-2:])
        if len(mats) != len(scales):
            raise IRError(f"format {fmt}: q {list(q.shape)} and scale_inv {list(s.shape)} disagree on the batch")
        out = np.stack([ck.dequantize_fp8_blocks(m, sc, fmt.block) for m, sc in zip(mats, scales)])
        return out.reshape(q.shape)


class _GroupCodec(Codec):
    """Symmetric integers with one float32 scale per group of g consecutive values along the last axis."""

    layouts = (ROWMAJOR, K32_BLOCKED)

    def __init__(self, dtype: DType, qmax: int, block_bytes: int) -> None:
        self.dtype, self.qmax, self.block_bytes = dtype, qmax, block_bytes

    def check(self, fmt: WeightFormat) -> None:
        super().check(fmt)
        if fmt.block is None or fmt.block[0] != 1 or fmt.block[1] < 1:
            raise IRError(f"format {fmt}: {self.dtype} needs a (1, group) scale block")
        if fmt.layout == K32_BLOCKED and fmt.block[1] != 32:
            raise IRError(f"format {fmt}: layout {K32_BLOCKED} needs groups of 32")

    # integers <-> storage of the rowmajor 'q' part
    def _pack(self, v: np.ndarray) -> np.ndarray:
        return v.astype(np.int8)

    def _unpack(self, parts: Mapping[str, np.ndarray]) -> np.ndarray:
        return np.asarray(parts["q"]).astype(np.int8)

    def _encode(self, value, fmt):
        g, k = fmt.block[1], value.shape[-1]
        groups = -(-k // g)
        padded = np.zeros(value.shape[:-1] + (groups * g,), np.float32)
        padded[..., :k] = value
        grouped = padded.reshape(value.shape[:-1] + (groups, g))
        amax = np.abs(grouped).max(axis=-1)
        # float16 scales, like llama.cpp's Q8_0/Q4_0: 2 bytes per 32 weights; values are rounded against the
        # stored (rounded) scale, so the error bound below holds for it
        scale = np.minimum(amax / np.float32(self.qmax), np.float32(F16_MAX)).astype(np.float16)
        scale = np.where(scale > 0, scale, np.float16(1.0))
        v = np.clip(np.rint(grouped / scale.astype(np.float32)[..., None]), -self.qmax - 1, self.qmax).astype(np.int8)
        v = v.reshape(padded.shape)[..., :k]
        return {**self._store(v), "scale": scale}

    def _store(self, v: np.ndarray) -> Parts:
        return {"q": v}

    def _decode(self, parts, fmt):
        g = fmt.block[1]
        v = self._unpack(parts)
        scale = np.asarray(parts["scale"], dtype=np.float32)
        full = np.repeat(scale, g, axis=-1)[..., : v.shape[-1]]
        return v.astype(np.float32) * full

    # k32-blocked: [scale f32 LE][32 values] per group, groups of a row in order, rows in order
    def _group_bytes(self, v32: np.ndarray) -> np.ndarray:
        """[..., G, 32] int8 values -> [..., G, B-4] payload bytes."""
        return v32.view(np.uint8)

    def _group_values(self, payload: np.ndarray) -> np.ndarray:
        return payload.view(np.int8)

    def _to_layout(self, parts, fmt, layout):
        v, scale = self._unpack(parts), np.asarray(parts["scale"], dtype=np.float32)
        k = v.shape[-1]
        groups = scale.shape[-1]
        v32 = np.zeros(v.shape[:-1] + (groups * 32,), np.int8)
        v32[..., :k] = v
        v32 = v32.reshape(v.shape[:-1] + (groups, 32))
        payload = self._group_bytes(v32)
        scale_bytes = np.ascontiguousarray(scale.astype("<f4")).view(np.uint8).reshape(scale.shape + (4,))
        blocks = np.concatenate([scale_bytes, payload], axis=-1)
        assert blocks.shape[-1] == self.block_bytes
        return {"blocks": blocks.reshape(v.shape[:-1] + (groups * self.block_bytes,)),
                "shape": np.asarray(v.shape, np.int64)}

    def _from_layout(self, parts, fmt):
        shape = tuple(int(d) for d in parts["shape"])
        k = shape[-1]
        blocks = np.ascontiguousarray(parts["blocks"], dtype=np.uint8)
        groups = blocks.shape[-1] // self.block_bytes
        blocks = blocks.reshape(shape[:-1] + (groups, self.block_bytes))
        scale = np.ascontiguousarray(blocks[..., :4]).view("<f4").reshape(shape[:-1] + (groups,)).astype(np.float32)
        v = self._group_values(np.ascontiguousarray(blocks[..., 4:])).reshape(shape[:-1] + (groups * 32,))[..., :k]
        return {**self._store(v), "scale": scale}


class _Int4Codec(_GroupCodec):
    """int8's scheme with qmax 7, two offset-binary nibbles per byte."""

    def __init__(self) -> None:
        super().__init__(DType.I4, 7, 20)

    def _store(self, v):
        k = v.shape[-1]
        nib = np.full(v.shape[:-1] + (k + k % 2,), 8, np.uint8)
        nib[..., :k] = (v.astype(np.int16) + 8).astype(np.uint8)
        packed = nib[..., 0::2] | (nib[..., 1::2] << np.uint8(4))
        return {"q": packed, "shape": np.asarray(v.shape, np.int64)}

    def _unpack(self, parts):
        packed = np.asarray(parts["q"], dtype=np.uint8)
        k = int(parts["shape"][-1])
        nib = np.stack([packed & np.uint8(0xF), packed >> np.uint8(4)], axis=-1).reshape(packed.shape[:-1] + (-1,))
        return (nib[..., :k].astype(np.int16) - 8).astype(np.int8)

    def _group_bytes(self, v32):
        nib = (v32.astype(np.int16) + 8).astype(np.uint8)
        return nib[..., :16] | (nib[..., 16:] << np.uint8(4))

    def _group_values(self, payload):
        lo, hi = payload & np.uint8(0xF), payload >> np.uint8(4)
        return (np.concatenate([lo, hi], axis=-1).astype(np.int16) - 8).astype(np.int8)


_CODECS: dict[DType, Codec] = {}


def register_codec(codec: Codec) -> Codec:
    _CODECS[codec.dtype] = codec
    return codec


register_codec(_PlainCodec(DType.F32, lambda x: x.copy(), lambda d: np.asarray(d, dtype=np.float32)))
register_codec(_PlainCodec(DType.BF16, ck.f32_to_bf16, ck.bf16_to_f32))
register_codec(_PlainCodec(DType.F16, _f16_bits, ck.f16_to_f32))
register_codec(_Fp8BlockCodec())
register_codec(_GroupCodec(DType.I8, 127, 36))
register_codec(_Int4Codec())


# ---- public helpers ------------------------------------------------------------------------------------------------
def codec_for(fmt: WeightFormat) -> Codec:
    codec = _CODECS.get(fmt.dtype)
    if codec is None:
        raise IRError(f"no codec for weight format {fmt}")
    codec.check(fmt)
    return codec


def encode(value: np.ndarray, fmt: WeightFormat) -> Parts:
    return codec_for(fmt).encode(value, fmt)


def decode(parts: Mapping[str, np.ndarray], fmt: WeightFormat) -> np.ndarray:
    return codec_for(fmt).decode(parts, fmt)


def relayout(parts: Parts, fmt: WeightFormat, layout: str) -> Parts:
    return codec_for(fmt).relayout(parts, fmt, layout)


def encode_exact(value: np.ndarray, fmt: WeightFormat) -> Optional[Parts]:
    """Parts that decode to exactly `value` in `fmt`, or None when `fmt` cannot hold these values exactly."""
    try:
        parts = encode(value, fmt)
    except IRError:
        return None
    back = decode(parts, fmt)
    same = back.shape == np.shape(value) and np.array_equal(back.view(np.uint32),
                                                            np.ascontiguousarray(value, np.float32).view(np.uint32))
    return parts if same else None


def parts_nbytes(parts: Mapping[str, np.ndarray]) -> int:
    """Bytes the parts occupy (what an artifact stores), not counting the small `shape` vectors."""
    return sum(int(a.nbytes) for k, a in parts.items() if k != "shape")
