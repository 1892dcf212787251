"""Tiny random DeepSeek-V3 checkpoints for tests, and the transformers reference that judges them.

`build_tiny_checkpoint(out_dir, TinySpec(...))` writes a complete checkpoint folder: config.json (transformers
v5 spelling or the real V3 spelling), safetensors weights (fp32 / bf16 / block-FP8, one file, HF-sharded with
an index, our own index, or bare shards), a trained byte-level BPE tokenizer with DeepSeek's special tokens,
tokenizer_config.json with a V3-style chat template, and generation_config.json.

The weights are chosen so tests can see mistakes: std 0.1 (0.02 gives flat logits), norms 1 + noise, a
non-zero `e_score_correction_bias` (HF zeroes it, which makes routing tests vacuous), v_head_dim !=
qk_nope_head_dim, a dense first layer then >= 2 MoE layers, grouped routing with topk_group < n_group, a
shared expert, norm_topk_prob and routed_scaling_factor != 1. FP8 specs have dims > 128 that are not multiples
of 128 so ragged scale blocks occur.

`hf_reference(dir)` builds transformers' fp32 `DeepseekV3ForCausalLM` and loads the weights *as decoded by
dzc's own loader* (never transformers' FP8 loader, which gets ragged blocks wrong on CPU): the reference sees
exactly the numbers the checkpoint stores. Do not modify a built fixture in place: copy it (`copy_checkpoint`)
first; references are cached by path.
"""
from __future__ import annotations

import functools
import json
import math
import re
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np

from dzc.checkpoint import dtypes
from dzc.checkpoint.safetensors_file import write_safetensors

BOS, EOS, USER, ASSISTANT = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT)  # ids 0, 1, 2, 3
BOS_ID, EOS_ID = 0, 1
FP8_BLOCK = (128, 128)

# A V3-style chat template (written for these fixtures): system prompts joined first, BOS, then
# <｜User｜>… / <｜Assistant｜>…<｜end▁of▁sentence｜> turns, and a trailing <｜Assistant｜> on request.
CHAT_TEMPLATE = (
    "{%- set ns = namespace(system='') -%}"
    "{%- for message in messages -%}{%- if message['role'] == 'system' -%}"
    "{%- set ns.system = ns.system + ('\\n\\n' if ns.system else '') + message['content'] -%}"
    "{%- endif -%}{%- endfor -%}"
    "{{ bos_token }}{{ ns.system }}"
    "{%- for message in messages -%}"
    "{%- if message['role'] == 'user' -%}{{ '<｜User｜>' + message['content'] }}"
    "{%- elif message['role'] == 'assistant' -%}{{ '<｜Assistant｜>' + message['content'] + eos_token }}"
    "{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{ '<｜Assistant｜>' }}{%- endif -%}"
)

TRAINING_TEXT = """\
The lighthouse keeper climbed the stairs every evening before the sun went down. He counted the steps out of
habit, one hundred and twelve of them, and at the top he cleaned the glass, trimmed the wick and wound the clock
that turned the lens. Ships passing in the night never saw him, only the light, and that was how he liked it.
In the morning he wrote the weather in a small book: wind from the west, light rain, a fishing boat at dawn.
Numbers are useful. Two plus two is four, ten times ten is one hundred, and a year has three hundred and
sixty-five days. A compiler turns a program into instructions that a machine can run quickly and correctly.
The model reads a sequence of tokens and predicts the next one; then it reads that token too, and so on.
Attention lets every token look back at the tokens before it. Experts are small networks, and a router
chooses a few of them for each token, so the model can be large while each step stays cheap.
What is the capital of France? Paris is the capital of France. What is the largest ocean? The Pacific.
Please write a short poem about the sea. The sea is wide, the sea is grey, it takes the sand and runs away.
Hello! How are you today? I am fine, thank you. Could you help me with my homework? Of course I can.
She opened the window and the cold air filled the room. Outside, the children were building a snowman,
and the dog ran in circles around them, barking at the falling snow. It was the first snow of the winter.
Bread, butter, cheese and apples were on the table. They ate slowly and talked about the long road ahead,
the mountains they would cross and the river they would follow to the town by the sea.
"""


