"""Which tensors a DeepSeek-V3 checkpoint must hold, computed from the config alone.

This table is the contract between config.json and the weights: `Checkpoint.validate()` checks every entry
(name, shape, storage dtype, FP8 scale grid) before any compute, so a wrong shape fails in one line naming the
tensor instead of deep inside a matmul. Names follow the HF checkpoint layout (see the facts note).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

from dzc.checkpoint.config import ModelConfig
from dzc.checkpoint.dtypes import scale_shape

FLOAT_DTYPES = frozenset({"F32", "BF16", "F16"})
FP8_DTYPE = "F8_E4M3"
SCALE_SUFFIX = "_scale_inv"  # weight `x.weight` has block scales `x.weight_scale_inv`
_LAYER = re.compile(r"^model\.layers\.(\d+)\.")


@dataclass(frozen=True)
class TensorSpec:
    """Expected shape and allowed storage dtypes of one tensor.

    has_fp8_scale: the weight is a Linear that the checkpoint's quantization_config covers; stored as F8_E4M3 it
    must come with `<name>_scale_inv` of shape [ceil(M/b0), ceil(N/b1)].
    """

    shape: tuple[int, ...]
    dtypes: frozenset[str]
    has_fp8_scale: bool = False

    def scale_shape(self, block: tuple[int, int]) -> tuple[int, int]:
        return scale_shape((self.shape[0], self.shape[1]), block)


def scale_name(weight_name: str) -> str:
    return weight_name + SCALE_SUFFIX


def layer_index(name: str) -> Optional[int]:
    """N for a `model.layers.N.` tensor, else None."""
    m = _LAYER.match(name)
    return int(m.group(1)) if m else None


def is_mtp_tensor(cfg: ModelConfig, name: str) -> bool:
    """MTP (next-n prediction) modules are stored as extra layers after the last decoder layer."""
    i = layer_index(name)
    return i is not None and cfg.num_hidden_layers <= i < cfg.num_hidden_layers + cfg.num_nextn_predict_layers


def expected_tensors(cfg: ModelConfig) -> dict[str, TensorSpec]:
    """Every tensor the model reads, in file-reading order (embed, layers, final norm, head)."""
    linear_dtypes = FLOAT_DTYPES | {FP8_DTYPE} if cfg.quantization is not None else FLOAT_DTYPES
    fp8 = cfg.quantization is not None
    out: dict[str, TensorSpec] = {}

    def plain(name: str, *shape: int) -> None:
        out[name] = TensorSpec(tuple(shape), FLOAT_DTYPES)

    def linear(name: str, rows: int, cols: int) -> None:
        out[name + ".weight"] = TensorSpec((rows, cols), linear_dtypes, fp8)

    def swiglu(prefix: str, width: int) -> None:
        linear(prefix + ".gate_proj", width, cfg.hidden_size)
        linear(prefix + ".up_proj", width, cfg.hidden_size)
        linear(prefix + ".down_proj", cfg.hidden_size, width)

    h, heads = cfg.hidden_size, cfg.num_attention_heads
    plain("model.embed_tokens.weight", cfg.vocab_size, h)
    for i in range(cfg.num_hidden_layers):
        p = f"model.layers.{i}."
        plain(p + "input_layernorm.weight", h)
        a = p + "self_attn."
        if cfg.q_lora_rank is None:
            linear(a + "q_proj", heads * cfg.qk_head_dim, h)
        else:
            linear(a + "q_a_proj", cfg.q_lora_rank, h)
            plain(a + "q_a_layernorm.weight", cfg.q_lora_rank)
            linear(a + "q_b_proj", heads * cfg.qk_head_dim, cfg.q_lora_rank)
        linear(a + "kv_a_proj_with_mqa", cfg.kv_lora_rank + cfg.qk_rope_head_dim, h)
        plain(a + "kv_a_layernorm.weight", cfg.kv_lora_rank)
        linear(a + "kv_b_proj", heads * (cfg.qk_nope_head_dim + cfg.v_head_dim), cfg.kv_lora_rank)
        linear(a + "o_proj", h, heads * cfg.v_head_dim)
        plain(p + "post_attention_layernorm.weight", h)
        m = p + "mlp."
        if not cfg.is_moe_layer(i):
            swiglu(m[:-1], cfg.intermediate_size)
            continue
        plain(m + "gate.weight", cfg.n_routed_experts, h)  # the router stays in high precision
        out[m + "gate.e_score_correction_bias"] = TensorSpec((cfg.n_routed_experts,), frozenset({"F32", "BF16", "F16"}))
        for e in range(cfg.n_routed_experts):
            swiglu(f"{m}experts.{e}", cfg.moe_intermediate_size)
        if cfg.n_shared_experts:
            swiglu(m + "shared_experts", cfg.moe_intermediate_size * cfg.n_shared_experts)
    plain("model.norm.weight", h)
    if not cfg.tie_word_embeddings:
        plain("lm_head.weight", cfg.vocab_size, h)
    return out
