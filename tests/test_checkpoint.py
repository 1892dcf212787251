"""dzc.checkpoint: config parsing, exact dtype conversions, the safetensors reader, the loader and every bad input."""
from __future__ import annotations

import copy
import json
import math
import time
from pathlib import Path

import numpy as np
import pytest

from dzc.checkpoint import dtypes
from dzc.checkpoint.config import Fp8Quantization, ModelConfig, RopeConfig
from dzc.checkpoint.expected import expected_tensors
from dzc.checkpoint.loader import Checkpoint, TensorSpec
from dzc.checkpoint.safetensors_file import SafetensorsFile, write_safetensors
from dzc.errors import CheckpointError, ConfigError

import tiny_models as tm

# The real DeepSeek-V3 config.json (values as published; keys we ignore included on purpose).
REAL_V3 = {
    "architectures": ["DeepseekV3ForCausalLM"], "attention_bias": False, "attention_dropout": 0.0,
    "aux_loss_alpha": 0.001, "bos_token_id": 0, "eos_token_id": 1, "ep_size": 1, "first_k_dense_replace": 3,
    "hidden_act": "silu", "hidden_size": 7168, "initializer_range": 0.02, "intermediate_size": 18432,
    "kv_lora_rank": 512, "max_position_embeddings": 163840, "model_type": "deepseek_v3",
    "moe_intermediate_size": 2048, "moe_layer_freq": 1, "n_group": 8, "n_routed_experts": 256,
    "n_shared_experts": 1, "norm_topk_prob": True, "num_attention_heads": 128, "num_experts_per_tok": 8,
    "num_hidden_layers": 61, "num_key_value_heads": 128, "num_nextn_predict_layers": 1, "pretraining_tp": 1,
    "q_lora_rank": 1536, "qk_nope_head_dim": 128, "qk_rope_head_dim": 64,
    "quantization_config": {"activation_scheme": "dynamic", "fmt": "e4m3", "quant_method": "fp8",
                            "weight_block_size": [128, 128]},
    "rms_norm_eps": 1e-06,
    "rope_scaling": {"beta_fast": 32, "beta_slow": 1, "factor": 40, "mscale": 1.0, "mscale_all_dim": 1.0,
                     "original_max_position_embeddings": 4096, "type": "yarn"},
    "rope_theta": 10000, "routed_scaling_factor": 2.5, "scoring_func": "sigmoid", "seq_aux": True,
    "tie_word_embeddings": False, "topk_group": 4, "topk_method": "noaux_tc", "torch_dtype": "bfloat16",
    "transformers_version": "4.33.1", "use_cache": True, "v_head_dim": 128, "vocab_size": 129280,
}


def v5_style(d: dict) -> dict:
    """The same config as transformers v5 writes it."""
    d = copy.deepcopy(d)
    scaling = d.pop("rope_scaling")
    theta = d.pop("rope_theta")
    params = {"rope_theta": theta, "rope_type": "default"}
    if scaling:
        params.update({k: v for k, v in scaling.items() if k != "type"}, rope_type=scaling["type"])
    d["rope_parameters"] = params
    d["head_dim"], d["qk_head_dim"] = d["qk_rope_head_dim"], d["qk_rope_head_dim"] + d["qk_nope_head_dim"]
    for k in ("moe_layer_freq", "scoring_func", "topk_method"):
        d.pop(k)
    return d


# ---- config --------------------------------------------------------------------------------------------------------
def test_real_v3_config():
    cfg = ModelConfig.from_dict(REAL_V3)
    assert cfg.quantization == Fp8Quantization((128, 128))
    assert cfg.rope.yarn_correction_range() == (10, 23)
    assert cfg.rope.cos_sin_factor() == 1.0
    assert cfg.rope.softmax_scale_factor() == pytest.approx((0.1 * math.log(40) + 1) ** 2)
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * (0.1 * math.log(40) + 1) ** 2)
    assert [cfg.is_moe_layer(i) for i in (0, 2, 3, 60)] == [False, False, True, True]
    assert cfg.eos_token_ids == (1,) and cfg.bos_token_id == 0
    exp = expected_tensors(cfg)
    assert sum(math.prod(s.shape) for s in exp.values()) == pytest.approx(671.0e9, rel=1e-3)
    kv_a = exp["model.layers.0.self_attn.kv_a_proj_with_mqa.weight"]
    assert kv_a.shape == (576, 7168) and kv_a.scale_shape((128, 128)) == (5, 56) and kv_a.has_fp8_scale
    assert exp["model.layers.3.mlp.gate.weight"] == TensorSpec((256, 7168), frozenset({"F32", "BF16", "F16"}))
    assert exp["model.layers.3.mlp.shared_experts.up_proj.weight"].shape == (2048, 7168)


