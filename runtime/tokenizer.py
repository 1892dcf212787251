"""Text <-> token ids for a checkpoint folder: tokenizer.json, its special tokens and its chat template.

The vocabulary and the encode/decode rules come from Hugging Face's `tokenizers` (tokenizer.json); only the
metadata that transformers keeps beside it is read here: tokenizer_config.json (bos/eos tokens, add_bos_token,
chat_template) and chat_template.jinja. Chat templates render the way transformers renders them, so a prompt
built here tokenizes to the same ids as `AutoTokenizer.apply_chat_template`.
"""
from __future__ import annotations

import json
from datetime import datetime
from pathlib import Path
from typing import Any, Mapping, Sequence

import jinja2
import jinja2.ext
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from dzc.errors import InputError, TokenizerError

Message = Mapping[str, Any]
_SPECIAL_TOKEN_KEYS = ("bos_token", "eos_token", "unk_token", "pad_token")
_REPLACEMENT = "\ufffd"


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens and chat template that transformers keeps in its config."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: Mapping[str, str] | None = None,
        add_bos_token: bool = False,
        chat_template: str | None = None,
        source: str = "<memory>",
    ) -> None:
        self.backend = backend
        self.special_tokens = dict(special_tokens or {})
        self.add_bos_token = add_bos_token
        self.chat_template = chat_template
        self.source = source
        self.bos_id = self._token_id("bos_token")
        self.eos_id = self._token_id("eos_token")
        self.vocab_size = backend.get_vocab_size(with_added_tokens=True)
        self._compiled_template: jinja2.Template | None = None
        if add_bos_token and self.bos_id is None:
            raise TokenizerError(f"{source}: add_bos_token is true but no bos_token is set; set one or turn it off")

    @classmethod
    def from_dir(cls, path: str | Path) -> Tokenizer:
        """Load tokenizer.json and, when present, tokenizer_config.json and chat_template.jinja from `path`."""
        folder = Path(path)
        tokenizer_file = folder / "tokenizer.json"
        if not tokenizer_file.is_file():
            raise TokenizerError(
                f"no tokenizer.json in {folder}; add one, or pass token ids with --prompt-ids, which needs no tokenizer"
            )
        try:
            backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
        except Exception as e:  # tokenizers raises bare Exceptions whose text spans lines
            raise TokenizerError(f"{tokenizer_file} cannot be loaded: {_one_line(e)}") from None
        config = _read_config(folder / "tokenizer_config.json")
        special = {key: _token_content(config[key], key, folder) for key in _SPECIAL_TOKEN_KEYS if config.get(key)}
        return cls(
            backend,
            special_tokens=special,
            add_bos_token=bool(config.get("add_bos_token", False)),
            chat_template=_find_chat_template(folder, config),
            source=str(folder),
        )

    def _token_id(self, key: str) -> int | None:
        token = self.special_tokens.get(key)
        if token is None:
            return None
        token_id = self.backend.token_to_id(token)
        if token_id is None:
            raise TokenizerError(f"{self.source}: {key} {token!r} is not in tokenizer.json's vocabulary")
        return token_id

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With `add_special_tokens`, tokenizer.json's post-processor runs and BOS is put
        first when tokenizer_config.json says add_bos_token (unless the text already produced it)."""
        ids = self.backend.encode(text, add_special_tokens=add_special_tokens).ids
        if add_special_tokens and self.add_bos_token and ids[:1] != [self.bos_id]:
            ids.insert(0, self.bos_id)
        return ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)

    def apply_chat_template(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, tools: Sequence[Message] | None = None
    ) -> str:
        """Render `messages` with the chat template, as transformers' `apply_chat_template(tokenize=False)` does."""
        # Like transformers: keys whose value is None are dropped (OpenAI clients send content=None with tool
        # calls, and templates test for a missing key, not for None).
        if not all(isinstance(message, Mapping) for message in messages):
            raise InputError("chat messages must be objects like {\"role\": \"user\", \"content\": \"...\"}")
        chat = [{k: v for k, v in message.items() if v is not None} for message in messages]
        try:
            return self._template().render(
                messages=chat,
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special_tokens,
            )
        except Exception as e:  # only template code runs here: raise_exception, or a bug in the template
            raise TokenizerError(f"chat template of {self.source} failed: {_one_line(e)}") from None

    def encode_chat(
        self, messages: Sequence[Message], add_generation_prompt: bool = True, tools: Sequence[Message] | None = None
    ) -> list[int]:
        """Token ids of the rendered chat. The template writes BOS itself, so none is added on encoding."""
        return self.encode(self.apply_chat_template(messages, add_generation_prompt, tools), add_special_tokens=False)

    def _template(self) -> jinja2.Template:
        if self._compiled_template is None:
            if self.chat_template is None:
                raise TokenizerError(
                    f"{self.source} has no chat template (tokenizer_config.json chat_template or chat_template.jinja); "
                    "give a raw prompt instead of chat messages"
                )
            try:
                self._compiled_template = _chat_environment().from_string(self.chat_template)
            except jinja2.TemplateSyntaxError as e:
                raise TokenizerError(f"chat template of {self.source} does not parse: {_one_line(e)}") from None
        return self._compiled_template


