#!/usr/bin/env python3
"""Train dzc's embedded demo model: a tiny DeepSeek-V3-architecture LM on Jane Austen's six novels.

One command reproduces everything (corpus, split, tokenizer, training, checkpoint, log, plot):

    .venv/bin/python examples/train_demo_model.py

Corpus: the Debian package `r-cran-janeaustenr` 1.0.0-1 (MIT; Julia Silge's CRAN package `janeaustenr`),
which ships the Project Gutenberg texts of Austen's six completed novels (public domain). The script reads
the installed copy under /usr/lib/R/site-library if there is one, else `apt-get download`s the .deb into
examples/.cache/ (never committed) and unpacks it there. The text sits in R's lazy-load database
(data/Rdata.rdb + .rdx); a small reader for R's XDR serialization below turns it back into text, so
neither R nor an extra Python package is needed.

The model is `transformers.DeepseekV3ForCausalLM` with every architectural feature on: MLA with q_lora
(q_a/q_b) and kv_lora, qk_nope != v_head_dim, YaRN rope (factor 4 over 256 -> 1024 positions), a dense
first layer, then MoE layers with sigmoid/noaux_tc group-limited routing (n_group 4, topk_group 2), one
shared expert, norm_topk_prob and routed_scaling_factor 2.5. transformers does not train the router's
`e_score_correction_bias`; this script applies DeepSeek-V3's auxiliary-loss-free balancing to it
(after each step: b_i += u * sign(mean_load - load_i)), so the shipped bias is nonzero and matters.

Training: 1000 steps of 2048 tokens (8 x 256; every 10th step 2 x 1024 so that positions past the original
256 are learned too), one thread (torch.set_num_threads(1)): about 15-20 minutes on one shared core.
`--bench N` only times N steps. See examples/README.md for the corpus, licences and results.
"""
from __future__ import annotations

import argparse
import gzip
import hashlib
import json
import math
import os
import random
import re
import struct
import subprocess
import sys
import time
import zlib
from pathlib import Path

HERE = Path(__file__).resolve().parent
DEFAULT_OUT = HERE / "demo-model"
DEFAULT_CACHE = HERE / ".cache"

DEB_NAME = "r-cran-janeaustenr"
DEB_VERSION = "1.0.0-1"
DEB_SHA256 = "df6bddf211906d1ff404f8ff662c21b34e6660e7f54a311084e749050c019c95"
RDATA_SUBDIR = "usr/lib/R/site-library/janeaustenr/data"
BOOKS = [  # R object name -> title (order fixes the corpus order)
    ("sensesensibility", "Sense and Sensibility (1811)"),
    ("prideprejudice", "Pride and Prejudice (1813)"),
    ("mansfieldpark", "Mansfield Park (1814)"),
    ("emma", "Emma (1815)"),
    ("northangerabbey", "Northanger Abbey (1817)"),
    ("persuasion", "Persuasion (1817)"),
]

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
SPECIAL_TOKENS = [BOS, EOS, USER, ASSISTANT]  # ids 0, 1, 2, 3

# DeepSeek-V3's chat template, reduced to what a base model needs: BOS, the system prompt, then
# <｜User｜>… / <｜Assistant｜>…<｜end▁of▁sentence｜> turns, and <｜Assistant｜> as the generation prompt.
CHAT_TEMPLATE = (
    "{% if not add_generation_prompt is defined %}{% set add_generation_prompt = false %}{% endif %}"
    "{{ bos_token }}"
    "{% for message in messages %}{% if message['role'] == 'system' %}{{ message['content'] }}{% endif %}{% endfor %}"
    "{% for message in messages %}"
    "{% if message['role'] == 'user' %}{{ '<｜User｜>' + message['content'] }}"
    "{% elif message['role'] == 'assistant' %}{{ '<｜Assistant｜>' + message['content'] + '<｜end▁of▁sentence｜>' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<｜Assistant｜>' }}{% endif %}"
)

