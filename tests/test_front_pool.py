"""The front's keep-alive pool of upstream connections (llmuxd/front/pool.py), in process:
a real reactor and FrontServer, a threaded keep-alive HTTP server as the model."""
from __future__ import annotations

import socket
import threading
import time

from llmuxd.front.pool import Pool
from llmuxd.front.proxy import Upstream, request_headers

from .test_front_units import loop, start_front  # noqa: F401  (the fixture)


class KeepAliveUpstream:
    """HTTP/1.1 with keep-alive; counts connections. `drop_nth`: on the nth request of a
    connection, close it without answering (an idle close racing the request)."""

    def __init__(self, drop_nth: int | None = None, close_after: bool = False) -> None:
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.port = self.listener.getsockname()[1]
        self.drop_nth, self.close_after = drop_nth, close_after
        self.accepted = self.closed = self.requests = 0
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            conn, _ = self.listener.accept()
            self.accepted += 1
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn: socket.socket) -> None:
        buf, n = b"", 0
        try:
            while True:
                while b"\r\n\r\n" not in buf:
                    data = conn.recv(65536)
                    if not data:
                        return
                    buf += data
                _, _, buf = buf.partition(b"\r\n\r\n")  # GET, Content-Length: 0
                n += 1
                if n == self.drop_nth:
                    return
                self.requests += 1
                body = b"answer %d" % self.requests
                conn.sendall(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s" % (len(body), body))
                if self.close_after:
                    return  # without saying so: as an idle timeout does later
        finally:
            self.closed += 1
            conn.close()


def pooled_proxy(reactor, pool: Pool, port: int):
    """GET /MODEL through the pool, to `port`."""
    def on_request(conn):
        model = conn.request.target.decode().strip("/")
        headers = request_headers(conn.request.headers, "127.0.0.1", port, b"", False)
        conn.task = type("T", (), {})()
        conn.task.upstream = Upstream(reactor, "127.0.0.1", port, "GET", "/", headers, b"", conn,
                                      done=lambda: None, pool=pool, model=model)
    return on_request


def get(s: socket.socket, model: str) -> bytes:
    s.sendall(b"GET /%s HTTP/1.1\r\nHost: x\r\n\r\n" % model.encode())
    data = b""
    while b"\r\n\r\n" not in data or not data.rstrip().split(b"\r\n")[-1].startswith(b"answer"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    return data


def setup(loop, upstream, active):  # noqa: F811
    pool = Pool(loop, keeps=lambda m: m in active)
    server = start_front(loop, pooled_proxy(loop, pool, upstream.port))
    return pool, socket.create_connection(("127.0.0.1", server.port), timeout=10)


def until(predicate, timeout=5.0) -> bool:
    deadline = time.monotonic() + timeout
    while not predicate() and time.monotonic() < deadline:
        time.sleep(0.01)
    return predicate()


def test_one_connection_serves_a_models_requests_one_after_another(loop):  # noqa: F811
    upstream = KeepAliveUpstream()
    pool, s = setup(loop, upstream, {"a"})
    for i in range(1, 6):
        assert get(s, "a").startswith(b"HTTP/1.1 200 ")
    assert upstream.accepted == 1 and upstream.requests == 5 and pool.reused == 4


def test_connections_are_never_lent_to_another_model(loop):  # noqa: F811
    upstream = KeepAliveUpstream()
    pool, s = setup(loop, upstream, {"a", "b"})
    for model in "abab":
        assert get(s, model).startswith(b"HTTP/1.1 200 ")
    assert upstream.accepted == 2 and pool.reused == 2  # one per model, each used twice


def test_a_model_that_leaves_active_keeps_no_connection(loop):  # noqa: F811
    upstream = KeepAliveUpstream()
    active = {"a"}
    pool, s = setup(loop, upstream, active)
    assert get(s, "a").startswith(b"HTTP/1.1 200 ") and until(lambda: pool.count() == 1)
    pool.drop("a")  # what Front.on_transition does when "a" drains, sleeps or dies
    # at once, not by the pool's IDLE_LIMIT sweep
    assert until(lambda: upstream.closed == 1, timeout=1), "the idle connection stayed open"
    active.discard("a")
    assert get(s, "a").startswith(b"HTTP/1.1 200 ")  # on a new connection, then closed
    assert upstream.accepted == 2 and pool.count() == 0
    assert until(lambda: upstream.closed == 2, timeout=1)


def test_an_idle_connection_the_server_closed_is_dropped(loop):  # noqa: F811
    upstream = KeepAliveUpstream(close_after=True)
    pool, s = setup(loop, upstream, {"a"})
    assert get(s, "a").startswith(b"HTTP/1.1 200 ")
    assert until(lambda: pool.count() == 0, timeout=1), "the pool kept a closed connection"
    assert get(s, "a").startswith(b"HTTP/1.1 200 ") and pool.reused == 0


def test_a_request_on_a_connection_closed_under_it_goes_again_on_a_new_one(loop):  # noqa: F811
    upstream = KeepAliveUpstream(drop_nth=2)
    pool, s = setup(loop, upstream, {"a"})
    assert get(s, "a").startswith(b"HTTP/1.1 200 ")
    reply = get(s, "a")  # the pooled connection is closed with no answer: tried anew
    assert reply.startswith(b"HTTP/1.1 200 "), reply
    assert pool.reused == 1 and upstream.accepted == 2 and upstream.requests == 2


def test_a_taken_connection_is_never_closed_by_the_pool():
    """The selector may hand out the idle watcher's callback in the same loop pass in
    which a request took the connection: the pool must leave it to its taker."""
    from llmuxd.loop import Reactor
    reactor = Reactor(lambda signum: None)
    mine, theirs = socket.socketpair()
    try:
        pool = Pool(reactor, keeps=lambda m: True)
        assert pool.give("a", ("127.0.0.1", 1), mine)
        theirs.close()  # the server's close arrives while the connection is idle...
        watcher = reactor.selector.get_key(mine).data[0]
        taken = pool.take("a", ("127.0.0.1", 1))  # ...and a request takes it in that pass
        assert taken is not None and taken.sock is mine
        watcher()  # the stale callback of this pass
        assert mine.fileno() != -1, "the pool closed a connection in use"
    finally:
        mine.close()
        reactor.selector.close()
