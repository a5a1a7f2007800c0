"""The state file: what a restarted llmuxd needs to adopt what is still running.

`<state_dir>/state.json` holds every model's state, PID, start time, process
group, port, level, checkpoint images, and what it was started with. It is
written atomically on every transition that matters (temp file in the same
directory, fsync, rename), so a crash at any instant leaves either the
old file or the new one, never half of one. A missing file means "nothing to
adopt"; a corrupt one (bad JSON, wrong types, absurd nesting) is set aside as
`state.json.bad-<time>` with a log line, and llmuxd starts with nothing to adopt.
A state file llmuxd did not write (another owner, a symbolic link) is refused:
its PIDs and process groups are what llmuxd would signal.

The directory is locked (flock on `<state_dir>/lock`) for llmuxd's lifetime: a
second llmuxd with another socket would otherwise adopt the first one's models.
"""

from __future__ import annotations

import errno
import fcntl
import json
import logging
import os
import tempfile
import time

from . import states as S
from . import trust

log = logging.getLogger(__name__)
VERSION = 1
FIELDS = ("state", "pid", "pgid", "start_time", "asleep_level", "last_error", "last_error_at")
EXTRA_FIELDS = ("images", "image_bytes", "criu_mode", "checkpoint_pid", "cuda_pids", "argv_hash")


def path_of(state_dir: str) -> str:
    return os.path.join(state_dir, "state.json")


def snapshot(daemon) -> dict:
    """What to write now. A model adoption has not decided yet keeps the entry the
    last llmuxd wrote (the file must never say less than the truth: a kill during
    adoption would otherwise record running models as stopped, and they would leak)."""
    pending = daemon.unadopted
    models = {name: entry for name, entry in pending.items() if name not in daemon.runtimes}
    for name, rt in daemon.runtimes.items():
        if name in pending:
            models[name] = pending[name]
            continue
        spec = daemon.spec_in_use(name)
        entry = {k: getattr(rt, k) for k in FIELDS}
        entry.update({k: rt.extra.get(k) for k in EXTRA_FIELDS if rt.extra.get(k) is not None})
        entry.update({"port": spec.port, "sleep_level": spec.sleep_level})
        models[name] = entry
    active = daemon.active()
    if active is None and daemon.unadopted_active in pending:
        active = daemon.unadopted_active
    return {"version": VERSION, "daemon_pid": os.getpid(), "active": active,
            "resident": daemon.resident(),
            # "resume" stays one name (the last used) so that an older llmuxd still reads
            # the file; the rest of a checkpointed resident set is in "resume_also".
            "resume": daemon.resume[-1] if daemon.resume else None,
            "resume_also": daemon.resume[:-1], "models": models}


RESERVE = ".reserve"
RESERVE_BYTES = 1 << 20  # room for the state file of a large catalog (~1 KiB a model)


