"""The front's HTTP/1.1 server: listening, one h11 connection per client, limits.

Runs on llmuxd's one selector loop and never blocks it: sockets are
non-blocking, replies are queued on the connection and written as the socket
allows. Every client is hostile (llmuxd is root): headers, bodies, the number
of connections, a request's arrival time (slowloris), idle keep-alives, a
client that never reads its answer: all bounded. A complete request (headers
and body) goes to `on_request(conn)`; what it means is the front's business.
"""

from __future__ import annotations

import logging
import socket
from http import HTTPStatus
import time
from typing import Callable

import h11

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

_REASONS = {s.value: s.phrase.encode() for s in HTTPStatus}
IDLE, READING, WAITING, ANSWERING = "idle", "reading", "waiting", "answering"


class Conn:
    def __init__(self, server: "FrontServer", sock: socket.socket, peer) -> None:
        self.server = server
        self.sock = sock
        self.peer = peer
        self.h11 = h11.Connection(h11.SERVER, max_incomplete_event_size=MAX_HEADERS)
        self.phase = IDLE
        self.since = time.monotonic()     # when the phase began
        self.last_sent = self.since       # last time the client took bytes
        self.request: h11.Request | None = None
        self.body = bytearray()
        self.out = bytearray()
        self.stash = bytearray()          # read while a request is being answered
        self.closed = False
        self.close_when_flushed = False
        self._corked = False
        self.on_drained: Callable[[], None] | None = None
        self.task = None                  # the front's handle for the request in progress

    def __repr__(self) -> str:
        target = self.request.target.decode("latin-1")[:80] if self.request else "-"
        return f"<front client {self.peer[0]}:{self.peer[1]} {target}>"

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
        try:
            self.h11.receive_data(data)
            self._events()
        except h11.RemoteProtocolError as exc:
            self._refuse(exc.error_status_hint, f"malformed request: {exc}")

    def _events(self) -> None:
        while self.phase == READING and not self.closed:
            event = self.h11.next_event()
            if event is h11.NEED_DATA or event is h11.PAUSED:
                return
            if isinstance(event, h11.Request):
                self.request, self.body = event, bytearray()
                # h11 bounds only an incomplete head; one that arrived whole is checked here.
                if len(event.target) + sum(len(n) + len(v) + 4 for n, v in event.headers) \
                        > MAX_HEADERS:
                    self._refuse(431, f"the request head is over {MAX_HEADERS} bytes")
                    return
                length = dict(event.headers).get(b"content-length")
                if length is not None and int(length) > MAX_BODY:
                    self._refuse(413, f"the body is over {MAX_BODY} bytes")
                    return
                if self.h11.they_are_waiting_for_100_continue:
                    self._write(self.h11.send(h11.InformationalResponse(status_code=100,
                                                                         headers=[])))
            elif isinstance(event, h11.Data):
                self.body += event.data
                if len(self.body) > MAX_BODY:
                    self._refuse(413, f"the body is over {MAX_BODY} bytes")
                    return
            elif isinstance(event, h11.EndOfMessage):
                self._set_phase(WAITING)
                self.server.on_request(self)
            elif isinstance(event, h11.ConnectionClosed):
                self.close()

    def _refuse(self, status: int, message: str) -> None:
        """An answer to a request we will not read on: send it, then close."""
        if self.h11.our_state in (h11.IDLE, h11.SEND_RESPONSE):
            self.close_when_flushed = True
            self.reply(error(status, message), closing=True)
        else:
            self.close()

    # -- answering ----------------------------------------------------------------
    def reply(self, reply: Reply, closing: bool = False) -> None:
        headers = list(reply.headers) + [("Content-Length", str(len(reply.body)))]
        if closing:
            headers.append(("Connection", "close"))
        self._corked = True  # head and body in one send
        self.start_response(reply.status, headers)
        if self.request is None or self.request.method != b"HEAD":
            self.send_data(reply.body)
        self._corked = False
        self.end_response()

    def reply_error(self, status: int, message: str, retry_after: float | None = None) -> None:
        self.reply(error(status, message, retry_after))

    def start_response(self, status: int, headers) -> None:
        if self.closed:
            return
        self._set_phase(ANSWERING)
        try:
            self._write(self.h11.send(h11.Response(status_code=status, headers=headers,
                                                   reason=_REASONS.get(status, b""))))
        except h11.LocalProtocolError as exc:  # a header vLLM sent that h11 will not repeat
            log.warning("%r: cannot send the response: %s", self, exc)
            self.abort()

    def send_data(self, data: bytes) -> None:
        if not self.closed and data:
            self._write(self.h11.send(h11.Data(data=data)))

    def cork(self) -> None:
        """Hold what is written until uncork() or end_response(): one send, not several."""
        self._corked = True

    def uncork(self) -> None:
        if self._corked:
            self._corked = False
            if self.out and not self.closed:
                self._flush()

    def end_response(self) -> None:
        if self.closed:
            return
        self.task = None
        self._corked = False
        self._write(self.h11.send(h11.EndOfMessage()))
        if self.out and not self.closed:
            self._flush()
        if self.h11.our_state is h11.MUST_CLOSE or self.h11.their_state is not h11.DONE:
            self.close_when_flushed = True  # h11 knows when keep-alive is over
            self._flush()
            return
        self.h11.start_next_cycle()
        self.request = None
        self._set_phase(IDLE)
        if self.stash:
            data, self.stash = bytes(self.stash), bytearray()
            self.server.reactor.add_reader(self.sock, self.on_readable)
            self._feed(data)

    def abort(self) -> None:
        self.close()

    def congested(self) -> bool:
        return len(self.out) > HIGH_WATER

    # -- writing ------------------------------------------------------------------
    def _write(self, data: bytes) -> None:
        if self.closed or not data:  # None, or the empty end of a Content-Length body
            return
        if not self.out and not self._corked:  # the common case: straight out, no copy
            try:
                sent = self.sock.send(data)
            except (BlockingIOError, InterruptedError):
                sent = 0
            except OSError:
                self.close()
                return
            if sent:
                self.last_sent = time.monotonic()
            if sent == len(data):
                return
            self.out += memoryview(data)[sent:]
            self.server.reactor.add_writer(self.sock, self._flush)
            return
        self.out += data

    def _flush(self) -> None:
        while self.out and not self.closed:
            try:
                sent = self.sock.send(self.out)
            except (BlockingIOError, InterruptedError):
                self.server.reactor.add_writer(self.sock, self._flush)
                return
            except OSError:
                self.close()
                return
            self.last_sent = time.monotonic()
            del self.out[:sent]
            if len(self.out) < LOW_WATER and self.on_drained is not None:
                resume, self.on_drained = self.on_drained, None
                resume()
        if self.closed:
            return
        self.server.reactor.remove_writer(self.sock)
        if self.close_when_flushed:
            self.close()

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
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
            elif conn.out and now - conn.last_sent > self.send_stall:
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
            conn._flush()
            conn.close()
