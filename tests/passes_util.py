"""Random tiny DeepSeek-V3 models for pass tests, numpy only (no torch, no checkpoint on disk).

`tiny_model(q_lora=True)` traces the model code with a small config and fills a `WeightStore` with seeded random
weights whose names and shapes come from the traced programs, so the store always matches the model code.
`write_checkpoint(folder, model)` writes the same model as a checkpoint folder (config.json + one safetensors
file) for CLI tests.
"""
from __future__ import annotations

import json
import zlib
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from dzc.checkpoint.config import ModelConfig
from dzc.ir.dtypes import DType
from dzc.ir.node import WeightFormat
from dzc.ir.program import Program
from dzc.ir.weights import WeightStore
from dzc.model import deepseek_v3
from dzc.passes.base import PassContext


def tiny_config(q_lora: bool = True, layers: int = 3, yarn: bool = True, **overrides: Any) -> dict[str, Any]:
    cfg: dict[str, Any] = dict(
        model_type="deepseek_v3", vocab_size=96, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
        num_hidden_layers=layers, num_attention_heads=4, q_lora_rank=24 if q_lora else None, kv_lora_rank=16,
        qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=10, n_routed_experts=8, n_shared_experts=1,
        num_experts_per_tok=2, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
        max_position_embeddings=256, rope_theta=10000.0, rms_norm_eps=1e-6)
    if yarn:
        cfg["rope_scaling"] = dict(type="yarn", factor=4.0, original_max_position_embeddings=64, beta_fast=32,
                                   beta_slow=1, mscale=1.0, mscale_all_dim=1.0)
    cfg.update(overrides)
    return cfg


def v3_config(layers: int = 61) -> dict[str, Any]:
    """The real DeepSeek-V3 shape (config_671B)."""
    return dict(
        model_type="deepseek_v3", vocab_size=129280, hidden_size=7168, intermediate_size=18432,
        moe_intermediate_size=2048, num_hidden_layers=layers, num_attention_heads=128, q_lora_rank=1536,
        kv_lora_rank=512, qk_rope_head_dim=64, qk_nope_head_dim=128, v_head_dim=128, n_routed_experts=256,
        n_shared_experts=1, num_experts_per_tok=8, n_group=8, topk_group=4, routed_scaling_factor=2.5,
        first_k_dense_replace=3, max_position_embeddings=163840, rope_theta=10000.0,
        rope_scaling=dict(type="yarn", factor=40.0, original_max_position_embeddings=4096, beta_fast=32, beta_slow=1,
                          mscale=1.0, mscale_all_dim=1.0),
        quantization_config=dict(quant_method="fp8", fmt="e4m3", weight_block_size=[128, 128]))


def _seed(name: str, seed: int) -> int:
    return zlib.crc32(name.encode()) ^ seed


def random_weight(name: str, shape: tuple[int, ...], seed: int = 0) -> np.ndarray:
    """std 0.1 matrices, 1 + noise norms, a non-zero routing bias (see deepseek-v3-facts.md, Numbers)."""
    rng = np.random.default_rng(_seed(name, seed))
    noise = rng.standard_normal(shape).astype(np.float32)
    if name.endswith("norm.weight"):
        return 1.0 + 0.1 * noise
    if name.endswith("e_score_correction_bias"):
        return 0.2 * noise
    return 0.1 * noise


@dataclass
class TinyModel:
    config: ModelConfig
    config_dict: dict[str, Any]
    programs: dict[str, Program]
    weights: dict[str, np.ndarray]   # checkpoint tensors (model constants excluded)
    store: WeightStore

    def context(self, target: str = "interp", **facts: Any) -> PassContext:
        return PassContext(self.store, self.config, target=target, facts=dict(facts))


def trace_model(config: ModelConfig, fmt: Optional[WeightFormat] = None) -> dict[str, Program]:
    fmt = fmt or WeightFormat(DType.F32)
    return {phase: deepseek_v3.trace(config, lambda name: fmt, phase) for phase in deepseek_v3.PHASES}


def tiny_model(q_lora: bool = True, seed: int = 0, **overrides: Any) -> TinyModel:
    cfg_dict = tiny_config(q_lora=q_lora, **overrides)
    config = ModelConfig.from_dict(cfg_dict)
    programs = trace_model(config)
    consts = deepseek_v3.constants(config)
    weights: dict[str, np.ndarray] = {}
    for program in programs.values():
        for ref, node in ((n.arg, n) for n in program.toposort() if n.op.name == "WEIGHT"):
            if ref.name not in consts and ref.name not in weights:
                weights[ref.name] = random_weight(ref.name, tuple(node.shape), seed)
    store = WeightStore(lambda name: consts[name] if name in consts else weights[name])
    return TinyModel(config, cfg_dict, programs, weights, store)


def zero_store(programs: dict[str, Program]) -> WeightStore:
    """A store answering every weight of `programs` with zeros of its shape (for tracing-scale tests)."""
    shapes = {n.arg.name: tuple(n.shape) for p in programs.values() for n in p.toposort() if n.op.name == "WEIGHT"}
    return WeightStore(lambda name: np.zeros(shapes[name], np.float32))


def write_checkpoint(folder: Path, model: TinyModel) -> Path:
    """config.json + model.safetensors (f32) for `model`; Checkpoint.open accepts it."""
    from dzc.checkpoint.safetensors_file import write_safetensors

    folder.mkdir(parents=True, exist_ok=True)
    cfg = dict(model.config_dict, architectures=["DeepseekV3ForCausalLM"])
    (folder / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    write_safetensors(folder / "model.safetensors", {k: ("F32", v) for k, v in sorted(model.weights.items())})
    return folder
