"""Plan steps shared by every sleep level: drain, health wait, stop.

Each step is a generator over `actions` operations (see actions.py): it yields
an operation, the loop performs it and sends back the result. Steps raise
StepFailed with the sentence an operator should read. No I/O, no clock.
"""

from __future__ import annotations

import json
import signal
from typing import Generator, Protocol

from . import states as S
from .actions import (CheckExited, CheckPort, Http, HttpResult, InFlight, Io, IoFailed, Now, Pause,
                      Phase, SignalGroup, Spawn, StepFailed, Transition, WaitGone, describe_http)

Plan = Generator[object, object, object]

HEALTH_POLL_FAST = 0.05   # first seconds of a start: notice readiness quickly
HEALTH_POLL_SLOW = 0.5    # after that: a 30-minute start need not poll 20 times a second
DRAIN_POLL = 0.1
KILL_GRACE = 10.0         # after SIGKILL, how long a group may take to vanish


class View(Protocol):
    """What plans may read: the catalog in force and the runtime records."""
    catalog: object
    runtimes: dict


def spec_of(view: View, name: str):
    """The definition the model's process runs with (the catalog's, if none runs)."""
    in_use = getattr(view, "spec_in_use", None)
    return in_use(name) if in_use is not None else view.catalog.models[name]


def timeout_of(view: View, name: str, key: str) -> float:
    return view.catalog.effective(spec_of(view, name), key)


def parse_queue_depth(text: str) -> int | None:
    """running + waiting from vLLM's /metrics; None when the gauges are absent."""
    total, seen = 0.0, False
    for line in text.splitlines():
        if line.startswith(("vllm:num_requests_running", "vllm:num_requests_waiting")):
            name = line.split("{", 1)[0].split(" ", 1)[0]
            if name not in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
                continue  # e.g. vllm:num_requests_waiting_by_reason double-counts
            try:
                total += float(line.rsplit(" ", 1)[1])
                seen = True
            except (IndexError, ValueError):
                continue
    return int(total) if seen else None


def drain(view: View, name: str) -> Plan:
    """Wait for in-flight requests to finish -> (drained: bool, last depth), or
    (True, "exited") when the process died meanwhile."""
    yield Phase("drain", name)
    timeout = timeout_of(view, name, "drain_timeout")
    deadline = (yield Now()) + timeout
    depth: int | None = None
    if view.catalog.daemon.front.listen:
        # The front's own count first: it knows of requests vLLM has not counted yet.
        while (depth := (yield InFlight(name))) > 0:
            if (yield CheckExited(name)) is not None:
                return True, "exited"
            if (yield Now()) >= deadline:
                return False, depth
            yield Pause(DRAIN_POLL)
    while True:
        if (yield CheckExited(name)) is not None:
            return True, "exited"
        result = yield Http(name, "GET", "/metrics", timeout=5.0)
        if isinstance(result, HttpResult) and result.ok:
            depth = parse_queue_depth(result.body.decode("utf-8", "replace"))
            if depth is None or depth == 0:
                # No gauges at all (--disable-log-stats): nothing to wait for.
                return True, 0
        if (yield Now()) >= deadline:
            return False, depth
        yield Pause(DRAIN_POLL)


def wait_healthy(view: View, name: str, timeout: float) -> Plan:
    """Poll /health of our own process until 200; fail fast if it exits."""
    start = yield Now()
    deadline = start + timeout
    while True:
        exited = yield CheckExited(name)
        if exited is not None:
            raise StepFailed(f"{name} {exited} before it became healthy (see `llmuxctl logs {name}`)")
        now = yield Now()
        result = yield Http(name, "GET", "/health", timeout=max(0.5, min(5.0, deadline - now)))
        if isinstance(result, HttpResult) and result.ok:
            return
        now = yield Now()
        if now >= deadline:
            raise StepFailed(f"{name} not healthy after {timeout:g}s ({describe_http(result)})")
        yield Pause(HEALTH_POLL_FAST if now - start < 10 else HEALTH_POLL_SLOW)


def start(view: View, name: str) -> Plan:
    """Cold start: port free, spawn, wait for /health -> active."""
    spec = spec_of(view, name)
    yield Phase("start", name)
    holder = yield CheckPort(name)
    if holder is not None:
        raise StepFailed(f"{name}: port {spec.port} is already in use by {holder}; refusing to start "
                         "a second server on it")
    yield Transition(name, S.STARTING)
    failure = yield Spawn(name)
    if failure is not None:
        raise StepFailed(f"{name}: cannot start: {failure}")
    yield Phase("health", name)
    yield from wait_healthy(view, name, timeout_of(view, name, "startup_timeout"))
    yield Transition(name, S.ACTIVE)


def stop(view: View, name: str, error: str | None = None, final: str = S.STOPPED,
         hurry: bool = False) -> Plan:
    """TERM the process group, KILL after stop_timeout; the group must be empty."""
    rt = view.runtimes[name]
    if rt.state not in S.HAS_PROCESS:
        if rt.state != final or error:
            yield Transition(name, final, error=error)
        return
    yield Phase("stop", name)
    if rt.state != S.STOPPING:
        yield Transition(name, S.STOPPING)
    grace = 0.0 if hurry else timeout_of(view, name, "stop_timeout")
    if grace > 0:
        yield SignalGroup(name, signal.SIGTERM)
        if (yield WaitGone(name, grace)):
            yield Transition(name, final, error=error)
            return
    # vLLM's EngineCore outlives a killed API server: always kill the group.
    yield SignalGroup(name, signal.SIGKILL)
    if not (yield WaitGone(name, KILL_GRACE)):
        yield Transition(name, S.FAILED, error=f"{name}: process group survived SIGKILL")
        raise StepFailed(f"{name}: process group survived SIGKILL")
    yield Transition(name, final, error=error)


def io(name: str, *args) -> Plan:
    """yield from io(...): an Io operation whose failure is a StepFailed."""
    result = yield Io(name, args)
    if isinstance(result, IoFailed):
        raise StepFailed(result.reason)
    return result


def expect_ok(result, what: str) -> None:
    if not result.ok:
        raise StepFailed(f"{what} failed: {describe_http(result)}")


def is_sleeping(view: View, name: str) -> Plan:
    """GET /is_sleeping (idempotent: retried on connection errors) -> bool."""
    last = None
    for attempt in range(3):
        last = yield Http(name, "GET", "/is_sleeping", timeout=5.0)
        if isinstance(last, HttpResult):
            break
        yield Pause(0.2 * (attempt + 1))
    expect_ok(last, f"{name}: GET /is_sleeping")
    try:
        return bool(json.loads(last.body)["is_sleeping"])
    except (ValueError, KeyError, TypeError):
        raise StepFailed(f"{name}: GET /is_sleeping answered {last.body[:100]!r}") from None
