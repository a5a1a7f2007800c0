"""The control socket's wire format, shared by llmuxd and llmuxctl.

NDJSON over a Unix stream socket: each request is one JSON object on one line,
`{"cmd": "swap", "model": "qwen"}`; each reply is zero or more event lines
(`{"event": "progress", ...}`) followed by one final line with `"ok": true|false`
and `"error"` when false. `json.dumps` never emits a raw newline, so framing by
line is safe. This module imports nothing from llmuxd, so the client stays cheap.
"""

from __future__ import annotations

import json

PROTOCOL_VERSION = 1
MAX_LINE = 64 * 1024  # a request longer than this is refused, never buffered
DEFAULT_SOCKET = "/run/llmux/llmux.sock"

# Commands that change which model holds the GPU (or the catalog). Everything
# else is read-only.
MUTATING = frozenset({"swap", "sleep", "stop", "reload", "restart", "shutdown"})
READ_ONLY = frozenset({"status", "logs", "ping", "doctor"})
COMMANDS = MUTATING | READ_ONLY


class ProtocolError(ValueError):
    """A request that is not a JSON object with a known `cmd`."""


def encode(obj: dict) -> bytes:
    return json.dumps(obj, separators=(",", ":"), default=str).encode() + b"\n"


def decode_request(line: bytes) -> dict:
    """Parse one request line; raise ProtocolError with a one-line reason."""
    try:
        obj = json.loads(line)
    except (UnicodeDecodeError, ValueError) as exc:
        raise ProtocolError(f"bad request: not JSON ({exc.__class__.__name__})") from None
    if not isinstance(obj, dict):
        raise ProtocolError("bad request: expected a JSON object")
    cmd = obj.get("cmd")
    if not isinstance(cmd, str):
        raise ProtocolError("bad request: missing \"cmd\"")
    if cmd not in COMMANDS:
        raise ProtocolError(f"unknown command {cmd!r} (known: {', '.join(sorted(COMMANDS))})")
    return obj


class LineBuffer:
    """Accumulates bytes and yields complete lines; refuses over-long lines."""

    def __init__(self, limit: int = MAX_LINE) -> None:
        self._buf = bytearray()
        self._limit = limit

    def feed(self, data: bytes) -> list[bytes]:
        self._buf += data
        lines = []
        while True:
            nl = self._buf.find(b"\n")
            if nl < 0:
                break
            if nl > self._limit:  # a line that arrived whole in one read is still too long
                raise ProtocolError(f"request line longer than {self._limit} bytes")
            lines.append(bytes(self._buf[:nl]))
            del self._buf[: nl + 1]
        if len(self._buf) > self._limit:
            raise ProtocolError(f"request line longer than {self._limit} bytes")
        return [ln for ln in lines if ln.strip()]

    def pending(self) -> bool:
        return bool(self._buf)
