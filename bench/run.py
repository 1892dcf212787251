"""dzc on the CPU vs PyTorch eager on one synthetic DeepSeek-V3-shaped checkpoint, as a llama-bench-shaped table.

    python bench/make_checkpoint.py /tmp/dzc-bench/dsv3-bf16
    python bench/make_checkpoint.py /tmp/dzc-bench/dsv3-fp8 --fp8
    python bench/run.py --bf16 /tmp/dzc-bench/dsv3-bf16 --fp8 /tmp/dzc-bench/dsv3-fp8 --work /tmp/dzc-bench

pp512: prompt processing, 512 new tokens on an empty cache (one prefill call). tg128: 128 tokens generated one
at a time (128 decode calls) from an empty cache. t/s is the median over --reps runs (± half the min-max
spread). `GB/tok` is the weight bytes one decode step reads (dense weights, the shared experts and top-k of the
routed experts, lm_head); `roof t/s` = measured read bandwidth / GB/tok; `%roof` = tg t/s / roof t/s. Each
rep (one pp and one tg run) sits between two bandwidth measurements and their mean is that rep's roofline; `roof
t/s` and `%roof` are medians over the reps of the per-rep values. On a shared VM the bandwidth drifts by tens of
percent within minutes, so one figure for the whole table, or even one per row, would misstate rows.
Artifacts are compiled into --work once and reused until the dzc sources change. Not a test: run it on a quiet
machine.

llama.cpp rows (`--llama-cpp DIR`, default --work/llama.cpp; `--llama-cpp ''` skips them): bench/llama_cpp_bench.py
downloads the llama-cpp-python sdist (it vendors llama.cpp), builds llama-bench and llama-quantize (CPU, native,
-j 2; the first run takes a while), converts the bf16 checkpoint with the vendored convert_hf_to_gguf.py to a
BF16 GGUF (the checkpoint has no tokenizer: the converter reads DIR/hf-view, symlinks plus a small byte-level
BPE tokenizer, see bench/llama_cpp_bench.py), quantizes it to Q8_0 and Q4_K_M, and runs
`llama-bench -m X.gguf -p PP -n TG -t T -r REPS -o json` (its per-rep samples, so the same median ± half range).
Their GB/tok comes from the GGUF's tensor sizes the same way (every non-expert tensor, top-k/n_experts of the
routed-expert tensors, one token_embd row). `vs llama.cpp` = dzc t/s / llama.cpp t/s at the same bits per weight
and threads: bf16 vs BF16, int8 vs Q8_0, int4 vs Q4_K_M. Just llama.cpp, every step cached in DIR:

    python bench/llama_cpp_bench.py --ckpt /tmp/dzc-bench/dsv3-bf16 --work /tmp/dzc-bench/llama.cpp --threads 1 2 --reps 3

If a llama.cpp step fails, one line says which (and names its log) and the table comes without those rows.
"""
from __future__ import annotations

import argparse
import functools
import gc
import hashlib
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Callable

import numpy as np


@functools.cache
def compiler_digest() -> str:
    """sha256 of the dzc sources the compiler imports: every loaded dzc package's folders (an editable install maps
    codegen/, ir/, ... into the namespace from outside dzc/, so dzc.__path__ alone would miss them)."""
    import dzc.codegen.compile  # noqa: F401  (with dzc.driver: the compiler's subpackages)
    import dzc.driver  # noqa: F401
    dirs = {Path(p) for name, m in list(sys.modules.items()) if name.split(".")[0] == "dzc"
            for p in getattr(m, "__path__", [])}
    h = hashlib.sha256()
    for f in sorted({f for d in dirs for f in d.rglob("*.py")}):
        h.update(f.name.encode() + b"\0" + f.read_bytes())
    return h.hexdigest()


def compile_if_stale(ckpt: Path, out: Path, quant, threads: int) -> Path:
    """Reuse the artifact in `out` only if this dzc source compiled it from `ckpt` with `quant` (recorded next to it
    in OUT.source): after a kernel change the table must not time the old code. Profiling builds are recompiled."""
    stamp = out.parent / (out.name + ".source")
    want = json.dumps({"dzc": compiler_digest(), "checkpoint": str(ckpt.resolve()), "quant": quant})
    man = out / "manifest.json"
    if man.is_file() and stamp.is_file() and stamp.read_text() == want and not json.loads(man.read_text()).get("profile"):
        return out
    from dzc.driver import compile_checkpoint
    t0 = time.time()
    print(f"compiling {ckpt.name} quant={quant} -> {out}", file=sys.stderr, flush=True)
    stamp.unlink(missing_ok=True)
    compile_checkpoint(ckpt, out, quant=quant, threads=threads)
    stamp.write_text(want)
    print(f"  {time.time() - t0:.0f} s", file=sys.stderr, flush=True)
    return out


