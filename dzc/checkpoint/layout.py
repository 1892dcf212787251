"""Where a checkpoint's pieces are: config.json, the safetensors files and which file holds which tensor.

Accepted layouts:
  * a folder with config.json and model.safetensors.index.json (+ the shards it lists): HF sharded layout;
  * a folder with config.json and one or more *.safetensors files, no index: every file's header is read;
  * one .safetensors file with config.json beside it: only that file is used.
With an index, opening reads no shard at all (a 163-shard V3 checkpoint opens in milliseconds); shard headers
are read when a tensor in them is first asked for.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Optional

from dzc.checkpoint.jsonfile import read_json_object
from dzc.errors import CheckpointError

INDEX_NAME = "model.safetensors.index.json"


@dataclass(frozen=True)
class Layout:
    folder: Path
    config_path: Path
    files: tuple[Path, ...]  # every safetensors file in use
    index_path: Optional[Path]  # None: names come from the files' headers
    weight_map: Optional[dict[str, Path]]  # tensor name -> file, from the index


def resolve(path: str | Path) -> Layout:
    """Find the files of the checkpoint at `path` (a folder, a .safetensors file, or its config.json)."""
    path = Path(path).expanduser()
    if not path.exists():
        raise CheckpointError(f"{path}: does not exist; pass a checkpoint folder or a .safetensors file")
    if path.is_file():
        if path.name == "config.json":
            return resolve(path.parent)
        if path.suffix != ".safetensors":
            raise CheckpointError(f"{path}: not a .safetensors file; pass a checkpoint folder or a .safetensors file")
        config = _config_path(path.parent)
        return Layout(path.parent, config, (path,), None, None)

    try:
        empty = not any(True for _ in path.iterdir())
    except OSError as exc:
        raise CheckpointError(f"{path}: cannot list folder ({exc.strerror})") from None
    if empty:
        raise CheckpointError(f"{path}: folder is empty; expected config.json and *.safetensors weights")
    config = _config_path(path)
    index = _find_index(path)
    if index is not None:
        weight_map = _read_index(index, path)
        files = tuple(sorted(set(weight_map.values())))
        return Layout(path, config, files, index, weight_map)
    files = tuple(sorted(p for p in path.glob("*.safetensors") if not p.name.startswith(".") and p.is_file()))
    if not files:
        hint = " (PyTorch .bin weights are not supported; convert them to safetensors)" \
            if any(path.glob("*.bin")) else ""
        raise CheckpointError(f"{path}: no *.safetensors files{hint}")
    return Layout(path, config, files, None, None)


def _config_path(folder: Path) -> Path:
    config = folder / "config.json"
    if not config.is_file():
        raise CheckpointError(f"{folder}: no config.json; a checkpoint folder needs the model's config.json "
                              f"next to its weights")
    return config


def _find_index(folder: Path) -> Optional[Path]:
    preferred = folder / INDEX_NAME
    if preferred.is_file():
        return preferred
    found = sorted(folder.glob("*.safetensors.index.json"))
    if len(found) > 1:
        raise CheckpointError(f"{folder}: several shard indexes ({', '.join(p.name for p in found)}); "
                              f"keep only one")
    return found[0] if found else None


def _read_index(index: Path, folder: Path) -> dict[str, Path]:
    data = read_json_object(index, CheckpointError)
    weight_map = data.get("weight_map")
    if not isinstance(weight_map, dict) or not weight_map:
        raise CheckpointError(f"{index}: 'weight_map' must be a non-empty object mapping tensor names to shard files")
    out: dict[str, Path] = {}
    checked: dict[str, Path] = {}
    for name, shard in weight_map.items():
        if not isinstance(shard, str) or shard not in checked:
            if not isinstance(shard, str) or not shard or Path(shard).is_absolute() or ".." in Path(shard).parts:
                raise CheckpointError(f"{index}: tensor {name!r} maps to {shard!r}; expected a shard file name "
                                      f"inside {folder}")
            shard_path = folder / shard
            if not shard_path.is_file():
                raise CheckpointError(f"{index}: lists shard {shard!r} (for {name!r}) but {shard_path} does not exist; "
                                      f"the download is incomplete")
            checked[shard] = shard_path
        out[name] = checked[shard]
    return out
