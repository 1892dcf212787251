"""`dzc serve` end to end: a real server process on 127.0.0.1 (tests/serve_fixture.py's tiny random model)
driven by the official `openai` client, httpx and a WebSocket client."""
from __future__ import annotations

import contextlib
import json
import sys
import threading
import time
from pathlib import Path

import pytest

openai = pytest.importorskip("openai")
httpx = pytest.importorskip("httpx")
pytest.importorskip("uvicorn")

sys.path.insert(0, str(Path(__file__).resolve().parent))
from serve_fixture import MAX_CONTEXT, ServerProcess  # noqa: E402

MODEL = "tiny-model"
CHAT = [{"role": "user", "content": "hello there"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    # A 3 ms sleep per forward pass makes generations long enough to overlap and to interrupt.
    proc = ServerProcess("--max-concurrency", "4", log_dir=tmp_path_factory.mktemp("serve"), delay_ms=3)
    yield proc
    proc.stop()


@pytest.fixture(scope="module")
def locked_server(tmp_path_factory):
    proc = ServerProcess("--api-key", "sesame", "--rate-limit", "4/min", log_dir=tmp_path_factory.mktemp("locked"))
    yield proc
    proc.stop()


def client(server, key: str = "unused") -> "openai.OpenAI":
    return openai.OpenAI(base_url=server.url + "/v1", api_key=key, max_retries=0, timeout=30)


def health(server) -> dict:
    return httpx.get(server.url + "/health", timeout=10).json()


def chat_text(c, stream: bool, **kw) -> tuple[str, str, object]:
    """(text, finish_reason, usage) of one chat completion, streamed or not."""
    kw.setdefault("messages", CHAT)
    kw.setdefault("max_tokens", 8)
    if not stream:
        r = c.chat.completions.create(model=MODEL, **kw)
        return r.choices[0].message.content, r.choices[0].finish_reason, r.usage
    parts, finish, usage = [], None, None
    for chunk in c.chat.completions.create(model=MODEL, stream=True, stream_options={"include_usage": True}, **kw):
        if chunk.usage is not None:
            usage = chunk.usage
        for choice in chunk.choices:
            parts.append(choice.delta.content or "")
            finish = choice.finish_reason or finish
    return "".join(parts), finish, usage


def completion_text(c, stream: bool, **kw) -> tuple[str, str]:
    kw.setdefault("prompt", "the quick brown fox")
    kw.setdefault("max_tokens", 8)
    if not stream:
        r = c.completions.create(model=MODEL, **kw)
        return r.choices[0].text, r.choices[0].finish_reason
    parts, finish = [], None
    for chunk in c.completions.create(model=MODEL, stream=True, **kw):
        for choice in chunk.choices:
            parts.append(choice.text)
            finish = choice.finish_reason or finish
    return "".join(parts), finish


# ---- the OpenAI surface ---------------------------------------------------------------------------------------------
def test_models_and_health(server):
    models = client(server).models.list()
    assert [m.id for m in models.data] == [MODEL]
    assert client(server).models.retrieve(MODEL).id == MODEL
    h = health(server)
    assert h["status"] == "ok" and h["model"] == MODEL and h["max_concurrency"] == 4


def test_chat_stream_equals_non_stream_at_temperature_0(server):
    c = client(server)
    text, finish, usage = chat_text(c, stream=False, temperature=0)
    streamed, s_finish, s_usage = chat_text(c, stream=True, temperature=0)
    assert text and streamed == text
    assert finish == s_finish == "length"
    assert usage.completion_tokens == s_usage.completion_tokens == 8
    assert usage.prompt_tokens == s_usage.prompt_tokens > 0
    assert usage.total_tokens == usage.prompt_tokens + 8
    # max_completion_tokens is the newer spelling of max_tokens.
    assert chat_text(c, stream=False, temperature=0, max_tokens=None, max_completion_tokens=8)[0] == text


def test_completion_stream_equals_non_stream_at_temperature_0(server):
    c = client(server)
    text, finish = completion_text(c, stream=False, temperature=0)
    assert completion_text(c, stream=True, temperature=0) == (text, finish)
    assert text and finish == "length"
    # A prompt given as token ids works as well as text.
    ids = [0, 70, 71, 72]
    assert completion_text(c, stream=False, temperature=0, prompt=ids) == completion_text(
        c, stream=True, temperature=0, prompt=ids)


def test_stop_strings(server):
    c = client(server)
    full, _ = completion_text(c, stream=False, temperature=0, max_tokens=16)
    stop = full[4:6]
    expected = full[: full.find(stop)]
    for stream in (False, True):
        assert completion_text(c, stream=stream, temperature=0, max_tokens=16, stop=stop) == (expected, "stop")
        assert completion_text(c, stream=stream, temperature=0, max_tokens=16, stop=["#none#", stop]) == (
            expected, "stop")
    chat_full, _, _ = chat_text(c, stream=False, temperature=0, max_tokens=16)
    chat_stop = chat_full[5:7]
    assert chat_text(c, stream=True, temperature=0, max_tokens=16, stop=chat_stop)[:2] == (
        chat_full[: chat_full.find(chat_stop)], "stop")


def test_seeded_sampling_is_reproducible(server):
    c = client(server)
    params = dict(temperature=1.0, top_p=0.9, max_tokens=16, extra_body={"top_k": 20, "min_p": 0.01})
    first = chat_text(c, stream=False, seed=7, **params)[0]
    assert chat_text(c, stream=True, seed=7, **params)[0] == first
    assert chat_text(c, stream=False, seed=8, **params)[0] != first  # 16 tokens: a collision is negligible
    penalised = dict(presence_penalty=1.5, frequency_penalty=1.0, temperature=0)
    assert chat_text(c, stream=False, **penalised)[0] == chat_text(c, stream=True, **penalised)[0]


# ---- concurrency, queueing, disconnects ---------------------------------------------------------------------------
def _run_threads(fns):
    results, errors = [None] * len(fns), []

    def run(i, fn):
        try:
            results[i] = fn()
        except Exception as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=run, args=(i, fn)) for i, fn in enumerate(fns)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not errors, errors
    return results


def test_four_concurrent_streams_match_sequential_runs(server):
    c = client(server)
    prompts = [[{"role": "user", "content": f"question number {i}"}] for i in range(4)]
    sequential = [chat_text(c, stream=False, messages=p, temperature=0, max_tokens=24)[0] for p in prompts]
    assert len(set(sequential)) > 1  # different prompts, different answers: cross-talk would show
    concurrent = _run_threads([
        (lambda p=p: chat_text(client(server), stream=True, messages=p, temperature=0, max_tokens=24)[0])
        for p in prompts])
    assert concurrent == sequential
    seeded = _run_threads([
        (lambda p=p: chat_text(client(server), stream=True, messages=p, temperature=1.0, seed=3, max_tokens=24)[0])
        for p in prompts])
    assert seeded == [chat_text(c, stream=False, messages=p, temperature=1.0, seed=3, max_tokens=24)[0]
                      for p in prompts]
    assert health(server)["executors"] <= 4


def test_requests_beyond_max_concurrency_queue_and_say_so(server):
    body = {"model": MODEL, "prompt": "queue me", "max_tokens": 40, "temperature": 0}

    def post():
        r = httpx.post(server.url + "/v1/completions", json=body, timeout=60)
        return r.status_code, int(r.headers["x-dzc-queue-position"]), r.json()["choices"][0]["text"]

    results = _run_threads([post] * 7)
    assert all(status == 200 for status, _, _ in results)
    assert len({text for _, _, text in results}) == 1
    positions = sorted(position for _, position, _ in results)
    assert positions[:4] == [0, 0, 0, 0] and positions[-1] >= 1  # 4 ran at once, the rest waited
    h = health(server)
    assert h["running"] == 0 and h["queued"] == 0


def test_client_dropped_mid_stream_frees_its_slot(server):
    before = health(server)
    body = {"model": MODEL, "messages": CHAT, "max_tokens": 400, "temperature": 0, "stream": True}
    with httpx.stream("POST", server.url + "/v1/chat/completions", json=body, timeout=30) as r:
        assert r.status_code == 200
        lines = r.iter_lines()
        got = [line for _, line in zip(range(6), (line for line in lines if line.startswith("data:")))]
        assert len(got) == 6  # the generation is under way; leave without reading the rest
    deadline = time.monotonic() + 2.0  # 400 tokens take over 1.2 s: only a cancellation frees it sooner
    while time.monotonic() < deadline:
        h = health(server)
        if h["running"] == 0 and h["cancelled"] == before["cancelled"] + 1:
            break
        time.sleep(0.02)
    else:
        pytest.fail(f"the dropped stream was not cancelled: {health(server)}")
    assert time.monotonic() < deadline
    text, finish, _ = chat_text(client(server), stream=False, temperature=0)
    assert finish == "length" and text == chat_text(client(server), stream=True, temperature=0)[0]


def _wait_for_health(server, condition, timeout=2.0) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        h = health(server)
        if condition(h):
            return h
        time.sleep(0.02)
    pytest.fail(f"the server did not reach the expected state: {health(server)}")


def test_client_leaving_the_queue_gives_up_its_place(server):
    long_body = {"model": MODEL, "messages": CHAT, "temperature": 0, "stream": True}  # fills the context: >1.5 s
    with contextlib.ExitStack() as streams:
        for _ in range(4):  # every slot busy
            r = streams.enter_context(httpx.stream("POST", server.url + "/v1/chat/completions", json=long_body,
                                                   timeout=30))
            assert r.status_code == 200 and r.headers["x-dzc-queue-position"] == "0"
        with pytest.raises(httpx.ReadTimeout):  # a fifth waits in the queue; its client gives up
            httpx.post(server.url + "/v1/chat/completions", json={**long_body, "max_tokens": 8},
                       timeout=httpx.Timeout(30, read=0.3))
        h = _wait_for_health(server, lambda h: h["queued"] == 0, timeout=1.0)
        assert h["running"] == 4
    _wait_for_health(server, lambda h: h["running"] == 0)  # the four dropped streams were cancelled too


def test_memory_does_not_grow_across_requests(server):
    def rss_kb() -> int:
        with open(f"/proc/{server.pid}/status") as f:
            return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:"))

    c = client(server)
    for i in range(10):
        chat_text(c, stream=bool(i % 2), temperature=0, max_tokens=8)
    start = rss_kb()
    for i in range(40):
        chat_text(c, stream=bool(i % 2), temperature=0, max_tokens=8,
                  messages=[{"role": "user", "content": f"message {i}"}])
    assert rss_kb() - start < 8 * 1024, "server RSS grew by more than 8 MiB over 40 requests"


# ---- bad requests ------------------------------------------------------------------------------------------------
BAD_REQUESTS = [
    # (path, body (dict, or raw bytes), status, error code)
    ("/v1/chat/completions", b'{"model": "tiny-model", "messages": [', 400, "invalid_json"),
    ("/v1/chat/completions", b"[1, 2, 3]", 400, "invalid_json"),
    ("/v1/chat/completions", b"\xff\xfe not utf-8", 400, "invalid_json"),
    ("/v1/chat/completions", b"[" * 100_000 + b"]" * 100_000, 400, "invalid_json"),
    ("/v1/chat/completions", b'{"model": "tiny-model", "messages": [{"role": "user", "content": "x"}], '
                             b'"temperature": NaN}', 400, "invalid_type"),
    ("/v1/chat/completions", {"model": "gpt-4", "messages": CHAT}, 404, "model_not_found"),
    ("/v1/chat/completions", {"messages": CHAT}, 400, "missing_required_parameter"),
    ("/v1/chat/completions", {"model": MODEL}, 400, "missing_required_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": "hello"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": []}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "wizard", "content": "x"}]}, 400,
     "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": 5}]}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": -1}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 0}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": "8"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 8.5}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "max_tokens": 10**12}, 400,
     "context_length_exceeded"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "temperature": -1}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "temperature": "hot"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "top_p": 0}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "seed": -3}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "n": 2}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stream": "yes"}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stop": 5}, 400, "invalid_type"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "stop": ["x" * 10_000]}, 400, "invalid_value"),
    ("/v1/chat/completions", {"model": MODEL, "messages": CHAT, "logprobs": True}, 400, "unsupported_parameter"),
    ("/v1/chat/completions", {"model": MODEL, "messages": [{"role": "user", "content": "word " * 200}]}, 400,
     "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": "x" * (MAX_CONTEXT + 10)}, 400, "context_length_exceeded"),
    ("/v1/completions", {"model": MODEL, "prompt": [1, 2, 100_000]}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": [-1]}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": ["a", "b"]}, 400, "invalid_value"),
    ("/v1/completions", {"model": MODEL, "prompt": {"text": "a"}}, 400, "invalid_type"),
    ("/v1/completions", {"model": MODEL, "prompt": "a", "echo": True}, 400, "unsupported_parameter"),
    ("/v1/completions", {"model": MODEL}, 400, "missing_required_parameter"),
    ("/v1/completions", b"x" * (5 << 20), 413, "request_too_large"),
    ("/v1/nothing-here", {}, 404, "not_found"),
]


