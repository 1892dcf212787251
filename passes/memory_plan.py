"""memory-plan: place every intermediate buffer of the final program in one static arena.

Buffers: every node that launches a kernel (passes/views.py) gets one; free views (contiguous reshapes and
slices) share their base's buffer and extend its lifetime; leaves live elsewhere (inputs are the caller's,
weights are the weight store's). Program outputs are planned too and live to the end of the program, where
the runtime copies them out (logits) or appends them to the KV cache (cache rows).

Sizes: a shape may use the symbols T (new tokens) and P (tokens already cached). A buffer's size is its byte
count maximised over every legal call: T <= max_tokens (1 in the decode program, where T does not occur),
P + T <= max_context. Both come from the pass's arguments, else ctx.facts["max-tokens"] / ["max-context"], else
512 and min(4096, the model's max_position_embeddings). Sizes are affine with non-negative coefficients, so the maximum is at a vertex of that
region: (T = max_tokens, P = max_context - max_tokens) or (T = 1, P = max_context - 1). Decode sizes are exact
for the longest context; prefill sizes are exact bounds for the largest chunk.

Placement: liveness over the topological order (a buffer is live from the kernel that writes it to its last
reader), then greedy best-fit by size: buffers in decreasing size (ties: earlier first) each take the smallest
gap, among the buffers already placed whose lifetimes overlap it, that fits (else the arena's end). Offsets
and sizes are multiples of 64 bytes.

The plan goes to ctx.facts["memory-plan"] (a `MemoryPlan`, a mapping node -> (offset, bytes)). It refers to the
program's nodes, so it must be the last pass. Invariant: the program is returned unchanged.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Iterator, Mapping, Optional

import numpy as np

from dzc.ir.node import Node
from dzc.ir.program import Program
from dzc.ir.shapes import Shape, Sym, evaluate_shape
from dzc.passes.base import PassContext
from dzc.passes.views import is_kernel, is_free_view, view_base

ALIGN = 64
DEFAULT_MAX_TOKENS = 512
DEFAULT_MAX_CONTEXT = 4096


def _align(n: int) -> int:
    return (n + ALIGN - 1) // ALIGN * ALIGN


def call_bounds(max_tokens: int, max_context: int, symbols: set[str]) -> list[dict[str, int]]:
    """The vertices of {1 <= T <= max_tokens, P >= 0, P + T <= max_context} that matter for affine sizes."""
    if "T" not in symbols:
        return [{"P": max_context - 1, "T": 1}]
    top = min(max_tokens, max_context)
    return [{"T": top, "P": max_context - top}, {"T": 1, "P": max_context - 1}]


def buffer_bytes(shape: Shape, itemsize: int, envs: list[dict[str, int]]) -> int:
    most = 0
    for env in envs:
        count = 1
        for d in evaluate_shape(shape, env):
            count *= d
        most = max(most, count * itemsize)
    return most


@dataclass
class MemoryPlan(Mapping[Node, tuple[int, int]]):
    """node -> (offset, bytes) for every planned buffer; free views map to their base's slot."""

    program: str
    slots: dict[Node, tuple[int, int]]
    live: dict[Node, tuple[int, int]]   # node -> (first, last) step, in topological order of the program
    arena_bytes: int
    total_bytes: int   # the sum of all buffer sizes: what one buffer per value would need
    bounds: list[dict[str, int]] = field(default_factory=list)
    views: dict[Node, Node] = field(default_factory=dict)   # free view -> the node whose buffer it reads

    def __getitem__(self, node: Node) -> tuple[int, int]:
        base = self.views.get(node, node)
        return self.slots[base]

    def __iter__(self) -> Iterator[Node]:
        return iter(self.slots)

    def __len__(self) -> int:
        return len(self.slots)

    def summary(self) -> str:
        saved = 1 - self.arena_bytes / self.total_bytes if self.total_bytes else 0.0
        return (f"{len(self.slots)} buffers, arena {_bytes(self.arena_bytes)} vs {_bytes(self.total_bytes)} "
                f"unshared ({saved:.0%} saved)")


def _bytes(n: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n} B" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return f"{n} B"


