"""cProfile evidence for missed goals: read the stats file llmuxd wrote and summarise it.

A row whose goal is missed reruns its scenario with llmuxd started as
`python -m cProfile -o FILE -m llmuxd --config C` (harness.Daemon(profile=FILE));
cProfile writes FILE when llmuxd exits after SIGTERM. Only the main thread is
profiled (the loop, where all daemon work happens); the catalog watcher thread
is not. `top_cumulative` is the table printed under the row; `hotspots` picks
the llmuxd functions that dominate once the loop's own scaffolding (the select
call, run_once, the click entry point) is set aside, for the one-line explanation.
"""

from __future__ import annotations

import os
import pstats
import sys
from pathlib import Path

from .harness import REPO

# Entry-point wrappers and the loop's wait: they contain everything or only wait.
WRAPPERS = {("runpy", None), ("click", None), ("cli.py", "main"), ("__main__.py", "<module>"),
            ("<string>", "<module>"), ("~", "<built-in method builtins.exec>"),
            ("daemon.py", "run"), ("loop.py", "run_once"), ("loop.py", "_safely"),
            ("selectors.py", "select"), ("~", "<method 'poll' of 'select.epoll' objects>"),
            ("cProfile", None), ("profile", None),
            # start-up imports: real, but not part of any scenario
            ("importlib._bootstrap", None), ("importlib._bootstrap_external", None),
            ("~", "<built-in method builtins.__import__>"), ("~", "<built-in method builtins.compile>"),
            ("~", "<built-in method _imp.create_dynamic>"), ("~", "<built-in method marshal.loads>"),
            ("~", "<built-in method builtins.__build_class__>"), ("dataclasses", None), ("re", None),
            ("enum", None), ("typing", None)}
# Dispatch frames: every job or request passes through them; not findings either.
DISPATCH = {("runner.py", "_step"), ("runner.py", "_resume"), ("runner.py", "start"),
            ("runner.py", "<lambda>"), ("daemon.py", "start_job"), ("commands.py", "handle"),
            ("control.py", "on_readable"), ("control.py", "_accept"), ("http.py", "<lambda>"),
            ("loop.py", "_drain_wakeups"), ("daemon.py", "_on_signal")}


def _matches(func: tuple, patterns: set) -> bool:
    filename, _line, name = func
    base = os.path.basename(filename) if filename != "~" else "~"
    for pat_file, pat_name in patterns:
        if pat_name is None:
            if pat_file in filename.split(os.sep) or base in (pat_file, pat_file + ".py") \
                    or filename == f"<frozen {pat_file}>":
                return True
        elif base == pat_file and name == pat_name:
            return True
    return False


def short(func: tuple) -> str:
    filename, line, name = func
    if filename == "~":
        return name
    for prefix in (str(REPO) + os.sep, *[p + os.sep for p in sys.path if p.endswith("-packages")]):
        if filename.startswith(prefix):
            filename = filename[len(prefix):]
            break
    else:
        filename = os.path.basename(filename)
    return f"{filename}:{line}({name})"


def load(path: Path) -> pstats.Stats | None:
    try:
        return pstats.Stats(str(path))
    except (OSError, TypeError, EOFError):
        return None


def top_cumulative(path: Path, n: int = 10) -> str:
    """The top `n` entries by cumulative time, one line each, without the entry-point
    wrappers and the loop's select() wait (which contain everything or only wait)."""
    stats = load(path)
    if stats is None:
        return f"(no profile written to {path})"
    entries = [kv for kv in sorted(stats.stats.items(), key=lambda kv: kv[1][3], reverse=True)
               if not _matches(kv[0], WRAPPERS) and kv[0][2] != "<module>"][:n]
    lines = [f"{'cumulative':>11} {'own':>9} {'calls':>8}  function"]
    for func, (cc, nc, tt, ct, callers) in entries:
        lines.append(f"{ct * 1000:9.1f}ms {tt * 1000:7.1f}ms {nc:8d}  {short(func)}")
    waited = sum(v[2] for f, v in stats.stats.items() if "poll" in f[2] or "select" in f[2])
    total = sum(v[2] for v in stats.stats.values())
    lines.append(f"(main thread, wall clock: {total * 1000:.0f} ms profiled, {waited * 1000:.0f} ms "
                 "of it waiting in select/epoll; entry-point wrappers and start-up imports omitted)")
    return "\n".join(lines)


def hotspots(path: Path, n: int = 3) -> list[tuple[str, float, float, int]]:
    """(function, cumulative s, own s, calls) of the heaviest llmuxd functions that are
    neither wrappers nor dispatch frames."""
    stats = load(path)
    if stats is None:
        return []
    found = []
    for func, (cc, nc, tt, ct, callers) in sorted(stats.stats.items(), key=lambda kv: kv[1][3],
                                                   reverse=True):
        if _matches(func, WRAPPERS | DISPATCH) or func[2] == "<module>":
            continue
        name = short(func)
        if not name.startswith(("llmuxd/", "llmuxctl/")):
            continue
        found.append((name, ct, tt, nc))
        if len(found) >= n:
            break
    return found


def own_time_top(path: Path, n: int = 3) -> list[tuple[str, float, int]]:
    """(function, own s, calls) of the functions with the most own time, the wait excluded."""
    stats = load(path)
    if stats is None:
        return []
    rows = [(short(f), v[2], v[1]) for f, v in stats.stats.items()
            if not _matches(f, WRAPPERS) and "poll" not in f[2] and "waitpid" not in f[2]]
    return sorted(rows, key=lambda r: r[1], reverse=True)[:n]


def describe(path: Path, per: int = 1, what: str = "") -> str:
    """One sentence naming the dominant llmuxd functions (per `per` operations)."""
    spots = hotspots(path)
    own = own_time_top(path)
    if not spots and not own:
        return "no profile data"
    unit = f"/{what}" if what else ""
    parts = [f"{name} {ct * 1000 / per:.2f} ms{unit} ({calls / per:.3g} calls{unit})"
             for name, ct, tt, calls in spots]
    own_parts = [f"{name} {tt * 1000 / per:.2f} ms{unit}" for name, tt, calls in own]
    return ("heaviest llmuxd functions (cumulative): " + "; ".join(parts)
            + ". Most own time: " + "; ".join(own_parts))


def calls(path: Path, needle: str) -> int:
    """How many calls the profile counted for functions whose short name contains `needle`."""
    stats = load(path)
    if stats is None:
        return 0
    return sum(v[1] for f, v in stats.stats.items() if needle in short(f))