@pytest.mark.parametrize("stream", [False, True])
def test_every_bad_request_gets_a_json_4xx(server, stream):
    with httpx.Client(base_url=server.url, timeout=30) as http:
        for path, body, status, code in BAD_REQUESTS:
            if isinstance(body, dict) and stream and path != "/v1/nothing-here":
                body = {**body, "stream": body.get("stream", True)}
            content = body if isinstance(body, bytes) else json.dumps(body).encode()
            r = http.post(path, content=content, headers={"content-type": "application/json"})
            assert r.status_code == status, (path, body if len(content) < 200 else content[:80], r.text)
            error = r.json()["error"]
            assert error["code"] == code and error["message"] and error["type"], (body, error)
        assert http.get("/v1/chat/completions").status_code == 405
    assert health(server)["running"] == 0
    text, finish, _ = chat_text(client(server), stream=False, temperature=0)  # still serving
    assert text and finish == "length"


def test_openai_client_sees_openai_errors(server):
    c = client(server)
    with pytest.raises(openai.NotFoundError):
        c.chat.completions.create(model="no-such-model", messages=CHAT)
    with pytest.raises(openai.BadRequestError) as e:
        c.chat.completions.create(model=MODEL, messages=CHAT, max_tokens=-5)
    assert e.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        c.completions.create(model=MODEL, prompt="hi", n=3)


