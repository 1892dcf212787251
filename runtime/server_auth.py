"""API keys and per-client rate limits for `dzc serve`.

A request is authorised by `Authorization: Bearer KEY` (compared in constant time). The rate limit is a token
bucket per client: it holds `limit` requests, refills continuously at `limit` per `period` seconds, and a
request that finds it empty is refused with the time until the next token (HTTP 429 + Retry-After). The client
is the API key when one is set (so every caller with the key shares one budget), else the peer's IP address.
"""
from __future__ import annotations

import hmac
import math
import re
import time
from dataclasses import dataclass
from typing import Callable

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0,
          "h": 3600.0, "hour": 3600.0}


@dataclass(frozen=True)
class RateLimit:
    limit: int  # requests per period, also the burst size
    period: float  # seconds

    @staticmethod
    def parse(text: str) -> "RateLimit":
        """'N/min' (also N/s, N/h; a bare N means per minute). Raises ValueError with a readable message."""
        m = re.fullmatch(r"\s*(\d+)\s*(?:/\s*([a-z]+))?\s*", text.lower())
        if not m or int(m.group(1)) < 1 or (m.group(2) or "min") not in _UNITS:
            raise ValueError(f"rate limit {text!r} is not N/min, N/s or N/h with N >= 1 (e.g. 60/min)")
        return RateLimit(int(m.group(1)), _UNITS[m.group(2) or "min"])

    def __str__(self) -> str:
        unit = {1.0: "s", 60.0: "min", 3600.0: "h"}.get(self.period)
        return f"{self.limit}/{unit}" if unit else f"{self.limit} per {self.period:g}s"


class RateLimiter:
    """Token buckets by client key. Buckets that have refilled completely are dropped once there are many,
    so the table stays small however many clients come and go."""

    MAX_IDLE_BUCKETS = 4096

    def __init__(self, rate: RateLimit, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate = rate
        self._clock = clock
        self._buckets: dict[str, tuple[float, float]] = {}  # key -> (tokens, time of that count)

    def acquire(self, key: str) -> float:
        """Take one request from `key`'s bucket: 0.0 if allowed, else the seconds until one is available."""
        now = self._clock()
        per_second = self.rate.limit / self.rate.period
        tokens, then = self._buckets.get(key, (float(self.rate.limit), now))
        tokens = min(float(self.rate.limit), tokens + (now - then) * per_second)
        if tokens >= 1.0:
            self._buckets[key] = (tokens - 1.0, now)
            if len(self._buckets) > self.MAX_IDLE_BUCKETS:
                self._prune(now, per_second)
            return 0.0
        self._buckets[key] = (tokens, now)
        return (1.0 - tokens) / per_second

    def _prune(self, now: float, per_second: float) -> None:
        full = [key for key, (tokens, then) in self._buckets.items()
                if tokens + (now - then) * per_second >= self.rate.limit]
        for k in full:
            del self._buckets[k]


def retry_after_header(seconds: float) -> str:
    """Retry-After is whole seconds; round up so a client that waits that long is admitted."""
    return str(max(1, math.ceil(seconds)))


def bearer_matches(authorization: str | None, key: str) -> bool:
    """True when the Authorization header is `Bearer <key>` (scheme case-insensitive, constant-time compare)."""
    if not authorization:
        return False
    scheme, _, token = authorization.strip().partition(" ")
    if scheme.lower() != "bearer":
        return False
    return hmac.compare_digest(token.strip().encode("utf-8", "surrogateescape"), key.encode("utf-8"))
