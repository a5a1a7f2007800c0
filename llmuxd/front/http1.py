"""HTTP/1.1's rules for the front's answers, apart from the I/O: the request record the
parser fills, and the head of an answer with its framing and keep-alive decision.

h11 applied these rules for us until the front parsed requests with httptools
(server.py says why); these are the ones the front needs, and only those: an
answer has a Content-Length, else it is chunked (HTTP/1.1) or ends with the close
(HTTP/1.0); HEAD, 1xx, 204 and 304 carry no body; Connection and
Transfer-Encoding are ours to say; a header that could split the head (CR, LF,
NUL, a name that is no token) is never repeated, whoever wrote it.
"""

from __future__ import annotations

import re
from http import HTTPStatus

STATUS_LINES = {s.value: b"HTTP/1.1 %d %s\r\n" % (s.value, s.phrase.encode()) for s in HTTPStatus}
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"
_BAD_VALUE = re.compile(rb"[\x00\r\n]")
_BAD_NAME = re.compile(rb"[^!#$%&'*+\-.^_`|~0-9A-Za-z]")


class Request:
    """One parsed request: method and target as sent, headers with lower-case names."""
    __slots__ = ("method", "target", "headers", "http_version", "keep_alive")

    def __init__(self) -> None:
        self.method = b""
        self.target = b""
        self.headers: list[tuple[bytes, bytes]] = []
        self.http_version = "1.1"
        self.keep_alive = True


class Refusal(Exception):
    """A request the front will not read on: its status and one-line reason."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status = status


class BadHeader(ValueError):
    pass


def response_head(status: int, headers, request: Request | None, keep: bool):
    """(head bytes, chunked, body length or -1 for "until the close", keep-alive) of an
    answer to `request` (None: to a request never parsed). headers: (name, value)
    as str or bytes. Raises BadHeader for one that must not be sent."""
    length = None
    lines = [STATUS_LINES.get(status) or b"HTTP/1.1 %d \r\n" % status]
    for name, value in headers:
        name = name if isinstance(name, bytes) else name.encode("latin-1")
        value = value if isinstance(value, bytes) else value.encode("latin-1")
        lname = name.lower()
        if lname == b"content-length":
            if not value.isdigit():
                raise BadHeader(f"Content-Length {value[:40]!r}")
            length = int(value)
        elif lname == b"connection":
            keep = keep and b"close" not in value.lower()
            continue  # ours to say, below
        elif lname == b"transfer-encoding":
            continue  # ours to choose, below
        if _BAD_NAME.search(name) or _BAD_VALUE.search(value):
            raise BadHeader(f"header {name[:80]!r}")
        lines.append(b"%s: %s\r\n" % (name, value))
    chunked = False
    if request is None:
        keep = False
    if status < 200 or status in (204, 304):
        left = 0
    elif length is not None:
        left = length
    elif request is not None and request.http_version == "1.1":
        chunked, left = True, -1
        lines.append(b"Transfer-Encoding: chunked\r\n")
    else:
        keep, left = False, -1  # HTTP/1.0 and no length: the close ends the body
    if request is not None and request.method == b"HEAD":
        left, chunked = 0, False  # the head describes a body never sent
    if not keep:
        lines.append(b"Connection: close\r\n")
    lines.append(b"\r\n")
    return b"".join(lines), chunked, left, keep
