"""Where each key of a TOML text is: tomlkit keeps no line numbers, and every catalog
error names FILE:LINE, so this small scanner maps key paths and table headers to the
line that defines them (and notes lines that define one a second time)."""
from __future__ import annotations

import re

BARE_KEY = re.compile(r"[A-Za-z0-9_-]+")
_BASIC_KEY = re.compile(r'"((?:[^"\\]|\\.)*)"')
_LITERAL = re.compile(r"'([^']*)'")


def _parse_key(text: str, i: int) -> tuple[list[str], int] | None:
    """Parse a (dotted, possibly quoted) key at text[i:]; return (parts, end) or None."""
    parts: list[str] = []
    while True:
        while i < len(text) and text[i] in " \t":
            i += 1
        quote = text[i:i + 1]
        m = {'"': _BASIC_KEY, "'": _LITERAL}.get(quote, BARE_KEY).match(text, i)
        if m is None:
            return None
        part = m.group(m.re.groups)  # the quoted text, or the whole bare key
        parts.append(re.sub(r"\\(.)", r"\1", part) if quote == '"' else part)
        i = m.end()
        while i < len(text) and text[i] in " \t":
            i += 1
        if text[i:i + 1] != ".":
            return parts, i
        i += 1


def _scan_value(text: str, i: int, depth: int, ml: str | None) -> tuple[int, str | None]:
    """Advance over a value, tracking bracket depth and open multi-line strings."""
    while i < len(text):
        if ml is not None:
            end = text.find(ml, i)
            if end < 0:
                return depth, ml
            i, ml = end + 3, None
            continue
        c = text[i]
        if c == "#":
            break
        if text.startswith(('"""', "'''"), i):
            ml, i = text[i:i + 3], i + 3
        elif c in "\"'":
            m = (_BASIC_KEY if c == '"' else _LITERAL).match(text, i)
            i = m.end() if m else len(text)
        else:
            depth += (c in "[{") - (c in "]}")
            i += 1
    return depth, ml


def locate_keys(text: str, repeats: list[int] | None = None) -> dict[tuple[str, ...], int]:
    """Map every key path and table header in TOML text to its first line (1-based).

    Lines that define a key or [table] a second time are appended to repeats.
    """
    lines: dict[tuple[str, ...], int] = {}
    defined: set[tuple[str, ...]] = set()
    table: tuple[str, ...] = ()
    depth, ml = 0, None

    def record(path: tuple[str, ...], lineno: int, again: bool = True) -> None:
        if path in defined and again and repeats is not None:
            repeats.append(lineno)
        defined.add(path)
        for n in range(1, len(path) + 1):
            lines.setdefault(path[:n], lineno)

    for lineno, line in enumerate(text.split("\n"), 1):
        if ml is not None or depth > 0:
            depth, ml = _scan_value(line, 0, depth, ml)
            continue
        stripped = line.lstrip()
        start = len(line) - len(stripped)
        if stripped.startswith("["):
            double = stripped.startswith("[[")
            parsed = _parse_key(line, start + (2 if double else 1))
            if parsed is not None:
                table = tuple(parsed[0])
                record(table, lineno, again=not double)
            continue
        parsed = _parse_key(line, start) if stripped and stripped[0] != "#" else None
        if parsed is not None and line[parsed[1]:parsed[1] + 1] == "=":
            record(table + tuple(parsed[0]), lineno)
            depth, ml = _scan_value(line, parsed[1] + 1, 0, None)
    return lines
