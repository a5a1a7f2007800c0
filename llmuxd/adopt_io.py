"""/proc and signal operations of adoption (see adopt.py), named for `Io` operations.

Identity is (PID, start time). A pidfd is opened before the start time is
compared, so a PID reused in between cannot slip through; the same pidfd then
supervises the adopted process (readable at its exit). Nothing here signals a
process whose identity does not match what the state file recorded.
"""

from __future__ import annotations

import dataclasses
import glob
import logging
import os
import signal

import psutil

from . import launch, procs
from . import states as S
from .checkpoint_io import MANIFEST, delete_images, read_manifest

log = logging.getLogger(__name__)
START_TIME_TOLERANCE = 0.05  # seconds: the same /proc field read twice agrees far better


def _matches(pid: int, start_time: float | None) -> bool:
    created = procs.process_start_time(pid)
    return (created is not None and start_time is not None
            and abs(created - start_time) < START_TIME_TOLERANCE and procs.is_alive(pid))


def identify(d, name: str, entry: dict) -> str:
    """'match', 'gone' or 'PID reused by another process'; keeps the pidfd of a match."""
    pid = entry.get("pid")
    if not pid:
        return "gone"
    try:
        pidfd = os.pidfd_open(pid)
    except ProcessLookupError:
        return "exited"
    if _matches(pid, entry.get("start_time")):
        d.pending_pidfds[name] = pidfd
        return "match"
    os.close(pidfd)
    return "exited" if not procs.is_alive(pid) else f"PID {pid} now belongs to another process"


def kill_leftovers(d, name: str, entry: dict) -> list[int]:
    """SIGKILL what is left of the model's process group, if the group is still ours."""
    pgid = entry.get("pgid")
    if not pgid:
        return []
    if pgid != entry.get("pid") or not entry.get("start_time"):
        # llmuxd starts every model as the leader of its own group: a group led by
        # anyone else is not one llmuxd can prove it started.
        log.warning("%s: not touching process group %s: its leader is not the recorded "
                    "process %s", name, pgid, entry.get("pid"))
        return []
    leader_alive = procs.is_alive(pgid)
    if leader_alive and not (entry.get("force") and _matches(pgid, entry.get("start_time"))):
        return []  # the leader lives: it is either ours and adopted, or not ours at all
    members = procs.group_members(pgid)
    older = [p for p in members if (procs.process_start_time(p) or 0)
             < entry["start_time"] - START_TIME_TOLERANCE]
    if older:
        # A member older than our leader was never started by it: the group is someone else's.
        log.warning("%s: not touching process group %d: %s predate(s) its recorded leader",
                    name, pgid, older)
        return []
    if members:
        log.warning("%s: killing leftovers of its process group %d: %s", name, pgid, members)
        procs.kill_group(pgid, signal.SIGKILL)
    pidfd = d.pending_pidfds.pop(name, None)  # identified, but not to be adopted
    if pidfd is not None:
        os.close(pidfd)
    return members


def adopt_pid(d, name: str, entry: dict) -> None:
    pidfd = d.pending_pidfds.pop(name)
    rt = d.runtimes[name]
    S.advance(rt, S.ADOPTING)
    # The group as the kernel says it is for the process identified above, not as written.
    rt.pid, rt.pgid, rt.start_time = entry["pid"], os.getpgid(entry["pid"]), entry["start_time"]
    rt.exit_reason = None
    for key in ("argv_hash", "cuda_pids"):
        if entry.get(key) is not None:
            rt.extra[key] = entry[key]
    spec = d.catalog.models[name]
    now = launch.argv_hash(launch.model_argv(d.catalog.daemon, spec), spec.env_dict())
    if entry.get("argv_hash") and entry["argv_hash"] != now:
        # The catalog changed while llmuxd was down: say so, as a reload would.
        rt.extra["restart_pending"] = True
    if entry.get("port") and entry["port"] != spec.port:
        # The process listens where it was started, not where the catalog now says:
        # probe and steer it there until it restarts (as after the same edit made live).
        d.specs_in_use[name] = dataclasses.replace(spec, port=entry["port"])
        rt.extra["restart_pending"] = True
    d.watch_pidfd(name, entry["pid"], pidfd, entry["start_time"])
    d.on_transition(name, S.STOPPED, S.ADOPTING)


def stop_unknown_model(d, name: str, entry: dict) -> None:
    """A model removed from the catalog while llmuxd was down: stop its group if ours."""
    if entry.get("pid") and identify(d, name, entry) == "match":
        os.close(d.pending_pidfds.pop(name))
        pgid = os.getpgid(entry["pid"])
        log.warning("%s is no longer in the catalog: stopping its process group %s", name, pgid)
        if pgid == entry["pid"]:  # only a group it leads (as every model llmuxd starts)
            procs.kill_group(pgid, signal.SIGTERM)
        d.reactor.call_later(d.catalog.daemon.stop_timeout,
                             lambda: kill_leftovers(d, name, {**entry, "force": True}))
    else:
        kill_leftovers(d, name, entry)


def kill_restored(d, name: str, entry: dict) -> list[int]:
    """A restore cut short by our death: the restored tree (same PIDs) must go."""
    root = entry.get("checkpoint_pid")
    if not root or not procs.is_alive(root) or d.reaper.owns(root):
        return []  # gone, or a process we track ourselves
    try:
        proc = psutil.Process(root)
        ours = os.getpgid(root) == root and any(
            c.laddr and c.laddr.port == entry.get("port") for c in proc.net_connections("tcp"))
    except (psutil.Error, OSError):
        return []
    if not ours:
        return []
    members = procs.group_members(root)
    procs.kill_group(root, signal.SIGKILL)
    return members


def valid_images(d, name: str, entry: dict) -> dict | None:
    """The committed checkpoint of this model, if it is complete; partial dumps go."""
    base = d.catalog.daemon.checkpoint.images_dir
    for partial in glob.glob(os.path.join(base, f"{name}.partial-*")):
        delete_images(d, partial)
    path = entry.get("images") or os.path.join(base, name)
    if not os.path.exists(os.path.join(path, MANIFEST)):
        return None
    manifest = read_manifest(d, path)
    if entry.get("state") == S.CHECKPOINTING and manifest.get("root_pid") != entry.get("pid"):
        return None  # an older checkpoint, not of the tree that was being dumped
    return {**manifest, "path": path}


OPERATIONS = {f.__name__: f for f in (identify, kill_leftovers, adopt_pid, stop_unknown_model,
                                      kill_restored, valid_images)}