MODEL_CONFIG = dict(
    vocab_size=2048,
    hidden_size=256,
    intermediate_size=512,  # the dense first layer's SwiGLU
    moe_intermediate_size=64,  # each routed expert and the shared expert
    num_hidden_layers=4,
    first_k_dense_replace=1,
    num_attention_heads=8,
    num_key_value_heads=8,
    q_lora_rank=128,
    kv_lora_rank=64,
    qk_rope_head_dim=16,
    qk_nope_head_dim=32,
    v_head_dim=32,
    n_routed_experts=8,
    num_experts_per_tok=2,
    n_group=4,
    topk_group=2,
    n_shared_experts=1,
    norm_topk_prob=True,
    routed_scaling_factor=2.5,
    hidden_act="silu",
    rms_norm_eps=1e-6,
    max_position_embeddings=1024,
    rope_scaling=dict(
        rope_type="yarn", rope_theta=10000.0, factor=4.0, original_max_position_embeddings=256,
        beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0,
    ),
    rope_interleave=True,
    attention_bias=False,
    attention_dropout=0.0,
    initializer_range=0.02,
    tie_word_embeddings=False,
    num_nextn_predict_layers=0,  # no MTP layer is trained or shipped
    bos_token_id=0,
    eos_token_id=1,
    pad_token_id=1,
    use_cache=True,
)


def log(msg: str, fh=None) -> None:
    print(msg, flush=True)
    if fh is not None:
        fh.write(msg + "\n")
        fh.flush()


# ----------------------------------------------------------------------------------------------------
# Corpus: Debian r-cran-janeaustenr -> R lazy-load database -> text
# ----------------------------------------------------------------------------------------------------

class _RUnserializer:
    """Just enough of R's XDR serialization (format 2/3) for the janeaustenr data: character vectors,
    lists, pairlists with tags/attributes, symbols, references, integer/logical/real vectors."""

    def __init__(self, buf: bytes):
        self.b, self.p, self.refs = buf, 0, []

    def _int(self) -> int:
        (v,) = struct.unpack_from(">i", self.b, self.p)
        self.p += 4
        return v

    def read(self):
        if self.b[:2] != b"X\n":
            raise ValueError("not an XDR R serialization")
        self.p = 2
        version = self._int()
        self._int(), self._int()  # writer R version, minimal reader version
        if version == 3:
            n = self._int()
            self.p += n  # native encoding name
        return self._item()

    def _item(self):
        flags = self._int()
        t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
        if t == 254:  # NILVALUE_SXP
            return None
        if t == 255:  # REFSXP
            return self.refs[(flags >> 8) - 1]
        if t == 1:  # SYMSXP
            sym = ("sym", self._item())
            self.refs.append(sym)
            return sym
        if t == 2:  # LISTSXP (pairlist): [(tag, value), ...]
            out = []
            while True:
                if has_attr:
                    self._item()
                tag = self._item() if has_tag else None
                out.append((tag[1] if tag else None, self._item()))
                flags = self._int()
                t, has_attr, has_tag = flags & 0xFF, flags & (1 << 9), flags & (1 << 10)
                if t == 254:
                    return out
                if t != 2:
                    raise ValueError(f"unexpected pairlist cell type {t}")
        if t == 9:  # CHARSXP
            n = self._int()
            if n == -1:
                return None
            s = self.b[self.p:self.p + n].decode("utf-8")
            self.p += n
            return s
        if t in (10, 13):  # LGLSXP, INTSXP
            n = self._int()
            v = list(struct.unpack_from(f">{n}i", self.b, self.p))
            self.p += 4 * n
        elif t == 14:  # REALSXP
            n = self._int()
            v = list(struct.unpack_from(f">{n}d", self.b, self.p))
            self.p += 8 * n
        elif t in (16, 19):  # STRSXP, VECSXP
            v = [self._item() for _ in range(self._int())]
        else:
            raise ValueError(f"unsupported R SEXP type {t}")
        if has_attr:
            return {"value": v, "attributes": dict(self._item())}
        return v