@dataclass(frozen=True)
class TinySpec:
    """Features and dimensions of a tiny checkpoint."""

    q_lora: bool = True  # False: a direct q_proj (q_lora_rank null, Moonlight-style)
    yarn: bool = True  # False: plain RoPE
    fp8: bool = False  # block-FP8 Linear weights inside the layers (the rest stored as `dtype`)
    shards: int = 1
    dtype: str = "float32"  # storage of non-FP8 weights: 'float32' | 'bfloat16'
    seed: int = 0
    config_style: str = "v5"  # 'v5': rope_parameters as transformers writes; 'v3': rope_theta + rope_scaling
    index: bool = True  # with shards > 1: False writes bare shard files without model.safetensors.index.json
    writer: str = "auto"  # 'hf': save_pretrained; 'dzc': our writer + index; auto: hf for plain fp32
    tie_word_embeddings: bool = False
    vocab_size: int = 384
    hidden_size: int = 64
    intermediate_size: int = 96
    moe_intermediate_size: int = 32
    num_hidden_layers: int = 3  # layer 0 dense, 1.. MoE
    num_attention_heads: int = 4
    q_lora_rank: int = 48
    kv_lora_rank: int = 32
    qk_rope_head_dim: int = 16
    qk_nope_head_dim: int = 24
    v_head_dim: int = 20
    n_routed_experts: int = 8
    n_shared_experts: int = 1
    num_experts_per_tok: int = 2
    n_group: int = 4
    topk_group: int = 2
    routed_scaling_factor: float = 2.5
    max_position_embeddings: int = 512
    yarn_factor: float = 4.0  # max_position_embeddings / yarn_original, as HF expects
    yarn_original: int = 128
    yarn_mscale: float = 1.0  # mscale and mscale_all_dim (equal, as in V3)
    init_std: float = 0.1
    bias_std: float = 0.2

    @property
    def uses_hf_writer(self) -> bool:
        if self.writer == "auto":
            return not self.fp8 and self.dtype == "float32" and self.index
        return self.writer == "hf"


# ---- building ------------------------------------------------------------------------------------------------------
def _rope_parameters(spec: TinySpec) -> dict[str, Any]:
    if not spec.yarn:
        return {"rope_type": "default", "rope_theta": 10000.0}
    return {"rope_type": "yarn", "rope_theta": 10000.0, "factor": spec.yarn_factor,
            "original_max_position_embeddings": spec.yarn_original, "beta_fast": 32.0, "beta_slow": 1.0,
            "mscale": spec.yarn_mscale, "mscale_all_dim": spec.yarn_mscale}


def hf_config(spec: TinySpec):
    from transformers import DeepseekV3Config

    return DeepseekV3Config(
        vocab_size=spec.vocab_size, hidden_size=spec.hidden_size, intermediate_size=spec.intermediate_size,
        moe_intermediate_size=spec.moe_intermediate_size, num_hidden_layers=spec.num_hidden_layers,
        num_attention_heads=spec.num_attention_heads, num_key_value_heads=spec.num_attention_heads,
        q_lora_rank=spec.q_lora_rank if spec.q_lora else None, kv_lora_rank=spec.kv_lora_rank,
        qk_rope_head_dim=spec.qk_rope_head_dim, qk_nope_head_dim=spec.qk_nope_head_dim, v_head_dim=spec.v_head_dim,
        n_routed_experts=spec.n_routed_experts, n_shared_experts=spec.n_shared_experts,
        num_experts_per_tok=spec.num_experts_per_tok, n_group=spec.n_group, topk_group=spec.topk_group,
        routed_scaling_factor=spec.routed_scaling_factor, norm_topk_prob=True, first_k_dense_replace=1,
        max_position_embeddings=spec.max_position_embeddings, rope_parameters=_rope_parameters(spec),
        tie_word_embeddings=spec.tie_word_embeddings, bos_token_id=BOS_ID, eos_token_id=EOS_ID,
        num_nextn_predict_layers=1, rms_norm_eps=1e-6, hidden_act="silu",
    )