# ---- WebSocket ----------------------------------------------------------------------------------------------------
def test_websocket_streams_tokens_then_a_final_message(server):
    pytest.importorskip("websockets")  # uvicorn needs it for WebSockets, as the client does
    from websockets.sync.client import connect

    expected = chat_text(client(server), stream=False, temperature=0)[0]
    with connect(server.url.replace("http", "ws") + "/ws", open_timeout=10) as ws:
        ws.send("this is not json")
        assert json.loads(ws.recv(timeout=10))["error"]["code"] == "invalid_json"
        ws.send(json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": -1}))
        assert json.loads(ws.recv(timeout=10))["status"] == 400
        for _ in range(2):  # the connection serves one request after another
            ws.send(json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 8, "temperature": 0}))
            tokens = []
            while (message := json.loads(ws.recv(timeout=10)))["type"] == "token":
                tokens.append(message)
            assert message["type"] == "done" and message["finish_reason"] == "length"
            assert message["usage"]["completion_tokens"] == len(tokens) == 8
            assert "".join(t["text"] for t in tokens) == expected
        ws.send(json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 400, "temperature": 0}))
        assert json.loads(ws.recv(timeout=10))["type"] == "token"
        ws.send(json.dumps({"type": "cancel"}))
        while (message := json.loads(ws.recv(timeout=10)))["type"] == "token":
            pass
        assert message["finish_reason"] == "cancelled" and message["usage"]["completion_tokens"] < 400
    # A client that piles up requests faster than they run is cut off, not buffered without limit.
    from websockets.exceptions import ConnectionClosed

    with connect(server.url.replace("http", "ws") + "/ws", open_timeout=10) as ws:
        request = json.dumps({"model": MODEL, "messages": CHAT, "max_tokens": 400, "temperature": 0})
        with pytest.raises(ConnectionClosed) as closed:
            for _ in range(50):
                ws.send(request)
            while True:
                ws.recv(timeout=10)
        assert closed.value.rcvd.code == 1008
    _wait_for_health(server, lambda h: h["running"] == 0)