def test_both_rope_styles_give_the_same_config():
    a, b = ModelConfig.from_dict(REAL_V3), ModelConfig.from_dict(v5_style(REAL_V3))
    assert a == b
    np.testing.assert_array_equal(a.rope.inv_freq(), b.rope.inv_freq())
    plain = dict(REAL_V3, rope_scaling=None)
    assert ModelConfig.from_dict(plain).rope == ModelConfig.from_dict(v5_style(plain)).rope == RopeConfig(10000.0, 64)


def test_config_round_trips_through_to_dict(tiny_qlora_yarn, tiny_direct_q_plain_rope, tiny_fp8_sharded):
    for cfg in (ModelConfig.from_dict(REAL_V3), ModelConfig.load(tiny_qlora_yarn / "config.json"),
                ModelConfig.load(tiny_direct_q_plain_rope / "config.json"),
                ModelConfig.load(tiny_fp8_sharded / "config.json")):
        assert ModelConfig.from_dict(json.loads(json.dumps(cfg.to_dict()))) == cfg


@pytest.mark.parametrize("rope", [
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 40.0, "original_max_position_embeddings": 4096,
     "beta_fast": 32, "beta_slow": 1, "mscale": 1.0, "mscale_all_dim": 1.0},
    {"rope_type": "yarn", "rope_theta": 50000.0, "factor": 8.0, "original_max_position_embeddings": 2048,
     "beta_fast": 16, "beta_slow": 2, "mscale": 0.707, "mscale_all_dim": 1.0},  # HF != DeepSeek here: follow HF
    {"rope_type": "yarn", "rope_theta": 10000.0, "factor": 4.0, "original_max_position_embeddings": 128},
    {"rope_type": "default", "rope_theta": 1000.0},
])
def test_rope_matches_transformers(rope):
    import torch
    from transformers import DeepseekV3Config
    from transformers.modeling_rope_utils import ROPE_INIT_FUNCTIONS
    from transformers.models.deepseek_v3.modeling_deepseek_v3 import DeepseekV3RotaryEmbedding, yarn_apply_mscale

    hf = DeepseekV3Config(rope_parameters=dict(rope), qk_rope_head_dim=64, max_position_embeddings=32768)
    ours = RopeConfig.from_config_dict({"rope_parameters": dict(rope)}, 64, 32768, "config.json")
    if rope["rope_type"] == "default":
        inv_freq, attention = DeepseekV3RotaryEmbedding.compute_default_rope_parameters(hf)
    else:
        inv_freq, attention = ROPE_INIT_FUNCTIONS["yarn"](hf)
    np.testing.assert_allclose(ours.inv_freq(), inv_freq.to(torch.float64).numpy(), rtol=2e-7)
    assert ours.cos_sin_factor() == pytest.approx(attention, rel=1e-12)
    assert ours.softmax_scale_factor() == pytest.approx(yarn_apply_mscale(hf.rope_parameters, 1.0), rel=1e-12)


BAD_CONFIGS = [
    ({"model_type": "llama"}, "model_type 'llama' is not supported (supported: deepseek_v3, kimi_k2)"),
    ({"architectures": ["LlamaForCausalLM"]}, "architectures"),
    ({"hidden_size": None}, "'hidden_size' must be an integer"),
    ({"hidden_size": -7168}, "'hidden_size' must be >= 1"),
    ({"hidden_size": "7168"}, "'hidden_size' must be an integer"),
    ({"num_hidden_layers": True}, "'num_hidden_layers' must be an integer"),
    ({"num_experts_per_tok": 300}, "num_experts_per_tok (300) must be <= n_routed_experts (256)"),
    ({"n_group": 7}, "n_routed_experts (256) must be divisible by n_group (7)"),
    ({"topk_group": 9}, "topk_group (9) must be <= n_group (8)"),
    ({"topk_group": 1, "num_experts_per_tok": 40}, "cannot supply"),
    ({"scoring_func": "softmax"}, "scoring_func 'softmax' is not supported (supported: sigmoid)"),
    ({"topk_method": "greedy"}, "topk_method 'greedy' is not supported (supported: noaux_tc)"),
    ({"hidden_act": "gelu"}, "hidden_act 'gelu' is not supported"),
    ({"qk_rope_head_dim": 63}, "'qk_rope_head_dim' must be a positive even number"),
    ({"rope_scaling": {"type": "linear", "factor": 2.0}}, "rope_scaling.rope_type 'linear' is not supported"),
    ({"rope_scaling": [1, 2]}, "'rope_scaling' must be an object"),
    ({"rope_scaling": dict(REAL_V3["rope_scaling"], factor=-1)}, "'rope_scaling.factor' must be > 0"),
    ({"quantization_config": {"quant_method": "awq"}}, "quant_method 'awq' is not supported (supported: fp8)"),
    ({"quantization_config": {"quant_method": "fp8", "weight_block_size": [128]}}, "weight_block_size"),
    ({"eos_token_id": 200000}, "'eos_token_id' must be a token id in [0, 129280)"),
    ({"first_k_dense_replace": 99}, "first_k_dense_replace (99) exceeds num_hidden_layers (61)"),
    ({"attention_bias": True}, "attention_bias"),
    ({"norm_topk_prob": "yes"}, "'norm_topk_prob' must be true or false"),
    ({"routed_scaling_factor": 0}, "'routed_scaling_factor' must be > 0"),
]


