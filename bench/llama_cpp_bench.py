"""llama.cpp on the same synthetic checkpoint: fetch, build, convert, quantize, run llama-bench.

    python bench/llama_cpp_bench.py --ckpt /tmp/dzc-bench/dsv3-bf16 --work /tmp/dzc-bench/llama.cpp --threads 1 2 --reps 3

Every step is cached in --work (outside the repo) and skipped when its output exists:
  1. source: `pip download --no-deps --no-binary :all: llama-cpp-python` (the sdist vendors llama.cpp under
     vendor/llama.cpp), unpacked into WORK/src. Pin a version with --version.
  2. build: cmake Release, CPU only, -DGGML_NATIVE=ON, static, no tests/examples/server/app/openssl; only the
     llama-bench and llama-quantize targets, -j 2, into WORK/build (log: WORK/build.log).
  3. convert: the vendored convert_hf_to_gguf.py (gguf-py from the vendored tree, torch/transformers/numpy from
     this interpreter) to WORK/dsv3-BF16.gguf (log: WORK/convert.log). The checkpoint has no tokenizer and the
     converter needs one, so it reads WORK/hf-view: symlinks to the checkpoint's files plus a small byte-level BPE
     tokenizer written here (GPT-2 pre-tokenizer, 2 specials + 256 byte tokens + 702 merges = 960 ids; the
     converter fills the rest of vocab_size with [PAD] entries). The converter names a BPE pre-tokenizer by hashing the ids of a test string against known
     models, which no synthetic vocabulary matches; `convert` runs it through a shim that answers "gpt-2" (the
     regex this tokenizer does use) when, and only when, that lookup fails. The checkpoint folder is not touched,
     so dzc keeps seeing a tokenizer-less checkpoint. Tokens never matter to llama-bench (it feeds random ids).
  4. quantize: llama-quantize BF16 -> Q8_0 and Q4_K_M (log: WORK/quantize-*.log).
  5. bench: `llama-bench -m X.gguf -p PP -n TG -t T -r REPS -o json`; per-rep t/s samples (samples_ts) when the
     build reports them, else avg ± stddev.

Any failing step raises LlamaCppError with a one-line message naming the log; bench/run.py prints it and goes on.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tarfile
import time
from pathlib import Path

QUANTS = ("BF16", "Q8_0", "Q4_K_M")


class LlamaCppError(RuntimeError):
    """A failed step, as one line."""

    def __init__(self, msg: str):
        super().__init__(" ".join(str(msg).split()))


def _run(cmd: list, log: Path, step: str, cwd: Path | None = None, env: dict | None = None) -> None:
    with open(log, "a") as f:
        f.write(f"\n$ {' '.join(map(str, cmd))}\n")
        f.flush()
        try:
            rc = subprocess.run([str(c) for c in cmd], stdout=f, stderr=subprocess.STDOUT, cwd=cwd, env=env,
                                check=False).returncode
        except OSError as e:
            raise LlamaCppError(f"{step}: cannot run {cmd[0]}: {e}") from None
    if rc != 0:
        tail = ""
        lines = [ln.strip() for ln in log.read_text(errors="replace").splitlines() if ln.strip()]
        if lines:
            tail = f": {lines[-1][:160]}"
        raise LlamaCppError(f"{step} failed (exit {rc}){tail} [log: {log}]")


def _say(msg: str) -> None:
    print(f"llama.cpp: {msg}", file=sys.stderr, flush=True)


def source(work: Path, version: str | None = None) -> Path:
    """The vendored llama.cpp tree of the llama-cpp-python sdist, downloaded and unpacked once."""
    found = sorted((work / "src").glob("*/vendor/llama.cpp/CMakeLists.txt"))
    if found:
        return found[-1].parent
    dl = work / "dl"
    dl.mkdir(parents=True, exist_ok=True)
    sdists = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
    if not sdists:
        _say("downloading the llama-cpp-python sdist")
        spec = f"llama-cpp-python=={version}" if version else "llama-cpp-python"
        _run([sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:", spec, "-d", dl],
             work / "download.log", "download")
        sdists = sorted(dl.glob("llama_cpp_python-*.tar.gz"))
        if not sdists:
            raise LlamaCppError(f"download: no llama_cpp_python-*.tar.gz in {dl}")
    _say(f"unpacking {sdists[-1].name}")
    try:
        with tarfile.open(sdists[-1]) as tf:
            tf.extractall(work / "src", filter="data")
    except (OSError, tarfile.TarError) as e:
        raise LlamaCppError(f"unpack {sdists[-1]}: {e}") from None
    found = sorted((work / "src").glob("*/vendor/llama.cpp/CMakeLists.txt"))
    if not found:
        raise LlamaCppError(f"unpack: {sdists[-1].name} has no vendor/llama.cpp")
    return found[-1].parent


def build(src: Path, work: Path, jobs: int = 2) -> Path:
    """Build llama-bench and llama-quantize (CPU, native, Release); returns the bin folder."""
    bdir = work / "build"
    binp = bdir / "bin"
    if (binp / "llama-bench").is_file() and (binp / "llama-quantize").is_file():
        return binp
    log = work / "build.log"
    gen = ["-G", "Ninja"] if _which("ninja") else []
    _say(f"building llama-bench and llama-quantize with -j {jobs} (log: {log})")
    t0 = time.time()
    _run(["cmake", "-S", src, "-B", bdir, *gen, "-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON",
          "-DBUILD_SHARED_LIBS=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_EXAMPLES=OFF",
          "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_APP=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_CURL=OFF",
          "-DGGML_BACKEND_DL=OFF"], log, "cmake configure")
    _run(["cmake", "--build", bdir, "--config", "Release", "--target", "llama-bench", "llama-quantize",
          "-j", str(jobs)], log, "cmake build")
    _say(f"built in {time.time() - t0:.0f} s")
    return binp


def _which(name: str) -> bool:
    return any((Path(p) / name).is_file() for p in os.environ.get("PATH", "").split(os.pathsep) if p)


def write_tokenizer(folder: Path) -> None:
    """A byte-level BPE tokenizer (GPT-2 pre-tokenizer): ids 0/1 = bos/eos, 2..257 = the 256 byte symbols, then
    merges of space+letter and letter+letter. Deterministic; only there so the converter has a vocabulary to write."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    vocab = {"<|bos|>": 0, "<|eos|>": 1}
    for ch in sorted(pre_tokenizers.ByteLevel.alphabet()):
        vocab[ch] = len(vocab)
    letters = list("abcdefghijklmnopqrstuvwxyz")      # printable ASCII is its own byte-level symbol
    space = "\u0120"                                  # the byte-level symbol of b" " ("Ġ")
    merges = [(space, c) for c in letters] + [(x, y) for x in letters for y in letters]
    for x, y in merges:
        vocab[x + y] = len(vocab)
    tok = Tokenizer(models.BPE(vocab=vocab, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens(["<|bos|>", "<|eos|>"])
    tok.save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps({
        "tokenizer_class": "PreTrainedTokenizerFast", "bos_token": "<|bos|>", "eos_token": "<|eos|>",
        "add_bos_token": False, "add_eos_token": False, "model_max_length": 4096}, indent=1) + "\n")


def hf_view(ckpt: Path, work: Path) -> Path:
    """WORK/hf-view: symlinks to the checkpoint's files plus tokenizer files (the checkpoint itself is untouched)."""
    view = work / "hf-view"
    view.mkdir(parents=True, exist_ok=True)
    for f in ckpt.iterdir():
        link = view / f.name
        if f.is_file() and not link.exists():
            link.symlink_to(f.resolve())
    if not (ckpt / "tokenizer.json").is_file() and not (view / "tokenizer.json").is_file():
        write_tokenizer(view)
    return view


_SHIM = r"""
import runpy, sys
src = sys.argv.pop(1)
sys.path.insert(0, src)
import conversion.base as base
_orig = base.TextModel.get_vocab_base_pre
def get_vocab_base_pre(self, tokenizer):
    try:
        return _orig(self, tokenizer)
    except NotImplementedError:
        base.logger.warning("dzc bench: unknown BPE pre-tokenizer hash (synthetic vocabulary); using 'gpt-2'")
        return "gpt-2"
base.TextModel.get_vocab_base_pre = get_vocab_base_pre
sys.argv[0] = src + "/convert_hf_to_gguf.py"
runpy.run_path(sys.argv[0], run_name="__main__")
"""


def convert(src: Path, ckpt: Path, work: Path) -> Path:
    out = work / "dsv3-BF16.gguf"
    if out.is_file():
        return out
    view = hf_view(ckpt, work)
    tmp = out.with_suffix(".gguf.part")
    log = work / "convert.log"
    _say(f"converting {ckpt} -> {out.name} (log: {log})")
    env = dict(os.environ, NO_LOCAL_GGUF="1")     # gguf comes from PYTHONPATH, set here
    env["PYTHONPATH"] = os.pathsep.join([str(src / "gguf-py")] + [p for p in [env.get("PYTHONPATH")] if p])
    _run([sys.executable, "-c", _SHIM, src, view, "--outtype", "bf16", "--outfile", tmp], log, "convert_hf_to_gguf",
         env=env)
    tmp.rename(out)
    return out


def quantize(binp: Path, bf16: Path, work: Path, qtype: str, threads: int) -> Path:
    out = work / f"dsv3-{qtype}.gguf"
    if out.is_file():
        return out
    tmp = out.with_suffix(".gguf.part")
    _say(f"quantizing -> {out.name}")
    _run([binp / "llama-quantize", bf16, tmp, qtype, str(threads)], work / f"quantize-{qtype}.log",
         f"llama-quantize {qtype}")
    tmp.rename(out)
    return out


def prepare(ckpt: Path, work: Path, threads: int = 2, version: str | None = None) -> tuple[Path, dict[str, Path]]:
    """(bin folder, {quant: gguf path}); raises LlamaCppError with a one-line message on failure."""
    work = work.resolve()
    try:
        work.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise LlamaCppError(f"work folder: {e}") from None
    src = source(work, version)
    binp = build(src, work, jobs=threads)
    bf16 = convert(src, ckpt.resolve(), work)
    ggufs = {"BF16": bf16}
    for q in QUANTS[1:]:
        ggufs[q] = quantize(binp, bf16, work, q, threads)
    return binp, ggufs


def gguf_info(path: Path, src: Path | None = None) -> dict:
    """arch, expert counts, total tensor bytes and bytes read per decoded token: every non-expert tensor in full,
    top-k / n_experts of each routed-expert tensor (*_exps), one row of token_embd."""
    if src is not None and str(src / "gguf-py") not in sys.path:
        sys.path.insert(0, str(src / "gguf-py"))
    try:
        from gguf import GGUFReader
    except ImportError as e:
        raise LlamaCppError(f"gguf reader: {e}") from None
    r = GGUFReader(str(path))

    def field(key):
        f = r.fields.get(key)
        if f is None:
            return None
        v = f.contents()
        return v

    arch = field("general.architecture")
    n_exp = field(f"{arch}.expert_count") or 1
    topk = field(f"{arch}.expert_used_count") or n_exp
    frac = topk / n_exp
    total = per_tok = 0.0
    types: dict[str, int] = {}
    n_exps = 0
    for t in r.tensors:
        n = int(t.n_bytes)
        total += n
        types[t.tensor_type.name] = types.get(t.tensor_type.name, 0) + 1
        if t.name == "token_embd.weight":
            per_tok += n / int(t.shape[-1])       # ggml shape is (n_embd, n_vocab): one row of n_vocab
        elif "_exps." in t.name:
            n_exps += 1
            per_tok += n * frac
        else:
            per_tok += n
    return {"arch": arch, "expert_count": n_exp, "expert_used_count": topk, "n_expert_tensors": n_exps,
            "tensors": len(r.tensors), "types": types, "total_bytes": total, "per_tok_bytes": per_tok,
            "file_bytes": path.stat().st_size}


def llama_bench(binp: Path, gguf: Path, threads: int, pp: int, tg: int, reps: int) -> dict:
    """{'pp': [t/s per rep], 'tg': [...], 'avg': {...}, 'stddev': {...}} from one llama-bench run."""
    cmd = [str(binp / "llama-bench"), "-m", str(gguf), "-p", str(pp), "-n", str(tg), "-t", str(threads),
           "-r", str(reps), "-o", "json"]
    p = subprocess.run(cmd, capture_output=True, text=True, check=False)
    if p.returncode != 0:
        err = [ln for ln in p.stderr.splitlines() if ln.strip()]
        raise LlamaCppError(f"llama-bench {gguf.name} -t {threads} failed (exit {p.returncode})"
                            f"{': ' + err[-1][:160] if err else ''}")
    try:
        results = json.loads(p.stdout)
    except json.JSONDecodeError as e:
        raise LlamaCppError(f"llama-bench {gguf.name}: unreadable JSON ({e})") from None
    out: dict = {"avg": {}, "stddev": {}}
    for res in results:
        key = "pp" if res.get("n_gen", 0) == 0 else "tg"
        samples = res.get("samples_ts") or [res["avg_ts"]]
        out[key] = [float(x) for x in samples]
        out["avg"][key] = float(res["avg_ts"])
        out["stddev"][key] = float(res.get("stddev_ts", 0.0))
        out["build"] = f"{res.get('build_commit', '?')} ({res.get('build_number', '?')})"
    if "pp" not in out or "tg" not in out:
        raise LlamaCppError(f"llama-bench {gguf.name}: missing pp or tg result")
    return out


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--ckpt", type=Path, default=Path("/tmp/dzc-bench/dsv3-bf16"))
    ap.add_argument("--work", type=Path, default=Path("/tmp/dzc-bench/llama.cpp"))
    ap.add_argument("--threads", type=int, nargs="*", default=[1, 2])
    ap.add_argument("--pp", type=int, default=512)
    ap.add_argument("--tg", type=int, default=128)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--version", default=None, help="llama-cpp-python sdist version (default: newest)")
    ap.add_argument("--prepare-only", action="store_true")
    a = ap.parse_args()
    try:
        binp, ggufs = prepare(a.ckpt, a.work, max(a.threads), a.version)
        src = source(a.work.resolve())
        info = {q: gguf_info(p, src) for q, p in ggufs.items()}
        for q, i in info.items():
            print(f"{q}: {ggufs[q]} arch={i['arch']} experts={i['expert_count']} top-{i['expert_used_count']} "
                  f"expert tensors={i['n_expert_tensors']} tensors={i['tensors']} "
                  f"size={i['total_bytes'] / 2**30:.3f} GiB ({i['file_bytes']} B file) "
                  f"GB/tok={i['per_tok_bytes'] / 1e9:.4f} types={i['types']}")
        if a.prepare_only:
            return 0
        print("| quant | threads | test | t/s (median ± half range) | llama-bench avg ± stddev | samples |")
        print("| --- | ---: | ---: | ---: | ---: | --- |")
        for q, p in ggufs.items():
            for t in a.threads:
                r = llama_bench(binp, p, t, a.pp, a.tg, a.reps)
                for k, n in (("pp", a.pp), ("tg", a.tg)):
                    xs = r[k]
                    print(f"| {q} | {t} | {k}{n} | {statistics.median(xs):.2f} ± {(max(xs) - min(xs)) / 2:.2f} | "
                          f"{r['avg'][k]:.2f} ± {r['stddev'][k]:.2f} | {', '.join(f'{x:.2f}' for x in xs)} |",
                          flush=True)
    except LlamaCppError as e:
        print(f"llama.cpp: {e}", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
