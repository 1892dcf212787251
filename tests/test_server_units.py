"""The server's parts without a server: request checking, rate limits, keys, the FIFO scheduler, the CLI."""
from __future__ import annotations

import argparse
import asyncio
import socket
import threading

import pytest

pytest.importorskip("starlette")

from dzc.cli_serve import add_serve_parser, default_model_name, run_serve  # noqa: E402
from dzc.runtime.generate import StreamEvent  # noqa: E402
from dzc.runtime.sampling import SamplingParams  # noqa: E402
from dzc.runtime.server import ServeError, bind, is_loopback  # noqa: E402
from dzc.runtime.server_auth import RateLimit, RateLimiter, bearer_matches, retry_after_header  # noqa: E402
from dzc.runtime.server_scheduler import Job, Scheduler, ServerBusy  # noqa: E402
from dzc.runtime.server_schemas import APIError, parse_chat, parse_completion, parse_json_object  # noqa: E402


# ---- request bodies ----------------------------------------------------------------------------------------------
def test_chat_body_is_checked_and_normalised():
    spec = parse_chat({
        "model": "m", "messages": [{"role": "system", "content": "be brief"},
                                   {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                {"type": "text", "text": "b"}]},
                                   {"role": "assistant", "content": None}],
        "max_tokens": 5, "max_completion_tokens": 7, "top_k": -1, "stop": ["", "x"], "seed": 3,
        "stream": True, "stream_options": {"include_usage": True}, "user": "ignored", "unknown": 1}, "m")
    assert spec.messages[1] == {"role": "user", "content": "a\nb"}
    assert spec.max_tokens == 7  # max_completion_tokens wins
    assert spec.sampling == {"top_k": 0, "seed": 3, "stop": ["x"]}
    assert spec.stream and spec.include_usage
    params = spec.sampling_params(prompt_tokens=10, max_context=20)
    assert params.max_tokens == 7 and params.temperature == 1.0
    # Without max_tokens the completion may fill the context.
    assert parse_chat({"model": "m", "messages": [{"role": "user", "content": "x"}]}, "m").sampling_params(
        10, 20).max_tokens == 10