@pytest.mark.parametrize("change,message", BAD_CONFIGS, ids=[str(c) for c, _ in BAD_CONFIGS])
def test_bad_config_values(change, message):
    with pytest.raises(ConfigError) as err:
        ModelConfig.from_dict({**REAL_V3, **change}, source="/x/config.json")
    assert str(err.value).startswith("/x/config.json: ") and message in str(err.value)
    assert "\n" not in str(err.value)


@pytest.mark.parametrize("key", ["vocab_size", "kv_lora_rank", "q_lora_rank", "n_group", "routed_scaling_factor"])
def test_missing_config_key(key):
    d = dict(REAL_V3)
    del d[key]
    with pytest.raises(ConfigError, match=f"required key '{key}' is missing"):
        ModelConfig.from_dict(d)


def test_moonlight_style_direct_q_proj():
    cfg = ModelConfig.from_dict(dict(REAL_V3, q_lora_rank=None, n_group=1, topk_group=1, rope_scaling=None,
                                     quantization_config=None))
    exp = expected_tensors(cfg)
    assert exp["model.layers.0.self_attn.q_proj.weight"].shape == (128 * 192, 7168)
    assert "model.layers.0.self_attn.q_a_proj.weight" not in exp and cfg.rope.kind == "default"
    assert exp["model.layers.5.mlp.experts.3.down_proj.weight"].dtypes == frozenset({"F32", "BF16", "F16"})


@pytest.mark.parametrize("text,message", [
    ("{not json", "invalid JSON at line 1"),
    ("[1, 2]", "expected a JSON object, got list"),
    ('{"a": 1, "a": 2}', "key 'a' appears twice"),
    (b"\xff\xfe{}", "not valid UTF-8"),
])
def test_unreadable_config_json(tmp_path, text, message):
    path = tmp_path / "config.json"
    path.write_bytes(text if isinstance(text, bytes) else text.encode())
    with pytest.raises(ConfigError) as err:
        ModelConfig.load(path)
    assert str(path) in str(err.value) and message in str(err.value)


# ---- dtypes --------------------------------------------------------------------------------------------------------
def test_bf16_conversions_are_exact():
    import torch

    bits = np.arange(1 << 16, dtype=np.uint16)
    ours = dtypes.bf16_to_f32(bits)
    ref = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float().numpy()
    np.testing.assert_array_equal(ours.view(np.uint32), ref.view(np.uint32))
    finite = ~np.isnan(ours)
    np.testing.assert_array_equal(dtypes.f32_to_bf16(ours)[finite], bits[finite])  # lossless round trip
    assert np.isnan(dtypes.bf16_to_f32(dtypes.f32_to_bf16(ours[~finite]))).all()

    rng = np.random.default_rng(0)
    x = np.concatenate([(rng.standard_normal(20000) * 10.0 ** rng.integers(-44, 38, 20000)).astype(np.float32),
                        # exact ties: the half-way bit set, nothing below it
                        (rng.integers(0, 1 << 16, 2000, dtype=np.uint32) << 16 | 0x8000).view(np.float32),
                        np.array([0.0, -0.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-45, 1.17e-38], np.float32)])
    x = x[~np.isnan(x)]
    assert x.dtype == np.float32
    ref = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    np.testing.assert_array_equal(dtypes.f32_to_bf16(x), ref)
    np.testing.assert_array_equal(dtypes.f16_to_f32(np.float16([1.5, -2.0])), np.float32([1.5, -2.0]))
    assert dtypes.f32_to_f16(np.float32([65520.0]))[0] == np.inf  # round-to-nearest-even overflow