def random_model(spec: TinySpec):
    """transformers' fp32 model with the test-friendly random weights described in the module docstring."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    config = hf_config(spec)
    config._attn_implementation = "eager"
    torch.manual_seed(spec.seed)
    model = DeepseekV3ForCausalLM(config).eval()
    gen = torch.Generator().manual_seed(spec.seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            noise = torch.randn(p.shape, generator=gen, dtype=torch.float32)
            p.copy_(1.0 + 0.1 * noise if name.endswith("norm.weight") else spec.init_std * noise)
        for name, b in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                b.copy_(spec.bias_std * torch.randn(b.shape, generator=gen, dtype=torch.float32))
    return model


_FUSED_GATE_UP = re.compile(r"^(.*\.mlp\.experts)\.gate_up_proj$")
_FUSED_DOWN = re.compile(r"^(.*\.mlp\.experts)\.down_proj$")


def canonical_state_dict(model) -> dict[str, np.ndarray]:
    """The model's weights under checkpoint names (per-expert gate/up/down instead of transformers' fused 3-D)."""
    out: dict[str, np.ndarray] = {}
    for name, t in model.state_dict().items():
        a = t.detach().to("cpu").float().numpy()
        if m := _FUSED_GATE_UP.match(name):
            width = a.shape[1] // 2
            for e in range(a.shape[0]):
                out[f"{m.group(1)}.{e}.gate_proj.weight"] = a[e, :width].copy()
                out[f"{m.group(1)}.{e}.up_proj.weight"] = a[e, width:].copy()
        elif m := _FUSED_DOWN.match(name):
            for e in range(a.shape[0]):
                out[f"{m.group(1)}.{e}.down_proj.weight"] = a[e].copy()
        elif name == "lm_head.weight" and model.config.tie_word_embeddings:
            continue
        else:
            out[name] = a.copy()
    return out


def _t(a: np.ndarray):
    import torch

    return torch.from_numpy(np.array(a, dtype=np.float32))  # a writable copy (checkpoint views are read-only)


def load_canonical(model, tensors: dict[str, np.ndarray]) -> None:
    """Inverse of `canonical_state_dict`: load checkpoint-named float32 arrays into the transformers model."""
    import torch

    state: dict[str, Any] = {}
    for name, t in model.state_dict().items():
        if m := _FUSED_GATE_UP.match(name):
            state[name] = torch.stack([torch.cat([_t(tensors[f"{m.group(1)}.{e}.gate_proj.weight"]),
                                                  _t(tensors[f"{m.group(1)}.{e}.up_proj.weight"])])
                                       for e in range(t.shape[0])])
        elif m := _FUSED_DOWN.match(name):
            state[name] = torch.stack([_t(tensors[f"{m.group(1)}.{e}.down_proj.weight"]) for e in range(t.shape[0])])
        elif name == "lm_head.weight" and model.config.tie_word_embeddings:
            state[name] = _t(tensors["model.embed_tokens.weight"])
        else:
            state[name] = _t(tensors[name])
        if tuple(state[name].shape) != tuple(t.shape):
            raise AssertionError(f"{name}: checkpoint gives {tuple(state[name].shape)}, model wants {tuple(t.shape)}")
    model.load_state_dict(state, strict=True)


_FP8_LINEAR = re.compile(r"^model\.layers\.\d+\."
                         r"(self_attn\.(q_a_proj|q_b_proj|q_proj|kv_a_proj_with_mqa|kv_b_proj|o_proj)"
                         r"|mlp\.(experts\.\d+\.|shared_experts\.)?(gate_proj|up_proj|down_proj))\.weight$")


def stored_tensors(spec: TinySpec, weights: dict[str, np.ndarray]) -> dict[str, tuple[str, np.ndarray]]:
    """{name: (safetensors dtype, storage array)} for the spec's storage format (as the real V3 files do it)."""
    out: dict[str, tuple[str, np.ndarray]] = {}
    for name, w in weights.items():
        if spec.fp8 and _FP8_LINEAR.match(name):
            q, scale = dtypes.quantize_fp8_blocks(w, FP8_BLOCK)
            out[name] = ("F8_E4M3", q)
            out[name + "_scale_inv"] = ("F32", scale)
        elif name.endswith("e_score_correction_bias") or spec.dtype == "float32":
            out[name] = ("F32", w)
        elif spec.dtype == "bfloat16":
            out[name] = ("BF16", dtypes.f32_to_bf16(w))
        else:
            raise ValueError(f"unknown TinySpec.dtype {spec.dtype!r}")
    return out


