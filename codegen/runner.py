"""Compile any program for this CPU and run it on numpy inputs, like `Interpreter.run` (tests, `dzc ir` checks).

    outs = NativeProgram(program, store).run({"x": x, "tokens": ids})

Inputs are bound to their slots by name; a cache input (an input that is also an output) must be given with
spare rows: the program reads rows [0, P) and writes its new rows at P, in place (P and T come from the shapes).
"""
from __future__ import annotations

from typing import Mapping, Optional

import numpy as np

from dzc.codegen.compile import lower_programs, pack_slots
from dzc.codegen.jit import JitModule
from dzc.codegen.target import Target, host_target
from dzc.ir.interpreter import bind_symbols
from dzc.ir.program import Program
from dzc.runtime.native_executor import _NP, plan_arena, poly_eval, _aligned_empty


def run_env(program: Program, inputs: Mapping[str, np.ndarray],
            cache_rows: Optional[Mapping[str, int]] = None) -> dict[str, int]:
    """T and P for one run. Cache inputs arrive at full capacity; `cache_rows[name]` rows of them are in use."""
    cache_rows = dict(cache_rows or {})
    shaped = {}
    for node in program.inputs:
        a = np.asarray(inputs[node.arg])
        shaped[node.arg] = a[: cache_rows[node.arg]] if node.arg in cache_rows else a
    env = bind_symbols(program, shaped)
    env.setdefault("T", 1)
    env.setdefault("P", 0)
    return env


class NativeProgram:
    def __init__(self, program: Program, store, target: Optional[Target] = None, threads: int = 2) -> None:
        self.program = program
        self.target = target or host_target()
        self.module, self.slots = lower_programs({program.name: program}, store, self.target)
        self.jit = JitModule(self.module, self.target, threads)
        self.weights = {name: arr for name, (_, arr) in pack_slots(self.slots, store).items()}

    def run(self, inputs: Mapping[str, np.ndarray], cache_rows: Optional[Mapping[str, int]] = None
            ) -> dict[str, np.ndarray]:
        """Run once. For cache inputs pass the full-capacity array and `cache_rows[name]` = P (rows in use)."""
        env = run_env(self.program, inputs, cache_rows)
        slots = [self._slot_json(s) for s in self.slots.slots]
        total, offsets = plan_arena(slots, {self.program.name: env})
        arena = _aligned_empty(total)
        arrays: list[np.ndarray] = []
        outs: dict[str, np.ndarray] = {}
        for s, js in zip(self.slots.slots, slots):
            dt = np.dtype(_NP[js["dtype"]])
            if s.kind == "weight":
                arr = np.ascontiguousarray(self.weights[s.name])
            elif s.kind in ("input", "cache"):
                arr = np.ascontiguousarray(inputs[s.name], dtype=dt)
            elif s.kind == "output":
                arr = np.zeros(max(1, max(poly_eval(p, env) for p in js["sizes"])), dt)
                outs[s.name] = arr
            else:
                arr = arena[offsets[s.index]:] if s.index in offsets else arena
            arrays.append(arr)
        self._keep = arrays
        import ctypes
        table = (ctypes.c_void_p * max(1, len(arrays)))(*[a.ctypes.data for a in arrays])
        getattr(self.jit.lib, f"dzc_{self.program.name}")(table, ctypes.c_int64(env["T"]), ctypes.c_int64(env["P"]))
        result = {}
        for name, node in self.program.outputs:
            if name in outs:
                shape = tuple(int(poly) for poly in _shape(node, env))
                result[name] = outs[name][: int(np.prod(shape))].reshape(shape).copy()
            else:   # cache rows written at row P
                arr = arrays[[s.index for s in self.slots.slots if s.kind == "cache" and s.name == name][0]]
                p = env["P"]
                result[name] = arr[p: p + int(_shape(node, env)[0])].copy()
        return result

    @staticmethod
    def _slot_json(s) -> dict:
        return {"index": s.index, "kind": s.kind, "dtype": s.dtype.name, "sizes": [p.to_json() for p in s.sizes],
                "program": s.program, "live": list(s.live)}


def _shape(node, env) -> tuple:
    from dzc.ir.shapes import evaluate_shape
    return evaluate_shape(node.shape, env)
