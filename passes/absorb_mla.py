"""`absorb-mla`: run MLA attention over the latent cache instead of re-expanding the cache through kv_b.

The traced (expanded) attention of one layer, per dzc/model/deepseek_v3.py, is

    kv      = LINEAR(latent_all[S,C], kv_b[H*(Dn+Dv), C])  -> [S,H,Dn+Dv] -> k_nope [S,H,Dn] | v [S,H,Dv]
    k       = CONCAT(k_nope, EXPAND(k_pe_all[S,R] -> [S,1,R] -> [S,H,R]))
    scores  = (CONCAT(q_nope, q_pe)[N,H,Dn+R] . k) * scale,  masked key j <= positions[i], softmax
    out     = probs @ v                                      [H,N,Dv]

(the softmax may already be a SOFTMAX op, or the whole thing one ATTENTION op). This pass rewrites it into

    q_lat   = LINEAR(q_nope, W_UK)                           [N,H,C]   W_UK [H,C,Dn] = kv_b rows of k_nope, transposed
    out_lat = MLA_ATTENTION(q_lat, q_pe, latent_all, k_pe_all, positions) {scale}
    out     = LINEAR(out_lat, W_UV)                          [H,N,Dv]  W_UV [H,Dv,C] = kv_b rows of v

which is the same function: q_nope . (W_k c) = (q_nope W_k) . c and probs @ (W_v c) = (probs @ c) W_v^T. Both
products are batched LINEARs (per head h: x[h] @ W[h]^T), so every back end runs them as GEMVs over contiguous
weight rows, and `quantize` treats them like any other LINEAR weight (int8 activations under int8/int4). The
match is structural (the graph above, operand by operand, the mask checked to be exactly `j <= positions[i]`);
names only name the derived weights: "<kv_b minus .weight>.w_uk" / ".w_uv", defined once in ctx.weights.

Derived weight formats: kv_b's own format when it holds the sliced values exactly (always for f32/bf16/f16; for
block FP8 when the store has kv_b's FP8 parts and Dn, Dv are multiples of the block rows: then q and scale_inv
are sliced (and transposed for W_UK), no re-rounding); otherwise f32. Run this pass before `quantize`, which
re-encodes them like kv_b.
They are derived from every matched layer, also in a program that stays expanded: programs of one compile
share ctx.weights, and a later program's absorption must still see kv_b's exact (unquantized) values.

Which programs: a one-token program (decode) is always absorbed: expanded decode multiplies the whole cache by
kv_b every step. A many-token program (prefill) is absorbed only when `mla_attention_cost` says so at the
assumed shape (`prefill_tokens` new tokens after `prefill_past` cached ones; default 512 after 0: a prompt).
Per layer, with S = P+T keys, in multiply-adds:
    expanded  S*C*H*(Dn+Dv)  +  H*T*S*(Dn+R+Dv)          (kv_b over every key, then ordinary MHA)
    absorbed  T*H*C*(Dn+Dv)  +  H*T*S*(2C+R)             (kv_b folded into q and out, MQA over the latent)
so absorbed - expanded = H*[T*S*(2C-Dn-Dv) - C*(Dn+Dv)*P]: with 2C > Dn+Dv (V3: 1024 > 256) expanded has fewer
FLOPs at P = 0 for every T, and absorbed has fewer for large P only while T < C*(Dn+Dv)/(2C-Dn-Dv) (V3: 170;
tests/tiny_models.py: 70). Activation bytes (f32; the expanded form writes and reads k_nope|v for every key, the
absorbed one q_lat/out_lat per head) are added at FLOPS_PER_BYTE flops per byte, which favours absorbed a little
more. Defaults: V3 and the tiny models both get expanded prefill (T=512, P=0) and absorbed decode. The choice and
its numbers are recorded in ctx.facts['absorb-mla'][program.name] and its "summary" (the pass table's note).

Invariant: the program computes the same values; in every absorbed program no LINEAR reads the cache (kv_b
never touches latent_all), and the cache outputs are unchanged (latent + k_pe per token).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from dzc.ir import quant
from dzc.ir.dtypes import DType
from dzc.ir.infer import make
from dzc.ir.node import Node, WeightFormat, WeightRef
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.passes.base import PassContext
from dzc.passes.fuse_softmax_attention import causal_positions
from dzc.passes.graph import commuted, const_value
from dzc.passes.rewrite import graph_rewrite

FLOPS_PER_BYTE = 8.0  # machine balance used to price activation traffic (a CPU core: ~10x more flop/s than B/s)
FORMS = ("auto", "absorbed", "expanded")


# ---- the cost model ----------------------------------------------------------------------------------------------
def mla_attention_cost(tokens: int, past: int, heads: int, kv_lora: int, rope: int, nope: int,
                       v_dim: int) -> dict[str, dict[str, float]]:
    """FLOPs and activation bytes of one layer's attention in each form (see the module docstring)."""
    t, s, h, c, r = tokens, past + tokens, heads, kv_lora, rope
    macs = {"expanded": s * c * h * (nope + v_dim) + h * t * s * (nope + r + v_dim),
            "absorbed": t * h * c * (nope + v_dim) + h * t * s * (2 * c + r)}
    nbytes = {"expanded": 4 * (s * (c + r) + 2 * s * h * (nope + v_dim) + t * h * (nope + r + v_dim)),
              "absorbed": 4 * (s * (c + r) + t * h * (nope + r + 2 * c + v_dim))}
    return {form: {"flops": 2.0 * macs[form], "bytes": float(nbytes[form]),
                   "cost": 2.0 * macs[form] + FLOPS_PER_BYTE * nbytes[form]} for form in macs}


