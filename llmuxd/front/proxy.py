"""One request forwarded to a model's server, its answer streamed back to the client.

The model's side is parsed by httptools (llhttp, uvicorn's parser: C), as the
client's side is in server.py: h11 in pure Python cost ~200 us of the loop per
proxied request on these cores, more than everything else the front does for
it. The request is serialized here: every byte of it was already validated by
llhttp on the client's side, or is ours.

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

import httptools

log = logging.getLogger(__name__)

RECV = 65536
# Headers that describe one connection, not the message (RFC 9110 7.6.1), and
# those the front sets itself.
HOP_BY_HOP = frozenset({b"connection", b"keep-alive", b"proxy-connection", b"transfer-encoding",
                        b"te", b"trailer", b"upgrade", b"proxy-authorization",
                        b"proxy-authenticate", b"host", b"content-length", b"expect"})


def request_headers(headers, host: str, port: int, body: bytes, strip_auth: bool) -> list:
    """(name, value) bytes for the model's server; `headers` as server.py parsed them
    (lower-case names). No "Connection: close": HTTP/1.1 keeps it, for the pool."""
    out = [(b"host", f"{host}:{port}".encode()), (b"content-length", b"%d" % len(body))]
    for name, value in headers:
        if name in HOP_BY_HOP or strip_auth and name == b"authorization":
            continue  # our API key is ours: vLLM may have its own --api-key
        out.append((name, value))
    return out


def request_bytes(method: bytes, target: bytes, headers, body: bytes) -> bytes:
    return b"".join([method, b" ", target, b" HTTP/1.1\r\n",
                     *[b"%s: %s\r\n" % h for h in headers], b"\r\n", body])


def response_headers(headers) -> list:
    # Content-Length passes: server.py frames the body by it; without one, it chunks it.
    return [(n, v) for n, v in headers if n not in HOP_BY_HOP or n == b"content-length"]


class Upstream:
    """Drives one upstream exchange; `client` is the front's connection (server.Conn).
    With a `pool`, the connection comes from and goes back to `model`'s idle ones."""

    def __init__(self, reactor, host: str, port: int, method, target, headers,
                 body: bytes, client, done: Callable[[], None], pool=None,
                 model: str | None = None, refused: Callable[[], None] | None = None) -> None:
        self.reactor = reactor
        self.client = client
        self._done = done
        self._refused = refused       # the connect was refused: the request never left
        self._pool, self._model, self._addr = pool, model, (host, port)
        method = _b(method)
        # The parser cannot know that an answer to HEAD has no body: it ends at the head.
        self._head_only = method == b"HEAD"
        self._request = request_bytes(method, _b(target), [(_b(n), _b(v)) for n, v in headers],
                                      body)
        self.finished = False
        self.started = False          # response headers went to the client
        self.streaming_events = False
        self.last_io = time.monotonic()
        self._paused = False
        pooled = pool.take(model, self._addr) if pool is not None else None
        if pooled is not None:
            self.reused, self._connecting = True, False
            self.sock = pooled.sock
            self._begin()
            self._on_writable()
        else:
            self._connect()

    def _begin(self) -> None:
        self._out = bytearray(self._request)
        self._writing = False         # a writer is registered with the reactor
        self._got = False             # any byte of the answer yet
        self._parser = httptools.HttpResponseParser(self)
        self._headers: list = []
        self._parts: list[bytes] = []  # body bytes of the recv being parsed
        self._status = 0
        self._complete = False
        self._extra = False
        self._keep_alive = False
        self._framed = True           # Content-Length or chunked; else the close ends it
        self._head = None             # (status, headers) held for the first body bytes

    def _connect(self) -> None:
        self.reused = False
        self._connecting = True
        self._begin()
        host, port = self._addr
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self.sock = socket.socket(family, socket.SOCK_STREAM)
        self.sock.setblocking(False)
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        err = self.sock.connect_ex((host, port))
        if err == 0:
            self._on_writable()
        elif err == errno.EINPROGRESS:
            self._writing = True
            self.reactor.add_writer(self.sock, self._on_writable)
        else:
            self.reactor.call_later(0, lambda: self._fail(f"connection failed: {os.strerror(err)}",
                                                          refused=True))

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
                self._fail(f"connection failed: {os.strerror(err)}", refused=True)
                return
            self._connecting = False
        try:
            sent = self.sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError as exc:
            if not self._retry_fresh():
                self._fail(f"send failed: {exc.strerror}")
            return
        self.last_io = time.monotonic()
        del self._out[:sent]
        if self._out:
            self._writing = True
            self.reactor.add_writer(self.sock, self._on_writable)
            return
        # The common case, all in one send, never registered a writer; else it goes now.
        if self._writing:
            self._writing = False
            self.reactor.remove_writer(self.sock)
        self.reactor.add_reader(self.sock, self._on_readable)

    # -- httptools' callbacks, during feed_data -----------------------------------
    def on_message_begin(self) -> None:
        if self._complete:
            self._extra = True  # bytes after the answer: this connection is not reused

    def on_header(self, name: bytes, value: bytes) -> None:
        self._headers.append((name.lower(), value))

    def on_headers_complete(self) -> None:
        if self._extra:
            return
        status = self._parser.get_status_code()
        headers, self._headers = self._headers, []
        if status < 200:
            return  # 100 Continue and the like: not for the client
        fields = dict(headers)
        self._status = status
        self.streaming_events = fields.get(b"content-type", b"").startswith(b"text/event-stream")
        self._framed = b"content-length" in fields or b"transfer-encoding" in fields
        head = (status, response_headers(headers))
        if self._head_only:
            self._complete = True  # the parser cannot know that an answer to HEAD has no body
        if b"content-length" in fields and fields[b"content-length"] != b"0" \
                and not self._head_only:
            # A head with a body to come is of no use alone: it leaves with the first
            # bytes of the body (vLLM writes them separately), and should the model
            # die in between, the client still gets a clean 502.
            self._head = head
        else:
            self._send_head(head)

    def _send_head(self, head) -> None:
        self._head = None
        self.started = True
        self.client.start_response(*head)

    def on_body(self, body: bytes) -> None:
        if not self._extra:
            self._parts.append(body)

    def on_message_complete(self) -> None:
        if self._status and not self._extra:
            self._complete = True
            self._keep_alive = self._parser.should_keep_alive()  # only valid in here

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
        client = self.client
        client.cork()  # every byte of this recv leaves in one send
        try:
            if data:
                self._parser.feed_data(data)
        except httptools.HttpParserError as exc:
            self._flush_parts()
            client.uncork()
            self._fail(f"malformed response: {exc}")
            return
        if self._complete or not data and self.started and not self._framed:
            self._flush_parts()
            keep = self._complete and bool(data) and self._keep_alive and not self._head_only \
                and not self._extra
            self._finish(keep=keep)
            client.end_response()
            return
        if not data:
            self._flush_parts()
            client.uncork()
            self._fail("the model's server closed the connection mid-response")
            return
        self._flush_parts()
        client.uncork()
        if client.congested() and not self._paused:
            self._paused = True  # the client reads slower than vLLM writes: let TCP push back
            self.reactor.remove_reader(self.sock)
            client.on_drained = self._resume

    def _flush_parts(self) -> None:
        parts, self._parts = self._parts, []
        if self._head is not None and (parts or self._complete):
            self._send_head(self._head)
        if parts:
            self.client.send_data(parts[0] if len(parts) == 1 else b"".join(parts))

    def _resume(self) -> None:
        if self._paused and not self.finished:
            self._paused = False
            self.reactor.add_reader(self.sock, self._on_readable)

    # -- endings ------------------------------------------------------------------
    def _fail(self, reason: str, refused: bool = False) -> None:
        if self.finished:
            return
        self._finish()
        if refused and self._refused is not None:
            self._refused()  # nothing reached the model: the front may send it again
            return
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
                and self._pool.give(self._model, self._addr, self.sock)):
            self.reactor.forget(self.sock)
            self.sock.close()
        self._done()

    def cancel(self) -> None:
        """The client went away: closing the socket is how vLLM learns to abort."""
        if not self.finished:
            self._finish()

    def timed_out(self, what: str) -> None:
        self._fail(what)


def _b(x) -> bytes:
    return x if isinstance(x, bytes) else x.encode("latin-1")
