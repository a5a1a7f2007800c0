"""Value converters of the catalog: each takes (value, where) and returns the value in
the form llmuxd uses, or raises ValueError("where: message") for catalog.py to report
with its file and line. Pure functions, no I/O; catalog.py owns which key uses which."""
from __future__ import annotations

import ipaddress
import math
import re
import shlex
from typing import Any

# ---------------------------------------------------------------- durations

_DURATION_RE = re.compile(r"(?:(\d+(?:\.\d+)?)h)?(?:(\d+(?:\.\d+)?)m(?!s))?"
                          r"(?:(\d+(?:\.\d+)?)s)?(?:(\d+(?:\.\d+)?)ms)?")
_DURATION_HELP = 'a number of seconds, or a string like "30s", "5m", "1h30m", "500ms"'


def parse_duration(value: Any, where: str) -> float:
    """Seconds from a number (>= 0) or a unit string ("1m30s"); ValueError otherwise."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        seconds = float(value) if abs(value) < 1e300 else math.inf
    elif isinstance(value, str):
        m = _DURATION_RE.fullmatch(value.strip())
        if not value.strip() or m is None:
            raise ValueError(f"{prefix}invalid duration {value!r} (expected {_DURATION_HELP})")
        h, mi, s, ms = (float(g) if g else 0.0 for g in m.groups())
        seconds = h * 3600 + mi * 60 + s + ms / 1000
    else:
        raise ValueError(f"{prefix}expected a duration ({_DURATION_HELP}), got {type_name(value)}")
    if not math.isfinite(seconds) or seconds < 0:
        raise ValueError(f"{prefix}duration must be a finite number >= 0, got {value!r}")
    return seconds


# ---------------------------------------------------------------- converters

_TYPE_NAMES = {bool: "boolean", int: "integer", str: "string", list: "array", dict: "table"}


def type_name(value: Any) -> str:
    return _TYPE_NAMES.get(type(value), type(value).__name__)


def expect(value: Any, where: str, types: tuple, what: str) -> Any:
    if isinstance(value, bool) and bool not in types or not isinstance(value, types):
        raise ValueError(f"{where}: expected {what}, got {type_name(value)}")
    return value


def string(value: Any, where: str, nonempty: bool = True) -> str:
    expect(value, where, (str,), "a string")
    if nonempty and not value.strip():
        raise ValueError(f"{where}: must not be empty")
    return value


def integer(value: Any, where: str, lo: int = 0, hi: int | None = None) -> int:
    expect(value, where, (int,), "an integer")
    if value < lo or (hi is not None and value > hi):
        bounds = f"between {lo} and {hi}" if hi is not None else f">= {lo}"
        raise ValueError(f"{where}: must be {bounds}, got {value}")
    return value


def positive(value: Any, where: str) -> float:
    seconds = parse_duration(value, where)
    if seconds <= 0:
        raise ValueError(f"{where}: must be greater than 0")
    return seconds


def choice(value: Any, where: str, choices: tuple[str, ...]) -> str:
    text = string(value, where)
    if text not in choices:
        raise ValueError(f"{where}: expected one of {', '.join(map(repr, choices))}, got {text!r}")
    return text


def mode(value: Any, where: str) -> int:
    if isinstance(value, str):
        if not re.fullmatch(r"(0o)?[0-7]{1,4}", value.strip()):
            raise ValueError(f'{where}: expected octal digits like "0660", got {value!r}')
        value = int(value.strip().replace("0o", ""), 8)
    else:
        expect(value, where, (int,), 'an octal mode string like "0660"')
    if not 0 <= value <= 0o777:
        raise ValueError(f"{where}: must be between 0 and 0o777, got {oct(value)}")
    return value


def command(value: Any, where: str) -> tuple[str, ...]:
    if isinstance(value, str):
        try:
            argv = shlex.split(value)
        except ValueError as e:
            raise ValueError(f"{where}: cannot split command: {e}") from None
    else:
        argv = string_list(value, where)
    if not argv or not argv[0]:
        raise ValueError(f"{where}: must name a program (a string or a non-empty list of strings)")
    return tuple(argv)


def principal(value: Any, where: str) -> str:
    """A user or group given by name or number; kept as a string."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    return string(value, where)


