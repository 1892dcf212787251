"""The reference executor: runs any program with numpy, in float32.

Every pass and every code generator is checked against this. It favours being obviously right over being
fast, but is vectorised enough to run tiny models at interactive speed (`dzc run --target interp`).
"""
from __future__ import annotations

from typing import Callable, Mapping

import numpy as np

from dzc.errors import InputError
from dzc.ir import quant
from dzc.ir.node import Node
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.ir.shapes import Sym, evaluate, evaluate_shape, format_shape
from dzc.ir.weights import WeightStore

Env = Mapping[str, int]
Impl = Callable[[Node, list, Env], np.ndarray]
_IMPLS: dict[Op, Impl] = {}


def impl(*ops: Op) -> Callable[[Impl], Impl]:
    def register(fn: Impl) -> Impl:
        for op in ops:
            _IMPLS[op] = fn
        return fn
    return register


def _sigmoid(x: np.ndarray) -> np.ndarray:
    return (1.0 / (1.0 + np.exp(-x))).astype(x.dtype)


_UNARY = {
    Op.NEG: np.negative, Op.EXP: np.exp, Op.LOG: np.log, Op.SQRT: np.sqrt,
    Op.RSQRT: lambda x: (1.0 / np.sqrt(x)).astype(x.dtype), Op.RECIP: lambda x: (1.0 / x).astype(x.dtype),
    Op.SIGMOID: _sigmoid, Op.SILU: lambda x: x * _sigmoid(x), Op.COS: np.cos, Op.SIN: np.sin,
}
_BINARY = {Op.ADD: np.add, Op.SUB: np.subtract, Op.MUL: np.multiply, Op.DIV: np.divide, Op.MAX: np.maximum,
           Op.CMPLT: np.less}


@impl(*_UNARY)
def _unary(node, args, env):
    return _UNARY[node.op](args[0])


@impl(*_BINARY)
def _binary(node, args, env):
    out = _BINARY[node.op](args[0], args[1])
    return out if node.op == Op.CMPLT else out.astype(node.dtype.numpy, copy=False)


impl(Op.CAST)(lambda node, args, env: args[0].astype(node.dtype.numpy))
impl(Op.WHERE)(lambda node, args, env: np.where(args[0], args[1], args[2]))
impl(Op.SUM)(lambda node, args, env: args[0].sum(axis=node.arg, keepdims=True, dtype=args[0].dtype))
impl(Op.RMAX)(lambda node, args, env: args[0].max(axis=node.arg, keepdims=True))
impl(Op.RESHAPE)(lambda node, args, env: args[0].reshape(evaluate_shape(node.arg, env)))
impl(Op.PERMUTE)(lambda node, args, env: np.transpose(args[0], node.arg))
impl(Op.EXPAND)(lambda node, args, env: np.broadcast_to(args[0], evaluate_shape(node.arg, env)))
impl(Op.CONCAT)(lambda node, args, env: np.concatenate(args, axis=node.arg))
impl(Op.GATHER)(lambda node, args, env: np.take(args[0], args[1], axis=0))
impl(Op.TAKE)(lambda node, args, env: np.take_along_axis(args[0], args[1].astype(np.intp), axis=-1))
impl(Op.MATMUL)(lambda node, args, env: np.matmul(args[0], args[1]))


def _input_for(node, weight_index: int, x: np.ndarray) -> np.ndarray:
    """x as the op multiplies it by its weight operand `weight_index` (int8-rounded for `act=8` formats)."""
    w = node.src[weight_index]
    return quant.for_input(w.arg.fmt, x) if w.op == Op.WEIGHT else x


@impl(Op.LINEAR)
def _linear(node, args, env):
    return _input_for(node, 1, args[0]) @ np.swapaxes(args[1], -1, -2)       # batched W [B, N, K] too


@impl(Op.SLICE)
def _slice(node, args, env):
    axis, start, stop = node.arg
    index = [slice(None)] * args[0].ndim
    index[axis] = slice(evaluate(start, env), evaluate(stop, env))
    return args[0][tuple(index)]


@impl(Op.TOPK)
def _topk(node, args, env):
    # Stable descending sort: equal scores keep the lower index first.
    order = np.argsort(-args[0], axis=-1, kind="stable")
    return order[..., : node.arg].astype(np.int32)


@impl(Op.MOE)
def _moe(node, args, env):
    x, idx, w, *experts = args
    out = np.zeros_like(x)
    for e in np.unique(idx):
        rows, slots = np.nonzero(idx == e)
        gate, up, down = experts[3 * e: 3 * e + 3]
        h = _input_for(node, 3 + 3 * e, x[rows])
        g = h @ gate.T
        act = _input_for(node, 5 + 3 * e, (g * _sigmoid(g)) * (h @ up.T))
        np.add.at(out, rows, (act @ down.T) * w[rows, slots][:, None])
    return out


@impl(Op.RMSNORM)
def _rmsnorm(node, args, env):
    x, w = args
    return (x * (1.0 / np.sqrt((x * x).mean(axis=-1, keepdims=True) + np.float32(node.arg)))).astype(x.dtype) * w


@impl(Op.SOFTMAX)
def _softmax(node, args, env):
    e = np.exp(args[0] - args[0].max(axis=node.arg, keepdims=True))
    return e / e.sum(axis=node.arg, keepdims=True)


@impl(Op.SWIGLU)
def _swiglu(node, args, env):
    return args[0] * _sigmoid(args[0]) * args[1]


@impl(Op.ROPE)
def _rope(node, args, env):
    x, cos, sin = args
    even, odd = x[..., 0::2], x[..., 1::2]
    out = np.empty_like(x)
    out[..., 0::2] = even * cos - odd * sin
    out[..., 1::2] = even * sin + odd * cos
    return out