def write_shards(out_dir: Path, tensors: dict[str, tuple[str, np.ndarray]], shards: int, index: bool) -> None:
    """Split tensors (in order) into `shards` files of similar size; write an HF-style index when asked."""
    names = list(tensors)
    if shards <= 1:
        write_safetensors(out_dir / "model.safetensors", tensors, {"format": "pt"})
        return
    total = sum(a.nbytes for _, a in tensors.values())
    groups: list[list[str]] = [[] for _ in range(shards)]
    done = 0
    for name in names:
        k = min(shards - 1, done * shards // max(total, 1))
        groups[k].append(name)
        done += tensors[name][1].nbytes
    weight_map: dict[str, str] = {}
    for k, group in enumerate(groups):
        fname = f"model-{k + 1:05d}-of-{shards:05d}.safetensors"
        write_safetensors(out_dir / fname, {n: tensors[n] for n in group}, {"format": "pt"})
        weight_map.update({n: fname for n in group})
    if index:
        (out_dir / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}, indent=2))


def _v3_style(cfg: dict[str, Any]) -> dict[str, Any]:
    """Rewrite a transformers-v5 config.json dict the way the real DeepSeek-V3 files spell it."""
    cfg = dict(cfg)
    rope = cfg.pop("rope_parameters")
    cfg.pop("head_dim", None)
    cfg.pop("qk_head_dim", None)
    cfg["rope_theta"] = rope["rope_theta"]
    if rope["rope_type"] == "yarn":
        cfg["rope_scaling"] = {"type": "yarn",
                               **{k: v for k, v in rope.items() if k not in ("rope_type", "rope_theta")}}
    else:
        cfg["rope_scaling"] = None
    cfg.update(moe_layer_freq=1, scoring_func="sigmoid", topk_method="noaux_tc", aux_loss_alpha=0.001, ep_size=1,
               seq_aux=True, torch_dtype="bfloat16")
    return dict(sorted(cfg.items()))