def read_lazyload_db(data_dir: Path) -> dict[str, list]:
    """R's lazy-load database: Rdata.rdx (gzip'd serialized index) + Rdata.rdb (zlib'd serialized objects)."""
    index = _RUnserializer(gzip.decompress((data_dir / "Rdata.rdx").read_bytes())).read()
    parts = dict(zip(index["attributes"]["names"], index["value"]))
    variables = parts["variables"]
    names = variables["attributes"]["names"]
    rdb = (data_dir / "Rdata.rdb").read_bytes()
    out = {}
    for name, (offset, length) in zip(names, variables["value"]):
        blob = rdb[offset:offset + length]
        (n,) = struct.unpack(">i", blob[:4])
        raw = zlib.decompress(blob[4:])
        if len(raw) != n:
            raise ValueError(f"{name}: bad length")
        out[name] = _RUnserializer(raw).read()
    return out


def find_or_fetch_rdata(cache: Path, fh=None) -> Path:
    installed = Path("/") / RDATA_SUBDIR
    if (installed / "Rdata.rdb").exists():
        log(f"corpus: using installed {installed}", fh)
        return installed
    unpacked = cache / "janeaustenr-deb" / RDATA_SUBDIR
    if (unpacked / "Rdata.rdb").exists():
        log(f"corpus: using cached {unpacked}", fh)
        return unpacked
    cache.mkdir(parents=True, exist_ok=True)
    debs = sorted(cache.glob(f"{DEB_NAME}_*.deb"))
    if not debs:
        log(f"corpus: apt-get download {DEB_NAME} into {cache}", fh)
        cmd = ["apt-get", "download", DEB_NAME]
        r = subprocess.run(cmd, cwd=cache, capture_output=True, text=True)
        if r.returncode != 0 and os.geteuid() == 0:  # package lists may be missing: refresh once
            subprocess.run(["apt-get", "update", "-qq"], capture_output=True)
            r = subprocess.run(cmd, cwd=cache, capture_output=True, text=True)
        if r.returncode != 0:
            sys.exit(f"could not download {DEB_NAME} (run `apt-get update` first?):\n{r.stderr}")
        debs = sorted(cache.glob(f"{DEB_NAME}_*.deb"))
    deb = debs[-1]
    digest = hashlib.sha256(deb.read_bytes()).hexdigest()
    if digest != DEB_SHA256:
        log(f"WARNING: {deb.name} sha256 {digest} differs from the {DEB_VERSION} this model was trained on", fh)
    subprocess.run(["dpkg-deb", "-x", str(deb), str(cache / "janeaustenr-deb")], check=True)
    log(f"corpus: unpacked {deb.name}", fh)
    return unpacked


def clean_book(lines: list) -> list[str]:
    """Gutenberg hard-wrapped lines -> one string per paragraph; drop _italic_ marks, squeeze spaces."""
    paras, cur = [], []
    for line in lines + [""]:
        line = (line or "").strip()
        if line:
            cur.append(line)
        elif cur:
            p = " ".join(cur).replace("_", "")
            p = re.sub(r"\s+", " ", p).strip()
            if p:
                paras.append(p)
            cur = []
    return paras


def build_corpus(cache: Path, heldout_frac: float, heldout_file_chars: int, fh=None):
    objs = read_lazyload_db(find_or_fetch_rdata(cache, fh))
    train_books, heldout_books, heldout_file = [], [], []
    per_book_file = heldout_file_chars // len(BOOKS)
    for name, title in BOOKS:
        paras = clean_book(objs[name])
        total = sum(len(p) + 1 for p in paras)
        # hold out the last ~heldout_frac of each novel (whole paragraphs)
        acc, cut = 0, len(paras)
        while cut > 0 and acc < heldout_frac * total:
            cut -= 1
            acc += len(paras[cut]) + 1
        train_books.append("\n".join(paras[:cut]) + "\n")
        held = paras[cut:]
        heldout_books.append("\n".join(held) + "\n")
        # the committed heldout.txt: the first paragraphs of each held-out tail, within budget
        taken, n = [], 0
        for p in held:
            if n + len(p) + 1 > per_book_file:
                break
            taken.append(p)
            n += len(p) + 1
        heldout_file.append("\n".join(taken) + "\n")
        log(f"corpus: {title:30s} {total/1e3:7.0f} kchars, {len(paras):5d} paragraphs, "
            f"held out {acc/1e3:5.1f} kchars ({acc/total:.1%})", fh)
    return train_books, heldout_books, heldout_file


# ----------------------------------------------------------------------------------------------------
# Tokenizer
# ----------------------------------------------------------------------------------------------------

