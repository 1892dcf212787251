"""Decode speed at several context depths (llama-bench's `-d`): tg after a prompt of `depth` tokens.

    python bench/depth.py /tmp/dzc-bench/art-int4 [--depths 0 1024 4096] [--tg 32] [--reps 3]

tg128 in bench/run.py starts from an empty cache, where attention is ~1% of a step; at depth d every layer's
attention reads d rows of the latent cache (576 f32 each for DeepSeek-V3's MLA) for all heads, and at a few
thousand tokens it is most of the step. Prints tok/s (median of --reps) per depth and the ratio to depth 0.
"""
from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import numpy as np

from dzc.runtime.native_executor import NativeExecutor


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--depths", type=int, nargs="+", default=[0, 1024, 4096])
    ap.add_argument("--tg", type=int, default=32)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=None)
    a = ap.parse_args()
    vocab = json.loads((a.artifact / "manifest.json").read_text())["vocab_size"]
    ex = NativeExecutor(a.artifact, max_context=max(a.depths) + a.tg + 8, threads=a.threads, prefill_chunk=512,
                        verify=False)
    rng = np.random.default_rng(0)
    base = None
    print(f"| depth | tg{a.tg} t/s | vs depth {a.depths[0]} |\n| ---: | ---: | ---: |")
    for depth in a.depths:
        rates = []
        for _ in range(a.reps):
            ex.reset()
            if depth:
                ex.forward(rng.integers(2, vocab, depth), last_only=True)
            t0 = time.perf_counter()
            for _ in range(a.tg):
                ex.forward(rng.integers(2, vocab, 1))
            rates.append(a.tg / (time.perf_counter() - t0))
        rate = statistics.median(rates)
        base = base or rate
        print(f"| {depth} | {rate:.1f} | {rate / base:.2f} |", flush=True)


if __name__ == "__main__":
    main()
