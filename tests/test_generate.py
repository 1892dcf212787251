"""The generate loop against fake executors: stopping, streaming text, limits, stats and bad inputs."""
from __future__ import annotations

import numpy as np
import pytest
import tokenizers
from tokenizers import decoders, models, pre_tokenizers

from dzc.errors import InputError
from dzc.runtime.generate import generate, generate_all
from dzc.runtime.sampling import SamplingParams
from dzc.runtime.stopping import StopStringMatcher
from dzc.runtime.tokenizer import Tokenizer

BOS, EOS = 256, 257
VOCAB = 300  # bytes, two special tokens, and ids the tokenizer does not know (a model's padded vocabulary)
GREEDY = SamplingParams(temperature=0, max_tokens=64)


class FakeExecutor:
    """Logits that depend only on the last token: row t of a fixed random matrix. Checks the KV-cache
    discipline the real executors have: nothing runs past max_context."""

    kv_cache_bytes_per_token = 1234

    def __init__(self, max_context: int = 64, seed: int = 0) -> None:
        self.vocab_size, self.max_context = VOCAB, max_context
        self.table = np.random.default_rng(seed).standard_normal((VOCAB, VOCAB)).astype(np.float32)
        self.calls: list[list[int]] = []
        self._position = 0

    @property
    def position(self) -> int:
        return self._position

    def forward(self, token_ids: np.ndarray, last_only: bool = False) -> np.ndarray:
        assert token_ids.dtype == np.int32 and token_ids.ndim == 1
        assert self._position + token_ids.size <= self.max_context, "ran past the context"
        self._position += token_ids.size
        self.calls.append(token_ids.tolist())
        logits = self._logits(token_ids)
        return logits[-1:] if last_only else logits

    def _logits(self, token_ids: np.ndarray) -> np.ndarray:
        return self.table[token_ids]

    def reset(self) -> None:
        self._position = 0
        self.calls.append([])  # marks the reset in the call log


class ScriptedExecutor(FakeExecutor):
    """Makes greedy decoding produce `script`, one token per forward, whatever the input."""

    def __init__(self, script: list[int], max_context: int = 64) -> None:
        super().__init__(max_context)
        self.script = script

    def _logits(self, token_ids: np.ndarray) -> np.ndarray:
        out = np.zeros((token_ids.size, VOCAB), np.float32)
        out[-1, self.script[len(self.calls) - 2]] = 10.0  # calls holds the reset, then one entry per forward
        return out


def script_of(text: str) -> list[int]:
    return list(text.encode("utf-8"))


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    """A byte-level BPE whose token b (< 256) is byte b, so multibyte characters span several tokens."""
    printable = {*range(0x21, 0x7F), *range(0xA1, 0xAD), *range(0xAE, 0x100)}
    unprintable = [b for b in range(256) if b not in printable]
    chars = [chr(b) if b in printable else chr(256 + unprintable.index(b)) for b in range(256)]
    backend = tokenizers.Tokenizer(models.BPE(vocab={c: b for b, c in enumerate(chars)}, merges=[]))
    backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False)
    backend.decoder = decoders.ByteLevel()
    backend.add_special_tokens(["<s>", "</s>"])
    return Tokenizer(backend, special_tokens={"bos_token": "<s>", "eos_token": "</s>"})


def test_greedy_prefills_once_then_one_token_per_forward():
    ex = FakeExecutor()
    ex.forward(np.array([1, 2, 3], np.int32))  # a previous user's cache: generate must reset it
    result = generate_all(ex, [5, 6, 7], SamplingParams(temperature=0, max_tokens=6))
    expected, last = [], 7
    for _ in range(6):
        last = int(np.argmax(ex.table[last]))
        expected.append(last)
    assert result.token_ids == expected
    assert result.finish_reason == "length"
    assert ex.calls[1:] == [[], [5, 6, 7]] + [[t] for t in expected[:-1]]
    assert result.text == ""  # no tokenizer, no text


def test_same_seed_same_tokens_other_seed_other_tokens():
    def run(seed):
        return generate_all(FakeExecutor(), [1], SamplingParams(seed=seed, max_tokens=20, top_k=50)).token_ids
    assert run(3) == run(3)
    assert run(3) != run(4)


def test_eos_stops_and_is_not_shown(tok):
    result = generate_all(ScriptedExecutor(script_of("Hi!") + [EOS] + script_of("more")), [BOS], GREEDY, tok)
    assert result.finish_reason == "stop"
    assert result.token_ids == script_of("Hi!") + [EOS]
    assert result.text == "Hi!"


def test_explicit_eos_ids_and_stop_token_ids(tok):
    script = script_of("ab;cd") + [EOS]
    assert generate_all(ScriptedExecutor(script), [BOS], GREEDY, tok, eos_ids=[ord("c")]).text == "ab;"
    params = SamplingParams(temperature=0, max_tokens=64, stop_token_ids=[ord(";")])
    assert generate_all(ScriptedExecutor(script), [BOS], params, tok).text == "ab"


def test_ignore_eos_runs_to_max_tokens(tok):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    result = generate_all(ScriptedExecutor(script_of("ab") + [EOS] + script_of("cdef")), [BOS], params, tok)
    assert result.finish_reason == "length"
    assert result.token_ids == script_of("ab") + [EOS] + script_of("cde")
    assert result.text == "abcde"  # special tokens are left out of the text