def train_tokenizer(texts: list[str], vocab_size: int):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token=None, fuse_unk=False, byte_fallback=False))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, min_frequency=2, special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, s in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(s) == i, (s, tok.token_to_id(s))
    return tok


def write_tokenizer_files(tok, out: Path, model_max_length: int) -> None:
    tok.save(str(out / "tokenizer.json"))
    added = {
        str(i): {"content": s, "lstrip": False, "normalized": False, "rstrip": False,
                 "single_word": False, "special": True}
        for i, s in enumerate(SPECIAL_TOKENS)
    }
    cfg = {
        "add_bos_token": False,
        "add_eos_token": False,
        "added_tokens_decoder": added,
        "bos_token": BOS,
        "eos_token": EOS,
        "pad_token": EOS,
        "unk_token": None,
        "clean_up_tokenization_spaces": False,
        "legacy": True,
        "model_max_length": model_max_length,
        "tokenizer_class": "PreTrainedTokenizerFast",
        "chat_template": CHAT_TEMPLATE,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


# ----------------------------------------------------------------------------------------------------
# Model, balancing, evaluation
# ----------------------------------------------------------------------------------------------------

def make_model(seed: int):
    import torch
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    torch.manual_seed(seed)
    cfg = DeepseekV3Config(**MODEL_CONFIG)
    model = DeepseekV3ForCausalLM(cfg)
    model.config.use_cache = False
    # transformers' grouped_mm experts path: same math as the eager per-expert loop, ~20% faster on CPU
    model.config._experts_implementation = "grouped_mm"
    return model


class LoadBalancer:
    """DeepSeek-V3 auxiliary-loss-free load balancing (paper, section 2.1.2): count how many tokens each
    routed expert received in the step, then bias_i += u * sign(mean_load - load_i)."""

    def __init__(self, model, update_rate: float):
        import torch

        self.u = update_rate
        self.gates = [layer.mlp.gate for layer in model.model.layers if hasattr(layer.mlp, "gate")]
        self.n_experts = self.gates[0].num_experts
        self.counts = [torch.zeros(self.n_experts) for _ in self.gates]
        self.window = [torch.zeros(self.n_experts) for _ in self.gates]  # for logging
        self.active = True
        for i, g in enumerate(self.gates):
            g.register_forward_hook(self._hook(i))

    def _hook(self, i):
        import torch

        def hook(module, inputs, output):
            if self.active:
                idx = output[2].detach().reshape(-1)
                self.counts[i] += torch.bincount(idx, minlength=self.n_experts).float()
        return hook

    def step(self) -> None:
        import torch

        with torch.no_grad():
            for g, c, w in zip(self.gates, self.counts, self.window):
                g.e_score_correction_bias += self.u * torch.sign(c.mean() - c)
                w += c
                c.zero_()

    def report(self) -> str:
        parts = []
        for li, w in enumerate(self.window):
            frac = w / max(w.sum().item(), 1.0)
            parts.append(f"L{li + 1}:max/mean={frac.max().item() * self.n_experts:.2f},"
                         f"min/mean={frac.min().item() * self.n_experts:.2f}")
            w.zero_()
        return " ".join(parts)

    def bias_report(self) -> str:
        return " ".join(
            f"L{li + 1}:[{', '.join(f'{x:+.3f}' for x in g.e_score_correction_bias.tolist())}]"
            for li, g in enumerate(self.gates)
        )


def evaluate(model, ids, seq_len: int, max_windows: int | None = None) -> float:
    """Mean next-token NLL over non-overlapping windows of seq_len+1 tokens (each predicts seq_len)."""
    import torch

    model.eval()
    total, count = 0.0, 0
    n_windows = (len(ids) - 1) // seq_len
    if max_windows is not None:
        n_windows = min(n_windows, max_windows)
    with torch.no_grad():
        for start in range(0, n_windows, 8):
            rows = [ids[(start + j) * seq_len:(start + j) * seq_len + seq_len + 1]
                    for j in range(min(8, n_windows - start))]
            x = torch.tensor(rows)
            logits = model(input_ids=x[:, :-1]).logits.float()
            nll = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]), x[:, 1:].reshape(-1),
                                                    reduction="sum")
            total += nll.item()
            count += x[:, 1:].numel()
    model.train()
    return total / max(count, 1)


