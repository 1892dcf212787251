"""Per-kernel time of one artifact built with DZC_PROFILE=1 (entry functions count cycles around every call), and
the weight bytes each kind streams per second (decode: compare with bench/bandwidth.py).

    DZC_PROFILE=1 dzc compile ... -o OUT;  python bench/kernel_profile.py OUT [--decode 32] [--prefill 128]
"""
from __future__ import annotations

import argparse
import ctypes
import json
import time
from collections import defaultdict
from pathlib import Path

import numpy as np

from dzc.runtime.native_executor import NativeExecutor


def counters(ex: NativeExecutor, prog: str, n: int) -> np.ndarray:
    arr = (ctypes.c_int64 * n).in_dll(ex._lib, f"dzc_profile_{prog}")
    return np.frombuffer(arr, dtype=np.int64)


def weight_bytes_per_call(man: dict, prog: str) -> list[float]:
    """Weight bytes each call of `prog` reads (MoE expert stacks: only the top-k share of them)."""
    cfg = man["config"]
    frac = cfg.get("num_experts_per_tok", 1) / max(1, cfg.get("n_routed_experts", 1))
    item = {"f32": 4, "f16": 2, "u16": 2, "i8": 1, "u8": 1, "i32": 4}
    slots = man["slots"]
    out = []
    for call in man["call_slots"][prog]:
        total = 0.0
        for i in call:
            s = slots[i]
            if s["kind"] != "weight" or s["info"].get("weight") == "model.embed_tokens.weight":
                continue
            n = max(sum(c for _, c in p) for p in s["sizes"]) * item[s["dtype"]]
            total += n * (frac if "stack" in s["info"] else 1.0)
        out.append(total)
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("artifact")
    ap.add_argument("--decode", type=int, default=32)
    ap.add_argument("--prefill", type=int, default=128)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    man = json.loads((Path(a.artifact) / "manifest.json").read_text())
    if not man.get("profile"):
        raise SystemExit("artifact was not built with DZC_PROFILE=1")
    ex = NativeExecutor(a.artifact, max_context=a.prefill + a.decode + 8, threads=a.threads,
                        prefill_chunk=max(1, a.prefill), verify=False)
    kinds = man["kernels"]
    rng = np.random.default_rng(0)
    for prog, steps in (("prefill", 1), ("decode", a.decode)):
        sched = man["schedule"][prog]
        c = counters(ex, prog, len(sched))
        ex.reset()
        if prog == "decode":
            ex.forward(rng.integers(2, man["vocab_size"], 8))
        c[:] = 0
        t0 = time.perf_counter()
        if prog == "prefill":
            ex.forward(rng.integers(2, man["vocab_size"], a.prefill))
        else:
            for _ in range(steps):
                ex.forward(rng.integers(2, man["vocab_size"], 1))
        wall = time.perf_counter() - t0
        total = c.sum()
        by_kind: dict[str, int] = defaultdict(int)
        bytes_by_kind: dict[str, float] = defaultdict(float)
        for name, cyc, nbytes in zip(sched, c, weight_bytes_per_call(man, prog)):
            by_kind[kinds[name]] += int(cyc)
            bytes_by_kind[kinds[name]] += nbytes
        per = a.prefill if prog == "prefill" else steps
        print(f"== {prog}: {per / wall:.1f} tok/s over {per} tokens; {len(sched)} calls per step")
        print(f"  {'kind':18s} {'time':>6s}  {'ms/step':>8s}  weight GB/s")
        for kind, cyc in sorted(by_kind.items(), key=lambda kv: -kv[1]):
            sec = wall * cyc / total / steps
            rate = f"{bytes_by_kind[kind] / sec / 1e9:8.1f}" if bytes_by_kind[kind] and sec else ""
            print(f"  {kind:18s} {100 * cyc / total:5.1f}%  {sec * 1e3:8.3f}  {rate}")
        top = sorted(range(len(sched)), key=lambda i: -c[i])[:8]
        for i in top:
            print(f"    call {i:4d} {sched[i]:28s} {100 * c[i] / total:5.1f}%")


if __name__ == "__main__":
    main()
