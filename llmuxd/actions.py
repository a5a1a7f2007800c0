"""The vocabulary between the pure transition logic and the loop.

A plan (swap, sleep, stop, recovery) is a generator that yields these
operations and receives their results; the daemon performs them. Nothing here
does I/O. Every waiting operation carries its own deadline.
"""

from __future__ import annotations

from dataclasses import dataclass, field


# -- operations (yielded by plans) -------------------------------------------
@dataclass(frozen=True)
class Http:
    """One HTTP call to the model's server on 127.0.0.1 -> HttpResult | HttpError."""
    model: str
    method: str
    path: str
    timeout: float
    body: bytes | None = None


@dataclass(frozen=True)
class Spawn:
    """Start the model's server as the contract says -> None | str (why it failed)."""
    model: str


@dataclass(frozen=True)
class CheckPort:
    """Who listens on the model's port -> None (free) | str (the holder)."""
    model: str


@dataclass(frozen=True)
class CheckExited:
    """Has the model's main process exited? -> None (running) | str (how it ended)."""
    model: str


@dataclass(frozen=True)
class SignalGroup:
    """Send a signal to the model's whole process group -> None."""
    model: str
    signal: int


@dataclass(frozen=True)
class WaitGone:
    """Wait until the main process is reaped and its process group is empty -> bool."""
    model: str
    timeout: float


@dataclass(frozen=True)
class RunTool:
    """Run a helper (criu, cuda-checkpoint) to completion -> ToolResult.
    `env`: (NAME, VALUE) pairs on top of llmuxd's scrubbed environment."""
    argv: tuple[str, ...]
    timeout: float
    model: str = ""
    env: tuple[tuple[str, str], ...] = ()


@dataclass(frozen=True)
class RunTools:
    """Run several helpers at once (one per CUDA process) -> list[ToolResult], in order."""
    argvs: tuple[tuple[str, ...], ...]
    timeout: float
    model: str = ""


@dataclass(frozen=True)
class Io:
    """A named filesystem or /proc operation (checkpoint_io.py, link_remap.py,
    adopt_io.py) -> its return value, or IoFailed. Plans stay pure: they name the
    operation, the daemon performs it."""
    name: str
    args: tuple = ()


@dataclass(frozen=True)
class InFlight:
    """Requests the front has sent to the model and not yet seen answered -> int
    (0 without a front). Exact for traffic through the front, so a drain need not
    guess from /metrics, which lags a request that was sent but not yet counted."""
    model: str


@dataclass(frozen=True)
class Pause:
    """Let time pass (a poll interval) -> None."""
    seconds: float


@dataclass(frozen=True)
class Now:
    """The monotonic clock -> float. Plans never read a clock themselves."""


@dataclass(frozen=True)
class Transition:
    """Move a model to a new state (checked against states.TRANSITIONS) -> None."""
    model: str
    state: str
    error: str | None = None
    fields: dict = field(default_factory=dict, compare=True, hash=False)


@dataclass(frozen=True)
class Degraded:
    """The plan goes on, but `model` did not end where it was asked to: a sleep that
    became a stop, a restore that became a cold start. Never reported as plain
    success: a warning event now, `warnings` in the final reply -> None."""
    model: str
    text: str


@dataclass(frozen=True)
class Phase:
    """A progress event for whoever waits on the plan (llmuxctl swap) -> None."""
    name: str
    model: str


# -- results ------------------------------------------------------------------
@dataclass(frozen=True)
class HttpResult:
    status: int
    body: bytes = b""

    @property
    def ok(self) -> bool:
        return 200 <= self.status < 300


@dataclass(frozen=True)
class HttpError:
    reason: str
    ok = False


@dataclass(frozen=True)
class ToolResult:
    rc: int | None  # None: killed at its deadline
    output: str = ""

    @property
    def ok(self) -> bool:
        return self.rc == 0


def tool_message(text: str) -> str:
    """The line of a tool's output worth showing: its last meaningful one (criu warns
    about RLIMIT_NOFILE and its kdat cache on every run)."""
    lines = [ln.strip() for ln in text.splitlines()
             if ln.strip() and "RLIMIT_NOFILE" not in ln and "kdat cache" not in ln]
    return lines[-1] if lines else ""


@dataclass(frozen=True)
class IoFailed:
    reason: str
    ok = False


class StepFailed(Exception):
    """A step of a plan failed; the message is what the operator sees."""


class Refused(StepFailed):
    """A sleep that cannot work here (level 3 with no CUDA process, level 4 without a
    working criu), found before anything changed: no escalation to a stop."""


def describe_http(result: HttpResult | HttpError) -> str:
    if isinstance(result, HttpError):
        return result.reason
    text = result.body[:200].decode("utf-8", "replace").strip()
    return f"HTTP {result.status}" + (f": {text}" if text else "")