def loss_by_position(model, ids, seq_len: int, parts: int) -> list[float]:
    """Mean next-token NLL in each of `parts` position ranges of non-overlapping seq_len windows."""
    import torch

    model.eval()
    sums, counts = [0.0] * parts, [0] * parts
    with torch.no_grad():
        for start in range(0, len(ids) - seq_len - 1, seq_len):
            x = torch.tensor([ids[start:start + seq_len + 1]])
            nll = torch.nn.functional.cross_entropy(model(input_ids=x[:, :-1]).logits[0].float(), x[0, 1:],
                                                    reduction="none")
            for k, chunk in enumerate(nll.chunk(parts)):
                sums[k] += chunk.sum().item()
                counts[k] += chunk.numel()
    model.train()
    return [s / max(c, 1) for s, c in zip(sums, counts)]


def save_checkpoint(model, out: Path) -> None:
    """bf16 weights in DeepSeek/HF tensor names (per-expert), router bias kept in fp32 like real checkpoints."""
    import copy

    import torch
    from safetensors.torch import load_file, save_file

    biases = {f"model.layers.{i}.mlp.gate.e_score_correction_bias": layer.mlp.gate.e_score_correction_bias
              .detach().float().clone() for i, layer in enumerate(model.model.layers) if hasattr(layer.mlp, "gate")}
    m = copy.deepcopy(model).to(torch.bfloat16)
    m.config.use_cache = True
    m.save_pretrained(out, safe_serialization=True)
    path = out / "model.safetensors"
    tensors = load_file(path)
    for k, v in biases.items():
        assert k in tensors, k
        tensors[k] = v
    save_file(dict(sorted(tensors.items())), path, metadata={"format": "pt"})
    os.chmod(path, 0o644)
    cfg = json.loads((out / "config.json").read_text())
    cfg["dtype"] = "bfloat16"
    # spelled out as in the real DeepSeek-V3 config.json (transformers implies them)
    cfg.update(scoring_func="sigmoid", topk_method="noaux_tc", moe_layer_freq=1)
    (out / "config.json").write_text(json.dumps(cfg, indent=2, sort_keys=True) + "\n")


def write_generation_config(out: Path) -> None:
    gen = {"bos_token_id": 0, "eos_token_id": 1, "pad_token_id": 1, "do_sample": True, "temperature": 0.7,
           "top_p": 0.9, "max_new_tokens": 128}
    (out / "generation_config.json").write_text(json.dumps(gen, indent=2) + "\n")


def plot(history: list, evals: list, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4.2), dpi=100)
    ax.plot([h[0] for h in history], [h[1] for h in history], label="train loss (interval mean)", lw=1.2)
    ax.plot([e[0] for e in evals], [e[1] for e in evals], "o-", label="held-out loss", lw=1.2, ms=4)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.set_title("dzc demo model: DeepSeek-V3 architecture on Jane Austen")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


