"""The front's HTTP/1.1 server: listening, one parser per client connection, limits.

Runs on llmuxd's one selector loop and never blocks it: sockets are
non-blocking, replies are queued on the connection and written as the socket
allows. Every client is hostile (llmuxd is root): headers, bodies, the number
of connections, a request's arrival time (slowloris), idle keep-alives, a
client that never reads its answer: all bounded. A complete request (headers
and body) goes to `on_request(conn)`; what it means is the front's business.

Requests are parsed by httptools (llhttp, in C; uvicorn's parser), as the
models' answers are in proxy.py: h11 in pure Python cost ~160 us of the loop's
~600 us per proxied request here. HTTP/1.1's rules for the answers are in
http1.py; here, the request side's: a Host header for HTTP/1.1,
`Expect: 100-continue`, and pipelined requests answered strictly in order.
"""

from __future__ import annotations

import logging
import socket
import time
from typing import Callable

import httptools

from ..loop import Outbox
from .http1 import CONTINUE, BadHeader, Refusal, Request, response_head
from .routes import Reply, error

log = logging.getLogger(__name__)

MAX_HEADERS = 64 * 1024          # request line and headers
MAX_BODY = 32 * 1024 * 1024      # a long multimodal chat request fits; a flood does not
MAX_CONNECTIONS = 2048
MAX_STASH = 64 * 1024            # pipelined bytes held while a request is answered
HIGH_WATER = 256 * 1024          # unsent bytes: stop reading upstream above this
LOW_WATER = 64 * 1024            # ...and read again below this
REQUEST_TIMEOUT = 30.0           # first byte to complete body
KEEPALIVE_TIMEOUT = 75.0         # idle between requests
SEND_STALL = 120.0               # a client that reads nothing of its answer this long
SWEEP = 1.0

IDLE, READING, WAITING, ANSWERING = "idle", "reading", "waiting", "answering"


