"""The front's parts in process: routing rules, the swap choice, and the HTTP server on a
real reactor with shortened limits (slowloris, idle keep-alive, backpressure)."""
from __future__ import annotations

import json
import socket
import threading
import time

import pytest

from llmuxd import launch
from llmuxd import states as S
from llmuxd.catalog import Catalog, DaemonSettings, ModelSpec
from llmuxd.front import upstream_body
from llmuxd.front.demand import choose_swap
from llmuxd.front.proxy import Upstream, request_headers
from llmuxd.front.routes import FRONT_HEALTH, FRONT_METRICS, FRONT_MODELS, Reply, Route, route, split_target
from llmuxd.front.server import HIGH_WATER, FrontServer
from llmuxd.loop import Reactor

CATALOG = Catalog("/x.toml", ("/x.toml",), DaemonSettings(), {
    "a": ModelSpec("a", "org/a", 9001), "b": ModelSpec("b", "org/b", 9002, aliases=("bee",))})


def post(model):
    return json.dumps({"model": model, "prompt": "x"}).encode()


# ---------------------------------------------------------------- routing rules

@pytest.mark.parametrize("target, expected", [
    ("/v1/chat/completions", ("/v1/chat/completions", "")),
    ("/upstream/a/%76ersion?x=%2F", ("/upstream/a/version", "?x=%2F")),
    ("/upstream/a/%2fsleep", None), ("/upstream/a/%252f", None), ("/a//b", None),
    ("/a/./b", None), ("/a/../b", None), ("/a/..", None), ("relative", None), ("/a%", None),
    ("/a%zz", None), ("/a\\b", None), ("/a%00b", None)])
def test_split_target(target, expected):
    assert split_target(target) == expected


def test_route_classification():
    assert route("GET", "/health", b"", CATALOG) == FRONT_HEALTH
    assert route("GET", "/v1/models", b"", CATALOG) == FRONT_MODELS
    assert route("GET", "/metrics", b"", CATALOG) == FRONT_METRICS  # llmuxd's own, not vLLM's
    assert route("POST", "/v1/completions", post("bee"), CATALOG) == \
        Route("b", "/v1/completions", post("bee"))
    assert route("POST", "/v1/embeddings?x=1", post("a"), CATALOG).target == "/v1/embeddings?x=1"
    assert route("GET", "/upstream/a/metrics?q", b"", CATALOG) == Route("a", "/metrics?q", b"")
    assert route("GET", "/upstream/bee/v1/models", b"", CATALOG).model == "b"
    for method, target, body, status in [
            ("POST", "/v1/completions", post("c"), 404), ("POST", "/v1/completions", b"{", 400),
            ("POST", "/v1/completions", b'{"model": 1}', 400), ("PUT", "/v1/models", b"", 405),
            ("POST", "/upstream/a/sleep", b"", 404), ("POST", "/upstream/a/wake_up", b"", 404),
            ("POST", "/v1/load_lora_adapter", post("a"), 404), ("POST", "/metrics", b"", 405),
            ("POST", "/upstream/c/health", b"", 404), ("POST", "/upstream/a/v1/", b"", 404)]:
        reply = route(method, target, body, CATALOG)
        assert isinstance(reply, Reply) and reply.status == status, (target, reply)
        assert json.loads(reply.body)["error"]["code"] == status


def test_served_model_name_in_argv_unless_args_set_it():
    d = DaemonSettings()
    argv = launch.model_argv(d, CATALOG.models["b"])
    assert argv[argv.index("--served-model-name"):][:3] == ["--served-model-name", "b", "bee"]
    own = ModelSpec("q", "org/q", 1, args=("--served-model-name", "Q", "--seed", "1"))
    assert launch.model_argv(d, own).count("--served-model-name") == 1
    assert launch.served_names(own.args) == ["Q"]
    assert launch.served_names(("--served-model-name=Z",)) == ["Z"]
    # The front then sends vLLM a name it knows.
    assert json.loads(upstream_body(own, post("q")))["model"] == "Q"
    assert upstream_body(CATALOG.models["b"], post("bee")) == post("bee")


# ---------------------------------------------------------------- the swap choice

A, B, C = "a", "b", "c"


@pytest.mark.parametrize("waiting, states, since, now, min_active, expected", [
    ([B], {A: S.ACTIVE, B: S.SLEEPING}, {A: 0}, 10, 0, (B, None)),
    ([C, B], {A: S.ACTIVE, B: S.SLEEPING, C: S.STOPPED}, {A: 0}, 10, 0, (C, None)),  # FIFO
    ([B], {A: S.ACTIVE, B: S.SLEEPING}, {A: 9}, 10, 5, (None, 4)),  # too young to leave
    ([B], {A: S.ACTIVE, B: S.SLEEPING}, {A: 4}, 10, 5, (B, None)),
    ([B], {A: S.SLEEPING, B: S.FAILED}, {}, 10, 5, (B, None)),      # nothing active
    ([B], {A: S.ACTIVE, B: S.RESTARTING}, {A: 0}, 10, 0, (None, None)),  # supervision's
    ([B, C], {A: S.ACTIVE, B: S.WAKING, C: S.CHECKPOINTED}, {A: 0}, 10, 0, (C, None)),
    ([], {A: S.ACTIVE}, {A: 0}, 10, 0, (None, None)),
])
def test_choose_swap(waiting, states, since, now, min_active, expected):
    assert choose_swap(waiting, states, since, now, min_active) == expected


