"""Every kernel kind of the CPU backend against the numpy interpreter, at awkward sizes.

Each test builds a small program with the tracer (or IR nodes directly), compiles it for this CPU
(codegen.runner.NativeProgram) and compares every output with ir.interpreter on the same inputs. Sizes are
chosen to hit edges: K not a multiple of 16 or 32, N = 1, T = 1 and T = 7, ragged FP8 blocks, partial tiles.
"""
from __future__ import annotations

import dataclasses
import zlib

import numpy as np
import pytest

from dzc.checkpoint.dtypes import f32_to_bf16
from dzc.codegen.layout import Packed, for_target, gemv_rows, pack_array
from dzc.codegen.runner import NativeProgram
from dzc.codegen.target import Target, host_target
from dzc.ir import quant
from dzc.ir.dtypes import DType
from dzc.ir.infer import make
from dzc.ir.interpreter import Interpreter
from dzc.ir.node import FusedBody, Node, WeightFormat
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.ir.shapes import P, T
from dzc.ir.tracer import Tensor, arange, concat, gather, input_, linear, moe, take, topk, weight
from dzc.ir.weights import WeightStore

RNG = np.random.default_rng(1234)


@pytest.fixture(autouse=True)
def _per_test_rng(request):
    """Each test draws its data from its own seed (its name, parameters included), not from a stream shared with
    the tests that ran before it: adding or reordering tests never changes another test's inputs. (int8-activation
    kernels are exact only away from rounding ties; a shifted stream once put a SwiGLU output 5e-7 of a step from
    one, where the OpenCL and numpy sums rounded it apart.)"""
    global RNG
    RNG = np.random.default_rng(zlib.crc32(request.node.name.encode()))
FORMATS = {
    "f32": quant.F32, "bf16": quant.BF16, "f16": quant.F16, "fp8": quant.FP8_BLOCK128,
    "int8": quant.INT8_G32, "int4": quant.INT4_G32,
    "int8-k32": quant.with_layout(quant.INT8_G32, quant.K32_BLOCKED),
    "int4-k32": quant.with_layout(quant.INT4_G32, quant.K32_BLOCKED),
    # int8 activations (WeightFormat.act): row-tiled VNNI kernels where the CPU has them, else rounded inputs
    "int8-a8": quant.QUANT_FORMATS["int8"], "int4-a8": quant.QUANT_FORMATS["int4"],
}


def without_int8_dot() -> Target:
    """This CPU minus AVX-512 VNNI: act=8 weights take the portable path (round the input, float kernels)."""
    host = host_target()
    return dataclasses.replace(host, features=host.features.replace("+avx512vnni", "-avx512vnni"))


class Store(WeightStore):
    """A weight store filled by tests; `add` encodes a value in a format like the quantize pass does."""

    def __init__(self) -> None:
        self.values: dict[str, np.ndarray] = {}
        super().__init__(lambda name: self.values[name])

    def add(self, name: str, value: np.ndarray, fmt: WeightFormat = quant.F32) -> WeightFormat:
        value = np.asarray(value, np.float32)
        if fmt.dtype == DType.F32:
            self.values[name] = value
        else:
            self.define_encoded(name, fmt, quant.encode(value, fmt), quant.codec_for(fmt))
        return fmt


def program(name: str, inputs: list[Tensor], outputs: dict[str, Tensor]) -> Program:
    return Program(name, tuple(t.node for t in inputs), tuple((k, v.node) for k, v in outputs.items()))


def check(prog: Program, store: WeightStore, feed: dict, rtol: float = 2e-5, cache_rows=None, target=None) -> dict:
    want = Interpreter(store).run(prog, {k: (v[: cache_rows[k]] if cache_rows and k in cache_rows else v)
                                         for k, v in feed.items()})
    got = NativeProgram(prog, store, target).run(feed, cache_rows)
    for name, ref in want.items():
        out = got[name]
        assert out.shape == ref.shape, (name, out.shape, ref.shape)
        if ref.dtype.kind in "biu":
            np.testing.assert_array_equal(out, ref, err_msg=name)
        else:
            scale = max(1.0, float(np.abs(ref).max()))
            np.testing.assert_allclose(out, ref, rtol=0, atol=rtol * scale, err_msg=name)
    return got


