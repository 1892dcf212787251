"""Load test for `dzc serve`: streaming chat clients at several concurrency levels, on this machine only.

    python bench/load_server.py --spawn-fixture                 # start the tiny test model's server and load it
    python bench/load_server.py --url http://127.0.0.1:8080 --model NAME [--api-key KEY]

For each level in --concurrency (default 1,4,8) it sends --requests streaming requests (default 16) from that
many clients at once, every request generating exactly --max-tokens tokens (ignore_eos), and reports
requests/s, generated tokens/s, latency p50/p99 (request sent to `[DONE]`) and time to first token p50.
It is bounded: a fixed number of requests and a wall-clock cap per level (--time-cap), and it refuses any
URL that is not a loopback address.
"""
from __future__ import annotations

import argparse
import asyncio
import ipaddress
import json
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlparse

import httpx

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Sample:
    latency: float
    first_token: float
    tokens: int


@dataclass
class Level:
    concurrency: int
    requested: int
    samples: list[Sample]
    failures: list[str]
    wall: float
    capped: bool

    def row(self) -> dict:
        lat = sorted(s.latency for s in self.samples)
        ttft = sorted(s.first_token for s in self.samples)
        tokens = sum(s.tokens for s in self.samples)
        return {"concurrency": self.concurrency, "ok": len(self.samples), "failed": len(self.failures),
                "capped": self.capped, "wall_s": round(self.wall, 3),
                "requests_per_s": round(len(self.samples) / self.wall, 2) if self.wall else 0.0,
                "tokens_per_s": round(tokens / self.wall, 1) if self.wall else 0.0,
                "latency_p50_ms": _ms(_percentile(lat, 50)), "latency_p99_ms": _ms(_percentile(lat, 99)),
                "ttft_p50_ms": _ms(_percentile(ttft, 50))}


