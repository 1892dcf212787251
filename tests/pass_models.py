"""Tiny random DeepSeek-V3 programs for pass tests: no checkpoint files, no torch.

`tiny(q_lora=...)` traces prefill and decode for a small config and fills a WeightStore with random weights
(std 0.1, norms 1 + noise, a non-zero gate bias); `inputs(...)` makes T new tokens after P random cache rows;
`run(...)` interprets a program. Pass tests compare a program before and after a pass on the same inputs.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Optional

import numpy as np

from dzc.checkpoint.config import ModelConfig
from dzc.ir.dtypes import DType
from dzc.ir.interpreter import Interpreter
from dzc.ir.node import WeightFormat
from dzc.ir.ops import Op
from dzc.ir.program import Program
from dzc.ir.weights import WeightStore
from dzc.model import deepseek_v3
from dzc.passes.base import PassContext

FormatOf = Callable[[str], WeightFormat]


def config(q_lora: bool = True, **overrides) -> ModelConfig:
    d = dict(model_type="deepseek_v3", vocab_size=64, hidden_size=32, intermediate_size=48, moe_intermediate_size=16,
             num_hidden_layers=3, num_attention_heads=4, q_lora_rank=24 if q_lora else None, kv_lora_rank=16,
             qk_rope_head_dim=8, qk_nope_head_dim=12, v_head_dim=8, n_routed_experts=8, n_shared_experts=1,
             num_experts_per_tok=3, n_group=4, topk_group=2, routed_scaling_factor=2.5, first_k_dense_replace=1,
             max_position_embeddings=256,
             rope_parameters=dict(rope_type="yarn", rope_theta=10000.0, factor=4.0,
                                  original_max_position_embeddings=64, mscale=1.0, mscale_all_dim=1.0))
    d.update(overrides)
    return ModelConfig.from_dict(d)


@dataclass
class Tiny:
    config: ModelConfig
    programs: dict[str, Program]
    weights: WeightStore

    def ctx(self, **kw) -> PassContext:
        return PassContext(weights=self.weights, config=self.config, **kw)


def random_weights(cfg: ModelConfig, programs: dict[str, Program], seed: int) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    consts = deepseek_v3.constants(cfg)
    out: dict[str, np.ndarray] = {}
    for program in programs.values():
        for node in program.nodes(Op.WEIGHT):
            ref, node_shape = node.arg, node.shape
            if ref.name in out:
                continue
            if ref.name in consts:
                out[ref.name] = consts[ref.name]
            elif ref.name.endswith("norm.weight"):
                out[ref.name] = (1.0 + 0.1 * rng.standard_normal(node_shape)).astype(np.float32)
            elif ref.name.endswith("e_score_correction_bias"):
                out[ref.name] = (0.2 * rng.standard_normal(node_shape)).astype(np.float32)
            else:
                out[ref.name] = (0.1 * rng.standard_normal(node_shape)).astype(np.float32)
    return out


def tiny(q_lora: bool = True, seed: int = 0, format_of: Optional[FormatOf] = None, **overrides) -> Tiny:
    cfg = config(q_lora, **overrides)
    fmt = format_of or (lambda name: WeightFormat(DType.F32))
    programs = {phase: deepseek_v3.trace(cfg, fmt, phase) for phase in deepseek_v3.PHASES}
    values = random_weights(cfg, programs, seed)
    return Tiny(cfg, programs, WeightStore(lambda name: values[name]))


def inputs(cfg: ModelConfig, tokens: int, past: int, seed: int = 1) -> dict[str, np.ndarray]:
    rng = np.random.default_rng(seed)
    out = {"tokens": rng.integers(0, cfg.vocab_size, tokens).astype(np.int32),
           "positions": np.arange(past, past + tokens, dtype=np.int32)}
    for i in range(cfg.num_hidden_layers):
        out[f"cache.{i}.latent"] = rng.standard_normal((past, cfg.kv_lora_rank)).astype(np.float32)
        out[f"cache.{i}.k_pe"] = rng.standard_normal((past, cfg.qk_rope_head_dim)).astype(np.float32)
    return out


def run(program: Program, weights: WeightStore, feed: dict[str, np.ndarray]) -> dict[str, np.ndarray]:
    return Interpreter(weights).run(program, feed)


def rel_l2(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.linalg.norm(a - b) / np.linalg.norm(b))
