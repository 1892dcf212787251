"""What `dzc serve` accepts and answers: OpenAI request bodies checked field by field, and OpenAI-shaped errors.

Bodies are parsed by hand rather than by a schema library so that every wrong value is refused, never coerced
(`"max_tokens": "8"` and `"stream": 1` are 400s, as they are at OpenAI), and so that each error names the
field (`param`). Unknown fields are ignored, as OpenAI-compatible servers do; known fields that ask for
something dzc does not do (n > 1, logprobs, tools, echo, logit_bias...) are refused rather than ignored.
"""
from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from typing import Any

from dzc.runtime.sampling import SamplingParams

CHAT_ROLES = ("system", "developer", "user", "assistant", "tool")
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256  # the stop matcher keeps every prefix of every stop string


class APIError(Exception):
    """An answer in OpenAI's error shape: `{"error": {"message", "type", "param", "code"}}`."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None, headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.type = type
        self.code = code
        self.param = param
        self.headers = headers or {}

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad_request(message: str, param: str | None = None, code: str | None = "invalid_value") -> APIError:
    return APIError(400, message, param=param, code=code)


def parse_json_object(raw: bytes | str) -> dict[str, Any]:
    """The request body as a JSON object; anything else is a 400 (never a 500)."""
    try:
        body = json.loads(raw)
    except (ValueError, RecursionError) as e:  # JSONDecodeError, bad UTF-8, int digit limit; deep nesting
        raise bad_request(f"the request body is not valid JSON: {' '.join(str(e).split())[:200]}",
                          code="invalid_json") from None
    if not isinstance(body, dict):
        raise bad_request(f"the request body must be a JSON object, not {_json_type(body)}", code="invalid_json")
    return body


@dataclass
class RequestSpec:
    """A checked chat or completion request, before tokenization. Exactly one of messages / prompt is set:
    prompt is text (tokenized with BOS as the tokenizer says) or a list of token ids."""

    kind: str  # "chat" | "completion"
    model: str
    messages: list[dict[str, Any]] | None = None
    prompt: str | list[int] | None = None
    max_tokens: int | None = None  # None = up to the end of the context
    stream: bool = False
    include_usage: bool = False
    sampling: dict[str, Any] = field(default_factory=dict)  # SamplingParams fields the client set

    @property
    def prompt_param(self) -> str:
        return "messages" if self.kind == "chat" else "prompt"

    def sampling_params(self, prompt_tokens: int, max_context: int) -> SamplingParams:
        """SamplingParams for this request, checked against the prompt length and the context."""
        room = max_context - prompt_tokens
        if room < 1:
            raise APIError(
                400, f"the prompt has {prompt_tokens} tokens but the model's context holds {max_context}; "
                     "shorten it so at least one token can be generated",
                param=self.prompt_param, code="context_length_exceeded")
        if self.max_tokens is not None and self.max_tokens > room:
            raise APIError(
                400, f"max_tokens={self.max_tokens} is too large: the prompt has {prompt_tokens} tokens and the "
                     f"context holds {max_context}, so at most {room} can be generated",
                param="max_tokens", code="context_length_exceeded")
        params = SamplingParams(max_tokens=self.max_tokens if self.max_tokens is not None else room, **self.sampling)
        try:
            params.validate()
        except Exception as e:  # InputError naming the parameter
            raise bad_request(str(e)) from None
        return params


def parse_chat(body: dict[str, Any], model_name: str) -> RequestSpec:
    spec = _common(body, "chat", model_name)
    messages = body.get("messages")
    if not isinstance(messages, list) or not messages:
        raise bad_request("'messages' must be a non-empty list of {role, content} objects", "messages",
                          "missing_required_parameter" if messages is None else "invalid_type")
    spec.messages = [_message(m, i) for i, m in enumerate(messages)]
    if _get(body, "logprobs", bool, False) or _get(body, "top_logprobs", int, None) not in (None, 0):
        raise _unsupported("logprobs")
    if _get(body, "tools", list, None):
        raise _unsupported("tools", "tool calling is not supported by dzc serve; send plain messages")
    return spec


def parse_completion(body: dict[str, Any], model_name: str) -> RequestSpec:
    spec = _common(body, "completion", model_name)
    if "prompt" not in body:
        raise bad_request("'prompt' is required: a string or a list of token ids", "prompt",
                          "missing_required_parameter")
    spec.prompt = _prompt(body["prompt"])
    if _get(body, "echo", bool, False):
        raise _unsupported("echo")
    if _get(body, "logprobs", int, None) is not None:
        raise _unsupported("logprobs")
    if _get(body, "best_of", int, None) not in (None, 1):
        raise _unsupported("best_of", "best_of must be 1 (or unset): dzc serve generates one completion")
    if _get(body, "suffix", str, None):
        raise _unsupported("suffix")
    return spec


def _common(body: dict[str, Any], kind: str, model_name: str) -> RequestSpec:
    model = body.get("model")
    if not isinstance(model, str):
        raise bad_request("'model' is required and must be a string"
                          + (f"; this server serves {model_name!r}" if model is None else ""),
                          "model", "missing_required_parameter" if model is None else "invalid_type")
    if model != model_name:
        raise APIError(404, f"the model {model[:200]!r} does not exist; this server serves {model_name!r}",
                       param="model", code="model_not_found")
    n = _get(body, "n", int, None)
    if n not in (None, 1):
        raise bad_request(f"n={n} is not supported: dzc serve generates one choice per request (n=1)", "n")
    max_tokens = _get(body, "max_tokens", int, None)
    max_completion = _get(body, "max_completion_tokens", int, None)
    if max_completion is not None:
        max_tokens, name = max_completion, "max_completion_tokens"
    else:
        name = "max_tokens"
    if max_tokens is not None and max_tokens < 1:
        raise bad_request(f"{name}={max_tokens} is invalid: it must be an integer >= 1", name)
    stream = _get(body, "stream", bool, False)
    options = _get(body, "stream_options", dict, None) or {}
    include_usage = _get(options, "include_usage", bool, False, "stream_options.include_usage")
    if _get(body, "logit_bias", dict, None):
        raise _unsupported("logit_bias")
    response_format = _get(body, "response_format", dict, None)
    if response_format and response_format.get("type") != "text":
        raise _unsupported("response_format", "only response_format {'type': 'text'} is supported")
    _get(body, "user", str, None)

    sampling: dict[str, Any] = {}
    for key, kind_of in (("temperature", float), ("top_p", float), ("min_p", float), ("top_k", int),
                         ("presence_penalty", float), ("frequency_penalty", float), ("repetition_penalty", float),
                         ("seed", int), ("ignore_eos", bool)):
        value = _get(body, key, kind_of, None)
        if value is not None:
            sampling[key] = value
    if sampling.get("top_k") == -1:  # vLLM's spelling of "off"
        sampling["top_k"] = 0
    stop = _stop(body.get("stop"))
    if stop:
        sampling["stop"] = stop
    stop_ids = body.get("stop_token_ids")
    if stop_ids is not None:
        if not isinstance(stop_ids, list) or not all(_is_int(t) for t in stop_ids):
            raise bad_request("'stop_token_ids' must be a list of integers", "stop_token_ids", "invalid_type")
        sampling["stop_token_ids"] = stop_ids
    return RequestSpec(kind=kind, model=model, max_tokens=max_tokens, stream=stream, include_usage=include_usage,
                       sampling=sampling)


def _message(m: Any, i: int) -> dict[str, Any]:
    where = f"messages[{i}]"
    if not isinstance(m, dict):
        raise bad_request(f"{where} must be an object with 'role' and 'content', not {_json_type(m)}", where,
                          "invalid_type")
    role = m.get("role")
    if role not in CHAT_ROLES:
        raise bad_request(f"{where}.role must be one of {', '.join(CHAT_ROLES)}, not {_short(role)}",
                          f"{where}.role")
    content = m.get("content")
    if isinstance(content, list):
        texts = []
        for j, part in enumerate(content):
            if not (isinstance(part, dict) and part.get("type") == "text" and isinstance(part.get("text"), str)):
                raise bad_request(f"{where}.content[{j}] must be {{'type': 'text', 'text': string}}; "
                                  "only text content is supported", f"{where}.content")
            texts.append(part["text"])
        content = "\n".join(texts)
    elif content is None:
        if role != "assistant":
            raise bad_request(f"{where}.content is required for role {role!r}", f"{where}.content",
                              "missing_required_parameter")
    elif not isinstance(content, str):
        raise bad_request(f"{where}.content must be a string or a list of text parts, not {_json_type(content)}",
                          f"{where}.content", "invalid_type")
    out: dict[str, Any] = {"role": role, "content": content}
    name = m.get("name")
    if name is not None:
        if not isinstance(name, str):
            raise bad_request(f"{where}.name must be a string", f"{where}.name", "invalid_type")
        out["name"] = name
    return out


def _prompt(prompt: Any) -> str | list[int]:
    # OpenAI accepts a string, a list of strings, a list of token ids, or a list of lists of token ids;
    # lists of several prompts are batches, which dzc serve does not take.
    if isinstance(prompt, list) and len(prompt) == 1 and isinstance(prompt[0], (str, list)):
        prompt = prompt[0]
    if isinstance(prompt, str):
        if not prompt:
            raise bad_request("'prompt' is empty: give some text or token ids", "prompt")
        return prompt
    if isinstance(prompt, list) and prompt and all(_is_int(t) for t in prompt):
        return list(prompt)
    if isinstance(prompt, list) and len(prompt) > 1 and all(isinstance(p, (str, list)) for p in prompt):
        raise bad_request("batched prompts are not supported: send one prompt per request", "prompt")
    raise bad_request("'prompt' must be a non-empty string or a non-empty list of integer token ids", "prompt",
                      "invalid_type")


def _stop(stop: Any) -> list[str]:
    if stop is None:
        return []
    if isinstance(stop, str):
        stop = [stop]
    if not isinstance(stop, list) or not all(isinstance(s, str) for s in stop):
        raise bad_request("'stop' must be a string or a list of strings", "stop", "invalid_type")
    stop = [s for s in stop if s]  # OpenAI ignores empty stop strings
    if len(stop) > MAX_STOP_STRINGS or any(len(s) > MAX_STOP_LENGTH for s in stop):
        raise bad_request(f"'stop' takes at most {MAX_STOP_STRINGS} strings of at most {MAX_STOP_LENGTH} "
                          "characters each", "stop")
    return stop


def _get(body: dict[str, Any], key: str, kind: type, default: Any, param: str | None = None) -> Any:
    """body[key] if it is of `kind` (int: not bool; float: any finite number; null = unset), else a 400."""
    value = body.get(key)
    if value is None:
        return default
    if kind is float:
        value = _finite_float(value)
        ok = value is not None
    elif kind is int:
        ok = _is_int(value)
    else:
        ok = isinstance(value, kind)
    if not ok:
        expected = {int: "an integer", float: "a finite number", bool: "true or false", str: "a string",
                    list: "a list", dict: "an object"}[kind]
        raise bad_request(f"'{param or key}' must be {expected}, not {_short(body.get(key))}", param or key,
                          "invalid_type")
    return value


def _finite_float(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        return None
    try:
        value = float(value)
    except OverflowError:
        return None
    return value if math.isfinite(value) else None


def _unsupported(param: str, message: str | None = None) -> APIError:
    return bad_request(message or f"'{param}' is not supported by dzc serve; leave it unset", param,
                       "unsupported_parameter")


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def _json_type(value: Any) -> str:
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean", int: "a number",
            float: "a number", type(None): "null"}.get(type(value), type(value).__name__)


def _short(value: Any) -> str:
    text = json.dumps(value) if isinstance(value, (str, int, float, bool, type(None))) else _json_type(value)
    return text if len(text) <= 60 else text[:57] + "..."


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}

