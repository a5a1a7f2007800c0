"""Requests waiting for their model, the swaps they ask for, and what is in flight.

A request for the active model goes straight through; one for another model
waits here, and the oldest waiting request decides which model the next swap
brings up (FIFO across models). Every waiting request for that model joins
the same swap. A swap is the one `llmuxctl swap` runs (swap_plan, a job of the
daemon). Swaps whose claims (claims.py: the GPUs they touch) are disjoint run at
once; one that overlaps a running swap, or an older waiting one, waits its turn
(FIFO per GPU: a younger request never overtakes an older one on the same GPU).
`min_active` keeps a freshly
activated model for that long before on-demand traffic may swap it away, so
two clients alternating between two models cannot swap at every request.
The decisions are `choose_swap` and `choose_swaps`, pure functions; this class
only keeps the queue, the timers and the counts.
"""

from __future__ import annotations

import logging
import math
import time
from dataclasses import dataclass, field

from .. import states as S
from ..claims import conflicts, placement_for, swap_claim
from ..swap import swap_plan

log = logging.getLogger(__name__)
SWEEP = 0.5
RETRY_QUEUE_FULL = 1.0
RETRY_FAILED = 10.0
# Only from these does a swap bring a model up; others are on their way somewhere
# (a job runs) or under supervision (restarting: its backoff is not ours to skip).
SWAPPABLE = S.ASLEEP | {S.STOPPED, S.FAILED}


def choose_swap(waiting: list[str], states: dict[str, str], active_since: dict[str, float],
                now: float, min_active: float,
                evicts=None) -> tuple[str | None, float | None]:
    """(model to swap to now, None), (None, seconds until asking again makes sense),
    or (None, None) when nothing waits that a swap could serve. `waiting` lists the
    models of the waiting requests, oldest first. `evicts(target)` names the active
    models that swap would put to sleep (placement); by default all of them (v1).
    min_active only protects those: a target that fits beside them goes at once."""
    target = next((m for m in waiting if states.get(m) in SWAPPABLE), None)
    if target is None:
        return None, None
    victims = evicts(target) if evicts is not None else \
        [n for n, s in states.items() if s == S.ACTIVE]
    active = [active_since.get(n, -math.inf) for n in victims if states.get(n) == S.ACTIVE]
    if active:
        left = max(active) + min_active - now
        if left > 0:
            return None, left
    return target, None


def choose_swaps(waiting: list[str], states: dict[str, str], active_since: dict[str, float],
                 now: float, min_active: float, evicts, claim_of,
                 running: list) -> tuple[list[str], float | None]:
    """The models to swap to now, oldest request first, and the seconds until asking
    again makes sense (None: only an event can change the answer). A model's swap
    starts when its claim (`claim_of(model)`) overlaps neither a running job's claim
    nor that of an older waiting model that cannot start yet; min_active as in
    choose_swap."""
    blocked = list(running)
    starts: list[str] = []
    wait = None
    for model in waiting:
        if states.get(model) not in SWAPPABLE:
            continue
        claim = claim_of(model)
        if any(conflicts(claim, other) for other in blocked):
            blocked.append(claim)
            continue
        blocked.append(claim)
        target, left = choose_swap([model], states, active_since, now, min_active, evicts)
        if target is not None:
            starts.append(target)
        elif left is not None:
            wait = left if wait is None else min(wait, left)
    return starts, wait


@dataclass(eq=False)
class Task:
    """One request of a client, from the front's routing to its last byte."""
    conn: object
    route: object
    arrived: float = field(default_factory=time.monotonic)
    upstream: object = None
    queued: bool = False
    refused_at: float | None = None   # its model's server first refused it (front.REFUSED_GRACE)


