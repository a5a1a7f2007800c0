"""The front's HTTP/1.1 server (llmuxd/front/server.py) byte for byte, in process: what a
parser of its own must still do that h11 did (keep-alive, HEAD, Expect: 100-continue,
framing, pipelining in order, a Host header for HTTP/1.1), over raw sockets."""
from __future__ import annotations

import socket
import time

import pytest

from llmuxd.front.http1 import Request, response_head
from llmuxd.front.routes import Reply
from llmuxd.front.server import FrontServer

from .test_front_units import loop  # noqa: F401  (the reactor on its own thread)


def echo(conn) -> None:
    """Answers with the method, target and body it got."""
    req = conn.request
    conn.reply(Reply(200, b"%s %s %s" % (req.method, req.target, bytes(conn.body))))


def start(reactor, on_request=echo) -> FrontServer:
    server = FrontServer(reactor, "127.0.0.1", 0, on_request, on_abandon=lambda task: None)
    server.start()
    return server


def exchange(server, data: bytes, until_close: bool = True, expect: int = 1) -> bytes:
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(data)
        got = b""
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            if not until_close and _complete(got, expect):
                return got
            try:
                chunk = s.recv(65536)
            except socket.timeout:
                break
            if not chunk:
                return got
            got += chunk
        return got


def _complete(got: bytes, n: int) -> bool:
    """n answers with Content-Length bodies are all there."""
    rest = got
    for _ in range(n):
        head, sep, rest = rest.partition(b"\r\n\r\n")
        if not sep:
            return False
        length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:")]
        if not length or len(rest) < length[0]:
            return False
        rest = rest[length[0]:]
    return True


def test_pipelined_requests_are_answered_in_order_on_one_connection(loop):  # noqa: F811
    server = start(loop)
    got = exchange(server, b"POST /1 HTTP/1.1\r\nHost: x\r\nContent-Length: 3\r\n\r\nabc"
                           b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n"
                           b"POST /3 HTTP/1.1\r\nHost: x\r\nTransfer-Encoding: chunked\r\n\r\n"
                           b"2\r\nde\r\n1\r\nf\r\n0\r\n\r\n", until_close=False, expect=3)
    assert got.count(b"HTTP/1.1 200 OK\r\n") == 3
    assert got.index(b"POST /1 abc") < got.index(b"GET /2 ") < got.index(b"POST /3 def")
    assert b"Connection: close" not in got  # keep-alive goes on


def test_connection_close_ends_the_pipeline(loop):  # noqa: F811
    server = start(loop)
    got = exchange(server, b"GET /1 HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
                           b"GET /2 HTTP/1.1\r\nHost: x\r\n\r\n")
    assert got.count(b"HTTP/1.1 ") == 1 and b"GET /1 " in got and b"/2" not in got
    assert b"Connection: close\r\n" in got


def test_http_1_0_gets_its_answer_and_the_close(loop):  # noqa: F811
    server = start(loop)
    got = exchange(server, b"GET /old HTTP/1.0\r\n\r\n")  # no Host needed in 1.0
    assert got.startswith(b"HTTP/1.1 200 OK\r\n") and got.endswith(b"GET /old ")
    assert b"Connection: close\r\n" in got


def test_http_1_1_without_host_is_400(loop):  # noqa: F811
    server = start(loop)
    got = exchange(server, b"GET /x HTTP/1.1\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 400 ") and b"Host" in got


def test_head_gets_the_head_only(loop):  # noqa: F811
    server = start(loop)
    got = exchange(server, b"HEAD /x HTTP/1.1\r\nHost: x\r\n\r\n"
                           b"GET /y HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    head, _, rest = got.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 ") and b"Content-Length: 0" not in head
    assert rest.startswith(b"HTTP/1.1 200 ") and rest.endswith(b"GET /y ")  # no body between


def test_expect_100_continue_is_answered_before_the_body(loop):  # noqa: F811
    server = start(loop)
    with socket.create_connection(("127.0.0.1", server.port), timeout=5) as s:
        s.sendall(b"POST /x HTTP/1.1\r\nHost: x\r\nContent-Length: 2\r\n"
                  b"Expect: 100-continue\r\n\r\n")
        assert s.recv(65536).startswith(b"HTTP/1.1 100 ")
        s.sendall(b"ok")
        answer = s.recv(65536)
    assert answer.startswith(b"HTTP/1.1 200 ") and answer.endswith(b"POST /x ok")


def test_an_answer_without_length_is_chunked(loop):  # noqa: F811
    def stream(conn) -> None:
        conn.start_response(200, [(b"content-type", b"text/event-stream")])
        conn.send_data(b"data: 1\n\n")
        conn.send_data(b"data: 2\n\n")
        conn.end_response()

    server = start(loop, stream)
    got = exchange(server, b"GET /s HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
    assert b"Transfer-Encoding: chunked\r\n" in got
    assert got.endswith(b"\r\n\r\n9\r\ndata: 1\n\n\r\n9\r\ndata: 2\n\n\r\n0\r\n\r\n")


@pytest.mark.parametrize("header", [(b"x-bad", b"a\r\nInjected: 1"), (b"bad name", b"v")])
def test_a_header_that_must_not_be_repeated_closes_the_connection(loop, header):  # noqa: F811
    def bad(conn) -> None:
        conn.start_response(200, [header, (b"content-length", b"0")])
        conn.end_response()

    server = start(loop, bad)
    assert exchange(server, b"GET /x HTTP/1.1\r\nHost: x\r\n\r\n") == b""


def test_an_upgrade_request_is_answered_then_closed(loop):  # noqa: F811
    server = start(loop)
    got = exchange(server, b"GET /u HTTP/1.1\r\nHost: x\r\nConnection: Upgrade, HTTP2-Settings\r\n"
                           b"Upgrade: h2c\r\nHTTP2-Settings: AAMAAABkAAQAAP__\r\n\r\n")
    assert got.startswith(b"HTTP/1.1 200 ") and got.endswith(b"GET /u ")


def test_too_many_pipelined_requests_in_one_read_are_refused(loop):  # noqa: F811
    server = start(loop)
    got = exchange(server, b"GET /p HTTP/1.1\r\nHost: x\r\n\r\n" * 200)
    assert b" 429 " in got and got.count(b"HTTP/1.1 200 ") <= 65


def request(version="1.1", method=b"GET", keep=True) -> Request:
    r = Request()
    r.http_version, r.method, r.keep_alive = version, method, keep
    return r


@pytest.mark.parametrize("status, headers, req, chunked, left, keep", [
    (200, [("Content-Length", "5")], request(), False, 5, True),
    (200, [], request(), True, -1, True),                      # no length: chunked
    (200, [], request("1.0"), False, -1, False),               # 1.0: the close ends it
    (204, [], request(), False, 0, True),
    (200, [(b"content-length", b"9")], request(method=b"HEAD"), False, 0, True),
    (200, [("Connection", "close"), ("Content-Length", "0")], request(), False, 0, False),
    (400, [("Content-Length", "3")], None, False, 3, False),  # never parsed: close after
])
def test_response_head_framing(status, headers, req, chunked, left, keep):
    head, got_chunked, got_left, got_keep = response_head(status, headers, req, True)
    assert (got_chunked, got_left, got_keep) == (chunked, left, keep)
    assert head.startswith(b"HTTP/1.1 %d " % status) and head.endswith(b"\r\n\r\n")
    assert (b"Connection: close\r\n" in head) == (not keep)
    assert (b"Transfer-Encoding: chunked\r\n" in head) == chunked
    assert head.count(b"Connection:") <= 1
