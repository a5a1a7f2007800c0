"""The swap engine and the other operator plans, as pure generators.

`swap_plan` is the heart of llmux: drain the active model, put it to sleep at
its level (escalating to a stop when that fails), verify, and only then wake or
start the target and health-check it. GPU memory changes strictly one step at a
time because every step finishes before the next begins. Which models sleep is
placement's answer (placement.py, asked through claims.py): with sizes declared,
only the least recently used ones on the target's GPUs that it needs room from;
without, every other one on its GPUs (v1: all of them). A failed wake or
start stops the target and brings the previous model back (rollback), and the
original error is what the operator reads.

Plans yield operations from actions.py and never touch a socket or a clock;
tests drive them with tables of (operation, result) pairs.
"""

from __future__ import annotations

from . import states as S
from .actions import (CheckPort, Degraded, InFlight, Now, Pause, Phase, Refused, StepFailed,
                      Transition)
from .mechanisms import mechanism_for
from .claims import placement_for, resident_set, size_of, stray_holders
from .steps import Plan, View, drain, spec_of, start, stop, timeout_of

__all__ = ["resident_set", "size_of", "swap_plan", "sleep_plan", "stop_plan", "restart_plan", "recover_plan", "shutdown_plan",
           "StepFailed"]


def evict(view: View, name: str, force: bool, level: int | None = None) -> Plan:
    """Drain `name` and put it to sleep; raise StepFailed only if nothing changed."""
    level = level or spec_of(view, name).sleep_level
    yield Transition(name, S.DRAINING)
    drained, depth = yield from drain(view, name)
    if depth == "exited":  # it died under us: nothing to drain or put to sleep
        yield from stop(view, name, error=f"{name} exited while draining", hurry=True)
        return
    if not drained and not force:
        yield Transition(name, S.ACTIVE)
        raise StepFailed(
            f"{name}: {depth if depth is not None else 'unknown number of'} request(s) still in flight "
            f"after drain_timeout ({timeout_of(view, name, 'drain_timeout'):g}s); nothing changed "
            "(swap --force puts it to sleep anyway)")
    if not drained:
        yield Phase("drain-forced", name)
    yield from put_to_sleep(view, name, level)


def put_to_sleep(view: View, name: str, level: int) -> Plan:
    """Sleep at `level`; any failure escalates to a stop (level 5)."""
    mechanism = mechanism_for(level)
    try:
        yield from mechanism.sleep(view, name)
    except Refused:
        yield Transition(name, S.ACTIVE)  # found before anything changed: it serves on
        raise
    except StepFailed as exc:
        if level == 5:
            raise
        yield Degraded(name, f"{name} could not reach sleep level {level} ({exc}); "
                             "it was stopped instead")
        yield from stop(view, name, error=f"sleep (level {level}) failed: {exc}; stopped instead")


def bring_up(view: View, name: str) -> Plan:
    """Wake or start `name` until it is active and healthy."""
    rt = view.runtimes[name]
    if rt.state == S.ACTIVE:
        return
    if rt.state in S.ASLEEP and rt.extra.get("restart_pending"):
        # Its definition changed while it slept: never wake it with stale settings.
        yield from stop_plan(view, name)
        yield from start(view, name)
    elif rt.state in (S.STOPPED, S.FAILED):
        yield from start(view, name)
    elif rt.state == S.RESTARTING:
        yield from stop(view, name, hurry=True)
        yield from start(view, name)
    elif rt.state in S.ASLEEP:
        level = rt.asleep_level or spec_of(view, name).sleep_level
        yield from mechanism_for(level).wake(view, name)
    else:
        raise StepFailed(f"{name} is {rt.state}; cannot make it active now")


def swap_plan(view: View, target: str, force: bool = False) -> Plan:
    """Make `target` active, putting to sleep only the active models placement names
    (see the module docstring). Every eviction finishes before the target wakes."""
    if view.runtimes[target].state == S.ACTIVE:
        return f"{target} is already active"
    placement = placement_for(view, target)
    if placement.refused:
        raise StepFailed(placement.refused)
    if placement.evict and view.runtimes[target].state in (S.STOPPED, S.FAILED):
        # A cold start would be refused for a taken port: say so before anything changes.
        holder = yield CheckPort(target)
        if holder is not None:
            raise StepFailed(f"{target}: port {spec_of(view, target).port} is already in use by "
                             f"{holder}; nothing changed ({placement.evict[0]} is still active)")
    for name in stray_holders(view, target):  # crashed, or left half way, on its GPUs
        yield from stop(view, name, hurry=True)
    evicted: list[str] = []
    for name in placement.evict:
        try:
            yield from evict(view, name, force)
        except StepFailed:
            # Nothing changed for this one; those already asleep come back (v1: the swap
            # fails and leaves every model as it was).
            for back in reversed(evicted):
                yield from bring_up(view, back)
            raise
        evicted.append(name)
    try:
        yield from bring_up(view, target)
    except StepFailed as exc:
        error = str(exc)
        yield from stop(view, target, error=error, final=S.FAILED)
        if not evicted:
            raise
        again = []
        for previous in reversed(evicted):  # most recently used first
            yield Phase("rollback", previous)
            try:
                yield from bring_up(view, previous)
            except StepFailed as exc2:
                yield from stop(view, previous, error=str(exc2), final=S.FAILED)
                raise StepFailed(f"{error}; rollback to {previous} failed too: {exc2}") from None
            again.append(previous)
        verb = "is" if len(again) == 1 else "are"
        raise StepFailed(f"{error}; {', '.join(again)} {verb} active again") from None
    return f"{target} is active"


