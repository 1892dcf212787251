"""Cold start and peak memory of one artifact, each in a fresh process (the issue's two non-throughput targets).

    python bench/startup.py /tmp/dzc-bench/art-int4 [--context 4096] [--tokens 64] [--runs 5]

`load` is NativeExecutor construction in a new process (manifest, library, weights mapped; hashes checked as
`dzc run` does by default) and `first token` the first decode call after it. `peak RSS` is the process's
maximum resident set after a 64-token prompt and 64 decode steps; it is compared with what the run must hold:
the weight bytes the process touched (the mapped file, all of it once every expert has been read), the KV cache
for --context tokens and the Python interpreter with numpy (measured the same way, without loading anything).
Medians over --runs processes.
"""
from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

_CHILD = r"""
import json, resource, sys, time
t0 = time.perf_counter()
import numpy as np
base_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
if sys.argv[1] == "-":
    print(json.dumps({"base_rss": base_rss})); sys.exit()
from dzc.runtime.native_executor import NativeExecutor
t1 = time.perf_counter()
ex = NativeExecutor(sys.argv[1], max_context=int(sys.argv[2]), threads=2)
t2 = time.perf_counter()
ex.forward(np.array([3]))
t3 = time.perf_counter()
n = int(sys.argv[3])
ex.forward(np.arange(4, 4 + n) % ex.vocab_size)
for i in range(n):
    ex.forward(np.array([(7 * i + 11) % ex.vocab_size]))
print(json.dumps({"load": t2 - t1, "first": t3 - t2, "peak_rss": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024,
                  "kv": ex.kv_cache_bytes_per_token * int(sys.argv[2])}))
"""


def child(*args: str) -> dict:
    out = subprocess.run([sys.executable, "-c", _CHILD, *args], check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("artifact", type=Path)
    ap.add_argument("--context", type=int, default=4096)
    ap.add_argument("--tokens", type=int, default=64)
    ap.add_argument("--runs", type=int, default=5)
    a = ap.parse_args()
    man = json.loads((a.artifact / "manifest.json").read_text())
    weights = sum(size for name, size in man["file_sizes"].items() if name.endswith(".safetensors"))
    base = statistics.median(child("-")["base_rss"] for _ in range(a.runs))
    runs = [child(str(a.artifact), str(a.context), str(a.tokens)) for _ in range(a.runs)]
    med = {k: statistics.median(r[k] for r in runs) for k in runs[0]}
    budget = weights + med["kv"] + base + 150e6
    print(f"{a.artifact.name}: load {med['load'] * 1e3:.0f} ms, first token {med['first'] * 1e3:.0f} ms; "
          f"peak RSS {med['peak_rss'] / 1e6:.0f} MB = weights file {weights / 1e6:.0f} MB + KV cache "
          f"{med['kv'] / 1e6:.1f} MB ({a.context} tokens) + python/numpy {base / 1e6:.0f} MB + "
          f"{(med['peak_rss'] - weights - med['kv'] - base) / 1e6:+.0f} MB (target: under +150 MB; "
          f"{'met' if med['peak_rss'] <= budget else 'NOT met'})")


if __name__ == "__main__":
    main()
