"""The state file: what a restarted llmuxd needs to adopt what is still running.

`<state_dir>/state.json` holds every model's state, PID, start time, process
group, port, level, checkpoint images, and what it was started with. It is
written atomically on every transition that matters (temp file in the same
directory, fsync, rename), so a crash at any instant leaves either the
old file or the new one, never half of one. A missing or corrupt file means
"nothing to adopt" and is said once in the log.
"""

from __future__ import annotations

import json
import logging
import os
import tempfile

log = logging.getLogger(__name__)
VERSION = 1
FIELDS = ("state", "pid", "pgid", "start_time", "asleep_level", "last_error", "last_error_at")
EXTRA_FIELDS = ("images", "image_bytes", "criu_mode", "checkpoint_pid", "cuda_pids", "argv_hash")


def path_of(state_dir: str) -> str:
    return os.path.join(state_dir, "state.json")


def snapshot(daemon) -> dict:
    models = {}
    for name, rt in daemon.runtimes.items():
        spec = daemon.spec_in_use(name)
        entry = {k: getattr(rt, k) for k in FIELDS}
        entry.update({k: rt.extra.get(k) for k in EXTRA_FIELDS if rt.extra.get(k) is not None})
        entry.update({"port": spec.port, "sleep_level": spec.sleep_level})
        models[name] = entry
    return {"version": VERSION, "daemon_pid": os.getpid(), "active": daemon.active(),
            "resident": daemon.resident(), "resume": daemon.resume, "models": models}


def save(state_dir: str, data: dict) -> None:
    os.makedirs(state_dir, exist_ok=True)
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


def load(state_dir: str) -> dict:
    path = path_of(state_dir)
    try:
        with open(path) as f:
            data = json.load(f)
    except FileNotFoundError:
        return {}
    except (OSError, ValueError) as exc:
        log.warning("ignoring unreadable state file %s: %s", path, exc)
        return {}
    if not isinstance(data, dict) or data.get("version") != VERSION or \
            not isinstance(data.get("models"), dict):
        log.warning("ignoring state file %s: unknown format", path)
        return {}
    return data