# ---- API key and rate limit ---------------------------------------------------------------------------------------
def test_api_key_required_except_for_health(locked_server):
    url = locked_server.url
    assert httpx.get(url + "/health").status_code == 200
    for headers in ({}, {"Authorization": "Bearer wrong"}, {"Authorization": "sesame"}):
        r = httpx.get(url + "/v1/models", headers=headers)
        assert r.status_code == 401 and r.json()["error"]["code"] == "invalid_api_key"
        r = httpx.post(url + "/v1/chat/completions", headers=headers, json={"model": MODEL, "messages": CHAT})
        assert r.status_code == 401
    with pytest.raises(openai.AuthenticationError):
        client(locked_server, key="wrong").models.list()

    pytest.importorskip("websockets")
    from websockets.exceptions import InvalidStatus
    from websockets.sync.client import connect

    with pytest.raises(InvalidStatus) as e:
        connect(url.replace("http", "ws") + "/ws", open_timeout=10)
    assert e.value.response.status_code == 401


def test_rate_limit_answers_429_with_retry_after(locked_server):
    c = client(locked_server, key="sesame")
    statuses = []
    for _ in range(8):  # the limit is 4/min: some of these must be refused
        r = httpx.get(locked_server.url + "/v1/models", headers={"Authorization": "Bearer sesame"})
        statuses.append(r.status_code)
        if r.status_code == 429:
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "rate_limit_exceeded"
            break
    assert statuses[-1] == 429 and set(statuses) <= {200, 429}
    with pytest.raises(openai.RateLimitError):
        c.models.list()
    assert httpx.get(locked_server.url + "/health").status_code == 200  # /health is never limited