class Conn:
    def __init__(self, server: "FrontServer", sock: socket.socket, peer) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.parser = httptools.HttpRequestParser(self)
        self.phase = IDLE
        self.since = time.monotonic()     # when the phase began
        self.request: Request | None = None  # the one being answered
        self.body = bytearray()
        self.outbox = Outbox(server.reactor, sock, self.close, LOW_WATER)
        self.stash = bytearray()          # read while a request is being answered
        self.closed = False
        self.close_when_flushed = False
        self.task = None                  # the front's handle for the request in progress
        # the parser's side: the request being read, those complete but not yet answered
        self._req: Request | None = None
        self._req_body = bytearray()
        self._head_size = 0
        self._in_head = False
        self._ready: list[tuple[Request, bytearray]] = []
        self._broken: tuple[int, str] | None = None  # refuse once the ready ones are answered
        # the answer's framing
        self._chunked = False
        self._left = 0                    # Content-Length bytes still to send; -1: none
        self._must_close = False

    def __repr__(self) -> str:
        req = self.request or self._req
        target = req.target.decode("latin-1")[:80] if req else "-"
        return f"<front client {self.peer[0]}:{self.peer[1]} {target}>"

    @property
    def last_sent(self) -> float:
        return self.outbox.last_sent

    @property
    def on_drained(self) -> Callable[[], None] | None:
        return self.outbox.on_drained

    @on_drained.setter
    def on_drained(self, resume: Callable[[], None] | None) -> None:
        self.outbox.on_drained = resume

    def _set_phase(self, phase: str) -> None:
        self.phase, self.since = phase, time.monotonic()

    # -- reading ------------------------------------------------------------------
    def on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()  # a client gone mid-answer cancels its upstream (on_abandon)
            return
        if self.phase in (WAITING, ANSWERING):
            self.stash += data  # a pipelined next request: parsed once this one is done
            if len(self.stash) > MAX_STASH:
                self.server.reactor.remove_reader(self.sock)
            return
        self._feed(data)

    def _feed(self, data: bytes) -> None:
        if self.phase == IDLE:
            self._set_phase(READING)
        in_head = self._in_head
        try:
            self.parser.feed_data(data)
            # A head that stays incomplete is bounded by the bytes it took so far.
            if in_head and self._in_head:
                self._head_size += len(data)
                if self._head_size > MAX_HEADERS:
                    raise Refusal(431, f"the request head is over {MAX_HEADERS} bytes")
        except httptools.HttpParserUpgrade:  # no protocol switch: close after the answer
            for req, _ in self._ready:
                req.keep_alive = False
            self._broken = self._broken or (0, "")
        except httptools.HttpParserCallbackError as exc:
            why = exc.__context__
            self._broken = (why.status, str(why)) if isinstance(why, Refusal) else \
                (400, f"malformed request: {exc}")
        except httptools.HttpParserError as exc:
            self._broken = (400, f"malformed request: {exc}")
        except Refusal as exc:
            self._broken = (exc.status, str(exc))
        self._next()

    def _next(self) -> None:
        """Answer the next complete request, if none is being answered."""
        if self.closed or self.phase in (WAITING, ANSWERING):
            return
        if self._ready:
            self.request, self.body = self._ready.pop(0)
            self._set_phase(WAITING)
            self.server.on_request(self)
        elif self._broken is not None:
            status, message = self._broken
            if status:
                self._refuse(status, message)
            else:
                self.close()

    # httptools' callbacks, during feed_data
    def on_message_begin(self) -> None:
        self._req, self._req_body = Request(), bytearray()
        self._head_size, self._in_head = 0, True

    def on_url(self, url: bytes) -> None:
        self._req.target += url

    def on_header(self, name: bytes, value: bytes) -> None:
        self._req.headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        req, parser = self._req, self.parser
        self._in_head = False
        req.method = parser.get_method()
        req.http_version = parser.get_http_version()
        req.keep_alive = parser.should_keep_alive() and req.http_version == "1.1"
        size = len(req.target)
        length = expect = host = None
        for name, value in req.headers:
            size += len(name) + len(value) + 4
            if name == b"content-length":
                length = value
            elif name == b"expect":
                expect = value
            elif name == b"host":
                host = value
        # the parser bounds nothing: a head that arrived whole is measured here
        if size > MAX_HEADERS:
            raise Refusal(431, f"the request head is over {MAX_HEADERS} bytes")
        if host is None and req.http_version == "1.1":
            raise Refusal(400, "malformed request: missing mandatory Host header")
        if length is not None and int(length) > MAX_BODY:
            raise Refusal(413, f"the body is over {MAX_BODY} bytes")
        if expect is not None and expect.lower() == b"100-continue" \
                and req.http_version == "1.1" and self.phase == READING and not self._ready:
            self.outbox.write(CONTINUE)  # the client waits for this before its body

    def on_body(self, body: bytes) -> None:
        self._req_body += body
        if len(self._req_body) > MAX_BODY:
            raise Refusal(413, f"the body is over {MAX_BODY} bytes")

    def on_message_complete(self) -> None:
        self._ready.append((self._req, self._req_body))
        self._req = None
        if len(self._ready) > 64:  # one recv of tiny pipelined requests: a flood, not a client
            raise Refusal(429, "too many pipelined requests")

    def _refuse(self, status: int, message: str) -> None:
        """An answer to a request we will not read on: send it, then close."""
        self._ready.clear()
        if self.phase in (IDLE, READING):
            self.close_when_flushed = True
            self.reply(error(status, message), closing=True)
        else:
            self.close()

    # -- answering ----------------------------------------------------------------
    def reply(self, reply: Reply, closing: bool = False) -> None:
        headers = list(reply.headers) + [("Content-Length", str(len(reply.body)))]
        if closing:
            headers.append(("Connection", "close"))
        self.outbox.corked = True  # head and body in one send
        self.start_response(reply.status, headers)
        if self.request is None or self.request.method != b"HEAD":
            self.send_data(reply.body)
        self.end_response()

    def reply_error(self, status: int, message: str, retry_after: float | None = None) -> None:
        self.reply(error(status, message, retry_after))

    def start_response(self, status: int, headers) -> None:
        if self.closed:
            return
        self._set_phase(ANSWERING)
        req = self.request
        keep = req is not None and req.keep_alive and not self.close_when_flushed
        try:
            head, self._chunked, self._left, keep = response_head(status, headers, req, keep)
        except BadHeader as exc:  # one a model's server sent: it must not reach the client
            log.warning("%r: cannot send the response: %s", self, exc)
            self.abort()
            return
        self._must_close = not keep
        self.outbox.write(head)

    def send_data(self, data: bytes) -> None:
        if self.closed or not data or self.phase != ANSWERING:
            return
        if self._chunked:
            self.outbox.write(b"%x\r\n%s\r\n" % (len(data), data))
            return
        if self._left >= 0:
            if len(data) > self._left:  # more than the head announced: the framing is broken
                log.warning("%r: the answer is longer than its Content-Length", self)
                self.abort()
                return
            self._left -= len(data)
        self.outbox.write(data)

    def cork(self) -> None:
        """Hold what is written until uncork() or end_response(): one send, not several."""
        self.outbox.corked = True

    def uncork(self) -> None:
        if self.outbox.corked:
            self.outbox.corked = False
            if not self.closed:
                self.outbox.flush()

    def end_response(self) -> None:
        if self.closed:
            return
        self.task = None
        if self._chunked:
            self.outbox.write(b"0\r\n\r\n")
        self.outbox.corked = False
        if self._left > 0:
            log.warning("%r: the answer ended %d bytes short of its Content-Length", self,
                        self._left)
            self._must_close = True
        self.outbox.flush()
        if self.closed:
            return
        if self._must_close or self.close_when_flushed:
            self.close_when_flushed = True  # keep-alive is over
            self.outbox.on_flushed = self.close
            self.outbox.flush()
            return
        self.request = None
        self._set_phase(READING if self._req is not None else IDLE)
        if self._ready or self._broken is not None:
            self._next()
        elif self.stash:
            data, self.stash = bytes(self.stash), bytearray()
            self.server.reactor.add_reader(self.sock, self.on_readable)
            self._feed(data)

    def abort(self) -> None:
        self.close()

    def congested(self) -> bool:
        return len(self.outbox) > HIGH_WATER

    def close(self) -> None:
        if self.closed:
            return
        self.closed = self.outbox.closed = True
        self.server.conns.discard(self)
        self.server.reactor.forget(self.sock)
        self.sock.close()
        task, self.task = self.task, None
        if task is not None:
            self.server.on_abandon(task)  # out of the queue, or its upstream closed


