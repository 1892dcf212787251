"""fuse-softmax and fuse-attention: the softmax kernel, then the whole causal attention around it.

fuse-softmax:
    div(e, sum(e, a)) with e = exp(sub(x, rmax(x, a)))           -> softmax(x) {axis=a}

fuse-attention (the expanded multi-head attention dzc/model/deepseek_v3.py traces, after fuse-softmax):
    permute(matmul(softmax(where(allowed, mul(matmul(permute(q, [1,0,2]), permute(k, [1,2,0])), scale), -inf)),
                   permute(v, [1,0,2])), [1,0,2])                 -> attention(q, k, v, positions) {scale}
    allowed = cmplt(reshape(arange(S), [1, S]), reshape(add(positions, 1), [N, 1]))

`allowed` says key j is visible to query i iff j < positions[i] + 1, i.e. j <= positions[i]: exactly
ATTENTION's causal-by-positions rule, so the mask disappears into the kernel (it is shared by every layer and
is left to die once the last layer is fused). Without the scale multiply the scale is 1.0.

Invariant: fuse-softmax is bit-identical; fuse-attention computes the same products, scaling, mask and softmax
(bit-identical in the interpreter; a native kernel may reorder the sums).
"""
from __future__ import annotations

from typing import Optional

from dzc.ir.dtypes import DType
from dzc.ir.infer import make
from dzc.ir.node import Node
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.passes.base import PassContext
from dzc.passes.graph import Uses, commuted, const_value, norm_axis, replace_nodes


def match_softmax(node: Node, uses: Uses) -> Optional[Node]:
    e, total = node.src
    if total.op != Op.SUM or total.src[0] is not e or e.op != Op.EXP:
        return None
    (diff,) = e.src
    if diff.op != Op.SUB:
        return None
    x, peak = diff.src
    if peak.op != Op.RMAX or peak.src[0] is not x or node.shape != x.shape:
        return None
    axis = norm_axis(total.arg, x.ndim)
    if norm_axis(peak.arg, x.ndim) != axis:
        return None
    inner = [e, total, diff, peak]
    inside = {id(n) for n in inner} | {id(node)}
    if not all(uses.private(n, inside) for n in inner):
        return None
    return make(Op.SOFTMAX, [x], total.arg)


def _permuted(node: Node, order: tuple[int, ...]) -> Optional[Node]:
    return node.src[0] if node.op == Op.PERMUTE and tuple(node.arg) == order else None


def causal_positions(mask: Node, n: object, s: object) -> Optional[Node]:
    """positions when mask == (arange(S)[None, :] < positions[:, None] + 1), shaped [N, S]."""
    if mask.op != Op.CMPLT:
        return None
    keys, limit = mask.src
    if keys.op != Op.RESHAPE or keys.shape != (1, s) or keys.src[0].op != Op.ARANGE or keys.src[0].shape != (s,):
        return None
    if limit.op != Op.RESHAPE or limit.shape != (n, 1) or limit.src[0].op != Op.ADD:
        return None
    for pos, one in commuted(limit.src[0]):
        if const_value(one) == 1 and pos.shape == (n,) and pos.dtype == DType.I32:
            return pos
    return None


def match_attention(node: Node, uses: Uses) -> Optional[Node]:
    out = _permuted(node, (1, 0, 2))
    if out is None or out.op != Op.MATMUL:
        return None
    probs, vt = out.src
    v = _permuted(vt, (1, 0, 2))
    if v is None or probs.op != Op.SOFTMAX or norm_axis(probs.arg, probs.ndim) != 2:
        return None
    (masked,) = probs.src
    if masked.op != Op.WHERE or masked.shape != probs.shape:
        return None
    mask, scores, fill = masked.src
    if const_value(fill) != float("-inf"):
        return None
    scale, product, inner = 1.0, scores, [node, out, vt, probs, masked]
    if scores.op == Op.MUL:
        for a, b in commuted(scores):
            if const_value(b) is not None and a.op == Op.MATMUL:
                scale, product = float(const_value(b)), a
                inner.append(scores)
                break
    if product.op != Op.MATMUL:
        return None
    qt, kt = product.src
    q, k = _permuted(qt, (1, 0, 2)), _permuted(kt, (1, 2, 0))
    if q is None or k is None or q.ndim != 3 or k.ndim != 3 or v.ndim != 3:
        return None
    n, heads, _ = q.shape
    s = k.shape[0]
    if v.shape[0] != s or k.shape[1] not in (1, heads) or v.shape[1] != k.shape[1]:
        return None
    positions = causal_positions(mask, n, s)
    if positions is None:
        return None
    inner += [product, qt, kt]
    inside = {id(x) for x in inner}
    if not all(uses.private(x, inside) for x in inner[1:]):
        return None
    return make(Op.ATTENTION, [q, k, v, positions], scale)


class FuseSoftmax:
    name = "fuse-softmax"
    description = "exp(x - max(x)) / sum(exp(x - max(x)))  ->  softmax(x)"

    def run(self, program: Program, ctx: PassContext) -> Program:
        out, n = replace_nodes(program, {Op.DIV: [match_softmax]})
        ctx.facts[self.name] = {"summary": f"{n} softmaxes fused", "fused": n}
        return out


class FuseAttention:
    name = "fuse-attention"
    description = "masked scores, softmax and the value product of expanded attention -> attention(q, k, v, positions)"

    def run(self, program: Program, ctx: PassContext) -> Program:
        out, n = replace_nodes(program, {Op.PERMUTE: [match_attention]})
        ctx.facts[self.name] = {"summary": f"{n} attentions fused", "fused": n}
        return out