class Demand:
    def __init__(self, daemon, dispatch) -> None:
        self.d = daemon
        self.dispatch = dispatch          # Task -> None: forward it now (the front's)
        self.queue: dict[Task, None] = {}  # insertion-ordered: FIFO with O(1) removal
        self.in_flight: dict[str, int] = {}
        self.active_since: dict[str, float] = {}
        self._timer = None
        self._sweeping = False

    @property
    def settings(self):
        return self.d.catalog.daemon.front

    # -- entering ------------------------------------------------------------------
    def admit(self, task: Task) -> None:
        rt = self.d.runtimes.get(task.route.model)
        if rt is None:
            task.conn.reply_error(404, f"unknown model {task.route.model!r}")
        elif self.d.shutting_down:
            task.conn.reply_error(503, "llmuxd is shutting down", RETRY_FAILED)
        elif rt.state == S.ACTIVE:
            self.dispatch(task)
        elif len(self.queue) >= self.settings.max_queue:
            task.conn.reply_error(429, f"{len(self.queue)} requests already wait for their "
                                       "model (daemon.front.max_queue)", RETRY_QUEUE_FULL)
        else:
            task.queued = True
            self.queue[task] = None
            log.debug("front: %r waits for %s (%s)", task.conn, task.route.model, rt.state)
            if not self._sweeping:
                self._sweeping = True
                self.d.reactor.call_later(SWEEP, self._sweep)
            self.pump()

    def abandon(self, task: Task) -> None:
        """The client went away while its request waited."""
        self.queue.pop(task, None)

    # -- the pump: after every loop pass, and when something changed -----------------
    def pump(self) -> None:
        if not self.queue:
            return
        for task in [t for t in self.queue
                     if self.d.runtimes.get(t.route.model) is not None
                     and self.d.runtimes[t.route.model].state == S.ACTIVE]:
            del self.queue[task]
            task.queued = False
            self.dispatch(task)
        if not self.queue or self.d.shutting_down:
            return
        states = {n: rt.state for n, rt in self.d.runtimes.items()}
        waiting = list(dict.fromkeys(t.route.model for t in self.queue))
        claims = {}

        def claim_of(model: str):
            claims[model] = swap_claim(self.d, model)
            return claims[model]
        targets, wait = choose_swaps(waiting, states, self.active_since, time.monotonic(),
                                     self.settings.min_active, self._evicts, claim_of,
                                     [job.claim for job in self.d.jobs])
        for target in targets:
            log.info("front: %d request(s) wait for %s: swapping to it",
                     sum(t.route.model == target for t in self.queue), target)
            self.d.start_job(
                "swap", target, swap_plan(self.d, target), on_done=self._swap_done,
                claim=claims[target])
        if wait is not None and self._timer is None:
            self._timer = self.d.reactor.call_later(wait, self._timer_due)

    def _evicts(self, target: str) -> list[str]:
        return list(placement_for(self.d, target).evict)

    def _timer_due(self) -> None:
        self._timer = None
        self.pump()

    def _swap_done(self, job) -> None:
        if job.ok:
            return  # the next pump dispatches the waiters
        failed = [t for t in self.queue if t.route.model == job.model]
        for task in failed:
            del self.queue[task]
            task.queued = False
            task.conn.reply_error(503, f"{job.model} could not be made active: {job.message}",
                                  RETRY_FAILED)

    def _sweep(self) -> None:
        now = time.monotonic()
        limit = self.settings.queue_timeout
        for task in [t for t in self.queue if now - t.arrived > limit]:
            del self.queue[task]
            task.queued = False
            task.conn.reply_error(503, f"{task.route.model} did not become active within "
                                       f"{limit:g}s (daemon.front.queue_timeout)", RETRY_FAILED)
        if self.queue:
            self.d.reactor.call_later(SWEEP, self._sweep)
        else:
            self._sweeping = False

    # -- what the daemon tells us and asks ---------------------------------------------
    def on_transition(self, name: str, after: str) -> None:
        if after == S.ACTIVE:
            self.active_since[name] = time.monotonic()

    def started(self, name: str) -> None:
        self.in_flight[name] = self.in_flight.get(name, 0) + 1

    def ended(self, name: str) -> None:
        self.in_flight[name] = max(0, self.in_flight.get(name, 0) - 1)

    def fail_all(self, why: str) -> None:
        for task in list(self.queue):
            task.queued = False
            task.conn.reply_error(503, why, RETRY_FAILED)
        self.queue.clear()

    def queued(self) -> dict[str, int]:
        counts: dict[str, int] = {}
        for task in self.queue:
            counts[task.route.model] = counts.get(task.route.model, 0) + 1
        return counts