def build_tiny_checkpoint(out_dir: str | Path, spec: TinySpec = TinySpec()) -> Path:
    """Write the checkpoint described by `spec` into `out_dir` (created; must be empty or absent)."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    model = random_model(spec)
    model.config.architectures = ["DeepseekV3ForCausalLM"]
    if spec.uses_hf_writer:
        total = sum(p.numel() * 4 for p in model.parameters())
        kwargs = {"max_shard_size": max(total // spec.shards, 1)} if spec.shards > 1 else {}
        model.save_pretrained(out, **kwargs)
    else:
        model.config.save_pretrained(out)
        write_shards(out, stored_tensors(spec, canonical_state_dict(model)), spec.shards, spec.index)

    config = json.loads((out / "config.json").read_text())
    config.pop("dtype", None)
    if spec.fp8:
        config["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                         "weight_block_size": list(FP8_BLOCK)}
    if spec.config_style == "v3":
        config = _v3_style(config)
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": BOS_ID, "eos_token_id": EOS_ID}, indent=2))
    write_tokenizer(out, spec.vocab_size - 4, spec.max_position_embeddings)
    return out


# ---- tokenizer -----------------------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=4)
def _tokenizer_json(vocab_size: int) -> str:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=list(SPECIAL_TOKENS), show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(TRAINING_TEXT.splitlines(), trainer)
    return tok.to_str()


def _added_token(content: str) -> dict[str, Any]:
    return {"__type": "AddedToken", "content": content, "lstrip": False, "normalized": True, "rstrip": False,
            "single_word": False}


def write_tokenizer(out_dir: Path, vocab_size: int, max_length: int) -> None:
    """tokenizer.json (byte-level BPE, specials at ids 0-3) + tokenizer_config.json in the DeepSeek-V3 shape."""
    (out_dir / "tokenizer.json").write_text(_tokenizer_json(vocab_size))
    (out_dir / "tokenizer_config.json").write_text(json.dumps({
        "add_bos_token": False, "add_eos_token": False, "bos_token": _added_token(BOS),
        "eos_token": _added_token(EOS), "pad_token": _added_token(EOS), "unk_token": None,
        "clean_up_tokenization_spaces": False, "legacy": True, "model_max_length": max_length,
        "tokenizer_class": "LlamaTokenizerFast", "chat_template": CHAT_TEMPLATE}, indent=2, ensure_ascii=False))


# ---- the transformers reference ------------------------------------------------------------------------------------
@functools.lru_cache(maxsize=8)
def _reference(model_dir: str):
    from transformers import DeepseekV3Config, DeepseekV3ForCausalLM

    from dzc.checkpoint.loader import Checkpoint

    ckpt = Checkpoint.open(model_dir)
    ckpt.validate()
    config = DeepseekV3Config.from_pretrained(model_dir)
    if hasattr(config, "quantization_config"):
        del config.quantization_config  # we feed dequantized weights; transformers must not quantize anything
    config._attn_implementation = "eager"
    model = DeepseekV3ForCausalLM(config).eval()
    load_canonical(model, {name: ckpt.f32(name) for name in ckpt.expected_tensors()})
    ckpt.close()
    return model


def hf_reference(model_dir: str | Path):
    """fp32 transformers `DeepseekV3ForCausalLM` holding the checkpoint's weights exactly as dzc decodes them."""
    return _reference(str(Path(model_dir).resolve()))


def hf_logits(model_dir: str | Path, ids: list[int] | np.ndarray) -> np.ndarray:
    """Logits [T, vocab] (float32) of one forward pass over `ids` from position 0."""
    import torch

    model = hf_reference(model_dir)
    with torch.no_grad():
        out = model(input_ids=torch.tensor([list(map(int, ids))], dtype=torch.long), use_cache=False)
    return out.logits[0].float().numpy()


def hf_greedy(model_dir: str | Path, prompt_ids: list[int], n: int) -> tuple[list[int], np.ndarray]:
    """Greedy decode `n` tokens with transformers' KV cache; returns (tokens, logits [n, vocab] each was chosen from).

    Does not stop at EOS: random models emit it by chance and tests want a fixed length.
    """
    import torch
    from transformers import DynamicCache

    model = hf_reference(model_dir)
    cache = DynamicCache(config=model.config)
    tokens: list[int] = []
    steps: list[np.ndarray] = []
    ids = torch.tensor([list(map(int, prompt_ids))], dtype=torch.long)
    with torch.no_grad():
        for _ in range(n):
            logits = model(input_ids=ids, past_key_values=cache, use_cache=True).logits[0, -1].float().numpy()
            steps.append(logits)
            tokens.append(int(np.argmax(logits)))
            ids = torch.tensor([[tokens[-1]]], dtype=torch.long)
    return tokens, np.stack(steps) if steps else np.zeros((0, model.config.vocab_size), np.float32)


# ---- damaging files for bad-input tests ----------------------------------------------------------------------------
def copy_checkpoint(src: str | Path, dst: str | Path) -> Path:
    """A private copy of a fixture that a test may damage."""
    shutil.copytree(src, dst)
    return Path(dst)