@pytest.mark.parametrize("body, param", [
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": True}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "top_k": 2.0}, "top_k"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "temperature": 10**400}, "temperature"),
    ({"model": "m", "messages": [{"role": "user", "content": [{"type": "image_url"}]}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user"}]}, "messages[0].content"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "stream_options": {"include_usage": 1}},
     "stream_options.include_usage"),
    ({"model": "m", "messages": [{"role": "user", "content": "x"}], "tools": [{"type": "function"}]}, "tools"),
])
def test_chat_body_errors_name_the_parameter(body, param):
    with pytest.raises(APIError) as e:
        parse_chat(body, "m")
    assert e.value.status == 400 and e.value.param == param


def test_completion_prompt_forms():
    assert parse_completion({"model": "m", "prompt": ["text"]}, "m").prompt == "text"
    assert parse_completion({"model": "m", "prompt": [[1, 2]]}, "m").prompt == [1, 2]
    with pytest.raises(APIError):
        parse_completion({"model": "m", "prompt": [[1], [2]]}, "m")
    with pytest.raises(APIError):
        parse_completion({"model": "m", "prompt": [True]}, "m")


def test_context_checks():
    spec = parse_completion({"model": "m", "prompt": "x", "max_tokens": 11}, "m")
    with pytest.raises(APIError) as e:
        spec.sampling_params(prompt_tokens=10, max_context=20)
    assert e.value.code == "context_length_exceeded" and e.value.param == "max_tokens"
    with pytest.raises(APIError) as e:
        spec.sampling_params(prompt_tokens=20, max_context=20)
    assert e.value.param == "prompt"


@pytest.mark.parametrize("raw", [b"", b"{", b"null", b"\"s\"", b"1e999999", b"9" * 5000, b"[" * 50_000])
def test_bodies_that_are_not_json_objects(raw):
    with pytest.raises(APIError) as e:
        parse_json_object(raw)
    assert e.value.status == 400 and e.value.body()["error"]["code"] == "invalid_json"


# ---- keys and rate limits ----------------------------------------------------------------------------------------
def test_rate_limit_parse():
    assert RateLimit.parse("60/min") == RateLimit(60, 60.0)
    assert RateLimit.parse("5/s") == RateLimit(5, 1.0)
    assert RateLimit.parse("100/h") == RateLimit(100, 3600.0)
    assert RateLimit.parse("7") == RateLimit(7, 60.0)
    assert str(RateLimit.parse("7")) == "7/min"
    for bad in ("0/min", "x", "5/day", "-1/min", ""):
        with pytest.raises(ValueError):
            RateLimit.parse(bad)


def test_token_bucket_per_key():
    now = [0.0]
    limiter = RateLimiter(RateLimit(2, 60.0), clock=lambda: now[0])
    assert limiter.acquire("a") == 0 and limiter.acquire("a") == 0
    wait = limiter.acquire("a")
    assert wait == pytest.approx(30.0) and retry_after_header(wait) == "30"
    assert limiter.acquire("b") == 0  # another client has its own bucket
    now[0] = 29.0
    assert limiter.acquire("a") > 0
    now[0] = 30.0
    assert limiter.acquire("a") == 0
    assert retry_after_header(0.2) == "1"


def test_idle_buckets_are_dropped():
    now = [0.0]
    limiter = RateLimiter(RateLimit(1, 1.0), clock=lambda: now[0])
    for i in range(RateLimiter.MAX_IDLE_BUCKETS + 10):
        limiter.acquire(f"client{i}")
        now[0] += 0.01
    assert len(limiter._buckets) <= RateLimiter.MAX_IDLE_BUCKETS + 1


def test_bearer():
    assert bearer_matches("Bearer k3y", "k3y") and bearer_matches("bearer  k3y ", "k3y")
    assert not bearer_matches(None, "k3y") and not bearer_matches("k3y", "k3y")
    assert not bearer_matches("Bearer k3", "k3y") and not bearer_matches("Basic k3y", "k3y")
    assert not bearer_matches("Bearer \udcff", "k3y")


# ---- the scheduler -----------------------------------------------------------------------------------------------
class _Executor:
    vocab_size, max_context, kv_cache_bytes_per_token = 8, 64, 4
    position = 0

    def __init__(self) -> None:
        self.resets = 0

    def forward(self, ids):  # never called: the fake generate below does not run a model
        raise AssertionError

    def reset(self) -> None:
        self.resets += 1


def test_scheduler_is_fifo_bounded_and_cancellable():
    gates = {k: threading.Event() for k in range(6)}
    started: list[int] = []
    executors: list[_Executor] = []

    def make_executor():
        executors.append(_Executor())
        return executors[-1]

    def fake_generate(executor, prompt_ids, params):
        key = prompt_ids[0]
        started.append(key)

        def events():
            for i in range(params.max_tokens):
                if i > 0 or key != 5:  # job 5 yields its first token at once
                    assert gates[key].wait(10)
                yield StreamEvent(i, "x", "length" if i == params.max_tokens - 1 else None)
        return events()

    async def drain(job):
        events = []
        while (event := await job.next()) is not None:
            events.append(event)
        return events

    async def scenario():
        scheduler = Scheduler(make_executor, fake_generate, max_concurrency=1, max_queue=2)
        jobs = {k: Job(f"job{k}", [k], SamplingParams(max_tokens=3)) for k in range(6)}
        await scheduler.start(jobs[0])
        waiting = {k: asyncio.create_task(scheduler.start(jobs[k])) for k in (1, 2)}
        await asyncio.sleep(0.01)
        assert (jobs[1].queue_position, jobs[2].queue_position) == (1, 2)
        with pytest.raises(ServerBusy):
            await scheduler.start(jobs[3])  # the queue holds 2
        waiting[1].cancel()  # a client that leaves while queued
        await asyncio.gather(waiting[1], return_exceptions=True)
        assert scheduler.stats()["queued"] == 1
        waiting[4] = asyncio.create_task(scheduler.start(jobs[4]))
        await asyncio.sleep(0.01)
        for gate in gates.values():
            gate.set()
        await asyncio.gather(waiting[2], waiting[4])
        assert [len(await drain(jobs[k])) for k in (0, 2, 4)] == [3, 3, 3]
        # Cancelling a running job stops it after the current token.
        gates[5].clear()
        await scheduler.start(jobs[5])
        assert (await jobs[5].next()).token_id == 0
        jobs[5].cancel()
        gates[5].set()
        # at most token 1, if the worker was already past its cancel check for token 0 (a thread race)
        assert [e.finish_reason for e in await drain(jobs[5])] in ([], [None])
        await asyncio.sleep(0.01)
        stats = scheduler.stats()
        scheduler.close()
        return stats

    stats = asyncio.run(scenario())
    assert started == [0, 2, 4, 5]  # first come, first served; job 1 left, job 3 was refused
    assert stats["running"] == stats["queued"] == 0
    assert stats["completed"] == 3 and stats["cancelled"] == 1
    assert len(executors) == 1 and executors[0].resets == 4  # one slot, one executor, emptied after each job


def test_scheduler_reports_generation_errors():
    def failing_generate(executor, prompt_ids, params):
        raise ValueError("boom")

    async def scenario():
        scheduler = Scheduler(_Executor, failing_generate, max_concurrency=2, max_queue=0)
        job = Job("j", [1], SamplingParams(max_tokens=1))
        await scheduler.start(job)
        with pytest.raises(ValueError, match="boom"):
            await job.next()
        await asyncio.sleep(0.01)
        stats = scheduler.stats()
        scheduler.close()
        return stats

    stats = asyncio.run(scenario())
    assert stats["failed"] == 1 and stats["running"] == 0 and stats["idle_executors"] == 1


# ---- CLI -----------------------------------------------------------------------------------------------------------
def _parse(*argv):
    parser = argparse.ArgumentParser()
    add_serve_parser(parser.add_subparsers(dest="command"))
    return parser.parse_args(["serve", *argv])


def test_cli_defaults_and_options():
    args = _parse("out/my-model")
    assert (args.out, args.host, args.port, args.api_key, args.rate_limit, args.max_concurrency) == (
        "out/my-model", "127.0.0.1", 8080, None, None, 1)
    args = _parse("x", "--rate-limit", "30/min", "--max-concurrency", "4", "--model-name", "dsv3")
    assert args.rate_limit == RateLimit(30, 60.0) and args.max_concurrency == 4 and args.model_name == "dsv3"
    for bad in (["--rate-limit", "lots"], ["--max-concurrency", "0"], ["--port", "http"]):
        with pytest.raises(SystemExit):
            _parse("x", *bad)
    assert default_model_name("some/where/dsv3-tiny/") == "dsv3-tiny"


def test_cli_refuses_bad_settings_before_loading(monkeypatch):
    def never(path):
        raise AssertionError("the model must not load")

    with pytest.raises(ServeError):
        run_serve(_parse("x", "--port", "70000"), never)
    monkeypatch.setenv("DZC_API_KEY", "has space")
    with pytest.raises(ServeError):
        run_serve(_parse("x"), never)


def test_bind_reports_a_taken_port():
    taken = bind("127.0.0.1", 0)
    try:
        port = taken.getsockname()[1]
        other = socket.socket()
        other.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        with pytest.raises(ServeError, match=str(port)):
            bind("127.0.0.1", port)
        other.close()
    finally:
        taken.close()
    assert is_loopback("127.0.0.1") and is_loopback("::1") and is_loopback("localhost")
    assert not is_loopback("0.0.0.0") and not is_loopback("example.com")


def test_run_serve_names_the_model_and_reads_the_key_from_the_environment(monkeypatch):
    import dzc.runtime.server as server_module
    from dzc.runtime.server import ServedModel

    served = {}
    monkeypatch.setattr(server_module, "serve", lambda model, config: served.update(model=model, config=config))
    model = ServedModel(name="from-loader", make_executor=_Executor, tokenizer=None, eos_ids=(), max_context=64)
    monkeypatch.setenv("DZC_API_KEY", "env-key")
    assert run_serve(_parse("artifacts/dsv3-q4/"), lambda path: model) == 0
    assert served["model"].name == "dsv3-q4" and served["config"].api_key == "env-key"
    run_serve(_parse("x", "--model-name", "deepseek", "--api-key", "flag-key", "--host", "::1"), lambda path: model)
    assert served["model"].name == "deepseek" and served["config"].api_key == "flag-key"
    assert served["config"].host == "::1"


def test_served_model_from_a_loaded_model():
    from types import SimpleNamespace

    from dzc.cli_serve import served_model
    from dzc.errors import TokenizerError

    sizes = []
    loaded = SimpleNamespace(name="m", tokenizer=object(), eos_ids=[1], max_context=99,
                             make_executor=lambda n: sizes.append(n) or _Executor())
    model = served_model(loaded)
    model.make_executor()
    assert (model.name, model.eos_ids, model.max_context, sizes) == ("m", (1,), 99, [99])
    with pytest.raises(TokenizerError):
        served_model(SimpleNamespace(**{**vars(loaded), "tokenizer": None}))