class IncrementalDetokenizer:
    """Turns a stream of token ids into text deltas whose concatenation equals `decode(all ids)`.

    One token can end in the middle of a UTF-8 character (byte-level BPE splits characters into bytes), and
    decoding such a prefix yields U+FFFD. So each push decodes a short window of ids twice, with and without
    the tokens not yet shown; while the window's text ends in U+FFFD the new tokens are held back, because the
    next token may complete the character. `flush` at the end of the stream shows whatever is still held, so
    bytes that really are invalid do come out as U+FFFD. Decoding a window rather than single tokens keeps
    the decoder's context (e.g. SentencePiece's leading-space rule) the same as in a full decode.
    """

    def __init__(self, tokenizer: Tokenizer, skip_special_tokens: bool = False) -> None:
        self._decode = tokenizer.backend.decode
        self._skip = skip_special_tokens
        self._ids: list[int] = []
        self._prefix = 0  # start of the window: the last tokens already shown, kept as decoding context
        self._read = 0  # tokens before this index have been shown
        self._prefix_text = ""  # decode(ids[prefix:read])

    def push(self, token_id: int) -> str:
        """Add one token; return the text it makes final (often "", never a partial character)."""
        self._ids.append(token_id)
        text = self._decode(self._ids[self._prefix :], skip_special_tokens=self._skip)
        if text.endswith(_REPLACEMENT):
            return ""
        return self._advance(text)

    def flush(self) -> str:
        """End of stream: return the text still held back, incomplete characters included (as U+FFFD)."""
        return self._advance(self._decode(self._ids[self._prefix :], skip_special_tokens=self._skip))

    def _advance(self, text: str) -> str:
        delta = text[len(self._prefix_text) :]
        self._prefix, self._read = self._read, len(self._ids)
        self._prefix_text = self._decode(self._ids[self._prefix : self._read], skip_special_tokens=self._skip)
        return delta


def _chat_environment() -> ImmutableSandboxedEnvironment:
    """The Jinja environment transformers renders chat templates in: templates come from checkpoint folders,
    so they run sandboxed; its `tojson` does not HTML-escape (Jinja's would turn '<' into '\\u003c')."""
    env = ImmutableSandboxedEnvironment(trim_blocks=True, lstrip_blocks=True, extensions=[jinja2.ext.loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _raise_exception(message: str) -> None:
    raise jinja2.TemplateError(message)


def _read_config(path: Path) -> dict[str, Any]:
    """tokenizer_config.json is optional: a bare tokenizer.json has no special-token metadata or template."""
    if not path.is_file():
        return {}
    try:
        config = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise TokenizerError(f"{path} is not readable JSON: {_one_line(e)}") from None
    if not isinstance(config, dict):
        raise TokenizerError(f"{path} must hold a JSON object, not {type(config).__name__}")
    return config


def _token_content(value: Any, key: str, folder: Path) -> str:
    """Special tokens are written as plain strings or as serialised AddedTokens ({"content": ...})."""
    if isinstance(value, dict):
        value = value.get("content")
    if not isinstance(value, str):
        raise TokenizerError(f"{folder / 'tokenizer_config.json'}: {key} must be a string or have a 'content' string")
    return value


def _find_chat_template(folder: Path, config: Mapping[str, Any]) -> str | None:
    """chat_template.jinja wins over tokenizer_config.json (as in transformers). A config may list named
    templates ([{"name", "template"}]); the one named "default" is the chat template."""
    jinja_file = folder / "chat_template.jinja"
    if jinja_file.is_file():
        return jinja_file.read_text(encoding="utf-8")
    template = config.get("chat_template")
    if template is None or isinstance(template, str):
        return template
    where = f"{folder / 'tokenizer_config.json'}: chat_template"
    if not isinstance(template, list) or not all(_is_named_template(t) for t in template):
        raise TokenizerError(f"{where} must be a string or a list of {{'name', 'template'}} objects")
    named = {t["name"]: t["template"] for t in template}
    if "default" not in named:
        raise TokenizerError(f"{where} has no template named 'default' (names: {', '.join(sorted(named))})")
    return named["default"]


def _is_named_template(entry: Any) -> bool:
    return isinstance(entry, dict) and isinstance(entry.get("name"), str) and isinstance(entry.get("template"), str)


def _one_line(error: Exception) -> str:
    return " ".join(str(error).split())
