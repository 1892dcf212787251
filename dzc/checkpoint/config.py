"""config.json of a DeepSeek-V3-family checkpoint, read into one validated, frozen `ModelConfig`.

Accepts what transformers 5.23 writes (`rope_parameters`, `head_dim`, `qk_head_dim`, no `moe_layer_freq`,
`scoring_func`, `topk_method`) and what the real V3/R1/Moonlight files hold (`rope_theta` + `rope_scaling`,
`moe_layer_freq`, `scoring_func`, `topk_method`, `quantization_config`). Shape-defining keys are required:
a missing one would otherwise fall back to a transformers default sized for the 671B model. Keys whose
defaults are harmless (eps, act, MTP count) default as in transformers.

Every problem raises `ConfigError` with one line naming the file and key.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Optional

from dzc.checkpoint.jsonfile import read_json_object
from dzc.checkpoint.rope import RopeConfig, yarn_mscale  # noqa: F401  (re-exported: config is the entry point)
from dzc.errors import ConfigError

# Kimi-K2 ships the DeepseekV3 architecture under its own model_type.
SUPPORTED_MODEL_TYPES = ("deepseek_v3", "kimi_k2")
SUPPORTED_ARCHITECTURES = ("DeepseekV3ForCausalLM",)
SUPPORTED_SCORING = ("sigmoid",)
SUPPORTED_TOPK_METHODS = ("noaux_tc",)
SUPPORTED_ACTS = ("silu",)
SUPPORTED_QUANT_METHODS = ("fp8",)


@dataclass(frozen=True)
class Fp8Quantization:
    """Block-scaled float8_e4m3fn weights: W = fp8 * weight_scale_inv[i // block[0], j // block[1]]."""

    block: tuple[int, int] = (128, 128)
    fmt: str = "e4m3"

    def to_dict(self) -> dict[str, Any]:
        return {"quant_method": "fp8", "fmt": self.fmt, "activation_scheme": "dynamic",
                "weight_block_size": list(self.block)}


@dataclass(frozen=True)
class ModelConfig:
    """Everything the DeepSeek-V3 model code needs from config.json (+ eos ids from generation_config.json)."""

    vocab_size: int
    hidden_size: int
    intermediate_size: int  # dense-layer SwiGLU width
    moe_intermediate_size: int  # per-expert SwiGLU width (shared experts: n_shared_experts times this)
    num_hidden_layers: int
    num_attention_heads: int
    q_lora_rank: Optional[int]  # None => a direct q_proj (Moonlight-style)
    kv_lora_rank: int
    qk_rope_head_dim: int
    qk_nope_head_dim: int
    v_head_dim: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    routed_scaling_factor: float
    norm_topk_prob: bool
    first_k_dense_replace: int
    moe_layer_freq: int
    rms_norm_eps: float
    rope: RopeConfig
    max_position_embeddings: int
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0
    bos_token_id: Optional[int] = None
    eos_token_ids: tuple[int, ...] = ()
    quantization: Optional[Fp8Quantization] = None
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    hidden_act: str = "silu"
    rope_interleave: bool = True  # q_pe/k_pe channels stored as interleaved pairs (the official layout)
    source: str = field(default="config.json", compare=False, repr=False)

    # ---- derived ---------------------------------------------------------------------------------------------------
    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def softmax_scale(self) -> float:
        """The attention softmax scale, YaRN's mscale^2 included (keep it an explicit number downstream)."""
        return self.qk_head_dim ** -0.5 * self.rope.softmax_scale_factor()

    def is_moe_layer(self, i: int) -> bool:
        """HF rule: MoE when experts exist, past the dense prefix, and on the moe_layer_freq grid."""
        return bool(self.n_routed_experts) and i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    # ---- construction ----------------------------------------------------------------------------------------------
    @staticmethod
    def load(path: str | Path) -> "ModelConfig":
        """Read and validate config.json at `path` (eos ids from config.json only; see `with_generation_config`)."""
        path = Path(path)
        return ModelConfig.from_dict(read_json_object(path, ConfigError), source=str(path))

    @staticmethod
    def from_dict(d: dict[str, Any], source: str = "config.json") -> "ModelConfig":
        return _parse(d, source)

    def with_generation_config(self, gen: dict[str, Any], source: str = "generation_config.json") -> "ModelConfig":
        """generation_config.json wins over config.json for eos/bos, as in transformers' generate()."""
        changes: dict[str, Any] = {}
        if gen.get("eos_token_id") is not None:
            changes["eos_token_ids"] = eos_ids(gen["eos_token_id"], "eos_token_id", source, self.vocab_size)
        if gen.get("bos_token_id") is not None:
            changes["bos_token_id"] = _token_id(gen["bos_token_id"], "bos_token_id", source, self.vocab_size)
        return dataclasses.replace(self, **changes) if changes else self

    def to_dict(self) -> dict[str, Any]:
        """A config.json-shaped dict (v5 rope spelling) that `from_dict` turns back into an equal config."""
        out: dict[str, Any] = {"architectures": list(SUPPORTED_ARCHITECTURES), "model_type": "deepseek_v3"}
        for f in dataclasses.fields(self):
            if f.name in ("rope", "eos_token_ids", "quantization", "source"):
                continue
            out[f.name] = getattr(self, f.name)
        out["rope_parameters"] = self.rope.to_dict()
        out["eos_token_id"] = list(self.eos_token_ids)
        if self.quantization is not None:
            out["quantization_config"] = self.quantization.to_dict()
        return out


# ---- parsing helpers -----------------------------------------------------------------------------------------------
_MISSING = object()


class _Reader:
    """Typed access to config keys; each failure names the file and key."""

    def __init__(self, d: dict[str, Any], source: str):
        self.d, self.source = d, source

    def _get(self, key: str, default: Any) -> Any:
        value = self.d.get(key, _MISSING)
        if value is _MISSING:
            if default is _MISSING:
                raise ConfigError(f"{self.source}: required key {key!r} is missing; a DeepSeek-V3 config must set it")
            return default
        return value

    def integer(self, key: str, default: Any = _MISSING, minimum: int = 1) -> int:
        value = self._get(key, default)
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        if isinstance(value, bool) or not isinstance(value, int):
            raise ConfigError(f"{self.source}: {key!r} must be an integer, got {value!r}")
        if value < minimum:
            raise ConfigError(f"{self.source}: {key!r} must be >= {minimum}, got {value}")
        return value

    def optional_int(self, key: str, default: Any = _MISSING) -> Optional[int]:
        if self._get(key, default) is None:
            return None
        return self.integer(key, default)

    def number(self, key: str, default: Any = _MISSING, positive: bool = True) -> float:
        value = self._get(key, default)
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ConfigError(f"{self.source}: {key!r} must be a number, got {value!r}")
        if positive and value <= 0:
            raise ConfigError(f"{self.source}: {key!r} must be > 0, got {value!r}")
        return float(value)

    def flag(self, key: str, default: Any = _MISSING) -> bool:
        value = self._get(key, default)
        if not isinstance(value, bool):
            raise ConfigError(f"{self.source}: {key!r} must be true or false, got {value!r}")
        return value

    def choice(self, key: str, supported: tuple[str, ...], default: str) -> str:
        value = self._get(key, default)
        if value is None:
            value = default
        if value not in supported:
            raise ConfigError(f"{self.source}: {key} {value!r} is not supported (supported: {', '.join(supported)})")
        return value


def _token_id(value: Any, key: str, source: str, vocab_size: int) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value < vocab_size:
        raise ConfigError(f"{source}: {key!r} must be a token id in [0, {vocab_size}), got {value!r}")
    return value


def eos_ids(value: Any, key: str, source: str, vocab_size: int) -> tuple[int, ...]:
    """An eos_token_id field (int, list of ints or null) as a tuple of ids."""
    if value is None:
        return ()
    values = value if isinstance(value, list) else [value]
    return tuple(_token_id(v, key, source, vocab_size) for v in values)


def _check_model_type(d: dict[str, Any], source: str) -> None:
    model_type = d.get("model_type")
    if model_type not in SUPPORTED_MODEL_TYPES:
        raise ConfigError(f"{source}: model_type {model_type!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_MODEL_TYPES)})")
    archs = d.get("architectures")
    if archs is None:
        return
    if not isinstance(archs, list) or not any(a in SUPPORTED_ARCHITECTURES for a in archs):
        raise ConfigError(f"{source}: architectures {archs!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_ARCHITECTURES)})")


def _quantization(d: dict[str, Any], source: str) -> Optional[Fp8Quantization]:
    q = d.get("quantization_config")
    if q is None:
        return None
    if not isinstance(q, dict):
        raise ConfigError(f"{source}: 'quantization_config' must be an object, got {type(q).__name__}")
    method = q.get("quant_method")
    if method not in SUPPORTED_QUANT_METHODS:
        raise ConfigError(f"{source}: quantization_config.quant_method {method!r} is not supported "
                          f"(supported: {', '.join(SUPPORTED_QUANT_METHODS)})")
    fmt = q.get("fmt", "e4m3")
    if fmt != "e4m3":
        raise ConfigError(f"{source}: quantization_config.fmt {fmt!r} is not supported (supported: e4m3)")
    block = q.get("weight_block_size", [128, 128])
    if (not isinstance(block, list) or len(block) != 2
            or not all(isinstance(b, int) and not isinstance(b, bool) and b > 0 for b in block)):
        raise ConfigError(f"{source}: quantization_config.weight_block_size must be two positive integers, "
                          f"got {block!r}")
    return Fp8Quantization(block=(block[0], block[1]), fmt=fmt)


def _parse(d: dict[str, Any], source: str) -> ModelConfig:
    if not isinstance(d, dict):
        raise ConfigError(f"{source}: expected a JSON object")
    _check_model_type(d, source)
    r = _Reader(d, source)
    vocab = r.integer("vocab_size")
    hidden = r.integer("hidden_size")
    heads = r.integer("num_attention_heads")
    layers = r.integer("num_hidden_layers")
    rope_dim = r.integer("qk_rope_head_dim", minimum=2)
    max_pos = r.integer("max_position_embeddings", 4096)
    experts = r.integer("n_routed_experts")
    n_group = r.integer("n_group")
    topk_group = r.integer("topk_group")
    top_k = r.integer("num_experts_per_tok")
    first_dense = r.integer("first_k_dense_replace", minimum=0)

    if experts % n_group:
        raise ConfigError(f"{source}: n_routed_experts ({experts}) must be divisible by n_group ({n_group})")
    if topk_group > n_group:
        raise ConfigError(f"{source}: topk_group ({topk_group}) must be <= n_group ({n_group})")
    if top_k > experts:
        raise ConfigError(f"{source}: num_experts_per_tok ({top_k}) must be <= n_routed_experts ({experts})")
    per_group = experts // n_group
    if per_group < 2:
        raise ConfigError(f"{source}: each of the n_group ({n_group}) expert groups needs >= 2 experts (the group "
                          f"score sums its top 2), but n_routed_experts is {experts}")
    if topk_group * per_group < top_k:
        raise ConfigError(f"{source}: topk_group ({topk_group}) groups of {per_group} experts cannot supply "
                          f"num_experts_per_tok ({top_k}) experts")
    if first_dense > layers:
        raise ConfigError(f"{source}: first_k_dense_replace ({first_dense}) exceeds num_hidden_layers ({layers})")
    if d.get("attention_bias", False) is not False:
        raise ConfigError(f"{source}: attention_bias {d.get('attention_bias')!r} is not supported (only false)")
    # num_key_value_heads is not read: HF v5 writes its default (128) even for small models and MLA has no use for it.

    return ModelConfig(
        vocab_size=vocab,
        hidden_size=hidden,
        intermediate_size=r.integer("intermediate_size"),
        moe_intermediate_size=r.integer("moe_intermediate_size"),
        num_hidden_layers=layers,
        num_attention_heads=heads,
        q_lora_rank=r.optional_int("q_lora_rank"),
        kv_lora_rank=r.integer("kv_lora_rank"),
        qk_rope_head_dim=rope_dim,
        qk_nope_head_dim=r.integer("qk_nope_head_dim"),
        v_head_dim=r.integer("v_head_dim"),
        n_routed_experts=experts,
        n_shared_experts=r.integer("n_shared_experts", minimum=0),
        num_experts_per_tok=top_k,
        n_group=n_group,
        topk_group=topk_group,
        routed_scaling_factor=r.number("routed_scaling_factor"),
        norm_topk_prob=r.flag("norm_topk_prob", True),
        first_k_dense_replace=first_dense,
        moe_layer_freq=r.integer("moe_layer_freq", 1),
        rms_norm_eps=r.number("rms_norm_eps", 1e-6),
        rope=RopeConfig.from_config_dict(d, rope_dim, max_pos, source),
        max_position_embeddings=max_pos,
        tie_word_embeddings=r.flag("tie_word_embeddings", False),
        num_nextn_predict_layers=r.integer("num_nextn_predict_layers", 0, minimum=0),
        bos_token_id=None if d.get("bos_token_id") is None else _token_id(d["bos_token_id"], "bos_token_id",
                                                                          source, vocab),
        eos_token_ids=eos_ids(d.get("eos_token_id"), "eos_token_id", source, vocab),
        quantization=_quantization(d, source),
        scoring_func=r.choice("scoring_func", SUPPORTED_SCORING, "sigmoid"),
        topk_method=r.choice("topk_method", SUPPORTED_TOPK_METHODS, "noaux_tc"),
        hidden_act=r.choice("hidden_act", SUPPORTED_ACTS, "silu"),
        rope_interleave=r.flag("rope_interleave", True),
        source=source,
    )


def read_generation_config(folder: str | Path) -> dict[str, Any]:
    """generation_config.json in `folder` as a dict, or {} when the file does not exist."""
    path = Path(folder) / "generation_config.json"
    if not path.is_file():
        return {}
    return read_json_object(path, ConfigError)
