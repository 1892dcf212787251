"""DeepSeek-V3, written once against the tracer.

`trace(config, phase)` runs this code on symbolic tensors and returns a `Program`:
  inputs   tokens i32[N], positions i32[N], and per layer i the cache rows already stored
           cache.i.latent f32[P, kv_lora_rank] (kv_a_layernorm'd latent c) and cache.i.k_pe f32[P, rope_dim];
  outputs  logits f32[N, vocab] and the N new rows of every cache (same names), which the runtime appends.
N is the symbol T for the prefill program and 1 for the decode program. The attention here is the expanded
(multi-head) form that the reference implementations run; the MLA absorption pass rewrites it.
Semantics follow transformers' DeepseekV3ForCausalLM in fp32 (see ../shared/notes/deepseek-v3-facts.md).
"""
from __future__ import annotations

from typing import Callable

import numpy as np

from typing import TYPE_CHECKING
if TYPE_CHECKING:
    from dzc.checkpoint.config import ModelConfig
from dzc.ir.dtypes import DType
from dzc.ir.node import WeightFormat
from dzc.ir.program import Program
from dzc.ir.shapes import Dim, P, T
from dzc.ir.tracer import Tensor, arange, concat, gather, input_, linear, moe, take, topk, weight

FormatOf = Callable[[str], WeightFormat]
INV_FREQ = "rope.inv_freq"  # a constant the model adds to the weight store, not a checkpoint tensor
NEG_INF = float("-inf")


def constants(config: ModelConfig) -> dict[str, np.ndarray]:
    """Weights the model derives from its config rather than reading from the checkpoint."""
    return {INV_FREQ: config.rope.inv_freq().astype(np.float32)}


