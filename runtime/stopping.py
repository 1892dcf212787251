"""Stop strings over streamed text (OpenAI semantics: the text ends just before the stop string, which is
not shown).

A stop string can arrive split over several tokens, so text that could be the start of one is held back
until the next delta says whether it is; everything before it is released at once.
"""
from __future__ import annotations

from typing import Sequence


class StopStringMatcher:
    """Feed text deltas in order; get back the part that is safe to show and whether a stop string ended it."""

    def __init__(self, stop: Sequence[str]) -> None:
        if not stop or not all(stop):
            raise ValueError("StopStringMatcher needs at least one stop string, none of them empty")
        self._stop = tuple(stop)
        # Every proper prefix of every stop string: the text that may have to be held back.
        self._prefixes = frozenset(s[:n] for s in self._stop for n in range(1, len(s)))
        self._longest_prefix = max(len(s) for s in self._stop) - 1
        self._held = ""

    def push(self, delta: str) -> tuple[str, bool]:
        """Add `delta`. Returns (text to show now, stopped). Once stopped, the text before the stop string has
        been returned and the rest is dropped."""
        text = self._held + delta
        # The stop string that completes first wins (on a tie, the one that starts first), as if the text
        # arrived one character at a time: which stop ends the text must not depend on how tokens split it.
        found = [(i + len(s), i) for i, s in ((text.find(s), s) for s in self._stop) if i >= 0]
        if found:
            self._held = ""
            return text[: min(found)[1]], True
        hold = self._held_length(text)
        self._held = text[len(text) - hold :]
        return text[: len(text) - hold], False

    def flush(self) -> str:
        """End of stream without a stop string: the held-back text was ordinary text after all."""
        text, self._held = self._held, ""
        return text

    def _held_length(self, text: str) -> int:
        """Length of the longest suffix of `text` that begins some stop string."""
        for n in range(min(len(text), self._longest_prefix), 0, -1):
            if text[-n:] in self._prefixes:
                return n
        return 0
