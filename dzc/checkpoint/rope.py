"""Rotary position embedding parameters of an MLA model: plain RoPE or YaRN, and the numbers they imply.

Both config spellings are read here: transformers v5 writes `rope_parameters {rope_type, rope_theta, ...}`,
the real DeepSeek-V3 files write `rope_theta` + `rope_scaling {type, factor, ...}`. They must give the same
`RopeConfig`, so everything downstream sees one form.

Numbers follow transformers 5.23 (`_compute_yarn_parameters` and `yarn_apply_mscale`), which agrees with
DeepSeek's own code whenever `mscale == mscale_all_dim` (V3, R1). Where they differ we follow HF:
  * the softmax scale is multiplied by mscale(factor, mscale_all_dim)^2 when mscale_all_dim is set (non-zero);
  * cos/sin are multiplied by mscale(factor, mscale) / mscale(factor, mscale_all_dim) when both are set,
    by mscale(factor, 1) when either is unset (0), or by an explicit `attention_factor`.
`mscale`/`mscale_all_dim` are stored as 0.0 when the config omits them, because HF tests them for truthiness.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from dzc.errors import ConfigError

ROPE_KINDS = ("default", "yarn")


def yarn_mscale(factor: float, mscale: float = 1.0) -> float:
    """YaRN's attention temperature: 0.1 * mscale * ln(factor) + 1 for factor > 1, else 1."""
    if factor <= 1.0:
        return 1.0
    return 0.1 * mscale * math.log(factor) + 1.0