def sleep_plan(view: View, name: str, level: int | None = None, force: bool = False) -> Plan:
    """`llmuxctl sleep NAME [--level N]`: put an awake model to sleep."""
    rt = view.runtimes[name]
    level = level or spec_of(view, name).sleep_level
    if rt.state == S.ACTIVE:
        yield from evict(view, name, force, level)
        after = view.runtimes[name]
        reached = after.asleep_level if after.state in S.ASLEEP else \
            5 if after.state == S.STOPPED else None
        if reached != level:  # escalated: `llmuxctl sleep --level N` must not say ok
            raise StepFailed(f"{name} did not reach sleep level {level}: it is {after.state}"
                             f" ({after.last_error or 'no reason recorded'})")
        return f"{name} is {after.state}"
    if rt.state in S.ASLEEP and level == 5:
        yield from stop_plan(view, name)
        return f"{name} is stopped"
    if rt.state in S.ASLEEP or rt.state == S.STOPPED:
        return f"{name} is already {rt.state}"
    raise StepFailed(f"{name} is {rt.state}; only an active model can be put to sleep")


def stop_plan(view: View, name: str) -> Plan:
    """`llmuxctl stop NAME`: whatever its state, no process of it is left."""
    rt = view.runtimes[name]
    if rt.state == S.CHECKPOINTED:
        discard = getattr(mechanism_for(4), "discard", None)
        if discard is not None:
            yield from discard(view, name)
        else:
            yield Transition(name, S.STOPPED)
        return f"{name} is stopped"
    yield from stop(view, name)
    return f"{name} is stopped"


def start_or_fail(view: View, name: str) -> Plan:
    """A cold start that, when it fails, leaves no process behind: the model is `failed`."""
    try:
        yield from start(view, name)
    except StepFailed as exc:
        yield from stop(view, name, error=str(exc), final=S.FAILED)
        raise


def restart_plan(view: View, name: str, force: bool = False) -> Plan:
    """`llmuxctl restart NAME`: drain, stop and start the active model again (its new
    definition applies); for a model that is not active, only the stop."""
    rt = view.runtimes[name]
    if rt.state == S.ACTIVE:
        yield from evict(view, name, force, level=5)
        yield from start_or_fail(view, name)
        return f"{name} restarted"
    yield from stop_plan(view, name)
    return f"{name} is stopped; its new definition applies at its next start"


def recover_plan(view: View, name: str) -> Plan:
    """Supervision: the active model crashed or went unhealthy; start it again."""
    yield from stop(view, name, hurry=True, final=S.STOPPED)
    yield from start_or_fail(view, name)
    return f"{name} restarted"


def let_streams_finish(view: View, names: list[str]) -> Plan:
    """Shutdown: what the front sent the active models may finish, up to drain_timeout
    (the front takes no new requests by now)."""
    deadline = None
    for name in names:
        deadline = deadline or (yield Now()) + timeout_of(view, name, "drain_timeout")
        if (yield InFlight(name)):
            yield Phase("drain", name)
        while (yield InFlight(name)) and (yield Now()) < deadline:
            yield Pause(0.1)


def shutdown_plan(view: View, hurry: bool = False, checkpoint: bool = False) -> Plan:
    """Stop every model that has a process; `hurry` skips the TERM grace. With
    `checkpoint`, the active model is first checkpointed (level 4), so the next
    llmuxd restores it instead of cold-starting it."""
    failures = []
    active = [n for n, rt in view.runtimes.items() if rt.state == S.ACTIVE]
    if view.catalog.daemon.front.listen and not hurry:
        # A swap cancelled by the shutdown may have left its model draining.
        yield from let_streams_finish(view, [n for n, rt in view.runtimes.items()
                                             if rt.state in (S.ACTIVE, S.DRAINING)])
    # Every resident model goes to disk (one dump at a time: they share /dev/shm's
    # link_remap names); the next llmuxd restores them all.
    for name in active if checkpoint else ():
        try:
            yield from evict(view, name, force=True, level=4)
        except StepFailed as exc:
            failures.append(str(exc))
    for name, rt in list(view.runtimes.items()):
        if rt.state in S.HAS_PROCESS:
            try:
                yield from stop(view, name, hurry=hurry)
            except StepFailed as exc:  # go on: the other models must stop regardless
                failures.append(str(exc))
    if failures:
        raise StepFailed("; ".join(failures))
    return "every model is stopped"