def test_e4m3_table_and_rounding_match_torch():
    import torch

    codes = np.arange(256, dtype=np.uint8)
    ours = dtypes.e4m3_to_f32(codes)
    ref = torch.from_numpy(codes).view(torch.float8_e4m3fn).float().numpy()
    np.testing.assert_array_equal(np.isnan(ours), np.isnan(ref))
    assert np.flatnonzero(np.isnan(ours)).tolist() == [0x7F, 0xFF]
    ok = ~np.isnan(ours)
    np.testing.assert_array_equal(ours[ok], ref[ok])
    assert np.nanmax(ours) == 448.0 and ours[1] == 2.0 ** -9

    rng = np.random.default_rng(1)
    finite = np.sort(ours[ok & (ours >= 0)])
    midpoints = (finite[:-1] + finite[1:]) / 2  # exact ties between neighbours
    x = np.concatenate([rng.uniform(-448, 448, 20000), rng.standard_normal(20000) * 2.0 ** -8,
                        midpoints, -midpoints, finite, -finite]).astype(np.float32)
    ref = torch.from_numpy(x).to(torch.float8_e4m3fn).view(torch.uint8).numpy()
    np.testing.assert_array_equal(dtypes.f32_to_e4m3(x), ref)
    sat = dtypes.f32_to_e4m3(np.float32([464.0, 1e9, np.inf, -500.0, -np.inf, np.nan]))
    assert sat.tolist() == [0x7E, 0x7E, 0x7E, 0xFE, 0xFE, 0x7F]