def safetensors_files(folder: str | Path) -> list[Path]:
    return sorted(Path(folder).glob("*.safetensors"))


def truncate_file(path: str | Path, drop_bytes: int) -> None:
    """Cut the last `drop_bytes` bytes off a file (an interrupted download)."""
    path = Path(path)
    data = path.read_bytes()
    path.write_bytes(data[: max(len(data) - drop_bytes, 0)])


def set_header_length(path: str | Path, length: int) -> None:
    """Overwrite the 8-byte header length field."""
    path = Path(path)
    data = bytearray(path.read_bytes())
    data[:8] = struct.pack("<Q", length)
    path.write_bytes(bytes(data))


def read_header(path: str | Path) -> dict[str, Any]:
    data = Path(path).read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    return json.loads(data[8: 8 + n])


def rewrite_header(path: str | Path, edit: Callable[[dict[str, Any]], Optional[dict[str, Any]]]) -> None:
    """Apply `edit` to the parsed header (in place or by returning a new dict); the data section is kept as is."""
    path = Path(path)
    data = path.read_bytes()
    (n,) = struct.unpack("<Q", data[:8])
    header = json.loads(data[8: 8 + n])
    header = edit(header) or header
    blob = json.dumps(header).encode()
    blob += b" " * (-len(blob) % 8)
    path.write_bytes(struct.pack("<Q", len(blob)) + blob + data[8 + n:])


def push_offsets_past_end(path: str | Path, name: str) -> None:
    """Move tensor `name`'s data_offsets beyond the end of the data section (same span)."""
    def edit(h: dict[str, Any]) -> None:
        data_end = max(e["data_offsets"][1] for k, e in h.items() if k != "__metadata__")
        begin, end = h[name]["data_offsets"]
        h[name]["data_offsets"] = [data_end + 8, data_end + 8 + (end - begin)]
    rewrite_header(path, edit)


def param_count(model_dir: str | Path) -> int:
    """Total elements stored in the checkpoint's safetensors files (scales included)."""
    return sum(math.prod(e["shape"]) for f in safetensors_files(model_dir)
               for k, e in read_header(f).items() if k != "__metadata__")


# ---- the standard fixtures (built once per session by tests/conftest.py) -------------------------------------------
STANDARD_SPECS: dict[str, TinySpec] = {
    # fp32, q_lora + YaRN, transformers-v5 config, one model.safetensors written by save_pretrained
    "tiny_qlora_yarn": TinySpec(seed=0),
    # fp32, direct q_proj + plain RoPE, real-V3 config spelling, HF-sharded with an index
    "tiny_direct_q_plain_rope": TinySpec(q_lora=False, yarn=False, shards=3, config_style="v3", seed=1),
    # block-FP8 layers + bf16 rest (as the real V3 files), ragged blocks (hidden 160, dense 200), our own index
    "tiny_fp8_sharded": TinySpec(fp8=True, dtype="bfloat16", shards=3, hidden_size=160, intermediate_size=200,
                                 config_style="v3", seed=2),
    # bf16, two shard files and no index
    "tiny_bf16": TinySpec(dtype="bfloat16", shards=2, index=False, seed=3),
}


def assert_close(a: np.ndarray, b: np.ndarray, tol: float) -> None:
    """max |a - b| <= tol * max(1, max |b|): logits compared relative to their scale."""
    scale = max(1.0, float(np.abs(b).max()))
    assert np.abs(a - b).max() <= tol * scale, f"max diff {np.abs(a - b).max():.3g} (scale {scale:.3g})"


def executor_greedy(executor, prompt_ids: list[int], n: int) -> list[int]:
    """n greedy tokens from any ModelExecutor (prefill once, then one token per forward)."""
    executor.reset()
    logits = executor.forward(np.array(prompt_ids))
    tokens = []
    for _ in range(n):
        tokens.append(int(logits[-1].argmax()))
        logits = executor.forward(np.array([tokens[-1]]))
    return tokens
