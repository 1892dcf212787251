"""Reading weights in their compiled layout (codegen/layout.py) inside kernels: scalar and vector decodes.

Vector decodes never materialise a dequantised copy: bf16 widens by zext+shl16 (paired rows: shl16 and a mask
yield two vectors from one load), fp8 e4m3 codes become the f16 with the same exponent/mantissa bits (an exact
value/256; the 256 is folded into the block scale) or, in GEMVs on targets with fast subnormals, an f32 by integer
ops alone (value * 2^-120, exact), int8 sign-extends, int4 splits nibbles (low = first 16 of a 32-group, high =
last 16). Scales multiply once per group.
"""
from __future__ import annotations

from typing import Optional

from dzc.codegen.kir import (
    Buf, E, F16, F32, I16, I32, U32, Operand, _lift, bitcast, cast, const, load)
from dzc.codegen.layout import Packed


class WeightAccess:
    """Access to a weight [E?, N, K] stored as `pk` in buffers `data` (+ `scale`). `e` is the expert (0 if none)."""

    def __init__(self, pk: Packed, data: Buf, scale: Optional[Buf], N: int, K: int) -> None:
        self.pk, self.data, self.scale_buf, self.N, self.K = pk, data, scale, N, K
        self.row_len = pk.row_elems(K)
        self.scols = pk.scale_cols(K)
        self.srows = pk.scale_rows(N)
        self.group = pk.group
        self.E = 1              # experts stacked in the buffers (set by the lowering for MoE weights)
        self.fp8_bits = False   # fp8 only: the target multiplies subnormals at full speed, GEMVs may use fp8_bits_vec

    def _row(self, e: Operand, n: Operand) -> E:
        return (e * self.N + n) * self.row_len if not (isinstance(e, int) and e == 0) else n * self.row_len

    def at(self, e: Operand, n: Operand, k: Operand) -> E:
        """Index into `data` of row n's element k, for k a multiple of chunk(V) (any k in unpaired layouts; i4:
        the byte of k's group half)."""
        if self.pk.stripe:
            return self.words_at(e, n, k) * 2
        return self._row(e, n) + (k // 2 if self.pk.kind == "i4" else k)

    def words_at(self, e: Operand, n: Operand, k: Operand) -> E:
        """Paired bf16: index into `data` as 32-bit words of row n's chunk at k (a multiple of 2V). Striped, written
        without dividing the sum by 2, so the k loop's addresses stay one add (LLVM cannot see the sum is even)."""
        if not self.pk.stripe:
            return (self._row(e, n) + k) // 2
        S, V = self.pk.stripe, self.pk.pair
        r = e * self.N + n if not (isinstance(e, int) and e == 0) else n
        # masks, not division: for rows n0 + i of a stripe-aligned tile LLVM folds both to n0 and i
        row = r & (S - 1)
        return (r - row) * (self.K // 2) + k * (S // 2) + row * V       # a stripe's chunk is S*2V elements

    def scale(self, e: Operand, n: Operand, g: Operand) -> E:
        rb = self.pk.rblock
        row = n if rb == 1 else n // rb
        idx = (e * self.srows + row) * self.scols + g
        if self.pk.tile:                                            # [tiles, groups, tile rows]
            tl = self.pk.tile
            idx = ((e * self.pk.tiles(self.N) + n // tl) * self.scols + g) * tl + n % tl
        s = load(self.scale_buf, idx)
        return s if s.dtype == F32 else cast(s, F32)

    def chunk(self, V: int) -> int:
        """Elements that raw_vecs decodes together: 2V for paired bf16 rows, else V."""
        return 2 * V if self.pk.pair else V

    def raw_vecs(self, e: Operand, n: Operand, k: Operand, V: int) -> list[E]:
        """The chunk(V) unscaled values from element k (a multiple of chunk(V)) as vectors of V lanes, in order."""
        if not self.pk.pair:
            return [self.raw_vec(e, n, k, V)]
        assert V == self.pk.pair, (V, self.pk.pair)
        words = load(Buf(self.data.name, U32, self.data.local), self.words_at(e, n, k), V)
        return [bitcast(words << const(16, U32), F32.vec(V)), bitcast(words & const(0xFFFF0000, U32), F32.vec(V))]

    def raw_vec(self, e: Operand, n: Operand, k: Operand, lanes: int, half: int = 0) -> E:
        """`lanes` unscaled values starting at element k. For int4 k is (group start + j) with j < 16 and `half`
        says whether the chunk lies in the group's second 16 (high nibbles). Paired bf16 rows: one value, or a
        vector at a static k."""
        kind, base = self.pk.kind, self._row(e, n)
        if kind == "f32":
            return load(self.data, base + k, lanes)
        if kind == "bf16" and self.pk.pair and lanes > 1:
            assert isinstance(k, int) and lanes == self.pk.pair and k % lanes == 0, (k, lanes)
            return self.raw_vecs(e, n, k - k % (2 * lanes), lanes)[k // lanes % 2]
        if kind == "bf16":
            if self.pk.pair:
                V = self.pk.pair
                k = _lift(k, None)
                idx = self.at(e, n, k - k % (2 * V)) + k % V * 2 + k % (2 * V) // V
            else:
                idx = base + k
            w = cast(load(self.data, idx, lanes), U32.vec(lanes)) << const(16, U32)
            return bitcast(w, F32.vec(lanes))
        if kind == "f16":
            return cast(load(self.data, base + k, lanes), F32.vec(lanes))
        if kind == "fp8":
            return _fp8_to_f32(load(self.data, base + k, lanes))
        if kind == "i8":
            return cast(load(self.data, base + k, lanes), F32.vec(lanes))
        if kind == "i4":
            raise AssertionError("use raw_vec_i4")
        raise AssertionError(kind)

    def fp8_bits_vec(self, e: Operand, n: Operand, k: Operand, lanes: int) -> E:
        """fp8 only: `lanes` codes from k as f32 equal to raw_vec's value/256 times 2^-112 (see _fp8_bits)."""
        return _fp8_bits(load(self.data, self._row(e, n) + k, lanes))

    def raw_vec_i4(self, e: Operand, n: Operand, g: Operand, j: int, half: int, lanes: int) -> E:
        """int4: elements g*group + sub*32 + half*16 + (j..j+lanes) where j counts within the 32-subgroup half."""
        base = self._row(e, n) + g * (self.group // 2) + j
        b = cast(load(self.data, base, lanes), I32.vec(lanes))
        nib = (b & const(15, I32)) if half == 0 else (b >> const(4, I32))
        return cast(nib - const(8, I32), F32.vec(lanes))

    def raw_scalar(self, e: Operand, n: Operand, k: Operand) -> E:
        kind = self.pk.kind
        k = _lift(k, None)
        if self.pk.tile:
            return self._tiled_scalar(e, n, k)
        if kind == "i4":
            g, p = k // self.group, k % self.group
            sub, q = p // 32, p % 32
            byte = load(self.data, self._row(e, n) + g * (self.group // 2) + sub * 16 + q % 16)
            b = cast(byte, I32)
            nib = (b >> (cast((q // 16) * 4, I32))) & const(15, I32)
            return cast(nib - const(8, I32), F32)
        return self.raw_vec(e, n, k, 1)

    def _tiled_scalar(self, e: Operand, n: Operand, k: E) -> E:
        """One value of a row-tiled int8/int4 weight (codegen/layout.py), for readers other than tile_dot."""
        t, r = n // self.pk.tile, n % self.pk.tile
        per = 4 if self.pk.kind == "i8" else 8                   # K elements per 4-byte lane
        lanes_per_row = self.row_len // 4
        byte = load(self.data, ((e * self.pk.tiles(self.N) + t) * lanes_per_row + k // per) * (4 * self.pk.tile)
                    + r * 4 + (k % per) % 4)
        b = cast(byte, I32)
        if self.pk.kind == "i8":
            return cast(b - const(128, I32), F32)
        nib = (b >> cast(((k % per) // 4) * 4, I32)) & const(15, I32)
        return cast(nib - const(8, I32), F32)

    def scalar(self, e: Operand, n: Operand, k: Operand) -> E:
        raw = self.raw_scalar(e, n, k)
        if not self.group:
            return raw
        return raw * self.scale(e, n, k // self.group)


def _fp8_to_f32(codes: E) -> E:
    """e4m3 codes (loaded as i8) -> f32 value/256: sext to i16, << 7 puts exponent+mantissa in f16's place and
    the sign in bits 14 and 15; clearing bit 14 leaves exactly the f16 of value/256 (subnormals included)."""
    lanes = codes.dtype.count
    h = (cast(codes, I16.vec(lanes)) << const(7, I16)) & const(-16385, I16)
    return cast(bitcast(h, F16.vec(lanes)), F32.vec(lanes))


def _fp8_bits(codes: E) -> E:
    """e4m3 codes -> f32 value * 2^-120 in three integer ops (the f16 route also needs a conversion): sign-extend to
    i32, << 20 puts exponent and mantissa at the bottom of f32's exponent and top of its mantissa with copies of the
    sign above them, the mask keeps only the sign at bit 31. Exact; subnormal codes become f32 subnormals."""
    lanes = codes.dtype.count
    b = cast(codes, I32.vec(lanes)) << const(20, I32)
    return bitcast(b & const(0x87F00000 - (1 << 32), I32), F32.vec(lanes))


def raw_at(wa: WeightAccess, e: Operand, n: Operand, k0: int, lanes: int) -> E:
    """Unscaled values W[e, n, k0:k0+lanes] for a static k0 whose chunk lies inside one scale group (times
    wa.scale(e, n, k0 // wa.group) where the format has groups)."""
    if wa.pk.kind == "i4":
        g, off = k0 // wa.group, k0 % wa.group
        return wa.raw_vec_i4(e, n, g, (off // 32) * 16 + off % 16, (off % 32) // 16, lanes)
    return wa.raw_vec(e, n, k0, lanes)
