"""Write a synthetic DeepSeek-V3-shaped checkpoint big enough that decode reads memory, not cache.

    python bench/make_checkpoint.py /tmp/dzc-bench/dsv3-bf16                  # bf16 shards
    python bench/make_checkpoint.py /tmp/dzc-bench/dsv3-fp8 --fp8             # block-FP8 Linear weights

Default shape (about 1.5e9 parameters, about 360e6 read per decoded token): hidden 2048, 12 layers (the first
dense), 16 heads, q_lora 768, kv_lora 512, rope 64, nope 128, v 128, 64 routed experts of width 256 with top-6
routing in 8 groups (top-4 groups), 2 shared experts, vocab 32000. Weights are random (std 0.02, norms near 1,
a non-zero router bias) and written in the real checkpoints' layout and names (HF index + shards); FP8 uses
128x128 blocks with weight_scale_inv, like DeepSeek's files. No tokenizer: benchmarks feed token ids.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

from dzc.checkpoint import dtypes
from dzc.checkpoint.safetensors_file import write_safetensors


def config(a: argparse.Namespace) -> dict:
    cfg = {
        "architectures": ["DeepseekV3ForCausalLM"], "model_type": "deepseek_v3",
        "vocab_size": a.vocab, "hidden_size": a.hidden, "intermediate_size": a.dense_inter,
        "moe_intermediate_size": a.moe_inter, "num_hidden_layers": a.layers, "num_attention_heads": a.heads,
        "num_key_value_heads": a.heads, "q_lora_rank": a.q_lora, "kv_lora_rank": a.kv_lora,
        "qk_rope_head_dim": a.rope, "qk_nope_head_dim": a.nope, "v_head_dim": a.v,
        "n_routed_experts": a.experts, "n_shared_experts": a.shared, "num_experts_per_tok": a.topk,
        "n_group": a.groups, "topk_group": a.topk_groups, "routed_scaling_factor": 2.5, "norm_topk_prob": True,
        "first_k_dense_replace": 1, "moe_layer_freq": 1, "rms_norm_eps": 1e-6, "max_position_embeddings": 4096,
        "rope_parameters": {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0,
                            "original_max_position_embeddings": 1024, "beta_fast": 32.0, "beta_slow": 1.0,
                            "mscale": 1.0, "mscale_all_dim": 1.0},
        "tie_word_embeddings": False, "hidden_act": "silu", "scoring_func": "sigmoid", "topk_method": "noaux_tc",
        "bos_token_id": 0, "eos_token_id": 1, "attention_bias": False, "rope_interleave": True,
    }
    if a.fp8:
        cfg["quantization_config"] = {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                                      "weight_block_size": [128, 128]}
    return cfg


def layer_tensors(a: argparse.Namespace, i: int, rng: np.random.Generator) -> dict[str, tuple[tuple, str]]:
    """name -> (shape, kind) with kind 'linear' (FP8-able), 'norm', 'plain' or 'bias'."""
    p, h = f"model.layers.{i}", a.hidden
    qk = a.nope + a.rope
    out = {f"{p}.input_layernorm.weight": ((h,), "norm"), f"{p}.post_attention_layernorm.weight": ((h,), "norm"),
           f"{p}.self_attn.q_a_proj.weight": ((a.q_lora, h), "linear"),
           f"{p}.self_attn.q_a_layernorm.weight": ((a.q_lora,), "norm"),
           f"{p}.self_attn.q_b_proj.weight": ((a.heads * qk, a.q_lora), "linear"),
           f"{p}.self_attn.kv_a_proj_with_mqa.weight": ((a.kv_lora + a.rope, h), "linear"),
           f"{p}.self_attn.kv_a_layernorm.weight": ((a.kv_lora,), "norm"),
           f"{p}.self_attn.kv_b_proj.weight": ((a.heads * (a.nope + a.v), a.kv_lora), "linear"),
           f"{p}.self_attn.o_proj.weight": ((h, a.heads * a.v), "linear")}
    if i == 0:
        for proj, shape in (("gate", (a.dense_inter, h)), ("up", (a.dense_inter, h)), ("down", (h, a.dense_inter))):
            out[f"{p}.mlp.{proj}_proj.weight"] = (shape, "linear")
        return out
    out[f"{p}.mlp.gate.weight"] = ((a.experts, h), "plain")
    out[f"{p}.mlp.gate.e_score_correction_bias"] = ((a.experts,), "bias")
    for e in range(a.experts):
        for proj, shape in (("gate", (a.moe_inter, h)), ("up", (a.moe_inter, h)), ("down", (h, a.moe_inter))):
            out[f"{p}.mlp.experts.{e}.{proj}_proj.weight"] = (shape, "linear")
    si = a.moe_inter * a.shared
    for proj, shape in (("gate", (si, h)), ("up", (si, h)), ("down", (h, si))):
        out[f"{p}.mlp.shared_experts.{proj}_proj.weight"] = (shape, "linear")
    return out


def encode(name: str, shape: tuple, kind: str, a: argparse.Namespace, rng: np.random.Generator) -> dict:
    if kind == "norm":
        w = (1.0 + 0.05 * rng.standard_normal(shape)).astype(np.float32)
    elif kind == "bias":
        return {name: ("F32", (0.1 * rng.standard_normal(shape)).astype(np.float32))}
    else:
        w = rng.standard_normal(shape, dtype=np.float32) * np.float32(a.std)
    if kind == "linear" and a.fp8:
        q, s = dtypes.quantize_fp8_blocks(w, (128, 128))
        return {name: ("F8_E4M3", q), name + "_scale_inv": ("F32", s)}
    return {name: ("BF16", dtypes.f32_to_bf16(w))}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("out")
    ap.add_argument("--fp8", action="store_true", help="block-FP8 Linear weights inside the layers")
    ap.add_argument("--layers", type=int, default=12)
    ap.add_argument("--hidden", type=int, default=2048)
    ap.add_argument("--heads", type=int, default=16)
    ap.add_argument("--q-lora", type=int, default=768)
    ap.add_argument("--kv-lora", type=int, default=512)
    ap.add_argument("--rope", type=int, default=64)
    ap.add_argument("--nope", type=int, default=128)
    ap.add_argument("--v", type=int, default=128)
    ap.add_argument("--experts", type=int, default=64)
    ap.add_argument("--topk", type=int, default=6)
    ap.add_argument("--groups", type=int, default=8)
    ap.add_argument("--topk-groups", type=int, default=4)
    ap.add_argument("--shared", type=int, default=2)
    ap.add_argument("--moe-inter", type=int, default=256)
    ap.add_argument("--dense-inter", type=int, default=4096)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--std", type=float, default=0.02)
    ap.add_argument("--seed", type=int, default=0)
    a = ap.parse_args(argv)
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(a.seed)
    weight_map: dict[str, str] = {}
    shards = [("model.embed_tokens.weight", (a.vocab, a.hidden), "plain")]
    groups = [shards]
    for i in range(a.layers):
        groups.append([(n, s, k) for n, (s, k) in layer_tensors(a, i, rng).items()])
    groups.append([("model.norm.weight", (a.hidden,), "norm"), ("lm_head.weight", (a.vocab, a.hidden), "plain")])
    total = 0
    for gi, group in enumerate(groups):
        fname = f"model-{gi + 1:05d}-of-{len(groups):05d}.safetensors"
        tensors = {}
        for name, shape, kind in group:
            tensors.update(encode(name, shape, kind, a, rng))
        for name, (_, arr) in tensors.items():
            weight_map[name] = fname
            total += arr.nbytes
        write_safetensors(out / fname, tensors)
        print(f"\r{fname} ({total / 1e9:.2f} GB)", end="", file=sys.stderr, flush=True)
    print(file=sys.stderr)
    (out / "model.safetensors.index.json").write_text(json.dumps({"metadata": {"total_size": total},
                                                                  "weight_map": weight_map}, indent=1))
    (out / "config.json").write_text(json.dumps(config(a), indent=2) + "\n")
    (out / "generation_config.json").write_text(json.dumps({"bos_token_id": 0, "eos_token_id": 1}) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