class _Builder:
    """Holds the config and weight formats while one program is traced."""

    def __init__(self, config: ModelConfig, format_of: FormatOf) -> None:
        self.cfg = config
        self.format_of = format_of

    def w(self, name: str, *shape: int) -> Tensor:
        return weight(name, self.format_of(name), shape)

    def rmsnorm(self, x: Tensor, name: str) -> Tensor:
        variance = (x * x).mean(-1)
        return x * (variance + self.cfg.rms_norm_eps).rsqrt() * self.w(name, x.shape[-1])

    def mlp(self, x: Tensor, prefix: str, inter: int) -> Tensor:
        h = self.cfg.hidden_size
        gate = linear(x, self.w(f"{prefix}.gate_proj.weight", inter, h))
        up = linear(x, self.w(f"{prefix}.up_proj.weight", inter, h))
        return linear(gate.silu() * up, self.w(f"{prefix}.down_proj.weight", h, inter))

    # ---- rope (interleaved pairs, the layout DeepSeek checkpoints store q_pe / k_pe in)
    def rope_tables(self, positions: Tensor) -> tuple[Tensor, Tensor]:
        half = self.cfg.qk_rope_head_dim // 2
        angles = positions.cast(DType.F32).reshape(positions.shape[0], 1) * self.w(INV_FREQ, half)
        scale = self.cfg.rope.cos_sin_factor()
        cos, sin = angles.cos(), angles.sin()
        return (cos * scale, sin * scale) if scale != 1.0 else (cos, sin)

    @staticmethod
    def rope(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
        """Rotate (x[2i], x[2i+1]) by angle i. cos/sin are [N, d/2] and broadcast over x's middle axes."""
        *lead, d = x.shape
        pairs = x.reshape(*lead, d // 2, 2)
        even, odd = pairs.slice(-1, 0, 1), pairs.slice(-1, 1, 2)
        extra = (1,) * (len(lead) - 1)
        c = cos.reshape(cos.shape[0], *extra, d // 2, 1)
        s = sin.reshape(sin.shape[0], *extra, d // 2, 1)
        return concat([even * c - odd * s, even * s + odd * c], -1).reshape(*lead, d)

    # ---- multi-head latent attention
    def attention(self, x: Tensor, i: int, n: Dim, cos: Tensor, sin: Tensor, allowed: Tensor,
                  past_latent: Tensor, past_k_pe: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        cfg, pre = self.cfg, f"model.layers.{i}.self_attn"
        heads, nope, rope, vdim = cfg.num_attention_heads, cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim
        qk = nope + rope
        if cfg.q_lora_rank is None:
            q = linear(x, self.w(f"{pre}.q_proj.weight", heads * qk, cfg.hidden_size))
        else:
            qa = linear(x, self.w(f"{pre}.q_a_proj.weight", cfg.q_lora_rank, cfg.hidden_size))
            q = linear(self.rmsnorm(qa, f"{pre}.q_a_layernorm.weight"),
                       self.w(f"{pre}.q_b_proj.weight", heads * qk, cfg.q_lora_rank))
        q_nope, q_pe = q.reshape(n, heads, qk).split(-1, [nope, rope])
        q_pe = self.rope(q_pe, cos, sin)

        kv_a = linear(x, self.w(f"{pre}.kv_a_proj_with_mqa.weight", cfg.kv_lora_rank + rope, cfg.hidden_size))
        latent, k_pe = kv_a.split(-1, [cfg.kv_lora_rank, rope])
        latent = self.rmsnorm(latent, f"{pre}.kv_a_layernorm.weight")
        k_pe = self.rope(k_pe, cos, sin)

        all_latent = concat([past_latent, latent], 0)  # [P+N, kv_lora]
        all_k_pe = concat([past_k_pe, k_pe], 0)         # [P+N, rope]
        kv_len = all_latent.shape[0]
        kv = linear(all_latent, self.w(f"{pre}.kv_b_proj.weight", heads * (nope + vdim), cfg.kv_lora_rank))
        k_nope, v = kv.reshape(kv_len, heads, nope + vdim).split(-1, [nope, vdim])
        k = concat([k_nope, all_k_pe.reshape(kv_len, 1, rope).expand(kv_len, heads, rope)], -1)
        q_full = concat([q_nope, q_pe], -1)

        scale = qk ** -0.5 * cfg.rope.softmax_scale_factor()
        scores = (q_full.permute(1, 0, 2) @ k.permute(1, 2, 0)) * scale   # [heads, N, P+N]
        probs = allowed.where(scores, NEG_INF).softmax(-1)
        out = (probs @ v.permute(1, 0, 2)).permute(1, 0, 2).reshape(n, heads * vdim)
        return linear(out, self.w(f"{pre}.o_proj.weight", cfg.hidden_size, heads * vdim)), latent, k_pe

    # ---- mixture of experts (noaux_tc routing)
    def moe(self, x: Tensor, i: int, n: Dim) -> Tensor:
        cfg, pre = self.cfg, f"model.layers.{i}.mlp"
        experts, groups = cfg.n_routed_experts, cfg.n_group
        scores = linear(x, self.w(f"{pre}.gate.weight", experts, cfg.hidden_size)).sigmoid()
        choice = scores + self.w(f"{pre}.gate.e_score_correction_bias", experts)   # bias selects, never weighs
        grouped = choice.reshape(n, groups, experts // groups)
        group_scores = take(grouped, topk(grouped, 2)).sum(-1).reshape(n, groups)
        kth_best = take(group_scores, topk(group_scores, cfg.topk_group).slice(-1, cfg.topk_group - 1, cfg.topk_group))
        dropped = (group_scores < kth_best).reshape(n, groups, 1).expand(n, groups, experts // groups)
        choice = dropped.reshape(n, experts).where(NEG_INF, choice)
        idx = topk(choice, cfg.num_experts_per_tok)
        w = take(scores, idx)
        if cfg.norm_topk_prob:
            w = w / (w.sum(-1) + 1e-20)
        w = w * cfg.routed_scaling_factor
        inter, h = cfg.moe_intermediate_size, cfg.hidden_size
        expert_weights = [
            (self.w(f"{pre}.experts.{e}.gate_proj.weight", inter, h), self.w(f"{pre}.experts.{e}.up_proj.weight", inter, h),
             self.w(f"{pre}.experts.{e}.down_proj.weight", h, inter)) for e in range(experts)]
        routed = moe(x, idx, w, expert_weights)
        return routed + self.mlp(x, f"{pre}.shared_experts", inter * cfg.n_shared_experts)

    # ---- the whole model
    def program(self, name: str, n: Dim, last_only: bool = False) -> Program:
        cfg = self.cfg
        tokens = input_("tokens", DType.I32, (n,))
        positions = input_("positions", DType.I32, (n,))
        inputs, outputs = [tokens, positions], []
        cos, sin = self.rope_tables(positions)
        # query i may attend key j iff j <= positions[i]
        allowed = arange(P + n).reshape(1, P + n) < (positions + 1).reshape(n, 1)

        h = gather(self.w("model.embed_tokens.weight", cfg.vocab_size, cfg.hidden_size), tokens)
        for i in range(cfg.num_hidden_layers):
            past_latent = input_(f"cache.{i}.latent", DType.F32, (P, cfg.kv_lora_rank))
            past_k_pe = input_(f"cache.{i}.k_pe", DType.F32, (P, cfg.qk_rope_head_dim))
            inputs += [past_latent, past_k_pe]
            attn, latent, k_pe = self.attention(self.rmsnorm(h, f"model.layers.{i}.input_layernorm.weight"),
                                                i, n, cos, sin, allowed, past_latent, past_k_pe)
            outputs += [(f"cache.{i}.latent", latent.node), (f"cache.{i}.k_pe", k_pe.node)]
            h = h + attn
            x = self.rmsnorm(h, f"model.layers.{i}.post_attention_layernorm.weight")
            ffn = self.moe(x, i, n) if cfg.is_moe_layer(i) else self.mlp(x, f"model.layers.{i}.mlp", cfg.intermediate_size)
            h = h + ffn
        head = "model.embed_tokens.weight" if cfg.tie_word_embeddings else "lm_head.weight"
        if last_only:
            h = h.slice(0, n - 1, n)
        logits = linear(self.rmsnorm(h, "model.norm.weight"), self.w(head, cfg.vocab_size, cfg.hidden_size))
        return Program(name, tuple(t.node for t in inputs), (("logits", logits.node), *outputs))


# prefill: logits for each of T new tokens (perplexity, parity checks); prefill_last: for the last one only, which
# is all generation needs (the lm_head over a 512-token prompt is 14% of prefill); decode: exactly one new token.
PHASES = ("prefill", "prefill_last", "decode")


def trace(config: ModelConfig, format_of: FormatOf, phase: str) -> Program:
    """The program of one phase (PHASES)."""
    if phase not in PHASES:
        raise ValueError(f"phase must be one of {PHASES}")
    return _Builder(config, format_of).program(phase, 1 if phase == "decode" else T, last_only=phase == "prefill_last")
