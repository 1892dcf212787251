"""A progress bar for steps that take seconds (compiling, packing weights), drawn on stderr.

Reporters call `bar(stage, done, total, detail)`. On a terminal the current stage redraws in place; elsewhere
(CI logs, pipes) each stage prints one line when it completes, so logs stay short and readable.
"""
from __future__ import annotations

import sys
import time
from typing import Optional, TextIO

_WIDTH = 28


class ProgressBar:
    def __init__(self, stream: Optional[TextIO] = None) -> None:
        self.stream = stream or sys.stderr     # looked up per bar: sys.stderr may have been replaced since import
        self.tty = self.stream.isatty()
        self.start = time.perf_counter()
        self.stage = ""

    def __call__(self, stage: str, done: int, total: int, detail: str = "") -> None:
        elapsed = time.perf_counter() - self.start
        finished = total > 0 and done >= total
        if self.tty:
            filled = int(_WIDTH * done / total) if total else _WIDTH
            bar = "#" * filled + "-" * (_WIDTH - filled)
            self.stream.write(f"\r\033[K{stage:>8} [{bar}] {done}/{total} {detail[:60]} {elapsed:5.1f}s")
            if finished:
                self.stream.write("\n")
        elif finished:
            self.stream.write(f"{stage:>8}: {detail} ({elapsed:.1f}s)\n".replace(":  (", ": ("))
        self.stream.flush()