def f32(*shape) -> np.ndarray:
    return RNG.standard_normal(shape).astype(np.float32)


# ---- elementwise, broadcasting, movement ----------------------------------------------------------------------------
@pytest.mark.parametrize("n", [1, 7])
def test_elementwise_and_broadcast(n):
    x = input_("x", DType.F32, (T, 13))
    y = input_("y", DType.F32, (1, 13))
    z = input_("z", DType.F32, (T, 1))
    pos = (x * x + 0.5)
    outs = {
        "a": (x + y) * z - x / (y * y + 1.0),
        "b": pos.sqrt() + pos.rsqrt() + pos.log() + pos.reciprocal(),
        "c": x.exp() + x.sigmoid() + x.silu() + x.cos() + x.sin() - (-x),
        "d": (x < y).where(x, y.maximum(z)),
        "e": x.cast(DType.I32).cast(DType.F32) + (x < 0.0).cast(DType.F32),
    }
    store = Store()
    check(program("p", [x, y, z], outs), store, {"x": f32(n, 13) * 2, "y": f32(1, 13), "z": f32(n, 1)})


def test_reductions_movement_concat():
    x = input_("x", DType.F32, (T, 6, 5))
    outs = {
        "sum0": x.sum(0), "sum2": x.sum(-1), "max1": x.max(1),
        "perm": x.permute(2, 0, 1) * 2.0,
        "resh": x.reshape(T, 30).slice(1, 3, 17) + 1.0,
        "split": x.reshape(T, 3, 2, 5).permute(0, 2, 1, 3).reshape(T, 30),
        "exp": x.slice(1, 2, 3).expand(T, 4, 5).exp(),
        "cat": concat([x.slice(2, 0, 2), x.slice(2, 4, 5) * 3.0, x.slice(2, 1, 3)], -1),
        "ar": (arange(T).cast(DType.F32).reshape(T, 1, 1) + x).max(-1),
    }
    check(program("p", [x], outs), Store(), {"x": f32(7, 6, 5)})


def test_fused_kernel_body():
    x = input_("x", DType.F32, (T, 9))
    y = input_("y", DType.F32, (9,))
    in0 = Node(Op.INPUT, DType.F32, (T, 9), (), "in0")
    in1 = Node(Op.INPUT, DType.F32, (9,), (), "in1")
    body = make(Op.MUL, [make(Op.SILU, [in0]), make(Op.ADD, [in1, Node(Op.CONST, DType.F32, (), (), 2.0)])])
    k = Tensor(Node(Op.KERNEL, DType.F32, (T, 9), (x.node, y.node), FusedBody(body)))
    check(program("p", [x, y], {"k": k + 1.0}), Store(), {"x": f32(7, 9), "y": f32(9)})


# ---- gather / take / topk ----------------------------------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
def test_gather_rows_every_format(fmt):
    store = Store()
    f = store.add("emb", f32(300, 160) * 0.3, FORMATS[fmt])
    ids = input_("tokens", DType.I32, (T,))
    out = gather(weight("emb", f, (300, 160)), ids)
    check(program("p", [ids], {"h": out}), store, {"tokens": np.array([0, 299, 17, 17, 128, 5, 200], np.int32)})


def test_take_topk_ties():
    x = input_("x", DType.F32, (T, 12))
    idx = topk(x, 5)
    outs = {"idx": idx, "val": take(x, idx), "g": take(x.reshape(T, 3, 4), topk(x.reshape(T, 3, 4), 2)).sum(-1)}
    data = np.round(f32(7, 12) * 2) / 2          # many ties
    data[0, :] = 1.0
    data[1, 3] = float("-inf")
    check(program("p", [x], outs), Store(), {"x": data})