# ----------------------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT)
    ap.add_argument("--cache", type=Path, default=DEFAULT_CACHE)
    ap.add_argument("--steps", type=int, default=1000)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--long-every", type=int, default=10,
                    help="every Nth step trains on --long-seq-len windows so YaRN positions past 256 are learned too")
    ap.add_argument("--long-seq-len", type=int, default=1024)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--warmup", type=int, default=60)
    ap.add_argument("--bias-update-rate", type=float, default=1e-2)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--log-every", type=int, default=20)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--heldout-frac", type=float, default=0.05)
    ap.add_argument("--bench", type=int, default=0, help="only time this many training steps, write nothing")
    args = ap.parse_args()

    import torch

    torch.set_num_threads(1)
    random.seed(args.seed)
    t_start = time.time()
    out: Path = args.out
    if not args.bench:
        out.mkdir(parents=True, exist_ok=True)
    fh = None if args.bench else open(out / "training_log.txt", "w")
    log(f"# dzc demo model training log ({time.strftime('%Y-%m-%d %H:%M:%S')}), torch {torch.__version__}, "
        f"threads {torch.get_num_threads()}", fh)
    log(f"# args: {vars(args)}", fh)

    # corpus + split
    train_books, heldout_books, heldout_file = build_corpus(args.cache, args.heldout_frac, 96_000, fh)
    train_text = "".join(train_books)
    heldout_text = "".join(heldout_books)
    heldout_file_text = "".join(heldout_file)
    log(f"corpus: train {len(train_text)/1e6:.2f} Mchars, held-out {len(heldout_text)/1e3:.0f} kchars "
        f"(heldout.txt {len(heldout_file_text.encode())/1e3:.0f} kB)", fh)

    # tokenizer
    tok = train_tokenizer(train_books, MODEL_CONFIG["vocab_size"])
    assert tok.get_vocab_size() == MODEL_CONFIG["vocab_size"], tok.get_vocab_size()
    bos, eos = 0, 1
    train_ids = []
    for book in train_books:
        train_ids += [bos] + tok.encode(book).ids + [eos]
    heldout_ids = []
    for book in heldout_books:
        heldout_ids += [bos] + tok.encode(book).ids + [eos]
    heldout_file_ids = [bos] + tok.encode(heldout_file_text).ids
    log(f"tokenizer: byte-level BPE, vocab {tok.get_vocab_size()}; train {len(train_ids)} tokens "
        f"({len(train_text.encode())/len(train_ids):.2f} bytes/token), held-out {len(heldout_ids)} tokens, "
        f"heldout.txt {len(heldout_file_ids)} tokens", fh)

    # model
    model = make_model(args.seed)
    n_params = sum(p.numel() for p in model.parameters())
    n_bias = sum(g.e_score_correction_bias.numel() for g in [l.mlp.gate for l in model.model.layers[1:]])
    cfg = MODEL_CONFIG
    per_expert = 3 * cfg["hidden_size"] * cfg["moe_intermediate_size"]
    n_moe = cfg["num_hidden_layers"] - cfg["first_k_dense_replace"]
    n_active = n_params - n_moe * (cfg["n_routed_experts"] - cfg["num_experts_per_tok"]) * per_expert
    log(f"model: DeepseekV3ForCausalLM, {n_params:,} parameters (+{n_bias} router-bias buffers), "
        f"{n_active:,} active per token", fh)
    log(f"config: {json.dumps(MODEL_CONFIG)}", fh)
    balancer = LoadBalancer(model, args.bias_update_rate)

    decay = [p for n, p in model.named_parameters() if p.dim() >= 2 and "embed" not in n]
    no_decay = [p for n, p in model.named_parameters() if not (p.dim() >= 2 and "embed" not in n)]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=args.lr, betas=(0.9, 0.95), eps=1e-8)
    steps = args.bench or args.steps

    def lr_at(step):
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        frac = (step - args.warmup) / max(1, steps - args.warmup)
        return args.lr * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * frac)))

    rng = random.Random(args.seed)
    train_t = torch.tensor(train_ids)
    L = args.seq_len
    n_tokens = 0
    history, evals = [], []
    acc_loss, acc_n = 0.0, 0
    t_train = time.time()
    model.train()
    for step in range(steps):
        # most steps: batch x seq_len; every long_every-th step the same token count as fewer, longer rows
        long_step = args.long_every > 0 and step % args.long_every == args.long_every - 1
        sl = args.long_seq_len if long_step else L
        bs = max(1, args.batch * L // sl) if long_step else args.batch
        starts = [rng.randrange(0, len(train_ids) - sl - 1) for _ in range(bs)]
        x = torch.stack([train_t[s:s + sl + 1] for s in starts])
        n_tokens += bs * sl
        for g in opt.param_groups:
            g["lr"] = lr_at(step)
        logits = model(input_ids=x[:, :-1]).logits
        loss = torch.nn.functional.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), x[:, 1:].reshape(-1))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        balancer.step()
        acc_loss += loss.item()
        acc_n += 1
        if args.bench:
            dt = time.time() - t_train
            log(f"bench step {step + 1}: loss {loss.item():.3f}, {dt / (step + 1):.2f} s/step, "
                f"{n_tokens / dt:.0f} tok/s (seq {sl})", fh)
            continue
        if (step + 1) % args.log_every == 0 or step == 0:
            elapsed = time.time() - t_train
            history.append((step + 1, acc_loss / acc_n))
            log(f"step {step + 1:5d}/{steps} loss {acc_loss / acc_n:.4f} lr {lr_at(step):.2e} "
                f"tok {n_tokens:>9,d} {elapsed:6.0f}s | load {balancer.report()}", fh)
            acc_loss, acc_n = 0.0, 0
        if (step + 1) % args.eval_every == 0 or step + 1 == steps:
            balancer.active = False
            nll = evaluate(model, heldout_file_ids, L)
            balancer.active = True
            evals.append((step + 1, nll))
            log(f"eval  {step + 1:5d}: heldout.txt loss {nll:.4f} ppl {math.exp(nll):.2f} | "
                f"gate bias {balancer.bias_report()}", fh)
            plot(history, evals, out / "loss_curve.png")
    train_secs = time.time() - t_train
    if args.bench:
        return
    log(f"training: {steps} steps, {n_tokens:,} tokens ({n_tokens / len(train_ids):.2f} epochs) "
        f"in {train_secs:.0f}s", fh)

    # save (bf16), then reload the shipped checkpoint in fp32 and measure it
    for f in ("model.safetensors", "config.json", "generation_config.json"):
        (out / f).unlink(missing_ok=True)
    save_checkpoint(model, out)
    write_generation_config(out)
    write_tokenizer_files(tok, out, MODEL_CONFIG["max_position_embeddings"])
    (out / "heldout.txt").write_text(heldout_file_text)

    from transformers import AutoTokenizer, DeepseekV3ForCausalLM

    shipped = DeepseekV3ForCausalLM.from_pretrained(out, torch_dtype=torch.float32)
    shipped.eval()
    biases = [l.mlp.gate.e_score_correction_bias for l in shipped.model.layers[1:]]
    assert all(b.dtype == torch.float32 and b.abs().max() > 0 for b in biases), "router bias must be nonzero fp32"
    nll_fp32 = evaluate(model, heldout_ids, L)
    nll_bf16 = evaluate(shipped, heldout_ids, L)
    nll_file = evaluate(shipped, heldout_file_ids, L)
    log(f"final held-out (5%, {len(heldout_ids)} tokens): fp32 weights loss {nll_fp32:.4f} ppl {math.exp(nll_fp32):.2f}; "
        f"shipped bf16 checkpoint loaded in fp32: loss {nll_bf16:.4f} ppl {math.exp(nll_bf16):.2f}", fh)
    log(f"final heldout.txt ({len(heldout_file_ids)} tokens, BOS first, windows of {L}+1): "
        f"loss {nll_file:.4f} ppl {math.exp(nll_file):.2f}", fh)
    quarters = loss_by_position(shipped, heldout_file_ids, args.long_seq_len, 4)
    log(f"heldout.txt in {args.long_seq_len}-token windows (YaRN range), loss by position quarter: "
        f"{', '.join(f'{q:.3f}' for q in quarters)}", fh)

    # samples from the shipped checkpoint
    hf_tok = AutoTokenizer.from_pretrained(out)
    for prompt in ("Once upon a time", "It is a truth universally acknowledged"):
        ids = torch.tensor([[bos] + hf_tok.encode(prompt, add_special_tokens=False)])
        for name, kw in (("greedy", dict(do_sample=False)),
                         ("sampled (T=0.7, top_p=0.9, seed 0)", dict(do_sample=True, temperature=0.7, top_p=0.9))):
            torch.manual_seed(0)
            gen = shipped.generate(ids, max_new_tokens=80, **kw)
            text = hf_tok.decode(gen[0, 1:], skip_special_tokens=False)
            log(f"sample [{name}] {text!r}", fh)
    chat = hf_tok.apply_chat_template([{"role": "user", "content": "Hello"}], tokenize=False, add_generation_prompt=True)
    log(f"chat template check: {chat!r}", fh)

    sizes = {p.name: p.stat().st_size for p in sorted(out.iterdir())}
    log(f"files: {json.dumps(sizes)}; total {sum(sizes.values())/1e6:.2f} MB", fh)
    log(f"done in {time.time() - t_start:.0f}s wall", fh)
    fh.close()


if __name__ == "__main__":
    main()