def test_context_limit():
    ex = FakeExecutor(max_context=8)
    result = generate_all(ex, [1, 2, 3, 4, 5], SamplingParams(temperature=0, max_tokens=100))
    assert result.finish_reason == "length"
    assert len(result.token_ids) == 3  # prompt + output fill the context; the last token is never forwarded
    assert ex.position == 7


def test_stop_string_across_tokens(tok):
    params = SamplingParams(temperature=0, max_tokens=64, stop=["STOP", "never"])
    events = list(generate(ScriptedExecutor(script_of("Hi S ST STOP after")), [BOS], params, tok))
    assert "".join(e.text for e in events) == "Hi S ST "
    assert events[-1].finish_reason == "stop"
    assert [e.token_id for e in events] == script_of("Hi S ST STOP")  # stops on the token that completes it
    shown = ""
    for e in events:  # a prefix of "STOP" is held back until it is known not to be the stop string
        shown += e.text
        assert not shown.endswith("S") and not shown.endswith("ST")


def test_stop_string_start_held_at_eos_is_shown(tok):
    params = SamplingParams(temperature=0, max_tokens=64, stop=["world"])
    assert generate_all(ScriptedExecutor(script_of("hello wor") + [EOS]), [BOS], params, tok).text == "hello wor"
    params = SamplingParams(temperature=0, max_tokens=9, stop=["world"])
    result = generate_all(ScriptedExecutor(script_of("hello world")), [BOS], params, tok)
    assert (result.text, result.finish_reason) == ("hello wor", "length")


def test_stop_matcher_on_random_splits():
    rng = np.random.default_rng(0)
    stops = ["aab", "ba", "abca", "bc", "cabcab"]
    for _ in range(300):
        text = "".join(rng.choice(list("abc"), rng.integers(0, 14)))
        cuts = sorted(rng.integers(0, len(text) + 1, rng.integers(0, 5)).tolist())
        deltas = [text[i:j] for i, j in zip([0, *cuts], [*cuts, len(text)])]
        matcher, shown, stopped = StopStringMatcher(stops), "", False
        for delta in deltas:
            out, stopped = matcher.push(delta)
            shown += out
            if stopped:
                break
        if not stopped:
            shown += matcher.flush()
        # Reference: feed one character at a time and stop as soon as the text ends with a stop string.
        end = next((n for n in range(1, len(text) + 1) if any(text[:n].endswith(s) for s in stops)), None)
        start = None if end is None else min(end - len(s) for s in stops if text[:end].endswith(s))
        assert (shown, stopped) == ((text[:start], True) if end is not None else (text, False))


def test_utf8_streaming(tok):
    events = list(generate(ScriptedExecutor(script_of("a你😀") + [EOS]), [BOS], GREEDY, tok))
    assert [e.text for e in events] == ["a", "", "", "你", "", "", "", "😀", ""]
    truncated = script_of("b你")[:-1]  # max_tokens ends inside a character: the bytes show as U+FFFD
    params = SamplingParams(temperature=0, max_tokens=len(truncated))
    events = list(generate(ScriptedExecutor(truncated), [BOS], params, tok))
    assert [e.text for e in events] == ["b", "", "\ufffd"]


def test_stop_string_made_of_multibyte_characters(tok):
    params = SamplingParams(temperature=0, max_tokens=64, stop=["好。"])
    result = generate_all(ScriptedExecutor(script_of("你好吗？你好。再见")), [BOS], params, tok)
    assert result.text == "你好吗？你"


def test_eos_defaults_to_the_tokenizers(tok):
    result = generate_all(ScriptedExecutor(script_of("x") + [EOS] + script_of("y")), [BOS], GREEDY, tok)
    assert result.token_ids[-1] == EOS


def test_logits_capture_and_stats():
    ex = FakeExecutor()
    result = generate_all(ex, [4, 9], SamplingParams(temperature=0, max_tokens=5), capture_logits=True)
    previous = [9] + result.token_ids[:-1]
    assert result.logits.shape == (5, VOCAB) and result.logits.dtype == np.float32
    assert np.array_equal(result.logits, ex.table[previous])
    s = result.stats
    assert (s.prompt_tokens, s.generated_tokens, s.kv_cache_bytes_per_token) == (2, 5, 1234)
    assert s.prefill_seconds > 0 and s.decode_seconds > 0 and s.decode_tokens_per_s > 0
    assert generate_all(ex, [4], SamplingParams(max_tokens=2)).logits is None


@pytest.mark.parametrize("prompt, params, match", [
    ([], GREEDY, "prompt is empty"),
    ([1, VOCAB, 2], GREEDY, f"token id {VOCAB} at position 1 is outside the vocabulary"),
    ([-1], GREEDY, "token id -1 at position 0"),
    ([1.5], GREEDY, "must be integers"),
    (list(range(64)), GREEDY, "prompt has 64 tokens but the context holds 64"),
    ([1], SamplingParams(top_p=0), "top_p"),
    ([1], SamplingParams(stop_token_ids=[VOCAB]), f"stop token id {VOCAB}"),
    ([1], SamplingParams(stop=["x"]), "stop strings need a tokenizer"),
])
def test_bad_inputs_fail_before_compute(prompt, params, match):
    ex = FakeExecutor()
    with pytest.raises(InputError, match=match) as err:
        generate(ex, prompt, params)
    assert "\n" not in str(err.value)
    assert ex.calls == []