def _percentile(sorted_values: list[float], p: float) -> float | None:
    """Nearest-rank percentile."""
    if not sorted_values:
        return None
    rank = max(1, -(-len(sorted_values) * p // 100))
    return sorted_values[int(rank) - 1]


def _ms(seconds: float | None) -> float | None:
    return None if seconds is None else round(seconds * 1000, 1)


async def one_request(http: httpx.AsyncClient, body: dict) -> Sample:
    start = time.perf_counter()
    first, tokens = None, 0
    async with http.stream("POST", "/v1/chat/completions", json=body) as r:
        if r.status_code != 200:
            raise RuntimeError(f"HTTP {r.status_code}: {(await r.aread())[:200]!r}")
        async for line in r.aiter_lines():
            if not line.startswith("data: "):
                continue
            data = line[6:]
            if data == "[DONE]":
                break
            chunk = json.loads(data)
            if "error" in chunk:
                raise RuntimeError(chunk["error"].get("message"))
            if chunk.get("usage"):
                tokens = chunk["usage"]["completion_tokens"]
            if first is None and any(c.get("delta", {}).get("content") for c in chunk.get("choices", [])):
                first = time.perf_counter() - start
    latency = time.perf_counter() - start
    return Sample(latency, first if first is not None else latency, tokens)


async def run_level(url: str, headers: dict, model: str, concurrency: int, requests: int, max_tokens: int,
                    time_cap: float) -> Level:
    samples: list[Sample] = []
    failures: list[str] = []
    next_index = iter(range(requests))

    async def client(http: httpx.AsyncClient) -> None:
        for i in next_index:
            body = {"model": model, "max_tokens": max_tokens, "temperature": 0, "ignore_eos": True,
                    "stream": True, "stream_options": {"include_usage": True},
                    "messages": [{"role": "user", "content": f"load test request {i}"}]}
            try:
                samples.append(await one_request(http, body))
            except (httpx.HTTPError, RuntimeError, ValueError) as e:
                failures.append(f"{type(e).__name__}: {e}")

    limits = httpx.Limits(max_connections=concurrency + 2)
    async with httpx.AsyncClient(base_url=url, headers=headers, limits=limits, timeout=time_cap) as http:
        start = time.perf_counter()
        tasks = [asyncio.create_task(client(http)) for _ in range(concurrency)]
        done, pending = await asyncio.wait(tasks, timeout=time_cap)
        for task in pending:
            task.cancel()
        await asyncio.gather(*pending, return_exceptions=True)
        wall = time.perf_counter() - start
    return Level(concurrency, requests, samples, failures, wall, capped=bool(pending))


def check_loopback(url: str) -> None:
    host = urlparse(url).hostname or ""
    try:
        ok = host == "localhost" or ipaddress.ip_address(host).is_loopback
    except ValueError:
        ok = False
    if not ok:
        sys.exit(f"load_server: {url} is not a loopback address; this script only loads servers on this machine")


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = p.add_mutually_exclusive_group()
    where.add_argument("--url", default="http://127.0.0.1:8080", help="a running server (loopback only)")
    where.add_argument("--spawn-fixture", action="store_true",
                       help="start tests/serve_fixture.py's tiny random model and load that")
    p.add_argument("--model", default="tiny-model", help="model id to send (default tiny-model)")
    p.add_argument("--api-key", default=None)
    p.add_argument("--concurrency", default="1,4,8", help="comma-separated client counts (default 1,4,8)")
    p.add_argument("--requests", type=int, default=16, help="requests per level (default 16)")
    p.add_argument("--max-tokens", type=int, default=16, help="tokens per request (default 16)")
    p.add_argument("--time-cap", type=float, default=60.0, help="seconds per level before it is cut off")
    p.add_argument("--server-concurrency", type=int, default=8, help="--max-concurrency of a spawned server")
    p.add_argument("--json", action="store_true", help="print the results as JSON lines")
    args = p.parse_args(argv)
    levels = [int(c) for c in args.concurrency.split(",") if c.strip()]
    if not levels or min(levels) < 1 or args.requests < 1 or args.max_tokens < 1 or args.time_cap <= 0:
        p.error("concurrency levels, --requests and --max-tokens must be >= 1, --time-cap > 0")

    server = None
    if args.spawn_fixture:
        sys.path.insert(0, str(ROOT / "tests"))
        from serve_fixture import ServerProcess

        log_dir = Path(tempfile.mkdtemp(prefix="dzc-load-"))
        server = ServerProcess("--max-concurrency", str(args.server_concurrency), log_dir=log_dir)
        url, model = server.url, "tiny-model"
        print(f"spawned {url} (--max-concurrency {args.server_concurrency}; logs in {log_dir})", file=sys.stderr)
    else:
        url, model = args.url.rstrip("/"), args.model
        check_loopback(url)
    headers = {"Authorization": f"Bearer {args.api_key}"} if args.api_key else {}
    try:
        # Warm-up, not measured: one request per client of the largest level, so every executor exists.
        asyncio.run(run_level(url, headers, model, max(levels), max(levels), 2, args.time_cap))
        rows = []
        for c in levels:
            level = asyncio.run(run_level(url, headers, model, c, args.requests, args.max_tokens, args.time_cap))
            rows.append(level.row())
            for failure in level.failures[:3]:
                print(f"  concurrency {c}: {failure}", file=sys.stderr)
    finally:
        if server is not None:
            server.stop()
    if args.json:
        for row in rows:
            print(json.dumps(row))
    else:
        print(f"{args.requests} streaming requests x {args.max_tokens} tokens per level, {url}")
        print(f"{'clients':>7} {'ok':>4} {'fail':>4} {'req/s':>7} {'tok/s':>8} {'p50 ms':>8} {'p99 ms':>8} "
              f"{'ttft50':>8} {'wall s':>7}")
        for r in rows:
            print(f"{r['concurrency']:>7} {r['ok']:>4} {r['failed']:>4} {r['requests_per_s']:>7} "
                  f"{r['tokens_per_s']:>8} {r['latency_p50_ms']!s:>8} {r['latency_p99_ms']!s:>8} "
                  f"{r['ttft_p50_ms']!s:>8} {r['wall_s']:>7}{'  (cut off by --time-cap)' if r['capped'] else ''}")
    return 0 if all(r["failed"] == 0 and not r["capped"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
