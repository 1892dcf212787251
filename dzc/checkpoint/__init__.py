"""Checkpoint loading: config.json, lazy safetensors, exact bf16/FP8 decoding, validation against the config."""
from dzc.checkpoint.config import Fp8Quantization, ModelConfig, RopeConfig
from dzc.checkpoint.expected import TensorSpec
from dzc.checkpoint.loader import Checkpoint

__all__ = ["Checkpoint", "Fp8Quantization", "ModelConfig", "RopeConfig", "TensorSpec"]