# ---- linear (every format, GEMV and GEMM) and matmul ---------------------------------------------------------------------
@pytest.mark.parametrize("fmt", list(FORMATS))
# the last four: K whole vector pairs (paired bf16 rows), the last two also N whole stripes
@pytest.mark.parametrize("n,K,N", [(1, 45, 1), (1, 61, 19), (1, 301, 37), (7, 200, 13), (7, 37, 130), (19, 600, 45),
                                   (1, 256, 37), (19, 288, 45), (1, 256, 40), (19, 288, 48)])
def test_linear(fmt, n, K, N):
    store = Store()
    f = store.add("w", f32(N, K) * 0.2, FORMATS[fmt])
    x = input_("x", DType.F32, (T, K) if n > 1 else (1, K))
    check(program("p", [x], {"y": linear(x, weight("w", f, (N, K)))}), store, {"x": f32(n, K)})


def test_bf16_pairs_bytes_are_as_documented():
    """codegen/layout.py: with pair = V, 32-bit word j of each 2V elements holds element j low, element j+V high;
    K that is not whole pairs stays plain, and only CPU targets pair. N that is whole stripes of S rows is stored
    [N/S, K/2V, S, 2V]: the chunks of a stripe's rows side by side."""
    V = host_target().vector_width
    w = f32(3, 4 * V)
    pk = for_target(Packed("bf16"), host_target(), 0, w.shape)
    assert pk.pair == V and pk.stripe == 0 and for_target(Packed("bf16"), host_target(), 0, (3, 4 * V + 2)).pair == 0
    words = pack_array(pk, w)["data"].view(np.uint32)
    plain = f32_to_bf16(w).astype(np.uint32)
    for c in range(2):
        for j in range(V):
            assert words[1, c * V + j] == plain[1, 2 * c * V + j] | plain[1, 2 * c * V + V + j] << 16
    S = gemv_rows(host_target())
    w = f32(2 * S, 4 * V)
    pk = for_target(Packed("bf16"), host_target(), 0, w.shape)
    assert pk.stripe == S
    words = pack_array(pk, w)["data"].view(np.uint32).reshape(-1)
    plain = f32_to_bf16(w).astype(np.uint32)
    for n in (0, S - 1, S + 2):
        for c in range(2):
            for j in range(V):
                at = ((n // S * 2 + c) * S + n % S) * V + j
                assert words[at] == plain[n, 2 * c * V + j] | plain[n, 2 * c * V + V + j] << 16


def e4m3_values() -> np.ndarray:
    """All 254 finite e4m3 values (codes 0..255 without the two NaNs), subnormals included."""
    out = []
    for c in range(256):
        if c & 0x7F == 0x7F:
            continue
        e, m = (c >> 3) & 15, c & 7
        v = 2.0 ** (e - 7) * (1 + m / 8) if e else 2.0 ** -6 * m / 8
        out.append(-v if c & 0x80 else v)
    return np.array(out, np.float32)


@pytest.mark.parametrize("subnormals_fast", [True, False])
def test_fp8_gemv_every_code(subnormals_fast):
    """Every e4m3 code (block amax 448: scale 1, codes exact) in a GEMV with x = +-1/|value|, so each code adds +-1
    and a wrong decode of any one, subnormals included, moves y by at least 1/2. Both routes: integer decode to f32
    subnormals (Target.denormals_fast) and the f16 one."""
    vals = np.concatenate([e4m3_values(), np.zeros(2, np.float32)])
    N, K = 19, vals.size
    w = np.stack([vals * (-1.0) ** r for r in range(N)]).astype(np.float32)
    x = np.where(vals != 0, RNG.choice([-1.0, 1.0], K) / np.where(vals != 0, np.abs(vals), 1), 0).astype(np.float32)
    store = Store()
    f = store.add("w", w, FORMATS["fp8"])
    host = host_target()
    target = host if host.denormals_fast == subnormals_fast else dataclasses.replace(
        host, cpu="znver4" if subnormals_fast else "sapphirerapids")
    assert target.denormals_fast == subnormals_fast
    xin = input_("x", DType.F32, (1, K))
    got = check(program("p", [xin], {"y": linear(xin, weight("w", f, (N, K)))}), store, {"x": x[None]},
                target=target)
    np.testing.assert_allclose(got["y"][0], (w @ x.astype(np.float64)).astype(np.float32), rtol=0, atol=1e-3)


@pytest.mark.parametrize("fmt", ["int8-a8", "int4-a8"])
@pytest.mark.parametrize("n,K,N", [(1, 301, 37), (7, 200, 13), (9, 96, 64)])
def test_linear_int8_activations_without_vnni(fmt, n, K, N):
    store = Store()
    f = store.add("w", f32(N, K) * 0.2, FORMATS[fmt])
    x = input_("x", DType.F32, (T, K) if n > 1 else (1, K))
    check(program("p", [x], {"y": linear(x, weight("w", f, (N, K)))}), store, {"x": f32(n, K)},
          target=without_int8_dot())


def test_int8_activation_rounding():
    """quantize_activations (what kernels compute): per 32 elements, ties to even, zero groups, ragged tail."""
    x = np.zeros((2, 70), np.float32)
    x[0, :4] = [127, 0.5, 1.5, -2.5]          # amax 127: scale exactly 1, so the ties are visible
    x[1, 64:] = [3, -6, 1.5, 0, 0, 0]          # the last group has 6 elements
    got = quant.quantize_activations(x)
    assert list(got[0, :4]) == [127, 0, 2, -2] and np.all(got[0, 32:] == 0)
    assert got[1, 65] == -6 and got[1, 66] == np.float32(np.rint(np.float32(1.5) * (np.float32(127) / 6))) * (
        np.float32(6) / np.float32(127))


def test_linear_on_strided_rows():
    store = Store()
    store.add("w", f32(19, 20), quant.BF16)
    x = input_("x", DType.F32, (T, 3, 40))
    rows = x.slice(2, 10, 30)                    # rows of 20 with stride 40: read in place
    y = linear(rows, weight("w", quant.BF16, (19, 20)))
    check(program("p", [x], {"y": y}), store, {"x": f32(5, 3, 40)})


def test_matmul_activations_and_weights():
    store = Store()
    f = store.add("wuk", f32(3, 24, 40) * 0.2, quant.BF16)
    a = input_("a", DType.F32, (3, T, 24))
    b = input_("b", DType.F32, (3, 24, T))
    outs = {"ab": a @ b, "bt": (a @ a.permute(0, 2, 1)), "aw": a @ weight("wuk", f, (3, 24, 40))}
    check(program("p", [a, b], outs), store, {"a": f32(3, 7, 24), "b": f32(3, 24, 7)})


@pytest.mark.parametrize("fmt", ["fp8", "int4"])
def test_matmul_weight_quantized(fmt):
    store = Store()
    f = store.add("w", f32(2, 128, 160) * 0.2, FORMATS[fmt])
    a = input_("a", DType.F32, (2, 1, 128))
    check(program("p", [a], {"y": a @ weight("w", f, (2, 128, 160))}), store, {"a": f32(2, 1, 128)})


@pytest.mark.parametrize("fmt", ["f32", "bf16", "fp8", "int8", "int8-a8", "int4-a8"])
@pytest.mark.parametrize("n", [1, 3])
@pytest.mark.parametrize("N,K", [(128, 160), (24, 40)])
def test_batched_linear(fmt, n, N, K):
    """LINEAR(x[B, M, K], W[B, N, K]) per b (absorbed W_UK / W_UV): N = 128 is whole VNNI tiles and fp8 blocks,
    N = 24 rows would straddle matrices (untiled; fp8 falls back to f32); x is a permuted view, as absorb-mla
    makes it; one token (decode) and several."""
    store = Store()
    f = store.add("w", f32(3, N, K) * 0.2, FORMATS[fmt])
    x = input_("x", DType.F32, (T, 3, K))
    y = linear(x.permute(1, 0, 2), weight("w", f, (3, N, K)))
    check(program("p", [x], {"y": y}), store, {"x": f32(n, 3, K)})


@pytest.mark.parametrize("fmt", ["int8-a8", "int4-a8"])
def test_batched_linear_int8_activations_without_vnni(fmt):
    store = Store()
    f = store.add("w", f32(2, 32, 64) * 0.2, FORMATS[fmt])
    x = input_("x", DType.F32, (2, T, 64))
    check(program("p", [x], {"y": linear(x, weight("w", f, (2, 32, 64)))}), store, {"x": f32(2, 1, 64)},
          target=without_int8_dot())


# ---- norms, softmax, swiglu, rope ------------------------------------------------------------------------------------------
def test_rmsnorm_softmax_swiglu_rope():
    store = Store()
    store.add("g", 1 + 0.1 * f32(37))
    x = input_("x", DType.F32, (T, 37))
    g = weight("g", quant.F32, (37,))
    rms = Tensor(make(Op.RMSNORM, [x.node, g.node], 1e-6))
    sm = Tensor(make(Op.SOFTMAX, [x.node], -1))
    sm0 = Tensor(make(Op.SOFTMAX, [x.node], 0))
    sw = Tensor(make(Op.SWIGLU, [x.node, (x * 0.5).node]))
    q = input_("q", DType.F32, (T, 3, 16))
    ang = input_("ang", DType.F32, (T, 8))
    rope = Tensor(make(Op.ROPE, [q.node, ang.cos().reshape(T, 1, 8).node, ang.sin().reshape(T, 1, 8).node]))
    outs = {"rms": rms, "sm": sm, "sm0": sm0, "sw": sw, "rope": rope}
    check(program("p", [x, q, ang], outs), store, {"x": f32(7, 37), "q": f32(7, 3, 16), "ang": f32(7, 8)})


# ---- attention -------------------------------------------------------------------------------------------------------------
@pytest.mark.parametrize("hk", [1, 4])
@pytest.mark.parametrize("n,past", [(1, 40), (7, 0), (7, 33)])
def test_attention(hk, n, past):
    q = input_("q", DType.F32, (T, 4, 24))
    k = input_("k", DType.F32, (P + T, hk, 24))
    v = input_("v", DType.F32, (P + T, hk, 20))
    pos = input_("positions", DType.I32, (T,))
    past_rows = input_("past", DType.F32, (P, 1))      # binds P
    att = Tensor(make(Op.ATTENTION, [q.node, k.node, v.node, pos.node], 0.3))
    s = past + n
    feed = {"q": f32(n, 4, 24), "k": f32(s, hk, 24), "v": f32(s, hk, 20),
            "positions": np.arange(past, past + n, dtype=np.int32), "past": f32(past, 1)}
    check(program("p", [q, k, v, pos, past_rows], {"o": att}), Store(), feed)


# (5, 40, 16): one head per work item, vector tails; (16, 512, 64): DeepSeek-V3-Lite's shape, head tiles of 4
@pytest.mark.parametrize("H,C,R", [(5, 40, 16), (16, 512, 64)])
@pytest.mark.parametrize("n,past", [(1, 70), (7, 0), (7, 19)])
def test_mla_attention_over_cache(n, past, H, C, R):
    q_lat = input_("q_lat", DType.F32, (T, H, C))
    q_pe = input_("q_pe", DType.F32, (T, H, R))
    lat_new = input_("lat_new", DType.F32, (T, C))
    cache = input_("cache.0.latent", DType.F32, (P, C))
    kpe = input_("k_pe", DType.F32, (P + T, R))
    pos = input_("positions", DType.I32, (T,))
    lat_all = concat([cache, lat_new * 1.0], 0)
    att = Tensor(make(Op.MLA_ATTENTION, [q_lat.node, q_pe.node, lat_all.node, kpe.node, pos.node], 0.2))
    prog = program("p", [q_lat, q_pe, lat_new, cache, kpe, pos], {"o": att, "cache.0.latent": lat_new * 1.0})
    capacity = f32(past + n + 5, C)
    feed = {"q_lat": f32(n, H, C) * 0.2, "q_pe": f32(n, H, R), "lat_new": f32(n, C), "cache.0.latent": capacity,
            "k_pe": f32(past + n, R), "positions": np.arange(past, past + n, dtype=np.int32)}
    check(prog, Store(), feed, cache_rows={"cache.0.latent": past})


# ---- mixture of experts ------------------------------------------------------------------------------------------------------
def _moe_program(store: Store, fmt: WeightFormat, n_tokens, lowered: bool, H: int = 40, I: int = 24):
    E, k = 6, 3
    experts = []
    for e in range(E):
        trio = []
        for proj, shape in (("gate", (I, H)), ("up", (I, H)), ("down", (H, I))):
            name = f"e{e}.{proj}"
            f = store.add(name, f32(*shape) * 0.3, fmt)
            trio.append(weight(name, f, shape))
        experts.append(tuple(trio))
    x = input_("x", DType.F32, (n_tokens, H))
    idx = input_("idx", DType.I32, (n_tokens, k))
    w = input_("w", DType.F32, (n_tokens, k))
    out = moe(x, idx, w, experts)
    if lowered:
        from dzc.passes.lower_moe import lower_moe_node
        out = Tensor(lower_moe_node(out.node))
    return program("p", [x, idx, w], {"y": out})


@pytest.mark.parametrize("fmt,vnni", [("f32", True), ("bf16", True), ("int8-k32", True), ("fp8", True),
                                      ("int8-a8", True), ("int4-a8", True), ("int8-a8", False), ("int4-a8", False)])
@pytest.mark.parametrize("n,lowered", [(1, False), (7, False), (7, True)])
def test_moe(fmt, vnni, n, lowered):
    store = Store()
    prog = _moe_program(store, FORMATS[fmt], 1 if n == 1 else T, lowered)
    idx = np.stack([RNG.choice(6, 3, replace=False) for _ in range(n)]).astype(np.int32)
    check(prog, store, {"x": f32(n, 40), "idx": idx, "w": np.abs(f32(n, 3))},
          target=None if vnni else without_int8_dot())


@pytest.mark.parametrize("n,lowered", [(1, False), (7, False), (7, True)])
def test_moe_paired_bf16(n, lowered):
    """H and I whole vector pairs: every expert projection in the paired bf16 layout."""
    store = Store()
    prog = _moe_program(store, FORMATS["bf16"], 1 if n == 1 else T, lowered, H=64, I=32)
    idx = np.stack([RNG.choice(6, 3, replace=False) for _ in range(n)]).astype(np.int32)
    check(prog, store, {"x": f32(n, 64), "idx": idx, "w": np.abs(f32(n, 3))})


@pytest.mark.parametrize("fmt", ["f32", "bf16", "fp8", "int8-a8", "int4-a8"])
def test_moe_decode_row_blocks(fmt):
    """H = 140: decode's down projection runs two blocks of 64 rows and the rest (float: one tile of 8 and 4 single
    rows; row-tiled int8/int4: 2 blocks of 4 tiles and a ragged tile of 12 rows)."""
    store = Store()
    prog = _moe_program(store, FORMATS[fmt], 1, True, H=140)
    check(prog, store, {"x": f32(1, 140), "idx": np.array([[4, 0, 2]], np.int32), "w": np.abs(f32(1, 3))})