class FrontServer:
    def __init__(self, reactor, host: str, port: int, on_request: Callable[[Conn], None],
                 on_abandon: Callable[[object], None]) -> None:
        self.reactor = reactor
        self.host, self.port = host, port
        self.on_request = on_request
        self.on_abandon = on_abandon
        self.conns: set[Conn] = set()
        self.sock: socket.socket | None = None
        self._sweeping = False
        # Limits as attributes, so an in-process test can shorten them.
        self.request_timeout = REQUEST_TIMEOUT
        self.keepalive_timeout = KEEPALIVE_TIMEOUT
        self.send_stall = SEND_STALL
        self.upstream_idle = 600.0     # no byte from vLLM this long: the answer fails
        self.answer_limit = 3600.0     # one answer, request complete to last byte
        self.sweep = SWEEP

    def start(self, what: str = "daemon.front.listen") -> None:
        family = socket.AF_INET6 if ":" in self.host else socket.AF_INET
        sock = socket.socket(family, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # not REUSEPORT: one owner
        try:
            sock.bind((self.host, self.port))
        except OSError as exc:  # name the key: "Address already in use" alone says little
            sock.close()
            raise OSError(f"{what} {self.host}:{self.port}: {exc.strerror or exc}") from None
        sock.listen(1024)
        sock.setblocking(False)
        self.sock = sock
        self.port = sock.getsockname()[1]
        self.reactor.add_reader(sock, self._accept)

    def _accept(self) -> None:
        for _ in range(64):  # fairness: the loop has other work
            try:
                sock, peer = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("front: accept failed: %s", exc)
                return
            if len(self.conns) >= MAX_CONNECTIONS:
                sock.close()  # no room to even answer: the client retries or gives up
                log.warning("front: refusing %s: %d connections already", peer, len(self.conns))
                continue
            sock.setblocking(False)
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            conn = Conn(self, sock, peer)
            self.conns.add(conn)
            self.reactor.add_reader(sock, conn.on_readable)
            if not self._sweeping:
                self._sweeping = True
                self.reactor.call_later(self.sweep, self._sweep)

    def _sweep(self) -> None:
        now = time.monotonic()
        for conn in list(self.conns):
            age = now - conn.since
            if conn.phase == IDLE and age > self.keepalive_timeout:
                conn.close()
            elif conn.phase == READING and age > self.request_timeout:
                log.warning("front: %r: request not complete within %gs", conn,
                            self.request_timeout)
                conn._refuse(408, f"the request did not arrive within {self.request_timeout:g}s")
            elif conn.outbox and now - conn.last_sent > self.send_stall:
                log.warning("front: %r reads nothing of its answer: closed", conn)
                conn.close()
            elif conn.phase == ANSWERING or conn.phase == WAITING and conn.task is not None:
                upstream = getattr(conn.task, "upstream", None)
                if upstream is None:
                    continue
                if now - upstream.last_io > self.upstream_idle:
                    upstream.timed_out(f"no data for {self.upstream_idle:g}s")
                elif age > self.answer_limit:
                    upstream.timed_out(f"answer still running after {self.answer_limit:g}s")
        if self.conns:
            self.reactor.call_later(self.sweep, self._sweep)
        else:
            self._sweeping = False

    def stop_listening(self) -> None:
        if self.sock is not None:
            self.reactor.forget(self.sock)
            self.sock.close()
            self.sock = None

    def close(self) -> None:
        self.stop_listening()
        for conn in list(self.conns):
            conn.outbox.flush()
            conn.close()