def test_fp8_block_dequant_is_exact_on_ragged_blocks():
    rng = np.random.default_rng(2)
    w = (rng.standard_normal((200, 300)) * rng.uniform(0.01, 3, (200, 1))).astype(np.float32)
    q, s = dtypes.quantize_fp8_blocks(w, (128, 128))
    assert q.dtype == np.uint8 and s.shape == (2, 3) and s.dtype == np.float32
    deq = dtypes.dequantize_fp8_blocks(q, s, (128, 128))
    loop = np.empty_like(deq)
    for i in range(200):
        for j in range(300):
            loop[i, j] = np.float32(dtypes.E4M3_TO_F32[q[i, j]]) * s[i // 128, j // 128]
    np.testing.assert_array_equal(deq, loop)
    # Quantization error: half a step of e4m3's 3-bit mantissa, or of its subnormals at the block's scale.
    bound = np.abs(w) * 2.0 ** -4 + np.repeat(np.repeat(s, 128, 0), 128, 1)[:200, :300] * 2.0 ** -10
    assert (np.abs(deq - w) <= bound * (1 + 1e-6)).all()
    np.testing.assert_array_equal(dtypes.quantize_fp8_blocks(deq, (128, 128))[0], q)  # a fixed point
    q0, s0 = dtypes.quantize_fp8_blocks(np.zeros((3, 5), np.float32), (2, 2))
    assert s0.shape == (2, 3) and (q0 == 0).all() and np.isfinite(s0).all()
    with pytest.raises(CheckpointError, match=r"weight_scale_inv has shape \[2, 2\], expected \[2, 3\]"):
        dtypes.dequantize_fp8_blocks(q, s[:, :2], (128, 128))


# ---- the safetensors reader ----------------------------------------------------------------------------------------
def test_reader_matches_the_safetensors_package(tiny_fp8_sharded):
    import torch
    from safetensors.torch import load_file

    for path in tm.safetensors_files(tiny_fp8_sharded):
        ref = load_file(path)
        with SafetensorsFile(path) as f:
            assert sorted(f.names()) == sorted(ref)
            for name, t in ref.items():
                a = f.tensor(name)
                assert a.shape == tuple(t.shape) and not a.flags.writeable
                if t.dtype == torch.float32:
                    np.testing.assert_array_equal(a, t.numpy())
                else:
                    assert t.dtype in (torch.bfloat16, torch.float8_e4m3fn)
                    np.testing.assert_array_equal(a, t.view(torch.uint16 if t.element_size() == 2 else
                                                            torch.uint8).numpy())


def test_opening_reads_only_the_header(tmp_path):
    path = tmp_path / "huge.safetensors"
    n = 1 << 30  # 4 GiB of F32, as a sparse file: opening and viewing must not read it
    write_safetensors(path, {"w": ("F32", np.zeros(1, np.float32))})
    tm.rewrite_header(path, lambda h: {"w": {"dtype": "F32", "shape": [n], "data_offsets": [0, 4 * n]}})
    with open(path, "r+b") as fh:
        fh.truncate(fh.seek(0, 2) + 4 * n)
    start = time.perf_counter()
    f = SafetensorsFile(path)
    view = f.tensor("w")
    assert time.perf_counter() - start < 1.0  # reading 4 GiB of pages would take several seconds
    assert view.shape == (n,) and view[-1] == 0.0 and f.dtype_name("w") == "F32" and f.shape("w") == (n,)


def test_writer_round_trip(tmp_path):
    path = tmp_path / "t.safetensors"
    tensors = {"scalar": ("F32", np.float32(3.5).reshape(())), "b": ("BF16", np.arange(6, dtype=np.uint16)),
               "q": ("F8_E4M3", np.arange(10, dtype=np.uint8).reshape(2, 5)), "e": ("I64", np.zeros((0, 3), np.int64))}
    write_safetensors(path, tensors, {"format": "pt"})
    f = SafetensorsFile(path)
    assert f.metadata == {"format": "pt"}
    for name, (dtype, array) in tensors.items():
        assert f.dtype_name(name) == dtype
        np.testing.assert_array_equal(f.tensor(name), array)
        assert f.tensor(name).shape == array.shape


def _one_tensor_file(tmp_path: Path) -> Path:
    path = tmp_path / "one.safetensors"
    write_safetensors(path, {"a.weight": ("F32", np.ones((4, 8), np.float32)),
                             "b.weight": ("F32", np.ones((2, 2), np.float32))})
    return path


def _set(name, key, value):
    def edit(h):
        h[name][key] = value
    return edit


@pytest.mark.parametrize("damage,message", [
    (lambda p: tm.truncate_file(p, 4), "data_offsets end at"),
    (lambda p: p.write_bytes(b"\x01\x00"), "too short for a safetensors file"),
    (lambda p: tm.set_header_length(p, 1 << 40), "does not fit in the"),
    (lambda p: tm.set_header_length(p, 0), "header length 0"),
    (lambda p: tm.set_header_length(p, 20), "invalid JSON"),
    (lambda p: tm.push_offsets_past_end(p, "b.weight"), "'b.weight': data_offsets end at"),
    (lambda p: tm.rewrite_header(p, _set("a.weight", "dtype", "F4")), "unknown dtype 'F4'"),
    (lambda p: tm.rewrite_header(p, _set("a.weight", "dtype", ["F32"])), "unknown dtype ['F32']"),
    (lambda p: tm.rewrite_header(p, _set("a.weight", "data_offsets", None)), "data_offsets must be"),
    (lambda p: tm.rewrite_header(p, lambda h: {"x": 1}), "tensor 'x': header entry must be an object"),
    (lambda p: tm.rewrite_header(p, _set("a.weight", "shape", [4, 9])), "span 128 bytes but F32 [4, 9] needs 144"),
    (lambda p: tm.rewrite_header(p, _set("a.weight", "shape", [4, -8])), "shape must be a list of non-negative"),
    (lambda p: tm.rewrite_header(p, _set("a.weight", "data_offsets", [16, 8])), "data_offsets must be"),
    (lambda p: tm.rewrite_header(p, _set("b.weight", "data_offsets", [8, 24])), "overlap"),
    (lambda p: tm.rewrite_header(p, lambda h: {"__metadata__": [1]}), "'__metadata__' must be an object"),
])
def test_damaged_safetensors_files(tmp_path, damage, message):
    path = _one_tensor_file(tmp_path)
    damage(path)
    with pytest.raises(CheckpointError) as err:
        SafetensorsFile(path)
    assert str(err.value).startswith(str(path)) and message in str(err.value), str(err.value)


def test_unknown_tensor_name(tmp_path):
    with pytest.raises(CheckpointError, match="no tensor named 'c'"):
        SafetensorsFile(_one_tensor_file(tmp_path)).tensor("c")


# ---- the loader: good checkpoints ----------------------------------------------------------------------------------
def test_fixtures_open_and_validate(tiny_qlora_yarn, tiny_direct_q_plain_rope, tiny_fp8_sharded, tiny_bf16):
    for folder in (tiny_qlora_yarn, tiny_direct_q_plain_rope, tiny_fp8_sharded, tiny_bf16):
        ckpt = Checkpoint.open(folder)
        assert ckpt.validate() == [] and ckpt.mtp_tensors == [] and ckpt.unknown_tensors == []
        assert ckpt.path == folder and ckpt.tokenizer_dir == folder
        assert ckpt.generation_config["eos_token_id"] == 1 and ckpt.config.eos_token_ids == (1,)
        cfg = ckpt.config
        assert cfg.v_head_dim != cfg.qk_nope_head_dim and cfg.first_k_dense_replace == 1 and cfg.n_shared_experts >= 1
        assert sum(cfg.is_moe_layer(i) for i in range(cfg.num_hidden_layers)) >= 2
        assert cfg.topk_group < cfg.n_group and cfg.routed_scaling_factor != 1 and cfg.norm_topk_prob
        bias = ckpt.f32("model.layers.1.mlp.gate.e_score_correction_bias")
        assert bias.dtype == np.float32 and np.abs(bias).min() > 0
    assert Checkpoint.open(tiny_qlora_yarn).config.rope.kind == "yarn"
    direct = Checkpoint.open(tiny_direct_q_plain_rope)
    assert direct.config.q_lora_rank is None and direct.config.rope.kind == "default"
    assert direct.layout.index_path is not None and len(direct.layout.files) >= 3
    assert Checkpoint.open(tiny_bf16).layout.index_path is None and len(Checkpoint.open(tiny_bf16).layout.files) == 2


def test_f32_decodes_exactly(tiny_qlora_yarn, tiny_bf16, tiny_fp8_sharded):
    from safetensors.torch import load_file

    ckpt = Checkpoint.open(tiny_qlora_yarn / "model.safetensors")  # a single file path works too
    ref = load_file(tiny_qlora_yarn / "model.safetensors")
    for name in ckpt.expected_tensors():
        np.testing.assert_array_equal(ckpt.f32(name), ref[name].numpy())

    ckpt = Checkpoint.open(tiny_bf16 / "config.json")
    name = "model.layers.2.mlp.experts.5.up_proj.weight"
    array, dtype, scale = ckpt.raw(name)
    assert dtype == "BF16" and array.dtype == np.uint16 and scale is None
    ref = load_file(ckpt.file_of(name))[name].float().numpy()
    np.testing.assert_array_equal(ckpt.f32(name), ref)

    ckpt = Checkpoint.open(tiny_fp8_sharded)
    ragged = 0
    for name, spec in ckpt.expected_tensors().items():
        array, dtype, scale = ckpt.raw(name)
        if not spec.has_fp8_scale:
            assert dtype in ("BF16", "F32") and scale is None
            continue
        assert dtype == "F8_E4M3" and scale.shape == spec.scale_shape((128, 128))
        ragged += any(n % 128 and n > 128 for n in spec.shape)
        loop = np.empty(array.shape, np.float32)
        for i in range(array.shape[0]):
            loop[i] = dtypes.E4M3_TO_F32[array[i]] * np.repeat(scale[i // 128], 128)[: array.shape[1]]
        np.testing.assert_array_equal(ckpt.f32(name), loop)
    assert ragged >= 3
    assert ckpt.raw("model.layers.1.mlp.gate.weight")[1] == "BF16"


def test_reference_loader_matches_transformers_own(tiny_direct_q_plain_rope):
    """hf_reference fuses experts itself; it must equal transformers' from_pretrained on an fp32 checkpoint."""
    import torch
    from transformers import DeepseekV3ForCausalLM

    ids = [0, 17, 42, 99, 5, 250, 3]
    model = DeepseekV3ForCausalLM.from_pretrained(tiny_direct_q_plain_rope, dtype=torch.float32,
                                                  attn_implementation="eager").eval()
    with torch.no_grad():
        ref = model(input_ids=torch.tensor([ids])).logits[0].numpy()
    np.testing.assert_array_equal(tm.hf_logits(tiny_direct_q_plain_rope, ids), ref)
    tokens, steps = tm.hf_greedy(tiny_direct_q_plain_rope, ids[:3], 4)
    assert len(tokens) == 4 and steps.shape == (4, 384) and tokens == steps.argmax(-1).tolist()
    np.testing.assert_allclose(steps[1], tm.hf_logits(tiny_direct_q_plain_rope, ids[:3] + tokens[:1])[-1], atol=1e-5)


def test_tied_embeddings(tmp_path):
    folder = tm.build_tiny_checkpoint(tmp_path / "tied", tm.TinySpec(tie_word_embeddings=True, dtype="bfloat16",
                                                                      writer="dzc", num_hidden_layers=2, seed=4))
    ckpt = Checkpoint.open(folder)
    assert ckpt.validate() == [] and "lm_head.weight" not in ckpt.expected_tensors() and "lm_head.weight" not in ckpt
    assert tm.hf_logits(folder, [0, 1, 2]).shape == (3, 384)


def test_mtp_and_unknown_tensors_are_set_aside(tmp_path, tiny_bf16):
    folder = tm.copy_checkpoint(tiny_bf16, tmp_path / "ckpt")
    h = 64
    write_safetensors(folder / "mtp.safetensors", {
        "model.layers.3.enorm.weight": ("F32", np.ones(h, np.float32)),
        "model.layers.3.eh_proj.weight": ("F32", np.zeros((h, 2 * h), np.float32)),
        "model.layers.3.self_attn.kv_a_layernorm.weight": ("F32", np.ones(32, np.float32)),
        "model.layers.4.enorm.weight": ("F32", np.ones(h, np.float32)),  # beyond num_nextn_predict_layers
        "model.rotary_emb.inv_freq": ("F32", np.ones(8, np.float32)),
    })
    ckpt = Checkpoint.open(folder)
    assert ckpt.mtp_tensors == ["model.layers.3.eh_proj.weight", "model.layers.3.enorm.weight",
                                "model.layers.3.self_attn.kv_a_layernorm.weight"]
    warnings = ckpt.validate()
    assert ckpt.unknown_tensors == ["model.layers.4.enorm.weight", "model.rotary_emb.inv_freq"]
    assert len(warnings) == 2 and "mtp.safetensors: tensor 'model.layers.4.enorm.weight' is not used" in warnings[0]


def test_generation_config_overrides_eos(tmp_path, tiny_qlora_yarn):
    folder = tm.copy_checkpoint(tiny_qlora_yarn, tmp_path / "ckpt")
    (folder / "generation_config.json").write_text('{"eos_token_id": [1, 3], "temperature": 0.6}')
    assert Checkpoint.open(folder).config.eos_token_ids == (1, 3)
    (folder / "generation_config.json").write_text('{"eos_token_id": [1, 9999]}')
    with pytest.raises(ConfigError, match="generation_config.json: 'eos_token_id' must be a token id"):
        Checkpoint.open(folder)
    (folder / "generation_config.json").write_text('{"eos')
    with pytest.raises(ConfigError, match="generation_config.json: invalid JSON"):
        Checkpoint.open(folder)


def test_opening_with_an_index_reads_no_shard(tmp_path, tiny_fp8_sharded):
    folder = tm.copy_checkpoint(tiny_fp8_sharded, tmp_path / "ckpt")
    shard = tm.safetensors_files(folder)[-1]
    tm.set_header_length(shard, 1 << 40)
    ckpt = Checkpoint.open(folder)  # lazy: the damaged shard is not touched yet
    assert ckpt.config.quantization is not None
    with pytest.raises(CheckpointError, match=f"{shard.name}: header length"):
        ckpt.validate()


# ---- the loader: bad checkpoints -----------------------------------------------------------------------------------
def _edit_json(path: Path, edit) -> None:
    d = json.loads(path.read_text())
    edit(d)
    path.write_text(json.dumps(d))


def _move_in_index(folder: Path) -> None:
    def edit(d):
        name = "model.layers.0.self_attn.kv_b_proj.weight"
        d["weight_map"][name] = next(v for v in d["weight_map"].values() if v != d["weight_map"][name])
    _edit_json(folder / "model.safetensors.index.json", edit)


def _header_of(folder: Path, name: str, edit) -> None:
    for path in tm.safetensors_files(folder):
        if name in tm.read_header(path):
            tm.rewrite_header(path, edit)
            return
    raise AssertionError(name)


def _drop(name: str):
    def edit(h):
        del h[name]
    return edit


def _remove(folder: Path, name: str) -> None:
    """Delete a tensor from its shard's header and from the index."""
    _header_of(folder, name, _drop(name))
    _edit_json(folder / "model.safetensors.index.json", lambda d: d["weight_map"].pop(name))


def _as_fp8(name: str):
    """Relabel a 2-byte tensor as F8_E4M3 of the same shape (its span halves, leaving a hole, which is legal)."""
    def edit(h):
        begin, end = h[name]["data_offsets"]
        h[name].update(dtype="F8_E4M3", data_offsets=[begin, begin + (end - begin) // 2])
    return edit


KV_B = "model.layers.0.self_attn.kv_b_proj.weight"  # [176, 32] in the fp8 fixture (ragged scale [2, 1])
BAD_CHECKPOINTS = [
    ("index invalid JSON", lambda f: (f / "model.safetensors.index.json").write_text("{"),
     CheckpointError, "model.safetensors.index.json: invalid JSON"),
    ("index without weight_map", lambda f: (f / "model.safetensors.index.json").write_text('{"metadata": {}}'),
     CheckpointError, "'weight_map' must be a non-empty object"),
    ("missing shard", lambda f: tm.safetensors_files(f)[1].unlink(),
     CheckpointError, "model-00002-of-00003.safetensors' (for"),
    ("shard path escapes", lambda f: _edit_json(f / "model.safetensors.index.json",
                                                lambda d: d["weight_map"].update({KV_B: "../x.safetensors"})),
     CheckpointError, "expected a shard file name inside"),
    ("shard not a string", lambda f: _edit_json(f / "model.safetensors.index.json",
                                                lambda d: d["weight_map"].update({KV_B: [1]})),
     CheckpointError, f"tensor '{KV_B}' maps to [1]"),
    ("tensor missing from its shard", _move_in_index, CheckpointError,
     f"lists '{KV_B}' in model-0000"),
    ("missing tensor", lambda f: _remove(f, KV_B),
     CheckpointError, f"tensor '{KV_B}' is missing (expected [176, 32] one of BF16/F16/F32/F8_E4M3)"),
    ("wrong shape", lambda f: _header_of(f, KV_B, _set(KV_B, "shape", [32, 176])),
     CheckpointError, f"tensor '{KV_B}' has shape [32, 176], expected [176, 32] from config.json"),
    ("wrong dtype", lambda f: _header_of(f, KV_B, _set(KV_B, "dtype", "I8")),
     CheckpointError, f"tensor '{KV_B}' has dtype I8, expected one of BF16/F16/F32/F8_E4M3"),
    ("fp8 where never fp8", lambda f: _header_of(f, "model.norm.weight", _as_fp8("model.norm.weight")),
     CheckpointError, "FP8 covers only the Linear weights"),
    ("fp8 without quantization_config", lambda f: _edit_json(f / "config.json",
                                                             lambda d: d.pop("quantization_config")),
     CheckpointError, "config.json has no FP8 quantization_config"),
    ("scale missing", lambda f: _remove(f, KV_B + "_scale_inv"),
     CheckpointError, f"FP8 tensor '{KV_B}' has no '{KV_B}_scale_inv'"),
    ("scale wrong shape", lambda f: _header_of(f, KV_B + "_scale_inv", _set(KV_B + "_scale_inv", "shape", [1, 2])),
     CheckpointError, f"'{KV_B}_scale_inv' has shape [1, 2], expected [2, 1]"),
    ("truncated shard", lambda f: tm.truncate_file(tm.safetensors_files(f)[0], 100),
     CheckpointError, "past the"),
    ("architecture", lambda f: _edit_json(f / "config.json", lambda d: d.update(model_type="mixtral")),
     ConfigError, "config.json: model_type 'mixtral' is not supported (supported: deepseek_v3, kimi_k2)"),
    ("config key missing", lambda f: _edit_json(f / "config.json", lambda d: d.pop("kv_lora_rank")),
     ConfigError, "config.json: required key 'kv_lora_rank' is missing"),
    ("config nonsense", lambda f: _edit_json(f / "config.json", lambda d: d.update(n_group=3)),
     ConfigError, "config.json: n_routed_experts (8) must be divisible by n_group (3)"),
    ("config shape mismatch", lambda f: _edit_json(f / "config.json", lambda d: d.update(kv_lora_rank=16)),
     CheckpointError, "has shape [48, 160], expected [32, 160]"),
    ("config invalid JSON", lambda f: (f / "config.json").write_text('{"vocab_size": 12,'),
     ConfigError, "config.json: invalid JSON"),
    ("no config.json", lambda f: (f / "config.json").unlink(), CheckpointError, "no config.json"),
]


@pytest.mark.parametrize("what,damage,error,message", BAD_CHECKPOINTS, ids=[b[0] for b in BAD_CHECKPOINTS])
def test_bad_checkpoints(tmp_path, tiny_fp8_sharded, what, damage, error, message):
    folder = tm.copy_checkpoint(tiny_fp8_sharded, tmp_path / "ckpt")
    damage(folder)
    with pytest.raises(error) as err:
        Checkpoint.open(folder).validate()
    text = str(err.value)
    assert message in text, text
    assert str(folder) in text and "\n" not in text
    assert type(err.value) is error


def test_bad_paths(tmp_path, tiny_bf16):
    with pytest.raises(CheckpointError, match="does not exist"):
        Checkpoint.open(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(CheckpointError, match="folder is empty"):
        Checkpoint.open(tmp_path / "empty")
    (tmp_path / "cfg_only").mkdir()
    (tmp_path / "cfg_only" / "config.json").write_text((tiny_bf16 / "config.json").read_text())
    (tmp_path / "cfg_only" / "pytorch_model.bin").write_bytes(b"")
    with pytest.raises(CheckpointError, match=r"no \*.safetensors files \(PyTorch .bin weights are not supported"):
        Checkpoint.open(tmp_path / "cfg_only")
    with pytest.raises(CheckpointError, match="not a .safetensors file"):
        Checkpoint.open(tiny_bf16 / "tokenizer.json")
    folder = tm.copy_checkpoint(tiny_bf16, tmp_path / "dup")
    files = tm.safetensors_files(folder)
    (folder / "extra.safetensors").write_bytes(files[0].read_bytes())
    with pytest.raises(CheckpointError, match="is in both"):
        Checkpoint.open(folder)
    with pytest.raises(CheckpointError, match="not in this checkpoint"):
        Checkpoint.open(tiny_bf16).f32("model.layers.9.nothing")


def test_kimi_k2_model_type_is_the_deepseek_v3_architecture(tmp_path, tiny_qlora_yarn):
    folder = tm.copy_checkpoint(tiny_qlora_yarn, tmp_path / "kimi")
    cfg = json.loads((folder / "config.json").read_text())
    cfg["model_type"] = "kimi_k2"
    (folder / "config.json").write_text(json.dumps(cfg))
    assert Checkpoint.open(folder).config.num_hidden_layers == cfg["num_hidden_layers"]