def choose_form(tokens: int, past: int, heads: int, kv_lora: int, rope: int, nope: int, v_dim: int) -> str:
    cost = mla_attention_cost(tokens, past, heads, kv_lora, rope, nope, v_dim)
    return "absorbed" if cost["absorbed"]["cost"] < cost["expanded"]["cost"] else "expanded"


def absorbed_token_limit(kv_lora: int, nope: int, v_dim: int) -> float:
    """In FLOPs, absorbed beats expanded for a large cache only while T is below this (inf when 2C <= Dn+Dv)."""
    excess = 2 * kv_lora - nope - v_dim
    return float("inf") if excess <= 0 else kv_lora * (nope + v_dim) / excess


# ---- matching the expanded form --------------------------------------------------------------------------------
@dataclass(frozen=True)
class ExpandedMLA:
    """The operands of one expanded MLA attention, recovered from the graph."""

    q_nope: Node     # [N,H,Dn]
    q_pe: Node       # [N,H,R]
    latent: Node     # [S,C]   all keys' latents (cache rows + new rows)
    k_pe: Node       # [S,R]
    kv_b: Node       # WEIGHT [H*(Dn+Dv), C]
    positions: Node  # i32[N]
    scale: float

    @property
    def dims(self) -> dict[str, int]:
        n, h, nope = self.q_nope.shape
        return {"heads": h, "kv_lora": self.latent.shape[1], "rope": self.q_pe.shape[2], "nope": nope,
                "v_dim": self.kv_b.shape[0] // h - nope}


def _last_axis(node: Node, axis: int) -> bool:
    return axis in (-1, node.ndim - 1)


def _slice_last(node: Node) -> Optional[tuple[Node, int, int]]:
    if node.op != Op.SLICE:
        return None
    axis, start, stop = node.arg
    (x,) = node.src
    if not _last_axis(x, axis) or not isinstance(start, int) or not isinstance(stop, int):
        return None
    return x, start, stop


def _kv_heads(k_nope: Node, v: Node) -> Optional[tuple[Node, Node]]:
    """k_nope, v = slices [0, Dn) and [Dn, Dn+Dv) of RESHAPE(LINEAR(latent, kv_b), [S, H, Dn+Dv])."""
    a, b = _slice_last(k_nope), _slice_last(v)
    if a is None or b is None or a[0] is not b[0]:
        return None
    kv3, (_, k0, k1), (_, v0, v1) = a[0], a, b
    if kv3.op != Op.RESHAPE or kv3.ndim != 3 or not (k0 == 0 and k1 == v0 and v1 == kv3.shape[2]):
        return None
    (kv,) = kv3.src
    if kv.op != Op.LINEAR or kv.ndim != 2 or kv.src[1].op != Op.WEIGHT:
        return None
    latent, w = kv.src
    s, h, width = kv3.shape
    if latent.ndim != 2 or kv.shape != (s, h * width) or latent.shape[0] != s:
        return None
    return latent, w


def _k_full(k: Node) -> Optional[tuple[Node, Node]]:
    """k = CONCAT(k_nope, EXPAND(RESHAPE(k_pe[S,R], [S,1,R]), [S,H,R])) on the last axis -> (k_nope, k_pe)."""
    if k.op != Op.CONCAT or len(k.src) != 2 or k.ndim != 3 or not _last_axis(k, k.arg):
        return None
    k_nope, bcast = k.src
    if bcast.op != Op.EXPAND or bcast.src[0].op != Op.RESHAPE:
        return None
    k_pe = bcast.src[0].src[0]
    s, h, r = bcast.shape
    if bcast.src[0].shape != (s, 1, r) or k_pe.shape != (s, r):
        return None
    return k_nope, k_pe


def _q_full(q: Node) -> Optional[tuple[Node, Node]]:
    if q.op != Op.CONCAT or len(q.src) != 2 or q.ndim != 3 or not _last_axis(q, q.arg):
        return None
    return q.src[0], q.src[1]


def _softmax_input(probs: Node) -> Optional[Node]:
    """x of softmax(x, last axis): a SOFTMAX op or the traced exp(x - max) / sum."""
    if probs.op == Op.SOFTMAX:
        return probs.src[0] if _last_axis(probs, probs.arg) else None
    if probs.op != Op.DIV:
        return None
    e, total = probs.src
    if total.op != Op.SUM or total.src[0] is not e or not _last_axis(e, total.arg) or e.op != Op.EXP:
        return None
    shifted = e.src[0]
    if shifted.op != Op.SUB:
        return None
    x, peak = shifted.src
    if peak.op != Op.RMAX or peak.src[0] is not x or not _last_axis(x, peak.arg):
        return None
    return x


def _scaled_scores(x: Node) -> Optional[tuple[Node, float]]:
    """(q.k MATMUL, scale) of `x` = MATMUL * scale (either order), or of a bare MATMUL (scale 1)."""
    if x.op == Op.MATMUL:
        return x, 1.0
    if x.op != Op.MUL:
        return None
    for mm, c in commuted(x):
        if mm.op == Op.MATMUL and isinstance(const_value(c), float):
            return mm, float(const_value(c))
    return None


def _assemble(q: Node, k: Node, v: Node, positions: Node, scale: float) -> Optional[ExpandedMLA]:
    """Check q [N,H,Dn+R], k [S,H,Dn+R], v [S,H,Dv] are the MLA expansion and collect its operands."""
    qs, ks = _q_full(q), _k_full(k)
    if qs is None or ks is None:
        return None
    (q_nope, q_pe), (k_nope, k_pe) = qs, ks
    kv = _kv_heads(k_nope, v)
    if kv is None:
        return None
    latent, w = kv
    if q_nope.shape[1:] != k_nope.shape[1:] or q_pe.shape[2] != k_pe.shape[1] or k_pe.shape[0] != latent.shape[0]:
        return None
    return ExpandedMLA(q_nope, q_pe, latent, k_pe, w, positions, float(scale))


def match_matmul(pv: Node) -> Optional[ExpandedMLA]:
    """pv = MATMUL(softmax(where(mask, (q . k) * scale, -inf)), PERMUTE(v, (1,0,2))) -> its operands."""
    probs, vt = pv.src
    if vt.op != Op.PERMUTE or vt.arg != (1, 0, 2) or probs.ndim != 3:
        return None
    x = _softmax_input(probs)
    if x is None or x.op != Op.WHERE or const_value(x.src[2]) != float("-inf"):
        return None
    mask, scaled = x.src[0], x.src[1]
    found = _scaled_scores(scaled)
    if found is None:
        return None
    qk, scale = found
    qt, kt = qk.src
    if qt.op != Op.PERMUTE or qt.arg != (1, 0, 2) or kt.op != Op.PERMUTE or kt.arg != (1, 2, 0):
        return None
    h, n, s = probs.shape
    positions = causal_positions(mask, n, s)
    if positions is None:
        return None
    return _assemble(qt.src[0], kt.src[0], vt.src[0], positions, scale)


def match_attention(att: Node) -> Optional[ExpandedMLA]:
    """ATTENTION(CONCAT(q_nope, q_pe), CONCAT(k_nope, k_pe broadcast), v, positions) {scale} -> its operands."""
    q, k, v, positions = att.src
    return _assemble(q, k, v, positions, att.arg)


# ---- derived weights ---------------------------------------------------------------------------------------------
def _base(name: str) -> str:
    return name[: -len(".weight")] if name.endswith(".weight") else name


def _fp8_slices(parts, fmt: WeightFormat, heads: int, nope: int, v_dim: int):
    """W_UK / W_UV FP8 parts sliced out of kv_b's, when head and k/v boundaries fall on block edges."""
    b0, b1 = fmt.block
    if fmt.layout != quant.ROWMAJOR or nope % b0 or v_dim % b0:
        return None
    q = np.asarray(parts["q"]).reshape(heads, nope + v_dim, -1)
    s = np.asarray(parts["scale_inv"], dtype=np.float32).reshape(heads, (nope + v_dim) // b0, -1)
    uk = {"q": np.ascontiguousarray(q[:, :nope].transpose(0, 2, 1)),
          "scale_inv": np.ascontiguousarray(s[:, : nope // b0].transpose(0, 2, 1))}
    uv = {"q": np.ascontiguousarray(q[:, nope:]), "scale_inv": np.ascontiguousarray(s[:, nope // b0:])}
    return (uk, WeightFormat(fmt.dtype, (b1, b0))), (uv, fmt)


def _define(ctx: PassContext, name: str, value: np.ndarray, candidates) -> WeightFormat:
    """Store `value` under `name` in the first candidate (parts, fmt) that holds it exactly, else as f32."""
    for parts, fmt in candidates:
        if parts is None:
            parts = quant.encode_exact(value, fmt)
        if parts is not None and np.array_equal(quant.decode(parts, fmt), value):
            ctx.weights.define_encoded(name, fmt, parts, quant.codec_for(fmt))
            return fmt
    ctx.weights.define(name, value)
    return quant.F32


def _candidates(ctx: PassContext, ref: WeightRef, heads: int, nope: int, v_dim: int):
    """Formats to try for (W_UK, W_UV), best first: kv_b's own encoding, exactly, where possible."""
    fmt = ref.fmt
    if fmt.dtype == DType.F32:
        return [], []
    rowmajor = quant.with_layout(fmt, quant.ROWMAJOR)
    if fmt.dtype != DType.FP8E4M3:
        return [(None, rowmajor)], [(None, rowmajor)]
    uk, uv = [], []
    stored = ctx.weights.encoded(ref.name)
    sliced = (_fp8_slices(stored[1], stored[0], heads, nope, v_dim)
              if stored and quant.same_encoding(stored[0], fmt) else None)
    if sliced:
        uk.append(sliced[0])
        uv.append(sliced[1])
    uk.append((None, WeightFormat(fmt.dtype, (fmt.block[1], fmt.block[0]))))
    uv.append((None, rowmajor))
    return uk, uv


def absorbed_weights(ctx: PassContext, kv_b: Node, heads: int, nope: int, v_dim: int) -> tuple[Node, Node]:
    """WEIGHT nodes W_UK [H, C, Dn] and W_UV [H, Dv, C] derived from kv_b (defined in ctx.weights once)."""
    ref: WeightRef = kv_b.arg
    c = kv_b.shape[1]
    names = (_base(ref.name) + ".w_uk", _base(ref.name) + ".w_uv")
    if not all(n in ctx.weights for n in names):
        w = ctx.weights.f32(ref.name).reshape(heads, nope + v_dim, c)
        values = (np.ascontiguousarray(w[:, :nope].transpose(0, 2, 1)), np.ascontiguousarray(w[:, nope:]))
        for name, value, cands in zip(names, values, _candidates(ctx, ref, heads, nope, v_dim)):
            _define(ctx, name, value, cands)
    out = []
    for name, shape in zip(names, ((heads, c, nope), (heads, v_dim, c))):
        stored = ctx.weights.encoded(name)
        out.append(Node(Op.WEIGHT, DType.F32, shape, (), WeightRef(name, stored[0] if stored else quant.F32)))
    return out[0], out[1]


def absorbed_attention(ctx: PassContext, m: ExpandedMLA) -> Node:
    """[H, N, Dv]: the absorbed computation of `m` (what probs @ v computed)."""
    d = m.dims
    w_uk, w_uv = absorbed_weights(ctx, m.kv_b, d["heads"], d["nope"], d["v_dim"])
    q_lat = make(Op.PERMUTE, [make(Op.LINEAR, [make(Op.PERMUTE, [m.q_nope], (1, 0, 2)), w_uk])], (1, 0, 2))
    out_lat = make(Op.MLA_ATTENTION, [q_lat, m.q_pe, m.latent, m.k_pe, m.positions], m.scale)
    return make(Op.LINEAR, [make(Op.PERMUTE, [out_lat], (1, 0, 2)), w_uv])


# ---- the pass ----------------------------------------------------------------------------------------------------
class AbsorbMLA:
    name = "absorb-mla"
    description = ("MLA over the latent cache (kv_b folded into W_UK/W_UV): always for decode, for prefill when the "
                   "FLOP/byte estimate favours it (default: expanded)")

    def __init__(self, prefill: str = "auto", prefill_tokens: int = 512, prefill_past: int = 0) -> None:
        if prefill not in FORMS:
            raise ValueError(f"prefill must be one of {FORMS}, got {prefill!r}")
        self.prefill, self.prefill_tokens, self.prefill_past = prefill, prefill_tokens, prefill_past

    def decide(self, tokens, dims: dict[str, int]) -> tuple[str, str]:
        """(form, reason) for attention over `tokens` new tokens (an int, or a symbol for prefill)."""
        if tokens == 1:
            return "absorbed", "one new token: expanded would run kv_b over the whole cache every step"
        if self.prefill != "auto":
            return self.prefill, f"forced by prefill={self.prefill!r}"
        t, p = (tokens if isinstance(tokens, int) else self.prefill_tokens), self.prefill_past
        cost, form = mla_attention_cost(t, p, **dims), choose_form(t, p, **dims)
        limit = absorbed_token_limit(dims["kv_lora"], dims["nope"], dims["v_dim"])
        return form, (f"estimate at T={t}, P={p}: expanded {cost['expanded']['cost']:.3g}, absorbed "
                      f"{cost['absorbed']['cost']:.3g} flop-eq per layer; by FLOPs alone absorbed needs "
                      f"T < {limit:.0f} and a long cache")

    def run(self, program: Program, ctx: PassContext) -> Program:
        record: dict = {"form": None, "layers": 0, "reason": "no expanded MLA attention found"}

        def rewrite(node: Node, m: Optional[ExpandedMLA]) -> Optional[Node]:
            if m is None:
                return None
            form, reason = self.decide(m.q_nope.shape[0], m.dims)
            record.update(form=form, reason=reason)
            d = m.dims
            # Derive W_UK/W_UV even when this program stays expanded: the next program may absorb after
            # `quantize` has re-encoded kv_b in the shared store, and they must come from kv_b's exact values.
            absorbed_weights(ctx, m.kv_b, d["heads"], d["nope"], d["v_dim"])
            if form != "absorbed":
                return None
            record["layers"] += 1
            out = absorbed_attention(ctx, m)
            return out if node.op == Op.MATMUL else make(Op.PERMUTE, [out], (1, 0, 2))

        rules = {Op.MATMUL: [lambda node, _: rewrite(node, match_matmul(node))],
                 Op.ATTENTION: [lambda node, _: rewrite(node, match_attention(node))]}
        out = graph_rewrite(program, rules)
        facts = ctx.facts.setdefault(self.name, {})
        facts[program.name] = record
        facts["summary"] = (f"{program.name}: {record['form']} ({record['layers']} layers absorbed; {record['reason']})"
                            if record["form"] else f"{program.name}: no expanded MLA attention")
        return out


PASS = AbsorbMLA()