def _causal_softmax(scores: np.ndarray, positions: np.ndarray) -> np.ndarray:
    """scores [H, N, S]; key j is visible to query i iff j <= positions[i]."""
    visible = np.arange(scores.shape[-1])[None, :] <= positions[:, None]
    scores = np.where(visible, scores, -np.inf)
    e = np.exp(scores - scores.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


@impl(Op.ATTENTION)
def _attention(node, args, env):
    q, k, v, pos = args
    q, k, v = (np.transpose(t, (1, 0, 2)) for t in (q, k, v))   # [H, N|S, D]
    probs = _causal_softmax((q @ np.swapaxes(k, 1, 2)) * np.float32(node.arg), pos)
    return np.transpose(probs @ v, (1, 0, 2)).astype(np.float32)


@impl(Op.MLA_ATTENTION)
def _mla_attention(node, args, env):
    q_lat, q_pe, latent, k_pe, pos = args
    scores = np.einsum("nhc,sc->hns", q_lat, latent) + np.einsum("nhr,sr->hns", q_pe, k_pe)
    probs = _causal_softmax(scores * np.float32(node.arg), pos)
    return np.einsum("hns,sc->nhc", probs, latent).astype(np.float32)


@impl(Op.KERNEL)
def _kernel(node, args, env):
    body = Program("kernel", tuple(), (("out", node.arg.out),))
    values: dict[int, np.ndarray] = {}
    for n in body.toposort():
        if n.op == Op.INPUT:
            values[id(n)] = args[int(n.arg[2:])]
        elif n.op == Op.CONST:
            values[id(n)] = np.asarray(n.arg, dtype=n.dtype.numpy)
        else:
            values[id(n)] = _IMPLS[n.op](n, [values[id(s)] for s in n.src], env)
    return values[id(node.arg.out)]


def bind_symbols(program: Program, inputs: Mapping[str, np.ndarray]) -> dict[str, int]:
    """Bind T, P, ... from the actual input shapes and check every input against its declared type."""
    env: dict[str, int] = {}
    for node in program.inputs:
        if node.arg not in inputs:
            raise InputError(f"program {program.name} needs input '{node.arg}' {format_shape(node.shape)}")
        actual = np.shape(inputs[node.arg])
        if len(actual) != node.ndim:
            raise InputError(f"input '{node.arg}' has shape {list(actual)}, expected {format_shape(node.shape)}")
        for dim, size in zip(node.shape, actual):
            if isinstance(dim, Sym) and len(dim.terms) == 1 and dim.terms[0][1] == 1 and dim.const == 0:
                env.setdefault(dim.terms[0][0], size)
    for node in program.inputs:
        expected = evaluate_shape(node.shape, env)
        if expected != np.shape(inputs[node.arg]):
            raise InputError(f"input '{node.arg}' has shape {list(np.shape(inputs[node.arg]))}, "
                             f"expected {list(expected)} from {format_shape(node.shape)}")
    return env


class Interpreter:
    def __init__(self, weights: WeightStore) -> None:
        self.weights = weights

    def run(self, program: Program, inputs: Mapping[str, np.ndarray]) -> dict[str, np.ndarray]:
        env = bind_symbols(program, inputs)
        values: dict[int, np.ndarray] = {}
        for node in program.toposort():
            values[id(node)] = self._eval(node, values, inputs, env)
        return {name: values[id(node)] for name, node in program.outputs}

    def _eval(self, node: Node, values: dict, inputs: Mapping[str, np.ndarray], env: Env) -> np.ndarray:
        if node.op == Op.INPUT:
            return np.asarray(inputs[node.arg], dtype=node.dtype.numpy)
        if node.op == Op.WEIGHT:
            return self.weights.f32(node.arg.name)
        if node.op == Op.CONST:
            return np.asarray(node.arg, dtype=node.dtype.numpy)
        if node.op == Op.ARANGE:
            return np.arange(evaluate(node.shape[0], env), dtype=np.int32)
        return _IMPLS[node.op](node, [values[id(s)] for s in node.src], env)


# ---- grouped MoE (passes/lower_moe.py) -----------------------------------------------------------------------------
@impl(Op.MOE_SORT)
def _moe_sort(node, args, env):
    return np.argsort(args[0].reshape(-1), kind="stable").astype(np.int32)


@impl(Op.MOE_OFFSETS)
def _moe_offsets(node, args, env):
    counts = np.bincount(args[0].reshape(-1), minlength=node.arg)
    return np.concatenate([[0], np.cumsum(counts)]).astype(np.int32)


@impl(Op.GROUPED_SWIGLU)
def _grouped_swiglu(node, args, env):
    xs, ws, offsets, *experts = args
    out = np.zeros((xs.shape[0], experts[2].shape[0]), np.float32)
    for e in np.nonzero(offsets[1:] > offsets[:-1])[0]:  # experts that own rows; the rest cost nothing
        lo, hi = int(offsets[e]), int(offsets[e + 1])
        gate, up, down = experts[3 * e: 3 * e + 3]
        h = _input_for(node, 3 + 3 * e, xs[lo:hi])
        g = h @ gate.T
        act = _input_for(node, 5 + 3 * e, (g * _sigmoid(g)) * (h @ up.T))
        out[lo:hi] = act @ down.T * ws[lo:hi, None]
    return out


@impl(Op.SCATTER_ADD)
def _scatter_add(node, args, env):
    base, index, rows = args
    out = np.array(base, dtype=node.dtype.numpy, copy=True)
    np.add.at(out, index, rows)
    return out