def principals(value: Any, where: str) -> tuple[str, ...]:
    expect(value, where, (list,), "an array of names or ids")
    return tuple(principal(item, f"{where}[{i}]") for i, item in enumerate(value))


def listen(value: Any, where: str) -> str:
    """ "HOST:PORT" ("[::1]:8000" for IPv6); "" means no front. Checked here, split later."""
    text = string(value, where, nonempty=False).strip()
    if text:
        split_listen(text, where)
    return text


def is_loopback(host: str) -> bool:
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False  # a name: it may resolve to anything


def metrics_listen(value: Any, where: str) -> str:
    """Loopback only: the metrics port has no API key (the front's /metrics has)."""
    text = listen(value, where)
    if text and not is_loopback(split_listen(text, where)[0]):
        raise ValueError(f"{where}: {text!r} is not a loopback address: this port serves "
                         "metrics without a key; scrape from afar through [daemon.front] "
                         "(GET /metrics, behind its api_keys) or a proxy")
    return text


def split_listen(text: str, where: str = "") -> tuple[str, int]:
    m = re.fullmatch(r"\[([0-9A-Fa-f:.]+)\]:(\d{1,5})|([A-Za-z0-9.-]+):(\d{1,5})", text)
    if m is None:
        raise ValueError(f'{where}: expected "HOST:PORT" (e.g. "127.0.0.1:8000" or '
                         f'"[::1]:8000"), got {text!r}')
    host, port = (m.group(1), m.group(2)) if m.group(1) else (m.group(3), m.group(4))
    if not 1 <= int(port) <= 65535:
        raise ValueError(f"{where}: port must be between 1 and 65535, got {port}")
    return host, int(port)


def api_keys(value: Any, where: str) -> tuple[str, ...]:
    keys = string_list(value, where)
    for i, key in enumerate(keys):
        # A key is compared byte for byte with what follows "Bearer ": no room for blanks.
        if not key or not key.isprintable() or any(c.isspace() for c in key):
            raise ValueError(f"{where}[{i}]: an API key must be non-empty printable text "
                             "without spaces")
    return keys


def aliases(value: Any, where: str) -> tuple[str, ...]:
    names = string_list(value, where)
    for i, name in enumerate(names):
        if not name.strip() or len(name) > 256 or not name.isprintable() or " " in name:
            raise ValueError(f"{where}[{i}]: an alias must be non-empty printable text without "
                             "spaces, at most 256 characters")
    return names


def string_list(value: Any, where: str) -> tuple[str, ...]:
    expect(value, where, (list,), "an array of strings")
    for i, item in enumerate(value):
        expect(item, f"{where}[{i}]", (str,), "a string")
    return tuple(value)


_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")


def env(value: Any, where: str) -> tuple[tuple[str, str], ...]:
    expect(value, where, (dict,), "a table of strings")
    for key, item in value.items():
        if not _ENV_NAME.fullmatch(key):
            raise ValueError(f"{where}: {key!r} is not a valid environment variable name")
        if not isinstance(item, str):
            err = ValueError(f"{where}.{key}: expected a string, got {type_name(item)}")
            err.key = key  # type: ignore[attr-defined]  # lets the caller find its line
            raise err
    return tuple(value.items())


def gpus(value: Any, where: str) -> tuple[int, ...]:
    expect(value, where, (list,), "an array of GPU indexes, such as [0] or [2, 3]")
    if not value:
        raise ValueError(f"{where}: an empty list gives the model no GPU (leave the key out "
                         "for every GPU)")
    for i, item in enumerate(value):
        integer(item, f"{where}[{i}]", lo=0, hi=1023)
    repeated = sorted({g for g in value if value.count(g) > 1})
    if repeated:
        raise ValueError(f"{where}: GPU {repeated[0]} is listed twice")
    return tuple(value)