def plan_memory(program: Program, max_tokens: int = DEFAULT_MAX_TOKENS,
                max_context: int = DEFAULT_MAX_CONTEXT) -> MemoryPlan:
    order = program.toposort()
    step = {id(n): i for i, n in enumerate(order)}
    symbols = {name for n in order for d in n.shape if isinstance(d, Sym) for name, _ in d.terms}
    envs = call_bounds(max_tokens, max_context, symbols)

    buffers = [n for n in order if is_kernel(n)]
    last: dict[int, int] = {id(n): step[id(n)] for n in buffers}
    views: dict[Node, Node] = {}
    for n in order:
        if is_free_view(n):
            views[n] = view_base(n)
        for s in n.src:   # a read through a chain of views keeps the viewed buffer alive
            base = view_base(s)
            if id(base) in last:
                last[id(base)] = max(last[id(base)], step[id(n)])
    end = len(order)
    for _, node in program.outputs:
        base = view_base(node)
        if id(base) in last:
            last[id(base)] = end

    size = {id(n): _align(buffer_bytes(n.shape, max(n.dtype.bits // 8, 1), envs)) for n in buffers}
    count = len(buffers)
    offsets, ends = np.zeros(count, np.int64), np.zeros(count, np.int64)     # of the buffers placed so far
    firsts, lasts = np.zeros(count, np.int64), np.zeros(count, np.int64)
    slots: dict[Node, tuple[int, int]] = {}
    for k, n in enumerate(sorted(buffers, key=lambda n: (-size[id(n)], step[id(n)]))):
        first, until, nbytes = step[id(n)], last[id(n)], size[id(n)]
        overlap = np.nonzero((firsts[:k] <= until) & (lasts[:k] >= first))[0]
        busy = sorted(zip(offsets[overlap].tolist(), ends[overlap].tolist()))
        best: Optional[tuple[int, int]] = None   # (gap size, offset)
        cursor = 0
        for lo, hi in busy:
            if lo - cursor >= nbytes and (best is None or lo - cursor < best[0]):
                best = (lo - cursor, cursor)
            cursor = max(cursor, hi)
        offset = best[1] if best is not None else cursor
        offsets[k], ends[k], firsts[k], lasts[k] = offset, offset + nbytes, first, until
        slots[n] = (offset, nbytes)
    arena = int(ends.max()) if count else 0
    slots = {n: slots[n] for n in buffers}   # topological order, for stable iteration
    live = {n: (step[id(n)], last[id(n)]) for n in buffers}
    return MemoryPlan(program.name, slots, live, arena, sum(size.values()), envs, views)


def check_plan(plan: MemoryPlan) -> None:
    """No two buffers that are live at the same time overlap (raises AssertionError naming both)."""
    items = list(plan.slots.items())
    for i, (a, (oa, ba)) in enumerate(items):
        fa, la = plan.live[a]
        for b, (ob, bb) in items[i + 1:]:
            fb, lb = plan.live[b]
            if fa <= lb and fb <= la and oa < ob + bb and ob < oa + ba:
                raise AssertionError(f"buffers {a!r} and {b!r} overlap while both live")


class MemoryPlanPass:
    name = "memory-plan"
    description = "liveness + best-fit placement of every kernel's output in one static arena (program unchanged)"

    def __init__(self, max_tokens: Optional[int] = None, max_context: Optional[int] = None) -> None:
        self.max_tokens = max_tokens
        self.max_context = max_context

    def run(self, program: Program, ctx: PassContext) -> Program:
        max_context = self.max_context or ctx.facts.get("max-context") or DEFAULT_MAX_CONTEXT
        limit = getattr(ctx.config, "max_position_embeddings", None)
        if self.max_context is None and "max-context" not in ctx.facts and limit:
            max_context = min(max_context, limit)
        max_tokens = min(self.max_tokens or ctx.facts.get("max-tokens") or DEFAULT_MAX_TOKENS, max_context)
        plan = plan_memory(program, max_tokens, max_context)
        ctx.facts[self.name] = plan   # "memory-plan": the last program planned; all of them by name below
        ctx.facts.setdefault("memory-plans", {})[program.name] = plan
        return program
