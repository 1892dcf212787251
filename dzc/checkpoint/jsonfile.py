"""Read a JSON object from disk, turning every way it can fail into a one-line DzcError.

config.json, generation_config.json, the shard index and safetensors headers are all JSON written by other
tools. A raw `JSONDecodeError` or `UnicodeDecodeError` would not say which file is broken, so every read
goes through here. Duplicate keys are an error: JSON allows them, but a config or index that names the same
key twice is ambiguous and silently keeping the last one hides a broken file.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from dzc.errors import DzcError


def _no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in pairs:
        if key in out:
            raise _DuplicateKey(key)
        out[key] = value
    return out


class _DuplicateKey(Exception):
    pass


def parse_json_object(text: bytes | str, source: str, error: type[DzcError]) -> dict[str, Any]:
    """Parse `text` (the contents of `source`) as a JSON object or raise `error` naming `source`."""
    try:
        if isinstance(text, bytes):
            text = text.decode("utf-8")
        value = json.loads(text, object_pairs_hook=_no_duplicates)
    except UnicodeDecodeError as exc:
        raise error(f"{source}: not valid UTF-8 at byte {exc.start}; the file is damaged") from None
    except _DuplicateKey as exc:
        raise error(f"{source}: key {exc.args[0]!r} appears twice; the file is damaged or hand-edited") from None
    except json.JSONDecodeError as exc:
        raise error(f"{source}: invalid JSON at line {exc.lineno} column {exc.colno} ({exc.msg}); "
                    f"the file is damaged or incomplete") from None
    except RecursionError:
        raise error(f"{source}: JSON nested too deeply; the file is damaged") from None
    if not isinstance(value, dict):
        raise error(f"{source}: expected a JSON object, got {type(value).__name__}")
    return value


def read_json_object(path: Path, error: type[DzcError]) -> dict[str, Any]:
    """Read and parse the JSON object in `path`, raising `error` (never OSError/JSONDecodeError)."""
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise error(f"{path}: file not found") from None
    except IsADirectoryError:
        raise error(f"{path}: is a folder, expected a JSON file") from None
    except OSError as exc:
        raise error(f"{path}: cannot read ({exc.strerror})") from None
    return parse_json_object(data, str(path), error)