# ---------------------------------------------------------------- the server in process

@pytest.fixture
def loop():
    reactor = Reactor(lambda signum: None)
    stop = threading.Event()
    thread = threading.Thread(target=lambda: [reactor.run_once(0.02) for _ in iter(stop.is_set, True)])
    thread.start()
    yield reactor
    stop.set()
    thread.join(5)
    reactor.selector.close()


def start_front(reactor, on_request, **limits):
    server = FrontServer(reactor, "127.0.0.1", 0, on_request, on_abandon=lambda task: None)
    for key, value in limits.items():
        setattr(server, key, value)
    server.start()
    return server


def read_all(s: socket.socket) -> bytes:
    chunks = []
    while chunk := s.recv(65536):
        chunks.append(chunk)
    return b"".join(chunks)


def test_slowloris_gets_408_and_is_closed(loop):
    server = start_front(loop, lambda conn: conn.reply_error(500, "unreachable"),
                         request_timeout=0.5, sweep=0.1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        started = time.monotonic()
        s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\n")  # and never the blank line
        reply = read_all(s)
    assert reply.startswith(b"HTTP/1.1 408 ") and time.monotonic() - started < 2
    deadline = time.monotonic() + 2  # the loop thread may still be inside close()
    while server.conns and time.monotonic() < deadline:
        time.sleep(0.01)
    assert not server.conns


def test_idle_keep_alive_is_closed(loop):
    server = start_front(loop, lambda conn: conn.reply(Reply(200, b"ok")),
                         keepalive_timeout=0.3, sweep=0.1)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n")
        assert read_all(s).endswith(b"ok")  # the answer, then the close at the idle limit


class FloodUpstream:
    """A model server that writes `total` bytes of chunked body as fast as TCP lets it."""

    def __init__(self, total: int) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.total, self.sent, self.closed_early = total, 0, threading.Event()
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        conn, _ = self.listener.accept()
        conn.recv(65536)
        conn.sendall(b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\n\r\n")
        chunk = b"x" * 16384
        try:
            while self.sent < self.total:
                conn.sendall(b"%x\r\n%s\r\n" % (len(chunk), chunk))
                self.sent += len(chunk)
            conn.sendall(b"0\r\n\r\n")
        except OSError:
            self.closed_early.set()
        conn.close()


def proxy_to(reactor, upstream_port, conns):
    def on_request(conn):
        conns.append(conn)
        headers = request_headers(conn.request.headers, "127.0.0.1", upstream_port, b"", False)
        conn.task = type("T", (), {})()
        conn.task.upstream = Upstream(reactor, "127.0.0.1", upstream_port, "GET", "/", headers,
                                      b"", conn, done=lambda: None)
    return on_request


def test_slow_client_slows_its_upstream_and_nothing_piles_up(loop):
    upstream = FloodUpstream(64 * 1024 * 1024)
    conns = []
    server = start_front(loop, proxy_to(loop, upstream.port, conns))
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
    s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    time.sleep(1.0)  # the client reads nothing meanwhile
    sent_while_stalled = upstream.sent
    assert sent_while_stalled < 16 * 1024 * 1024, sent_while_stalled  # TCP buffers, not 64 MiB
    assert len(conns[0].outbox) <= HIGH_WATER + 65536 * 2
    received = 0
    while chunk := s.recv(1 << 20):
        received += len(chunk)
        if b"0\r\n\r\n" in chunk[-5:]:
            break
    s.close()
    assert upstream.sent == 64 * 1024 * 1024 and received > 64 * 1024 * 1024


def test_client_gone_mid_stream_closes_the_upstream(loop):
    upstream = FloodUpstream(1 << 40)  # endless
    conns = []
    server = FrontServer(loop, "127.0.0.1", 0, proxy_to(loop, upstream.port, conns),
                         on_abandon=lambda task: task.upstream.cancel())
    server.start()
    s = socket.create_connection(("127.0.0.1", server.port), timeout=10)
    s.sendall(b"GET /stream HTTP/1.1\r\nHost: x\r\n\r\n")
    assert s.recv(65536).startswith(b"HTTP/1.1 200 ")
    s.close()
    assert upstream.closed_early.wait(5), "the upstream went on writing"


def test_choose_swap_min_active_protects_only_the_evicted():
    states = {A: S.ACTIVE, B: S.SLEEPING}
    # b fits beside a: a's min_active does not hold b back
    assert choose_swap([B], states, {A: 9}, 10, 5, evicts=lambda t: []) == (B, None)
    # b evicts a, which is too young to leave
    assert choose_swap([B], states, {A: 9}, 10, 5, evicts=lambda t: [A]) == (None, 4)