def active_bytes(art: Path) -> tuple[float, float]:
    """(bytes read per decode step, bytes of all weights)."""
    man = json.loads((art / "manifest.json").read_text())
    cfg = man["config"]
    frac = cfg.get("num_experts_per_tok", 1) / max(1, cfg.get("n_routed_experts", 1))
    item = {"f32": 4, "f16": 2, "u16": 2, "i8": 1, "u8": 1, "i32": 4}
    slots = man["slots"]
    used = {i for call in man["call_slots"]["decode"] for i in call}
    per_tok = total = 0.0
    for s in slots:
        if s["kind"] != "weight":
            continue
        n = max(sum(c for _, c in p) for p in s["sizes"]) * item[s["dtype"]]
        total += n
        if s["info"].get("weight") == "model.embed_tokens.weight" and not cfg.get("tie_word_embeddings"):
            per_tok += n / cfg["vocab_size"]        # one row is gathered per token
        elif s["index"] in used:
            per_tok += n * (frac if "stack" in s["info"] else 1.0)
    return per_tok, total


def timed(fn, reps: int) -> list[float]:
    out = []
    for _ in range(reps):
        gc.collect()
        t0 = time.perf_counter()
        fn()
        out.append(time.perf_counter() - t0)
    return out


def dzc_rep(art: Path, threads: int, pp: int, tg: int, vocab: int) -> Callable[[], dict]:
    """Load and warm `art`; returns one rep: {'pp': [t/s], 'tg': [t/s]}."""
    from dzc.runtime.native_executor import NativeExecutor
    ex = NativeExecutor(art, max_context=pp + tg + 8, threads=threads, prefill_chunk=pp, verify=False)
    rng = np.random.default_rng(0)
    prompt = rng.integers(2, vocab, pp)

    def run_pp():            # logits of the last token only, as llama-bench's pp (and generation) computes them
        ex.reset()
        ex.forward(prompt, last_only=True)

    def run_tg():
        ex.reset()
        tok = 5
        for _ in range(tg):
            tok = int(ex.forward(np.array([tok]))[0].argmax())
    run_pp()   # warm the page cache and the code
    ex.reset()
    for _ in range(8):
        ex.forward(np.array([3]))
    return lambda: {"pp": [pp / t for t in timed(run_pp, 1)], "tg": [tg / t for t in timed(run_tg, 1)]}


def torch_model(ckpt: Path, dtype: str):
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from dzc.checkpoint.loader import Checkpoint
    cfg = DeepseekV3Config.from_pretrained(ckpt)
    if hasattr(cfg, "quantization_config"):
        del cfg.quantization_config
    cfg._attn_implementation = "eager"
    tdt = {"bf16": torch.bfloat16, "f32": torch.float32}[dtype]
    with torch.device("meta"):
        model = DeepseekV3ForCausalLM(cfg)
    ck = Checkpoint.open(ckpt)
    state = {}
    for name, t in model.state_dict().items():
        if name.endswith("experts.gate_up_proj"):
            pre = name[: -len("gate_up_proj")]
            arr = np.stack([np.concatenate([ck.f32(f"{pre}{e}.gate_proj.weight"), ck.f32(f"{pre}{e}.up_proj.weight")])
                            for e in range(t.shape[0])])
        elif name.endswith("experts.down_proj"):
            pre = name[: -len("down_proj")]
            arr = np.stack([ck.f32(f"{pre}{e}.down_proj.weight") for e in range(t.shape[0])])
        else:
            arr = ck.f32(name)
        want = torch.float32 if name.endswith("e_score_correction_bias") else tdt
        state[name] = torch.from_numpy(np.array(arr, np.float32)).to(want)
    model.load_state_dict(state, strict=True, assign=True)
    model.model.rotary_emb = type(model.model.rotary_emb)(config=cfg)   # buffers not in the state dict
    model.eval()
    return model