def keep_reserve(state_dir: str) -> bool:
    """Hold space for the state file while the disk has it: a full state_dir must
    not lose what a restarted llmuxd needs to adopt the models (see save).
    False when there is no reserve and no room for one."""
    path = os.path.join(state_dir, RESERVE)
    if os.path.exists(path):
        return True
    try:
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW, 0o600)
    except OSError:
        return False
    try:
        try:
            os.posix_fallocate(fd, 0, RESERVE_BYTES)
        except OSError as exc:
            if exc.errno not in (errno.EOPNOTSUPP, errno.EINVAL):
                raise
            for _ in range(RESERVE_BYTES // 65536):  # a file system without fallocate
                os.write(fd, bytes(65536))
        return True
    except OSError:
        os.unlink(path)  # no room for it now: the next successful save tries again
        return False
    finally:
        os.close(fd)


def save(state_dir: str, data: dict) -> str | None:
    """Write the state file; on a full disk, spend the reserve on it. Returns a warning
    when the reserve was needed; raises OSError when the file could not be written."""
    try:
        _write(state_dir, data)
    except OSError as exc:
        if exc.errno not in (errno.ENOSPC, errno.EDQUOT):
            raise
        try:
            os.unlink(os.path.join(state_dir, RESERVE))
        except FileNotFoundError:
            raise exc from None
        _write(state_dir, data)
        return (f"state_dir {state_dir} is full ({exc.strerror}): the state file was written "
                "into llmuxd's reserve; free space there")
    if not keep_reserve(state_dir):
        return (f"state_dir {state_dir} is full: the state file was written, but the next "
                "change may not be; free space there")
    return None


def _write(state_dir: str, data: dict) -> None:
    fd, tmp = tempfile.mkstemp(prefix=".state.", dir=state_dir)
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(data, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.rename(tmp, path_of(state_dir))
    except BaseException:
        try:
            os.unlink(tmp)
        except OSError:
            pass
        raise
    # No fsync of the directory: the rename is atomic for every reader at once, and
    # after a power loss the previous file is as good an answer (adoption checks each
    # process anyway). It would double the cost of a write on the swap path.


MAX_BYTES = 64 * 1024 * 1024    # far beyond any real catalog; a bigger file is not ours
INTS = ("pid", "pgid", "checkpoint_pid", "port", "sleep_level", "asleep_level")
NUMBERS = ("start_time", "image_bytes")
STRINGS = ("last_error", "criu_mode", "argv_hash", "images")
STATES = frozenset(S.TRANSITIONS) | {S.FAILED}


class AlreadyLocked(Exception):
    pass


def lock(state_dir: str) -> int:
    """flock the state directory; the fd stays open (and locked) until llmuxd exits."""
    fd = trust.open_in(state_dir, "lock", os.O_RDWR | os.O_CREAT, "state_dir", 0o600)
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except OSError as exc:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
        os.close(fd)
        if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
            raise AlreadyLocked(f"state directory {state_dir} is in use by another llmuxd "
                                f"(pid {holder})") from None
        raise
    os.ftruncate(fd, 0)
    os.pwrite(fd, f"{os.getpid()}\n".encode(), 0)
    return fd


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def resume_list(stored: dict) -> list[str]:
    """The models to restore, least recently used first (see snapshot)."""
    last = stored.get("resume")
    return [n for n in stored.get("resume_also") or [] if n != last] + ([last] if last else [])


def validate(data) -> None:
    """Raise ValueError naming the first thing that is not what save() writes."""
    if not isinstance(data, dict) or data.get("version") != VERSION:
        raise ValueError("unknown format")
    if not isinstance(data.get("models"), dict):
        raise ValueError("models: not an object")
    for key in ("active", "resume"):
        if data.get(key) is not None and not isinstance(data[key], str):
            raise ValueError(f"{key}: not a model name")
    also = data.get("resume_also")
    if also is not None and not (isinstance(also, list) and all(isinstance(n, str) for n in also)):
        raise ValueError("resume_also: not a list of model names")
    for name, entry in data["models"].items():
        if not isinstance(entry, dict):
            raise ValueError(f"models.{name}: not an object")
        if entry.get("state") not in STATES:
            raise ValueError(f"models.{name}.state: {entry.get('state')!r} is no state")
        for key in INTS:
            if entry.get(key) is not None and not (_is_int(entry[key]) and entry[key] > 0):
                raise ValueError(f"models.{name}.{key}: not a positive integer")
        for key in NUMBERS:
            if entry.get(key) is not None and not (_is_int(entry[key]) or
                                                   isinstance(entry[key], float)):
                raise ValueError(f"models.{name}.{key}: not a number")
        for key in STRINGS:
            if entry.get(key) is not None and not isinstance(entry[key], str):
                raise ValueError(f"models.{name}.{key}: not a string")
        pids = entry.get("cuda_pids")
        if pids is not None and not (isinstance(pids, list) and all(_is_int(p) for p in pids)):
            raise ValueError(f"models.{name}.cuda_pids: not a list of PIDs")


def load(state_dir: str) -> dict:
    """The stored state, or {}; raises trust.Untrusted for a file llmuxd did not write."""
    path = path_of(state_dir)
    try:
        fd = trust.open_in(state_dir, "state.json", os.O_RDONLY, "state_dir")
    except FileNotFoundError:
        return {}
    with os.fdopen(fd, "rb") as f:
        raw = f.read(MAX_BYTES + 1)
    try:
        if len(raw) > MAX_BYTES:
            raise ValueError(f"larger than {MAX_BYTES} bytes")
        data = json.loads(raw)
        validate(data)
    except (ValueError, RecursionError) as exc:  # RecursionError: [[[[... nested deep
        reason = str(exc) if not isinstance(exc, RecursionError) else "nested too deeply"
        aside = f"{path}.bad-{time.strftime('%Y%m%d-%H%M%S')}"
        try:
            os.rename(path, aside)
        except OSError as err:
            aside = f"(could not be moved: {err.strerror})"
        log.error("state file %s is corrupt (%s): set aside as %s; nothing to adopt", path,
                  reason[:200], aside)
        return {}
    return data
