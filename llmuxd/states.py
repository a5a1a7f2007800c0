"""Model states and the transitions allowed between them.

One record (`Runtime`) per catalog model, owned by the daemon's loop thread.
Plans ask for transitions; `advance()` refuses any edge not in TRANSITIONS and
leaves the state untouched, so a bug shows up as a logged refusal rather than
a model in a state the operator cannot explain.

Invariants:
- without sizes in the catalog at most one model is `active` (or on its way there:
  starting, waking, ...); with sizes, the active ones form the resident set, whose
  declared or measured sizes fit the budget (placement.py decides, swap.py obeys);
- a model with a live process is never `stopped`, and `failed` only when its
  process group survived SIGKILL (status says so);
- `sleeping`, `suspended`, `checkpointed` remember the level they slept at.
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field

STOPPED = "stopped"
STARTING = "starting"
ACTIVE = "active"
DRAINING = "draining"
GOING_TO_SLEEP = "going_to_sleep"
SLEEPING = "sleeping"
WAKING = "waking"
SUSPENDING = "suspending"
SUSPENDED = "suspended"
RESUMING = "resuming"
CHECKPOINTING = "checkpointing"
CHECKPOINTED = "checkpointed"
RESTORING = "restoring"
STOPPING = "stopping"
RESTARTING = "restarting"
ADOPTING = "adopting"
FAILED = "failed"

# States in which the model's process tree exists (or may: stopping).
HAS_PROCESS = frozenset({STARTING, ACTIVE, DRAINING, GOING_TO_SLEEP, SLEEPING, WAKING,
                         SUSPENDING, SUSPENDED, RESUMING, CHECKPOINTING, RESTORING, STOPPING,
                         RESTARTING, ADOPTING})
ASLEEP = frozenset({SLEEPING, SUSPENDED, CHECKPOINTED})

TRANSITIONS: dict[str, frozenset[str]] = {
    # stopped -> starting: cold start.  stopped -> stopped: a new error noted.
    # stopped -> checkpointed: adopting images found on disk.
    # stopped -> failed: a start that failed before anything was spawned.
    STOPPED: frozenset({STARTING, STOPPED, CHECKPOINTED, FAILED, ADOPTING}),
    # starting -> active: healthy.  -> stopping/failed: start failed or was cancelled.
    STARTING: frozenset({ACTIVE, STOPPING, FAILED}),
    # active -> draining: first step of any sleep.  -> stopping: stop asked or
    # sleep escalated.  -> restarting: crashed or unhealthy, supervision restarts it.
    ACTIVE: frozenset({DRAINING, STOPPING, RESTARTING, FAILED}),
    # draining -> active: drain timed out (not forced): nothing changed.
    DRAINING: frozenset({ACTIVE, GOING_TO_SLEEP, SUSPENDING, CHECKPOINTING, STOPPING, RESTARTING}),
    GOING_TO_SLEEP: frozenset({SLEEPING, STOPPING}),
    # sleeping -> stopped: the process died while asleep.
    SLEEPING: frozenset({WAKING, STOPPING, STOPPED}),
    WAKING: frozenset({ACTIVE, STOPPING, FAILED}),
    SUSPENDING: frozenset({SUSPENDED, CHECKPOINTING, STOPPING}),
    SUSPENDED: frozenset({RESUMING, STOPPING, STOPPED}),
    RESUMING: frozenset({ACTIVE, STOPPING, FAILED}),
    # checkpointing -> checkpointed: images written and the tree is gone.
    CHECKPOINTING: frozenset({CHECKPOINTED, STOPPING, RESUMING}),
    # checkpointed -> stopped: images deleted.  -> starting: restore failed, cold start.
    CHECKPOINTED: frozenset({RESTORING, STOPPED, STARTING}),
    RESTORING: frozenset({ACTIVE, RESUMING, STARTING, STOPPING, FAILED, CHECKPOINTED}),
    STOPPING: frozenset({STOPPED, FAILED}),
    # restarting -> starting: backoff over.  -> failed: burst limit reached.
    RESTARTING: frozenset({STARTING, STOPPING, FAILED}),
    # failed -> starting: an operator's swap tries again.
    # adopting: a restarted llmuxd found the process; it settles in a stable state.
    ADOPTING: frozenset({ACTIVE, SLEEPING, SUSPENDED, STOPPING}),
    # failed -> restarting: supervision tries again after a backoff.
    FAILED: frozenset({STARTING, STOPPING, STOPPED, FAILED, RESTARTING}),
}


class IllegalTransition(Exception):
    pass


@dataclass
class Runtime:
    """What the daemon knows of one model right now (status shows it)."""
    name: str
    state: str = STOPPED
    pid: int | None = None
    pgid: int | None = None
    start_time: float | None = None   # the process's start time: with pid, its identity
    since: float = field(default_factory=time.time)
    # When it was last asked for while active (a request routed by the front, a swap to it):
    # eviction order is least recently *used*, not least recently woken.
    last_used: float = 0.0
    last_error: str | None = None
    last_error_at: float | None = None  # wall time of last_error
    asleep_level: int | None = None   # the level it went to sleep at
    exit_reason: str | None = None    # how its main process ended, once it has
    restarts: list[float] = field(default_factory=list)  # monotonic times of recent restarts
    restarts_total: int = 0           # supervision restarts since llmuxd started
    health_failures: int = 0
    extra: dict = field(default_factory=dict)

    @property
    def used_at(self) -> float:
        """What LRU eviction orders by: made active, or asked for since."""
        return max(self.since, self.last_used)

    def as_status(self) -> dict:
        return {"state": self.state, "pid": self.pid, "since": round(self.since, 3),
                "last_error": self.last_error, "last_error_at": self.last_error_at,
                "asleep_level": self.asleep_level,
                "restarts": len(self.restarts), "restarts_total": self.restarts_total,
                **self.extra}


def advance(rt: Runtime, state: str, error: str | None = None, **fields) -> None:
    """Apply `rt.state -> state`, or raise IllegalTransition and change nothing."""
    if state not in TRANSITIONS.get(rt.state, frozenset()):
        raise IllegalTransition(f"{rt.name}: {rt.state} -> {state} is not allowed")
    if state != rt.state:
        rt.since = time.time()
    rt.state = state
    if error is not None:
        rt.last_error, rt.last_error_at = error, time.time()
    if state == ACTIVE:
        rt.health_failures = 0
    if state not in ASLEEP:
        rt.asleep_level = None
    for key, value in fields.items():
        setattr(rt, key, value) if hasattr(rt, key) else rt.extra.__setitem__(key, value)