def bench_torch(ckpt: Path, dtype: str, threads: int, pp: int, tg: int, reps: int, vocab: int) -> dict:
    import torch
    torch.set_num_threads(threads)
    model = torch_model(ckpt, dtype)
    rng = np.random.default_rng(0)
    prompt = torch.tensor(rng.integers(2, vocab, pp))[None]

    @torch.no_grad()
    def run_pp():            # last token's logits only, like dzc's and llama.cpp's pp
        model(input_ids=prompt, use_cache=False, logits_to_keep=1)

    @torch.no_grad()
    def run_tg():
        from transformers import DynamicCache
        cache = DynamicCache(config=model.config)
        tok = torch.tensor([[5]])
        for _ in range(tg):
            out = model(input_ids=tok, past_key_values=cache, use_cache=True)
            tok = out.logits[:, -1].argmax(-1, keepdim=True)
    run_pp()
    return {"pp": [pp / t for t in timed(run_pp, reps)], "tg": [tg / t for t in timed(run_tg, reps)]}


def fmt_rate(xs: list[float]) -> str:
    med = statistics.median(xs)
    return f"{med:8.2f} ± {(max(xs) - min(xs)) / 2:.2f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--bf16", type=Path, required=True, help="bf16 checkpoint (bench/make_checkpoint.py)")
    ap.add_argument("--fp8", type=Path, default=None, help="FP8 variant of the same shape")
    ap.add_argument("--work", type=Path, default=Path("/tmp/dzc-bench"))
    ap.add_argument("--formats", default="f32,bf16,fp8,int8,int4")
    ap.add_argument("--threads", type=int, nargs="*", default=[2])
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--torch", default="bf16,f32", help="PyTorch eager dtypes to run ('' to skip)")
    ap.add_argument("--bandwidth-mb", type=int, default=1024)
    ap.add_argument("--llama-cpp", default=None, metavar="DIR",
                    help="llama.cpp work folder (bench/llama_cpp_bench.py; default --work/llama.cpp, '' to skip)")
    a = ap.parse_args()
    from bandwidth import read_bandwidth
    cfg = json.loads((a.bf16 / "config.json").read_text())
    vocab = cfg["vocab_size"]
    rows = []
    seen_bw: list[float] = []

    def bracketed(t: int, reps: int, rep: Callable[[], dict]) -> tuple[dict, list[float]]:
        """`reps` runs of rep(), each between two bandwidth measurements: (their results, each rep's mean GB/s)."""
        out: dict = {}
        bws = []
        for _ in range(reps):
            before = read_bandwidth(a.bandwidth_mb, t)
            r = rep()
            after = read_bandwidth(a.bandwidth_mb, t)
            seen_bw.extend((before, after))
            bws.append((before + after) / 2)
            for key, val in r.items():
                out[key] = out.get(key, []) + val if isinstance(val, list) else val
        return out, bws
    for fmt in [f for f in a.formats.split(",") if f]:
        if fmt == "fp8":
            if a.fp8 is None:
                continue
            art = compile_if_stale(a.fp8, a.work / "art-fp8", None, max(a.threads))
        else:
            art = compile_if_stale(a.bf16, a.work / f"art-{fmt}", None if fmt == "bf16" else fmt, max(a.threads))
        per_tok, total = active_bytes(art)
        for t in a.threads:
            r, bws = bracketed(t, a.reps, dzc_rep(art, t, a.pp, a.tg, vocab))
            rows.append((f"dsv3-synth {fmt}", total, "dzc-cpu", t, r, per_tok, [bw * 1e9 / per_tok for bw in bws]))
            print(f"done dzc {fmt} threads={t}", file=sys.stderr, flush=True)
    for dt in [d for d in a.torch.split(",") if d]:
        for t in a.threads:
            r = bench_torch(a.bf16, dt, t, a.pp, a.tg, max(1, a.reps - 1), vocab)
            nbytes = {"bf16": 2, "f32": 4}[dt]
            rows.append((f"dsv3-synth {dt}", None, "torch-eager", t, r, None, None, nbytes))
            print(f"done torch {dt} threads={t}", file=sys.stderr, flush=True)
    lc_dir = a.work / "llama.cpp" if a.llama_cpp is None else (Path(a.llama_cpp) if a.llama_cpp else None)
    lc_note = bench_llama_cpp(lc_dir, a, bracketed, rows) if lc_dir is not None else None
    n_params = _params(cfg)
    if seen_bw:
        print(f"\nmachine read bandwidth: {min(seen_bw):.1f} to {max(seen_bw):.1f} GB/s over the run "
              f"(each rep's roofline: the mean of the measurements just before and after it)")
    print(f"model: {n_params / 1e9:.2f} B params, vocab {vocab}, {cfg['num_hidden_layers']} layers, "
          f"{cfg['n_routed_experts']} experts top-{cfg['num_experts_per_tok']}")
    if lc_note:
        print(lc_note)
    print()
    llama = {(row[0].split()[-1], row[3]): row[4] for row in rows if row[2] == LLAMA_BACKEND}
    vs = " vs llama.cpp |" if llama else ""
    print("| model | size | params | backend | threads | test | t/s | GB/tok | roof t/s | %roof |" + vs)
    print("| --- | ---: | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |" + (" ---: |" if llama else ""))
    for row in rows:
        name, total, backend, t, r, per_tok, roofs = row[:7]
        size = f"{total / 2**30:.2f} GiB" if total else f"{n_params * row[7] / 2**30:.2f} GiB"
        for test in ("pp", "tg"):
            label = f"{test}{a.pp if test == 'pp' else a.tg}"
            extra = "| | |"
            if test == "tg" and per_tok:
                frac = statistics.median(tg / roof for tg, roof in zip(r["tg"], roofs))
                extra = f"| {per_tok / 1e9:.3f} | {statistics.median(roofs):.1f} | {100 * frac:.0f}% |"
            elif test == "tg":
                extra = "| | | |"
            else:
                extra = "| | | |"
            if llama:
                ref = llama.get((VS_LLAMA.get(name.split()[-1], ""), t)) if backend == "dzc-cpu" else None
                extra += f" {statistics.median(r[test]) / statistics.median(ref[test]):.2f}x |" if ref else " |"
            print(f"| {name} | {size} | {n_params / 1e9:.2f} B | {backend} | {t} | {label} | {fmt_rate(r[test])} {extra}")
    return 0


