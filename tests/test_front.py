"""The OpenAI-compatible front, black-box: real llmuxd, llmux-sim models, http.client."""
from __future__ import annotations

import http.client
import json
import socket
import threading
import time

import pytest

from .daemon_fixture import free_port, wait_for


def front_daemon(make_daemon, models, front=None, **daemon):
    port = free_port()
    d = make_daemon(models, {"front": {"listen": f"127.0.0.1:{port}", **(front or {})}, **daemon})
    d.front = port
    return d


def call(d, method, path, body=None, headers=None, timeout=30):
    conn = http.client.HTTPConnection("127.0.0.1", d.front, timeout=timeout)
    data = json.dumps(body).encode() if isinstance(body, dict) else body
    conn.request(method, path, body=data, headers={"Content-Type": "application/json",
                                                   **(headers or {})})
    r = conn.getresponse()
    raw = r.read()
    conn.close()
    try:
        parsed = json.loads(raw) if raw else None
    except ValueError:
        parsed = raw
    return r.status, dict(r.getheaders()), parsed


def complete(d, model, **kw):
    return call(d, "POST", "/v1/completions",
                {"model": model, "prompt": "hello world", "max_tokens": 3, **kw})


def stream_events(d, model, max_tokens, read_first=None):
    """Open a streamed completion; return (connection, response)."""
    conn = http.client.HTTPConnection("127.0.0.1", d.front, timeout=30)
    conn.request("POST", "/v1/completions", body=json.dumps(
        {"model": model, "prompt": "hi", "max_tokens": max_tokens, "stream": True}),
        headers={"Content-Type": "application/json"})
    return conn, conn.getresponse()


def next_event(response) -> bytes:
    line = response.readline()
    while line in (b"\n", b"\r\n"):
        line = response.readline()
    return line


def swaps_to(d, name) -> int:
    return d.daemon_log().count(f"wait for {name}: swapping to it")


# ---------------------------------------------------------------- routing

def test_routes_by_model_and_alias_swapping_on_demand(make_daemon):
    d = front_daemon(make_daemon, {"a": {}, "b": {"aliases": ["bee"]}})
    status, _, listing = call(d, "GET", "/v1/models")
    assert status == 200
    assert [(m["id"], m["state"]) for m in listing["data"]] == [("a", "stopped"), ("b", "stopped")]
    assert listing["data"][1]["aliases"] == ["bee"]
    status, _, body = complete(d, "a")
    assert status == 200 and body["model"] == "a" and body["object"] == "text_completion"
    status, _, body = complete(d, "bee")  # vLLM was started with --served-model-name b bee
    assert status == 200 and body["model"] == "bee"
    st = d.status()
    assert st["active"] == "b" and st["models"]["a"]["state"] == "sleeping"
    _, _, listing = call(d, "GET", "/v1/models")
    assert {m["id"]: m["state"] for m in listing["data"]} == {"a": "sleeping", "b": "active"}
    status, _, card = call(d, "GET", "/v1/models/bee")
    assert status == 200 and card["id"] == "b"
    # /upstream/NAME/PATH reaches the rest of the public API of that model.
    status, _, metrics = call(d, "GET", "/upstream/b/metrics")
    assert status == 200 and b'vllm:num_requests_running{model_name="b"' in metrics
    assert call(d, "GET", "/health")[:3:2] == (200, {"status": "ok"})


def test_errors_are_openai_style(make_daemon):
    d = front_daemon(make_daemon, {"a": {}}, default_model="a")
    wait_for(lambda: d.status()["active"] == "a", what="a active")
    cases = [
        ("POST", "/v1/completions", {"model": "nope", "prompt": "x"}, 404),
        ("POST", "/v1/completions", b"{not json", 400),
        ("POST", "/v1/completions", {"prompt": "no model"}, 400),
        ("POST", "/v1/completions", b"[1, 2]", 400),
        ("GET", "/v1/completions", None, 405),
        ("GET", "/nowhere", None, 404),
        ("GET", "/upstream/zz/health", None, 404),
    ]
    for method, path, body, expected in cases:
        status, headers, reply = call(d, method, path, body)
        assert status == expected, (method, path, reply)
        assert headers["Content-Type"] == "application/json"
        assert set(reply["error"]) >= {"message", "type", "code"} and reply["error"]["code"] == expected