@dataclass(frozen=True)
class RopeConfig:
    """RoPE over the `dim` = qk_rope_head_dim rotary channels (rotated in interleaved pairs in the weights)."""

    theta: float
    dim: int
    kind: str = "default"  # 'default' | 'yarn'
    factor: float = 1.0
    original_max_position_embeddings: int = 0  # YaRN's pretraining context L; 0 for plain RoPE
    beta_fast: float = 32.0
    beta_slow: float = 1.0
    mscale: float = 0.0  # 0.0 = not set in the config (HF semantics, see module docstring)
    mscale_all_dim: float = 0.0
    attention_factor: Optional[float] = None  # explicit cos/sin multiplier; rarely set
    truncate: bool = True  # round the YaRN correction range to whole channels (HF default)

    # ---- numbers ---------------------------------------------------------------------------------------------------
    def base_inv_freq(self) -> np.ndarray:
        """theta^(-2i/d) for i in [0, d/2), float64."""
        return 1.0 / (self.theta ** (np.arange(0, self.dim, 2, dtype=np.float64) / self.dim))

    def yarn_correction_range(self) -> tuple[float, float]:
        """(low, high) channel bounds of YaRN's ramp; DeepSeek-V3 gives (10, 23)."""
        d, base, length = self.dim, self.theta, self.original_max_position_embeddings

        def corr(rotations: float) -> float:
            return d * math.log(length / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low, high = corr(self.beta_fast), corr(self.beta_slow)
        if self.truncate:
            low, high = math.floor(low), math.ceil(high)
        return max(low, 0), min(high, d - 1)

    def inv_freq(self) -> np.ndarray:
        """Per-pair angular frequency, float64 [dim/2]: pair i of a token at position p turns by p * inv_freq[i]."""
        freq = self.base_inv_freq()
        if self.kind == "default":
            return freq
        low, high = self.yarn_correction_range()
        if low == high:
            high += 0.001  # as HF/DeepSeek: avoid a zero-width ramp
        ramp = np.clip((np.arange(self.dim // 2, dtype=np.float64) - low) / (high - low), 0.0, 1.0)
        # ramp 0: high-frequency channels keep their frequency (extrapolate); ramp 1: divided by factor.
        return freq * (1.0 - ramp) + (freq / self.factor) * ramp

    def softmax_scale_factor(self) -> float:
        """Multiplier on the attention softmax scale (nope+rope)^-0.5: mscale(f, mscale_all_dim)^2 under YaRN."""
        if self.kind == "default" or not self.mscale_all_dim:
            return 1.0
        m = yarn_mscale(self.factor, self.mscale_all_dim)
        return m * m

    def cos_sin_factor(self) -> float:
        """Multiplier on cos/sin (HF's `attention_scaling`); exactly 1.0 when mscale == mscale_all_dim."""
        if self.kind == "default":
            return 1.0
        if self.attention_factor is not None:
            return float(self.attention_factor)
        if self.mscale and self.mscale_all_dim:
            if self.mscale == self.mscale_all_dim:
                return 1.0
            return yarn_mscale(self.factor, self.mscale) / yarn_mscale(self.factor, self.mscale_all_dim)
        return yarn_mscale(self.factor)

    # ---- (de)serialisation -----------------------------------------------------------------------------------------
    def to_dict(self) -> dict[str, Any]:
        """transformers-v5 style `rope_parameters`, which `from_config_dict` reads back to an equal object."""
        out: dict[str, Any] = {"rope_type": self.kind, "rope_theta": self.theta}
        if self.kind == "yarn":
            out.update(factor=self.factor, original_max_position_embeddings=self.original_max_position_embeddings,
                       beta_fast=self.beta_fast, beta_slow=self.beta_slow)
            if self.mscale:
                out["mscale"] = self.mscale
            if self.mscale_all_dim:
                out["mscale_all_dim"] = self.mscale_all_dim
            if self.attention_factor is not None:
                out["attention_factor"] = self.attention_factor
            if not self.truncate:
                out["truncate"] = False
        return out

    @staticmethod
    def from_config_dict(d: dict[str, Any], dim: int, max_position_embeddings: int, source: str) -> "RopeConfig":
        """Read the rope settings of a whole config.json dict `d` (either spelling)."""
        params = d.get("rope_parameters")
        key = "rope_parameters"
        if params is None:
            params, key = d.get("rope_scaling"), "rope_scaling"
        if params is None:
            params = {}
        if not isinstance(params, dict):
            raise ConfigError(f"{source}: {key!r} must be an object, got {type(params).__name__}")
        if any(isinstance(v, dict) for v in params.values()):
            raise ConfigError(f"{source}: {key!r} holds per-layer-type settings, which DeepSeek-V3 never uses; "
                              f"give one set of rope parameters")
        theta = params.get("rope_theta", d.get("rope_theta", 10000.0))
        kind = params.get("rope_type", params.get("type", "default"))
        if kind not in ROPE_KINDS:
            raise ConfigError(f"{source}: {key}.rope_type {kind!r} is not supported "
                              f"(supported: {', '.join(ROPE_KINDS)})")
        theta = _number(theta, f"{key}.rope_theta", source, minimum_exclusive=0.0)
        if dim <= 0 or dim % 2:
            raise ConfigError(f"{source}: 'qk_rope_head_dim' must be a positive even number, got {dim}")
        if kind == "default":
            return RopeConfig(theta=theta, dim=dim)

        original = params.get("original_max_position_embeddings", d.get("original_max_position_embeddings"))
        if original is None:
            original = max_position_embeddings  # HF's fallback
        if isinstance(original, bool) or not isinstance(original, int) or original <= 0:
            raise ConfigError(f"{source}: {key}.original_max_position_embeddings must be a positive integer, "
                              f"got {original!r}")
        factor = params.get("factor")
        if factor is None:
            factor = max_position_embeddings / original  # HF's fallback when YaRN omits the factor
        factor = _number(factor, f"{key}.factor", source, minimum_exclusive=0.0)
        # HF treats 0/None betas as "use the default" (`or 32`), so do we.
        beta_fast = _number(params.get("beta_fast") or 32.0, f"{key}.beta_fast", source, minimum_exclusive=0.0)
        beta_slow = _number(params.get("beta_slow") or 1.0, f"{key}.beta_slow", source, minimum_exclusive=0.0)
        mscale = _number(params.get("mscale") or 0.0, f"{key}.mscale", source)
        mscale_all_dim = _number(params.get("mscale_all_dim") or 0.0, f"{key}.mscale_all_dim", source)
        attention_factor = params.get("attention_factor")
        if attention_factor is not None:
            attention_factor = _number(attention_factor, f"{key}.attention_factor", source, minimum_exclusive=0.0)
        truncate = params.get("truncate", True)
        if not isinstance(truncate, bool):
            raise ConfigError(f"{source}: {key}.truncate must be true or false, got {truncate!r}")
        return RopeConfig(theta=theta, dim=dim, kind="yarn", factor=factor, original_max_position_embeddings=original,
                          beta_fast=beta_fast, beta_slow=beta_slow, mscale=mscale, mscale_all_dim=mscale_all_dim,
                          attention_factor=attention_factor, truncate=truncate)


def _number(value: Any, key: str, source: str, minimum_exclusive: Optional[float] = None) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise ConfigError(f"{source}: {key!r} must be a number, got {value!r}")
    if minimum_exclusive is not None and value <= minimum_exclusive:
        raise ConfigError(f"{source}: {key!r} must be > {minimum_exclusive:g}, got {value!r}")
    return float(value)
