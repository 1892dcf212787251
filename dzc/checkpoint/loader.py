"""`Checkpoint`: a DeepSeek-V3 checkpoint on disk, opened lazily and validated against its config.

Opening reads config.json, generation_config.json and the shard index (or, without an index, the safetensors
headers); no tensor data is touched until `raw()`/`f32()` asks for it, and then only that tensor's pages
are mapped in. `validate()` checks every tensor the config implies (presence, shape, dtype, FP8 scale grid)
from headers alone, so a bad checkpoint fails before any compute with one line naming tensor and file.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

import numpy as np

from dzc.checkpoint import dtypes
from dzc.checkpoint.config import ModelConfig, read_generation_config
from dzc.checkpoint.expected import (FLOAT_DTYPES, FP8_DTYPE, TensorSpec, expected_tensors, is_mtp_tensor,
                                     scale_name)
from dzc.checkpoint.layout import Layout, resolve
from dzc.checkpoint.safetensors_file import SafetensorsFile
from dzc.errors import CheckpointError

DEFAULT_FP8_BLOCK = (128, 128)


class Checkpoint:
    """Open with `Checkpoint.open(path)`; see the module docstring."""

    def __init__(self, layout: Layout, config: ModelConfig, generation_config: dict[str, Any]):
        self.layout = layout
        self.config = config
        self.generation_config = generation_config
        self._files: dict[Path, SafetensorsFile] = {}
        self._expected: Optional[dict[str, TensorSpec]] = None
        # tensor name -> file; without an index the headers are the only table of contents
        self._where: dict[str, Path] = (layout.weight_map if layout.weight_map is not None
                                        else self._map_from_headers())

    @classmethod
    def open(cls, path: str | Path) -> "Checkpoint":
        layout = resolve(path)
        gen = read_generation_config(layout.folder)
        config = ModelConfig.load(layout.config_path).with_generation_config(
            gen, str(layout.folder / "generation_config.json"))
        return cls(layout, config, gen)

    # ---- where things are ------------------------------------------------------------------------------------------
    @property
    def path(self) -> Path:
        """The checkpoint folder."""
        return self.layout.folder

    @property
    def tokenizer_dir(self) -> Optional[Path]:
        """The folder holding tokenizer.json (the checkpoint folder), or None when there is none."""
        return self.path if (self.path / "tokenizer.json").is_file() else None

    def names(self) -> list[str]:
        """Every tensor name in the checkpoint (sorted)."""
        return sorted(self._where)

    def __contains__(self, name: object) -> bool:
        return name in self._where

    def file_of(self, name: str) -> Path:
        try:
            return self._where[name]
        except KeyError:
            raise CheckpointError(f"{self.path}: tensor {name!r} is not in this checkpoint") from None

    def _file(self, path: Path) -> SafetensorsFile:
        f = self._files.get(path)
        if f is None:
            f = self._files[path] = SafetensorsFile(path)
        return f

    def _located(self, name: str) -> SafetensorsFile:
        """The opened file holding `name`, checking that the index told the truth."""
        f = self._file(self.file_of(name))
        if name not in f:
            raise CheckpointError(f"{self.layout.index_path}: lists {name!r} in {f.path.name} but that shard has no "
                                  f"such tensor; the index and shards are from different checkpoints")
        return f

    def _map_from_headers(self) -> dict[str, Path]:
        where: dict[str, Path] = {}
        for path in self.layout.files:
            for name in self._file(path).names():
                if name in where:
                    raise CheckpointError(f"{self.path}: tensor {name!r} is in both {where[name].name} and "
                                          f"{path.name}; remove the duplicate file")
                where[name] = path
        return where

    # ---- what should be there --------------------------------------------------------------------------------------
    def expected_tensors(self) -> dict[str, TensorSpec]:
        if self._expected is None:
            self._expected = expected_tensors(self.config)
        return self._expected

    @property
    def mtp_tensors(self) -> list[str]:
        """Tensors of the multi-token-prediction layers (index >= num_hidden_layers): kept aside, not used."""
        return [n for n in self.names() if is_mtp_tensor(self.config, n)]

    @property
    def unknown_tensors(self) -> list[str]:
        """Tensors neither the model, its FP8 scales nor MTP account for."""
        expected = self.expected_tensors()
        known_scales = {scale_name(n) for n, s in expected.items() if s.has_fp8_scale}
        return [n for n in self.names()
                if n not in expected and n not in known_scales and not is_mtp_tensor(self.config, n)]

    def validate(self) -> list[str]:
        """Check every expected tensor; raise `CheckpointError` on the first problem, return warnings otherwise."""
        block = self._block()
        for name, spec in self.expected_tensors().items():
            if name not in self:
                raise CheckpointError(f"{self.path}: tensor {name!r} is missing (expected {_shape(spec.shape)} "
                                      f"{_one_of(spec.dtypes)}); the weights do not match config.json")
            f = self._located(name)
            info = f.info(name)
            if info.shape != spec.shape:
                raise CheckpointError(f"{f.path}: tensor {name!r} has shape {_shape(info.shape)}, expected "
                                      f"{_shape(spec.shape)} from {self.layout.config_path.name}")
            if info.dtype not in spec.dtypes:
                why = ""
                if info.dtype == FP8_DTYPE:
                    why = (" (config.json has no FP8 quantization_config)" if self.config.quantization is None
                           else " (FP8 covers only the Linear weights inside the layers)")
                raise CheckpointError(f"{f.path}: tensor {name!r} has dtype {info.dtype}, expected "
                                      f"{_one_of(spec.dtypes)}{why}")
            if info.dtype == FP8_DTYPE:
                self._check_scale(name, spec.scale_shape(block))
        warnings = [f"{self.file_of(n).name}: tensor {n!r} is not used by a DeepSeek-V3 model; ignored"
                    for n in self.unknown_tensors]
        return warnings

    def _check_scale(self, name: str, want: tuple[int, int]) -> None:
        sname = scale_name(name)
        if sname not in self:
            raise CheckpointError(f"{self.file_of(name)}: FP8 tensor {name!r} has no {sname!r}; "
                                  f"block-scaled FP8 weights need their scales")
        f = self._located(sname)
        info = f.info(sname)
        if info.shape != want:
            raise CheckpointError(f"{f.path}: tensor {sname!r} has shape {_shape(info.shape)}, expected "
                                  f"{_shape(want)} (the weight's shape / block {list(self._block())}, rounded up)")
        if info.dtype not in FLOAT_DTYPES:
            raise CheckpointError(f"{f.path}: tensor {sname!r} has dtype {info.dtype}, expected F32")

    def _block(self) -> tuple[int, int]:
        q = self.config.quantization
        return q.block if q is not None else DEFAULT_FP8_BLOCK

    # ---- data ------------------------------------------------------------------------------------------------------
    def raw(self, name: str) -> tuple[np.ndarray, str, Optional[np.ndarray]]:
        """(storage view, dtype name, float32 block scales or None); FP8 weights come with their scales."""
        f = self._located(name)
        array, dtype = f.tensor(name), f.dtype_name(name)
        if dtype != FP8_DTYPE:
            return array, dtype, None
        sname = scale_name(name)
        if sname not in self:
            raise CheckpointError(f"{f.path}: FP8 tensor {name!r} has no {sname!r}; block-scaled FP8 weights "
                                  f"need their scales")
        scale, _, _ = self.raw(sname)
        return array, dtype, _to_f32(scale, self._located(sname).dtype_name(sname), sname, f.path)

    def f32(self, name: str) -> np.ndarray:
        """`name` as float32, decoded exactly (F32 comes back as a read-only view, others as new arrays)."""
        array, dtype, scale = self.raw(name)
        if scale is not None:
            self._check_scale(name, dtypes.scale_shape(array.shape, self._block()))  # names the file on mismatch
            return dtypes.dequantize_fp8_blocks(array, scale, self._block())
        return _to_f32(array, dtype, name, self.file_of(name))

    def close(self) -> None:
        for f in self._files.values():
            f.close()
        self._files.clear()

    def __enter__(self) -> "Checkpoint":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __repr__(self) -> str:
        return f"Checkpoint({str(self.path)!r}, {len(self.layout.files)} files)"


def _to_f32(array: np.ndarray, dtype: str, name: str, path: Path) -> np.ndarray:
    if dtype == "F32":
        return array
    if dtype == "BF16":
        return dtypes.bf16_to_f32(array)
    if dtype == "F16":
        return dtypes.f16_to_f32(array)
    if dtype == FP8_DTYPE:
        return dtypes.e4m3_to_f32(array)
    raise CheckpointError(f"{path}: tensor {name!r} has dtype {dtype}, which is not a floating-point weight")


def _one_of(dtypes_: frozenset[str]) -> str:
    return "one of " + "/".join(sorted(dtypes_)) if len(dtypes_) > 1 else next(iter(dtypes_))


def _shape(shape: tuple[int, ...]) -> str:
    return "[" + ", ".join(map(str, shape)) + "]"