# ---- a real checkpoint folder through dzc.driver ------------------------------------------------------------------
def test_serving_a_checkpoint_folder_matches_generate(tiny_bf16, tmp_path):
    """`python -m dzc.cli_serve CHECKPOINT`: the real loader, tokenizer and chat template; the server's text is
    what the library's generate loop produces for the same prompt."""
    from dzc.driver import open_model
    from dzc.runtime.generate import generate_all
    from dzc.runtime.sampling import SamplingParams

    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Where is the lighthouse?"}]
    loaded = open_model(tiny_bf16, max_context=256)
    prompt = loaded.tokenizer.encode_chat(messages)
    expected = generate_all(loaded.make_executor(256), prompt, SamplingParams(max_tokens=8, temperature=0),
                            loaded.tokenizer, loaded.eos_ids)

    proc = ServerProcess("--max-context", "256", "--max-concurrency", "2", log_dir=tmp_path,
                         command=[sys.executable, "-m", "dzc.cli_serve", str(tiny_bf16)])
    try:
        c = client(proc)
        name = tiny_bf16.name
        assert [m.id for m in c.models.list().data] == [name]
        for stream in (False, True):
            parts, finish = [], None
            if stream:
                for chunk in c.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0,
                                                       stream=True):
                    parts += [ch.delta.content or "" for ch in chunk.choices]
                    finish = next((ch.finish_reason for ch in chunk.choices if ch.finish_reason), finish)
            else:
                r = c.chat.completions.create(model=name, messages=messages, max_tokens=8, temperature=0)
                parts, finish = [r.choices[0].message.content], r.choices[0].finish_reason
                assert r.usage.prompt_tokens == len(prompt)
                assert r.usage.completion_tokens == len(expected.token_ids)
            assert ("".join(parts), finish) == (expected.text, expected.finish_reason)
        with pytest.raises(openai.BadRequestError):  # the context is the --max-context given
            c.completions.create(model=name, prompt="x", max_tokens=300)
    finally:
        proc.stop()
