"""Errors a user can act on.

Every failure that bad input can cause is a `DzcError` subclass whose message is one line that names the file,
key or value at fault and says what to do. The CLI prints `dzc: error: <message>` and exits non-zero; it never
shows a traceback for these. Anything else escaping is a bug in dzc.
"""
from __future__ import annotations


class DzcError(Exception):
    """Base of every user-facing error. `exit_code` is what the CLI returns."""

    exit_code = 1


class CheckpointError(DzcError):
    """A checkpoint folder, file or tensor is missing, damaged or does not match its config."""


class ConfigError(DzcError):
    """config.json (or generation_config.json) is unreadable, incomplete or describes an unsupported model."""


class TokenizerError(DzcError):
    """The tokenizer is missing or cannot encode/decode what was asked."""


class InputError(DzcError):
    """A prompt, token id, sampling parameter or length limit is out of range."""


class IRError(DzcError):
    """The IR is malformed (a verifier failure). Raised by passes and the tracer; indicates a dzc bug or a bad pass."""


class CompileError(DzcError):
    """Code generation or linking failed for the requested target."""


class ArtifactError(DzcError):
    """A compiled artifact is damaged, tampered with, or built for another machine or dzc version."""


class DeviceError(DzcError):
    """The artifact's target device is not available on this machine."""