@pytest.mark.parametrize("path", [
    "/sleep?level=1", "/wake_up", "/is_sleeping", "/collective_rpc", "/reset_prefix_cache",
    "/pause", "/resume", "/server_info", "/upstream/a/sleep?level=1", "/upstream/a/%73leep",
    "/upstream/a/%2573leep", "/upstream/a//sleep", "/upstream/a/v1/../sleep",
    "/upstream/a/./sleep", "/upstream/a/collective_rpc", "/upstream/a/is_sleeping",
    "/v1/load_lora_adapter", "/upstream/a/v1/load_lora_adapter", "/upstream/a/sim/crash",
    "/v1/../sleep"])
def test_development_endpoints_never_pass(make_daemon, path):
    d = front_daemon(make_daemon, {"a": {}}, default_model="a")
    wait_for(lambda: d.status()["active"] == "a", what="a active")
    for method in ("POST", "GET"):
        status, _, reply = call(d, method, path, {"method": "reload_weights"})
        assert status in (400, 404, 405), (method, path, status, reply)
    assert d.sim("a")["sleeping"] is False and d.state("a") == "active"
    assert d.sim("a").get("pid")  # still the same healthy server


def raw(d, data: bytes) -> bytes:
    """Send bytes, read until the front closes."""
    with socket.create_connection(("127.0.0.1", d.front), timeout=10) as s:
        s.sendall(data)
        chunks = []
        while chunk := s.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_body_and_header_bounds(make_daemon):
    d = front_daemon(make_daemon, {"a": {}})
    reply = raw(d, b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Length: 999999999\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 413 ") and b'"code": 413' in reply
    body = b'{"model": "a", "prompt": "' + b"x" * (33 * 1024 * 1024) + b'"}'
    conn = http.client.HTTPConnection("127.0.0.1", d.front, timeout=10)
    try:  # chunked: no length up front, the front counts as it reads
        conn.request("POST", "/v1/completions", body=iter([body[i:i + 1 << 20] for i in
                                                          range(0, len(body), 1 << 20)]),
                     encode_chunked=True)
        assert conn.getresponse().status == 413
    except (BrokenPipeError, ConnectionResetError):
        pass  # closed before the whole body went out: refused all the same
    conn.close()
    reply = raw(d, b"GET /health HTTP/1.1\r\nHost: x\r\nX-Big: " + b"a" * 100_000 + b"\r\n\r\n")
    assert reply.startswith(b"HTTP/1.1 431 ")
    assert raw(d, b"GARBAGE\r\n\r\n").startswith(b"HTTP/1.1 400 ")
    assert call(d, "GET", "/health")[0] == 200  # and the front still serves


def test_keep_alive_and_chunked_request_body(make_daemon):
    d = front_daemon(make_daemon, {"a": {}}, default_model="a")
    wait_for(lambda: d.status()["active"] == "a", what="a active")
    conn = http.client.HTTPConnection("127.0.0.1", d.front, timeout=10)
    body = json.dumps({"model": "a", "prompt": "one two", "max_tokens": 2}).encode()
    for i in range(3):
        conn.request("POST", "/v1/completions", body=iter([body[:5], body[5:]]),
                     headers={"Content-Type": "application/json"}, encode_chunked=True)
        r = conn.getresponse()
        assert r.status == 200 and json.loads(r.read())["model"] == "a"
        if i == 0:
            sock = conn.sock
        assert conn.sock is sock  # one connection for all three


# ---------------------------------------------------------------- streaming

def test_stream_passes_event_by_event(make_daemon):
    d = front_daemon(make_daemon, {"a": {"args": ["--token-delay", "0.3"]}}, default_model="a")
    wait_for(lambda: d.status()["active"] == "a", what="a active")
    conn, r = stream_events(d, "a", 4)
    assert r.status == 200 and r.getheader("Content-Type").startswith("text/event-stream")
    times, events = [], []
    while True:
        line = next_event(r)
        times.append(time.monotonic())
        events.append(line)
        if line.startswith(b"data: [DONE]") or not line:
            break
    conn.close()
    assert len(events) == 5 and events[-1].startswith(b"data: [DONE]")
    assert [json.loads(e[6:])["choices"][0]["text"] for e in events[:4]]
    # Each token left the front as vLLM wrote it, not all at the end.
    gaps = [b - a for a, b in zip(times, times[1:4])]
    assert all(g > 0.15 for g in gaps), gaps


def test_client_disconnect_mid_stream_cancels_upstream(make_daemon):
    d = front_daemon(make_daemon, {"a": {"args": ["--token-delay", "0.2"]}}, default_model="a")
    wait_for(lambda: d.status()["active"] == "a", what="a active")
    conn, r = stream_events(d, "a", 100)  # 20 s if it ran to the end
    assert next_event(r).startswith(b"data: {")
    assert d.status()["models"]["a"]["in_flight"] == 1
    conn.sock.shutdown(socket.SHUT_RDWR)
    conn.close()
    wait_for(lambda: d.status()["models"]["a"]["in_flight"] == 0, timeout=3, what="front count")
    started = time.monotonic()
    wait_for(lambda: d.sim("a")["in_flight"] == 0, timeout=5, what="vLLM to abort the request")
    assert time.monotonic() - started < 5


def test_upstream_death_mid_stream_ends_with_error_event(make_daemon):
    d = front_daemon(make_daemon, {"a": {"args": ["--token-delay", "0.2"]}}, default_model="a")
    wait_for(lambda: d.status()["active"] == "a", what="a active")
    conn, r = stream_events(d, "a", 100)
    assert next_event(r).startswith(b"data: {")
    d.sim("a", "/sim/crash", method="POST")
    rest = r.read()  # the stream ends (a complete chunked body), with an error event
    conn.close()
    last = [line for line in rest.split(b"\n") if line.startswith(b"data: ")][-1]
    assert json.loads(last[6:])["error"]["code"] == 502
    # Supervision restarts the model and the front serves it again.
    wait_for(lambda: complete(d, "a")[0] == 200, timeout=20, what="a back")


# ---------------------------------------------------------------- on demand

def test_waiting_requests_join_one_swap_and_none_is_lost(make_daemon):
    d = front_daemon(make_daemon, {"a": {}, "b": {"args": ["--start-delay", "0.5"]}},
                     default_model="a")
    wait_for(lambda: d.status()["active"] == "a", what="a active")
    results = []

    def one(model):
        results.append((model, complete(d, model)[0]))
    threads = [threading.Thread(target=one, args=("b",)) for _ in range(30)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert results == [("b", 200)] * 30
    assert swaps_to(d, "b") == 1
    assert d.sim("b")["completions"] == 30


def test_drain_waits_for_requests_in_flight_through_the_front(make_daemon):
    d = front_daemon(make_daemon, {"a": {"args": ["--token-delay", "0.3"]}, "b": {}},
                     default_model="a", drain_timeout=10)
    wait_for(lambda: d.status()["active"] == "a", what="a active")
    result = {}
    t = threading.Thread(target=lambda: result.update(a=complete(d, "a", max_tokens=5)))
    t.start()
    wait_for(lambda: d.status()["models"]["a"]["in_flight"] == 1, what="a in flight")
    started = time.monotonic()
    assert d.swap("b")["ok"]
    t.join(10)
    assert result["a"][0] == 200 and len(result["a"][2]["choices"][0]["text"]) > 0
    assert time.monotonic() - started > 0.5  # the swap waited for it


def test_queue_timeout_gives_503_with_retry_after(make_daemon):
    d = front_daemon(make_daemon, {"a": {"args": ["--start-delay", "5"]}},
                     {"queue_timeout": "0.5s"})
    started = time.monotonic()
    status, headers, body = complete(d, "a")
    assert status == 503 and int(headers["Retry-After"]) >= 1
    assert "queue_timeout" in body["error"]["message"]
    assert time.monotonic() - started < 3


def test_queue_bound_gives_429(make_daemon):
    d = front_daemon(make_daemon, {"a": {"args": ["--start-delay", "3"]}}, {"max_queue": 2})
    waiting = [threading.Thread(target=complete, args=(d, "a")) for _ in range(2)]
    for t in waiting:
        t.start()
    wait_for(lambda: (d.status()["front"]["queued"]).get("a") == 2, what="two waiting")
    status, headers, body = complete(d, "a")
    assert status == 429 and int(headers["Retry-After"]) >= 1
    assert "max_queue" in body["error"]["message"]
    for t in waiting:
        t.join(20)


def test_failed_swap_answers_waiters_with_503_and_reason(make_daemon):
    d = front_daemon(make_daemon, {"a": {"args": ["--fail-start"]}})
    status, headers, body = complete(d, "a")
    assert status == 503 and "Retry-After" in headers
    assert body["error"]["message"].startswith("a could not be made active: ")
    assert "before it became healthy" in body["error"]["message"]


def test_min_active_keeps_a_model_before_swapping_it_away(make_daemon):
    d = front_daemon(make_daemon, {"a": {}, "b": {}}, {"min_active": "2s"})
    assert complete(d, "a")[0] == 200
    active_at = time.monotonic()
    assert complete(d, "b")[0] == 200
    assert time.monotonic() - active_at >= 1.9
    assert d.status()["active"] == "b"


# ---------------------------------------------------------------- auth and exposure

def test_api_keys(make_daemon):
    d = front_daemon(make_daemon, {"a": {}}, {"api_keys": ["sekrit", "other"]}, default_model="a")
    wait_for(lambda: d.status()["active"] == "a", what="a active")
    assert complete(d, "a")[0] == 401
    status, headers, body = call(d, "GET", "/v1/models", headers={"Authorization": "Bearer nope"})
    assert status == 401 and body["error"]["type"] == "authentication_error"
    status, _, _ = call(d, "POST", "/v1/completions", {"model": "a", "prompt": "x", "max_tokens": 1},
                        headers={"Authorization": "Bearer other"})
    assert status == 200
    assert call(d, "GET", "/upstream/a/health", headers={"Authorization": "Bearer sekrit"})[0] == 200
    assert call(d, "GET", "/health")[0] == 200  # a load balancer's check needs no key
    assert "WITHOUT api_keys" not in d.daemon_log()


def test_warns_when_listening_beyond_loopback_without_keys(make_daemon):
    port = free_port()
    d = make_daemon({"a": {}}, {"front": {"listen": f"0.0.0.0:{port}"}})
    d.front = port
    assert call(d, "GET", "/health")[0] == 200
    assert "WITHOUT api_keys" in d.daemon_log()


def test_shutdown_answers_waiters_and_lets_streams_finish(make_daemon):
    d = front_daemon(make_daemon, {"a": {"args": ["--token-delay", "0.2"]},
                                   "b": {"args": ["--start-delay", "5"]}},
                     default_model="a", drain_timeout=10)
    wait_for(lambda: d.status()["active"] == "a", what="a active")
    results = {}
    stream = threading.Thread(target=lambda: results.update(a=complete(d, "a", max_tokens=8)))
    waiter = threading.Thread(target=lambda: results.update(b=complete(d, "b")))
    stream.start()
    wait_for(lambda: d.status()["models"]["a"]["in_flight"] == 1, what="a in flight")
    waiter.start()
    wait_for(lambda: d.status()["front"]["queued"].get("b") or d.status()["job"], what="b waits")
    assert d.stop() == 0
    stream.join(10), waiter.join(10)
    assert results["a"][0] == 200 and len(results["a"][2]["choices"][0]["text"]) > 0
    assert results["b"][0] == 503 and "shutting down" in results["b"][2]["error"]["message"]