LLAMA_BACKEND = "llama.cpp-cpu"
VS_LLAMA = {"bf16": "BF16", "int8": "Q8_0", "int4": "Q4_K_M"}     # dzc format -> llama.cpp type, same bits/weight


def bench_llama_cpp(work: Path, a: argparse.Namespace, bracketed: Callable, rows: list) -> str | None:
    """Append llama.cpp rows (BF16, Q8_0, Q4_K_M) to rows; returns a note for the header. A failing step prints
    one line and adds nothing more."""
    import llama_cpp_bench as llama_cpp
    try:
        binp, ggufs = llama_cpp.prepare(a.bf16, work, max(a.threads))
        src = llama_cpp.source(work.resolve())
        build = ""
        for q, path in ggufs.items():
            info = llama_cpp.gguf_info(path, src)
            for t in a.threads:
                r, bws = bracketed(t, a.reps, lambda: llama_cpp.llama_bench(binp, path, t, a.pp, a.tg, 1))
                build = build or r.get("build", "")
                rows.append((f"dsv3-synth {q}", info["total_bytes"], LLAMA_BACKEND, t, r, info["per_tok_bytes"],
                             [bw * 1e9 / info["per_tok_bytes"] for bw in bws]))
                print(f"done llama.cpp {q} threads={t}", file=sys.stderr, flush=True)
        return (f"llama.cpp: {src.parent.parent.name} sdist, build {build}, GGUF arch {info['arch']}, "
                f"{info['expert_count']} experts top-{info['expert_used_count']} (llama-bench)")
    except Exception as e:       # one line, then the table without (the rest of) these rows
        msg = str(e) if isinstance(e, llama_cpp.LlamaCppError) else f"{type(e).__name__}: {e}"
        print(f"llama.cpp: {msg}; the table goes on without (the rest of) its rows", file=sys.stderr, flush=True)
        return None


def _params(cfg: dict) -> int:
    h, L, E = cfg["hidden_size"], cfg["num_hidden_layers"], cfg["n_routed_experts"]
    qk = cfg["qk_nope_head_dim"] + cfg["qk_rope_head_dim"]
    heads = cfg["num_attention_heads"]
    attn = (cfg["q_lora_rank"] * h + heads * qk * cfg["q_lora_rank"] + (cfg["kv_lora_rank"] + cfg["qk_rope_head_dim"]) * h
            + heads * (cfg["qk_nope_head_dim"] + cfg["v_head_dim"]) * cfg["kv_lora_rank"] + h * heads * cfg["v_head_dim"])
    moe = 3 * h * cfg["moe_intermediate_size"] * (E + cfg["n_shared_experts"]) + E * h
    dense = 3 * h * cfg["intermediate_size"]
    return L * attn + dense + (L - 1) * moe + 2 * cfg["vocab_size"] * h


if __name__ == "__main__":
    sys.path.insert(0, str(Path(__file__).parent))
    sys.exit(main())
