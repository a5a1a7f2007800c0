"""Adoption: a restarted llmuxd converges with what the state file says is out there.

For each model the state file names:
- a process whose (PID, start time) still match and whose port answers is
  supervised again through a pidfd (it is no longer our child): it stays
  active, sleeping or suspended; the recorded resident set stays active (v1: one);
- a process that is gone is noticed, and leftovers of its process group are
  killed, but only where the group leader's identity still matches or no
  longer exists (a PID that now belongs to someone else is never signalled);
- a model caught in the middle of a transition (llmuxd was killed during a
  swap) is stopped, which is always a consistent state;
- checkpoint images with a valid manifest stay restorable; partial dumps go.
"""

from __future__ import annotations

import json

from . import states as S
from .actions import Http, HttpResult, Io, IoFailed, Phase, Transition
from .steps import stop

STABLE = {S.ACTIVE, S.SLEEPING, S.SUSPENDED}
ADOPTING = S.ADOPTING


def adopt_plan(view, stored: dict):
    models = stored.get("models", {})
    wanted_active = stored.get("active")
    awake = []
    for name, entry in models.items():
        if name not in view.runtimes:
            yield Io("stop_unknown_model", (name, entry))
            continue
        yield from adopt_one(view, name, entry, awake)
    # The resident set the last llmuxd recorded (it fit the budget then); for a v1
    # state file, at most one active model: the one that was active, else the first found.
    keep = wanted_active if wanted_active in awake else (awake[0] if awake else None)
    resident = {n for n in stored.get("resident") or () if n in awake} or {keep}
    for name in awake:
        if name in resident:
            yield Transition(name, S.ACTIVE)
        else:
            yield from stop(view, name, error="found awake beside the active model after a "
                                               "restart of llmuxd; stopped")
    return {"adopted": [n for n, rt in view.runtimes.items() if rt.state != S.STOPPED],
            "active": keep}


def adopt_one(view, name: str, entry: dict, awake: list):
    state = entry.get("state")
    if state in (S.CHECKPOINTED, S.CHECKPOINTING, S.RESTORING):
        yield from adopt_checkpoint(view, name, entry)
        return
    if state not in S.HAS_PROCESS and state != S.ACTIVE:
        return  # stopped or failed: nothing out there
    found = yield Io("identify", (name, entry))
    if isinstance(found, IoFailed) or found != "match":
        why = found.reason if isinstance(found, IoFailed) else found
        yield Io("kill_leftovers", (name, entry))
        yield Transition(name, S.STOPPED, error=f"{why} while llmuxd was down")
        return
    yield Phase("adopt", name)
    yield Io("adopt_pid", (name, entry))          # -> state ADOPTING, supervised by pidfd
    health = yield Http(name, "GET", "/health", timeout=5.0)
    if not (isinstance(health, HttpResult) and health.ok):
        yield from stop(view, name, error="adopted after a restart of llmuxd but not healthy; "
                                          "stopped")
        return
    if state not in STABLE:
        yield from stop(view, name, error=f"llmuxd was restarted while it was {state}; stopped")
        return
    if state == S.SUSPENDED:
        yield Transition(name, S.SUSPENDED, fields={"asleep_level": 3,
                                                    "cuda_pids": entry.get("cuda_pids") or []})
        return
    level = entry.get("asleep_level") or view.catalog.models[name].sleep_level
    if level in (1, 2):
        reply = yield Http(name, "GET", "/is_sleeping", timeout=5.0)
        asleep = False
        if isinstance(reply, HttpResult) and reply.ok:
            try:
                asleep = bool(json.loads(reply.body)["is_sleeping"])
            except (ValueError, KeyError, TypeError):
                pass
        if asleep:
            yield Transition(name, S.SLEEPING, fields={"asleep_level": level})
            return
    if state == S.SLEEPING:
        yield from stop(view, name, error="was asleep before llmuxd restarted but is awake now; "
                                          "stopped")
        return
    awake.append(name)


def adopt_checkpoint(view, name: str, entry: dict):
    """Images with a manifest of this very tree are a good checkpoint; nothing else is."""
    if entry.get("state") == S.RESTORING:
        yield Io("kill_restored", (name, entry))  # a restore cut short: its images still count
    elif entry.get("state") == S.CHECKPOINTING:
        found = yield Io("identify", (name, entry))
        if found == "match":
            yield Io("kill_leftovers", (name, {**entry, "force": True}))
    images = yield Io("valid_images", (name, entry))
    if isinstance(images, IoFailed) or not images:
        why = images.reason if isinstance(images, IoFailed) else "no complete checkpoint"
        yield Transition(name, S.STOPPED, error=f"{why} after a restart of llmuxd")
        return
    yield Transition(name, S.CHECKPOINTED, fields={
        "asleep_level": 4, "images": images["path"], "image_bytes": images.get("bytes"),
        "criu_mode": images.get("mode"), "checkpoint_pid": images.get("root_pid"),
        "cuda_pids": images.get("cuda_pids") or []})
