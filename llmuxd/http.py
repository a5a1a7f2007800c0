"""HTTP/1.1 calls to vLLM servers on loopback, on non-blocking sockets in the loop.

h11 does the protocol (no hand-written parser); this module only moves bytes
between a socket and an h11.Connection, under a deadline. /sleep can take
minutes, so a call must never block the loop: every call is a small state
machine driven by the reactor, and its result arrives through a callback (on a later
loop pass if it failed before the constructor returned: never re-entrantly).
"""

from __future__ import annotations

import errno
import logging
import os
import socket
from typing import Callable

import h11

from .actions import HttpError, HttpResult

log = logging.getLogger(__name__)

MAX_BODY = 4 * 1024 * 1024  # /metrics of a large server is well below this


class HttpCall:
    def __init__(self, reactor, host: str, port: int, method: str, path: str,
                 body: bytes | None, timeout: float,
                 done: Callable[[HttpResult | HttpError], None]) -> None:
        self._reactor = reactor
        self._done = done
        self._finished = False
        self._starting = True
        self._conn = h11.Connection(h11.CLIENT)
        self._status: int | None = None
        self._body = bytearray()
        headers = [("Host", f"{host}:{port}"), ("Connection", "close"),
                   ("User-Agent", "llmuxd"), ("Content-Length", str(len(body or b"")))]
        if body is not None:
            headers.append(("Content-Type", "application/json"))
        self._out = (self._conn.send(h11.Request(method=method, target=path, headers=headers))
                     + self._conn.send(h11.Data(data=body or b""))
                     + self._conn.send(h11.EndOfMessage()))
        self._what = f"{method} {path}"
        family = socket.AF_INET6 if ":" in host else socket.AF_INET
        self._sock = socket.socket(family, socket.SOCK_STREAM)
        self._sock.setblocking(False)
        self._timer = reactor.call_later(timeout, self._on_timeout)
        self._starting = True
        err = self._sock.connect_ex((host, port))
        if err == 0:  # loopback often connects at once: send now, skip a loop pass
            self._on_writable()
        elif err == errno.EINPROGRESS:
            reactor.add_writer(self._sock, self._on_writable)
        else:
            self._finish(HttpError(f"{self._what}: connection failed: {os.strerror(err)}"))
        self._starting = False

    def _on_writable(self) -> None:
        if self._finished:
            return
        err = self._sock.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR)
        if err:
            self._finish(HttpError(f"{self._what}: connection failed: {os.strerror(err)}"))
            return
        try:
            sent = self._sock.send(self._out)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(HttpError(f"{self._what}: send failed: {exc.strerror}"))
            return
        self._out = self._out[sent:]
        if self._out:
            self._reactor.add_writer(self._sock, self._on_writable)
        else:
            self._reactor.remove_writer(self._sock)
            self._reactor.add_reader(self._sock, self._on_readable)

    def _on_readable(self) -> None:
        try:
            data = self._sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError as exc:
            self._finish(HttpError(f"{self._what}: receive failed: {exc.strerror}"))
            return
        try:
            self._conn.receive_data(data)
            while True:
                event = self._conn.next_event()
                if event is h11.NEED_DATA:
                    if not data:
                        raise h11.RemoteProtocolError("connection closed mid-response")
                    return
                if isinstance(event, h11.Response):
                    self._status = event.status_code
                elif isinstance(event, h11.Data):
                    self._body += event.data
                    if len(self._body) > MAX_BODY:
                        raise h11.RemoteProtocolError("response body too large")
                elif isinstance(event, (h11.EndOfMessage, h11.ConnectionClosed)):
                    if self._status is None:
                        raise h11.RemoteProtocolError("connection closed before a response")
                    self._finish(HttpResult(self._status, bytes(self._body)))
                    return
        except h11.RemoteProtocolError as exc:
            self._finish(HttpError(f"{self._what}: bad response: {exc}"))

    def _on_timeout(self) -> None:
        self._finish(HttpError(f"{self._what}: no answer within the deadline"))

    def _finish(self, result) -> None:
        if self._finished:
            return
        self._finished = True
        self._timer.cancel()
        self._reactor.forget(self._sock)
        self._sock.close()
        if self._starting:  # the caller is still inside our constructor: next pass
            self._reactor.call_later(0, lambda: self._done(result))
        else:
            self._done(result)

    def cancel(self) -> None:
        self._finished = True
        self._timer.cancel()
        self._reactor.forget(self._sock)
        self._sock.close()
