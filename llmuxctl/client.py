"""A blocking client of llmuxd's control socket: one request, a stream of replies."""

from __future__ import annotations

import errno
import json
import socket
from typing import Iterator

from llmuxd.protocol import encode


class Unreachable(Exception):
    """The daemon is not running or the socket cannot be used."""


def request(path: str, obj: dict, timeout: float | None = 30.0) -> Iterator[dict]:
    """Send one request; yield every reply line (events, then the final one)."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError as exc:
        sock.close()
        if exc.errno in (errno.ENOENT, errno.ECONNREFUSED, errno.ENOTSOCK):
            raise Unreachable(f"cannot reach llmuxd at {path}: {exc.strerror}") from None
        if exc.errno == errno.EACCES:
            raise Unreachable(f"cannot reach llmuxd at {path}: permission denied") from None
        raise Unreachable(f"cannot reach llmuxd at {path}: {exc}") from None
    try:
        sock.sendall(encode(obj))
        buf = b""
        while True:
            try:
                data = sock.recv(65536)
            except socket.timeout:
                raise Unreachable(f"llmuxd at {path} did not answer within {timeout:g}s") from None
            if not data:
                raise Unreachable(f"llmuxd at {path} closed the connection")
            buf += data
            while b"\n" in buf:
                line, buf = buf.split(b"\n", 1)
                if not line.strip():
                    continue
                reply = json.loads(line)
                yield reply
                if "ok" in reply:
                    return
    finally:
        sock.close()
