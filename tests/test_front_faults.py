"""The front under load and faults, black-box: a real llmuxd, llmux-sim models, real clients
(http.client and the `openai` package, as users do)."""
from __future__ import annotations

import http.client
import threading
import time

import pytest

from .daemon_fixture import wait_for
from .test_front import complete, front_daemon, next_event, stream_events, swaps_to


def test_model_crash_under_load_is_restarted_and_queued_requests_go_on(make_daemon):
    d = front_daemon(make_daemon, {"a": {"args": ["--start-delay", "1"]}}, default_model="a")
    wait_for(lambda: d.status()["active"] == "a", timeout=20, what="a active")
    first_pid = d.sim("a")["pid"]
    results: list[tuple[float, float, int | str]] = []  # (sent, answered, status)
    stop = threading.Event()

    def client() -> None:
        while not stop.is_set():
            sent = time.monotonic()
            try:
                status = complete(d, "a")[0]
            except (OSError, http.client.HTTPException) as exc:
                status = repr(exc)  # a connection the front closed with no answer: lost
            results.append((sent, time.monotonic(), status))
    clients = [threading.Thread(target=client) for _ in range(8)]
    for t in clients:
        t.start()
    wait_for(lambda: len(results) > 20, what="load on a")
    try:
        d.sim("a", "/sim/crash", method="POST")
    except OSError:
        pass  # it may die before its answer is out
    # From the moment llmuxd knows, nothing may be lost (before, a request can be in
    # flight in the dying server).
    wait_for(lambda: d.state("a") != "active", timeout=10, what="llmuxd to see the crash")
    crashed = time.monotonic()
    wait_for(lambda: d.status()["front"]["queued"].get("a"), timeout=10,
             what="requests waiting for the restart")
    wait_for(lambda: d.state("a") == "active", timeout=30, what="a restarted")
    wait_for(lambda: sum(s > crashed + 0.5 for s, _, _ in results) > 20, what="load after it")
    stop.set()
    for t in clients:
        t.join(30)
    assert d.sim("a")["pid"] != first_pid
    after = [status for s, _, status in results if s > crashed]
    if set(after) != {200}:
        open("/tmp/crash13.log", "w").write(d.daemon_log())
    assert after and set(after) == {200}, after
    # Requests waited through the restart (1 s of start) and were answered.
    assert any(e - s > 0.8 and status == 200 for s, e, status in results)
    lost = [status for s, _, status in results if status != 200]
    assert len(lost) <= 8 and set(lost) <= {502}, lost


def test_200_concurrent_clients_across_a_swap_lose_nothing(make_daemon):
    d = front_daemon(make_daemon, {"a": {}, "b": {"args": ["--start-delay", "0.5"]}},
                     default_model="a")
    wait_for(lambda: d.status()["active"] == "a", what="a active")
    gate = threading.Barrier(200, timeout=30)
    results: list[tuple[str, int, str]] = []

    def one(model: str) -> None:
        gate.wait()
        status, _, body = complete(d, model, max_tokens=2)
        results.append((model, status, body.get("model") if isinstance(body, dict) else body))
    threads = [threading.Thread(target=one, args=("ab"[i % 2],)) for i in range(200)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert len(results) == 200
    assert sorted(results) == sorted([("a", 200, "a")] * 100 + [("b", 200, "b")] * 100)
    assert swaps_to(d, "b") >= 1


def test_shutdown_cuts_streams_at_drain_timeout_then_exits(make_daemon):
    d = front_daemon(make_daemon, {"a": {"args": ["--token-delay", "0.2"]}}, default_model="a",
                     drain_timeout=1)
    wait_for(lambda: d.status()["active"] == "a", what="a active")
    conn, r = stream_events(d, "a", 100)  # 20 s if it ran to the end
    assert next_event(r).startswith(b"data: {")
    stopped = time.monotonic()
    rc = []
    stopper = threading.Thread(target=lambda: rc.append(d.stop(timeout=20)))
    stopper.start()
    time.sleep(0.5)
    assert next_event(r).startswith(b"data: {")  # within drain_timeout the stream goes on
    rest = r.read()  # then it ends: the model is stopped, the stream ends with an error event
    ended = time.monotonic() - stopped
    conn.close()
    stopper.join(20)
    assert 0.9 < ended < 8, ended
    events = [line for line in rest.split(b"\n") if line.startswith(b"data: ")]
    assert events and b'"error"' in events[-1] and b"[DONE]" not in rest
    assert rc and rc[0] is not None


def test_openai_client_uses_two_models_in_turn(make_daemon, monkeypatch):
    """The README's newcomer example: no llmuxctl, two models, one endpoint."""
    openai = pytest.importorskip("openai")
    for var in ("HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY", "http_proxy", "https_proxy", "all_proxy"):
        monkeypatch.delenv(var, raising=False)
    d = front_daemon(make_daemon, {"tiny-a": {}, "tiny-b": {}})
    client = openai.OpenAI(base_url=f"http://127.0.0.1:{d.front}/v1", api_key="unused",
                           max_retries=0, timeout=60)
    assert [m.id for m in client.models.list()] == ["tiny-a", "tiny-b"]
    first = client.completions.create(model="tiny-a", prompt="hello", max_tokens=8)  # starts it
    assert first.model == "tiny-a" and first.choices[0].text
    assert d.status()["active"] == "tiny-a"
    second = client.completions.create(model="tiny-b", prompt="hello", max_tokens=8)  # swaps
    assert second.model == "tiny-b" and second.choices[0].text
    st = d.status()
    assert st["active"] == "tiny-b" and st["models"]["tiny-a"]["state"] == "sleeping"
    chunks = list(client.completions.create(model="tiny-a", prompt="hi", max_tokens=4,
                                            stream=True))  # and back, streamed
    assert len(chunks) == 4 and all(c.model == "tiny-a" for c in chunks)
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="tiny-c", prompt="hello", max_tokens=1)
    with pytest.raises(openai.BadRequestError):
        client.post("/completions", body=None, cast_to=object,
                    options={"headers": {"Content-Type": "application/json"}})


def test_pooled_connection_closed_by_an_idle_model_is_not_an_error(make_daemon):
    """vLLM closes keep-alive connections idle for 5 s (llmux-sim as well; 1 s here):
    the front's pooled connection is then dead, and the next request must not see it."""
    d = front_daemon(make_daemon, {"a": {"env": {"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "1"}}})
    for _ in range(3):
        status, _, body = complete(d, "a")
        assert status == 200, body
        time.sleep(1.4)  # past the model's keep-alive: it closed the pooled connection
    assert swaps_to(d, "a") == 1
