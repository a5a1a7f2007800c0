"""One request forwarded to a model's server, its answer streamed back to the client.

The request goes out on a keep-alive connection of its model from the pool
(pool.py) or on a fresh one; a clean end gives the connection back. A client
that goes away closes exactly its request's connection, never pooled, and vLLM
aborts that request when it sees the close. The response is passed on as it
arrives: every event vLLM wrote leaves with the recv that brought it, and all
the events of one recv leave in one send. Backpressure: while the client's send
buffer is over its high-water mark, the upstream socket is not read, so TCP
slows vLLM's writes and nothing grows without bound. No byte of the answer is
buffered here beyond one recv.
"""

from __future__ import annotations

import errno
import json
import logging
import os
import socket
import time
from typing import Callable

import h11

log = logging.getLogger(__name__)

RECV = 65536
# Headers that describe one connection, not the message (RFC 9110 7.6.1), and
# those the front sets itself.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                        b"te", b"trailer", b"upgrade", b"proxy-authorization",
                        b"proxy-authenticate", b"host", b"content-length", b"expect"})


def request_headers(headers, host: str, port: int, body: bytes, strip_auth: bool) -> list:
    # No "Connection: close": HTTP/1.1 keeps the connection, for the pool.
    out = [("Host", f"{host}:{port}"), ("Content-Length", str(len(body)))]
    for name, value in headers:
        if name in HOP_BY_HOP or strip_auth and name == b"authorization":
            continue  # our API key is ours: vLLM may have its own --api-key
        out.append((name, value))
    return out


def response_headers(headers) -> list:
    # Content-Length passes: h11 frames the body by it; without one, h11 chunks it.
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP or n == b"content-length"]


class Upstream:
    """Drives one upstream exchange; `client` is the front's connection (server.Conn).
    With a `pool`, the connection comes from and goes back to `model`'s idle ones."""

    def __init__(self, reactor, host: str, port: int, method: str, target: str, headers,
                 body: bytes, client, done: Callable[[], None], pool=None,
                 model: str | None = None) -> None:
        self.reactor = reactor
        self.client = client
        self._done = done
        self._pool, self._model, self._addr = pool, model, (host, port)
        self._request = h11.Request(method=method, target=target, headers=headers)
        self._body = body
        self.finished = False
        self.started = False          # response headers went to the client
        self.streaming_events = False
        self.last_io = time.monotonic()
        self._paused = False
        pooled = pool.take(model, self._addr) if pool is not None else None
        if pooled is not None:
            self.reused = True
            self.sock, self._conn = pooled.sock, pooled.h11
            self._connecting = False
            self._serialize()
            self._on_writable()
        else:
            self._connect()

    def _serialize(self) -> None:
        c = self._conn
        self._out = bytearray(c.send(self._request) + c.send(h11.Data(data=self._body))
                              + c.send(h11.EndOfMessage()))
        self._got = False             # any byte of the answer yet

    def _connect(self) -> None:
        self.reused = False
        self._conn = h11.Connection(h11.CLIENT)
        self._serialize()
        host, port = self._addr
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self._connecting = True
        err = self.sock.connect_ex((host, port))
        if err == 0:
            self._on_writable()
        elif err == errno.EINPROGRESS:
            self.reactor.add_writer(self.sock, self._on_writable)
        else:
            self.reactor.call_later(0, lambda: self._fail(f"connection failed: {os.strerror(err)}"))

    def _retry_fresh(self) -> bool:
        """A pooled connection the server closed as we sent (its idle timeout): the
        request never reached it, so it goes again once, on a new connection."""
        if not self.reused or self._got or self.finished:
            return False
        log.debug("upstream %s: reused connection was closed; retrying on a new one", self.client)
        self.reactor.forget(self.sock)
        self.sock.close()
        self._connect()
        return True

    # -- sending the request ----------------------------------------------------
    def _on_writable(self) -> None:
        if self.finished:
            return
        if self._connecting:
            err = self.sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
            if err:
                self._fail(f"connection failed: {os.strerror(err)}")
                return
            self._connecting = False
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            self.reactor.add_writer(self.sock, self._on_writable)
            return
        except OSError as exc:
            if not self._retry_fresh():
                self._fail(f"send failed: {exc.strerror}")
            return
        self.last_io = time.monotonic()
        del self._out[:sent]
        if self._out:
            self.reactor.add_writer(self.sock, self._on_writable)
            return
        self.reactor.remove_writer(self.sock)
        self.reactor.add_reader(self.sock, self._on_readable)

    # -- reading the response -----------------------------------------------------
    def _on_readable(self) -> None:
        if self.finished:
            return
        try:
            data = self.sock.recv(RECV)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            if not (exc.errno == errno.ECONNRESET and self._retry_fresh()):
                self._fail(f"receive failed: {exc.strerror}")
            return
        if not data and self._retry_fresh():
            return
        self._got = True
        self.last_io = time.monotonic()
        parts: list[bytes] = []       # the body bytes of this recv: one send to the client
        client = self.client
        try:
            self._conn.receive_data(data)
            while True:
                event = self._conn.next_event()
                if type(event) is h11.Data:
                    parts.append(event.data)
                elif event is h11.NEED_DATA:
                    if not data:
                        raise h11.RemoteProtocolError("the model's server closed the connection "
                                                      "mid-response")
                    break
                elif type(event) is h11.Response:
                    ctype = dict(event.headers).get(b"content-type", b"")
                    self.streaming_events = ctype.startswith(b"text/event-stream")
                    self.started = True
                    client.start_response(event.status_code, response_headers(event.headers))
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    if parts:
                        client.send_data(b"".join(parts))
                    self._finish(keep=type(event) is h11.EndOfMessage)
                    client.end_response()
                    return
                # InformationalResponse (100 Continue): nothing for the client
        except h11.RemoteProtocolError as exc:
            if parts:
                client.send_data(b"".join(parts))
            self._fail(str(exc))
            return
        if parts:
            client.send_data(parts[0] if len(parts) == 1 else b"".join(parts))
        if client.congested() and not self._paused:
            self._paused = True  # the client reads slower than vLLM writes: let TCP push back
            self.reactor.remove_reader(self.sock)
            client.on_drained = self._resume

    def _resume(self) -> None:
        if self._paused and not self.finished:
            self._paused = False
            self.reactor.add_reader(self.sock, self._on_readable)

    # -- endings ------------------------------------------------------------------
    def _fail(self, reason: str) -> None:
        if self.finished:
            return
        self._finish()
        log.warning("upstream %s: %s", self.client, reason)
        message = f"the model's server failed: {reason}"
        if not self.started:
            self.client.reply_error(502, message)
        elif self.streaming_events:
            # An SSE client reads events, not framing: tell it in its own terms.
            event = {"error": {"message": message, "type": "upstream_error", "code": 502}}
            self.client.send_data(b"data: " + json.dumps(event).encode() + b"\n\n")
            self.client.end_response()
        else:
            self.client.abort()  # a truncated body must not look complete

    def _finish(self, keep: bool = False) -> None:
        """keep: the exchange ended cleanly, the pool may have the connection."""
        self.finished = True
        if not (keep and self._pool is not None
                and self._pool.give(self._model, self._addr, self.sock, self._conn)):
            self.reactor.forget(self.sock)
            self.sock.close()
        self._done()

    def cancel(self) -> None:
        """The client went away: closing the socket is how vLLM learns to abort."""
        if not self.finished:
            self._finish()

    def timed_out(self, what: str) -> None:
        self._fail(what)
