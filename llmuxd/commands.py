"""What each control command means: status, swap, sleep, stop, reload, logs, ping.

Requests arrive as raw lines from control.py; replies go back on the client.
Commands that change which model holds a GPU run as jobs; one whose claim (the
GPUs it may touch, claims.py) overlaps a running job's is refused with `busy`,
naming what runs; one on other GPUs starts at once. Errors
are one line; nothing a client sends can raise out of here.
"""

from __future__ import annotations

import logging
import os
import time

from . import __version__, launch, trust
from . import states as S
from .protocol import MUTATING, ProtocolError, decode_request
from .doctor import doctor_plan
from .claims import CRIU, gpus_of, model_claim, resident_set, swap_claim, universe
from .placement import free_budget, free_per_gpu
from .swap import restart_plan, sleep_plan, stop_plan, swap_plan

log = logging.getLogger(__name__)
FOLLOW_POLL = 0.2
MAX_TAIL = 10_000
STREAM_CHUNK = 64 * 1024    # log text per event
STREAM_QUEUE = 256 * 1024   # queued log text per client before we wait for it to read


class CommandError(Exception):
    pass


class Commands:
    def __init__(self, daemon) -> None:
        self.d = daemon
        self.followers: dict = {}  # client -> [model, offset]
        self.doctor_job = None
        self._follow_timer = None

    def handle(self, client, line: bytes) -> None:
        try:
            request = decode_request(line)
            if request["cmd"] in MUTATING and not self.d.access.allows(client):
                log.warning("permission denied: %s from uid %s pid %s", request["cmd"],
                            client.peer_uid, client.peer_pid)
                raise CommandError(f"permission denied: {request['cmd']} needs root, llmuxd's "
                                   "user, socket_group or [daemon.access]")
            handler = getattr(self, "cmd_" + request["cmd"], None)
            if handler is None:
                raise CommandError(f"command {request['cmd']!r} is not available in this build")
            handler(client, request)
        except (ProtocolError, CommandError) as exc:
            client.finish({"ok": False, "error": str(exc)})
        except Exception as exc:
            log.exception("command failed: %r", line[:200])
            client.finish({"ok": False, "error": f"internal error: {exc}"})

    # -- helpers ----------------------------------------------------------------
    def _model(self, request) -> str:
        name = request.get("model")
        if not isinstance(name, str) or not name:
            raise CommandError("missing \"model\"")
        if name not in self.d.runtimes:
            known = ", ".join(self.d.runtimes) or "none"
            raise CommandError(f"unknown model {name!r} (known: {known})")
        return name

    def _exclusive(self, client, what: str, claim: frozenset | None) -> frozenset | None:
        if self.d.shutting_down:
            raise CommandError("refused: llmuxd is shutting down")
        job = self.d.runner.conflicting(claim)
        if job is not None:
            elapsed = time.monotonic() - job.started
            raise CommandError(f"busy: {job.describe()} in progress ({elapsed:.1f}s, phase "
                               f"{job.phase or 'starting'}); try again when it finishes")
        log.info("%s asked by uid %s pid %s", what, client.peer_uid, client.peer_pid)
        return claim

    # -- commands -----------------------------------------------------------------
    def cmd_ping(self, client, request) -> None:
        client.finish({"ok": True, "version": __version__, "pid": os.getpid()})

    def cmd_status(self, client, request) -> None:
        client.finish({"ok": True, **self.status()})

    def status(self) -> dict:
        d = self.d
        models = {}
        for name, rt in d.runtimes.items():
            spec = d.spec_in_use(name)
            models[name] = {**rt.as_status(), "model": spec.model, "port": spec.port,
                            "sleep_level": spec.sleep_level, "gpu_memory": spec.gpu_memory,
                            "current_level": current_level(rt),
                            "gpus": list(spec.gpus) if spec.gpus else None}
            if d.front is not None:
                models[name]["in_flight"] = d.front.in_flight(name)
        jobs = [{"kind": j.kind, "model": j.model, "phase": j.phase,
                 "elapsed": round(time.monotonic() - j.started, 3),
                 "gpus": None if j.claim is None else sorted(g for g in j.claim if g != CRIU)}
                for j in d.jobs]
        front = d.front.status() if d.front is not None else None
        resident = d.resident()
        budget = d.catalog.daemon.gpu_memory
        placed, every = resident_set(d), universe(d)
        free = free_budget(budget, placed, every) if budget is not None else None
        per_gpu = {str(gpu): {"budget": budget, "free": left,
                              "resident": [n for n in resident if gpu in gpus_of(d, n)]}
                   for gpu, left in free_per_gpu(budget, placed, every).items()}
        return {"active": d.active(), "resident": resident,
                "gpu": {"budget": budget, "free": free}, "gpus": per_gpu, "models": models,
                "job": jobs[-1] if jobs else None, "jobs": jobs, "front": front,
                "config": {"path": d.config_path, "error": d.config_error},
                "daemon": {"pid": os.getpid(), "version": __version__,
                           "uptime": round(time.monotonic() - d.started, 3),
                           "shutting_down": d.shutting_down, "state_error": d.state_error}}

    def cmd_swap(self, client, request) -> None:
        name = self._model(request)
        claim = self._exclusive(client, f"swap to {name}", swap_claim(self.d, name))
        if self.d.runtimes[name].state == S.ACTIVE:
            self.d.runtimes[name].last_used = time.time()  # asked for: the last to evict
            client.finish({"ok": True, "model": name, "message": f"{name} is already active"})
            return
        self.d.start_job("swap", name, swap_plan(self.d, name, bool(request.get("force"))), client,
                         claim=claim)

    def cmd_sleep(self, client, request) -> None:
        name = self._model(request)
        level = request.get("level")
        if level is not None and (not isinstance(level, int) or isinstance(level, bool)
                                  or not 1 <= level <= 5):
            raise CommandError("level must be an integer from 1 to 5")
        claim = self._exclusive(client, f"sleep {name}", model_claim(self.d, name, level))
        self.d.start_job("sleep", name, sleep_plan(self.d, name, level, bool(request.get("force"))),
                         client, claim=claim)

    def cmd_stop(self, client, request) -> None:
        name = self._model(request)
        claim = self._exclusive(client, f"stop {name}", model_claim(self.d, name))
        self.d.start_job("stop", name, stop_plan(self.d, name), client, claim=claim)

    def cmd_restart(self, client, request) -> None:
        name = request.get("model") or self.d.active()
        if name is None:
            raise CommandError("no active model to restart (name one)")
        name = self._model({"model": name})
        claim = self._exclusive(client, f"restart {name}", model_claim(self.d, name, 5))
        self.d.start_job("restart", name, restart_plan(self.d, name, bool(request.get("force"))),
                         client, claim=claim)

    def cmd_doctor(self, client, request) -> None:
        # Anyone may ask, so one run at a time: later askers wait for the same answer.
        if self.doctor_job is not None and self.doctor_job.ok is None:
            client.busy = True
            self.doctor_job.waiters.append(client)
            return
        self.doctor_job = self.d.start_job("doctor", None, doctor_plan(self.d), client,
                                           exclusive=False)

    def cmd_reload(self, client, request) -> None:
        if self.d.shutting_down:
            raise CommandError("refused: llmuxd is shutting down")
        log.info("reload asked by uid %s pid %s", client.peer_uid, client.peer_pid)
        ok, message = self.d.reload()
        client.finish({"ok": ok, ("message" if ok else "error"): message})

    def cmd_shutdown(self, client, request) -> None:
        log.info("shutdown asked by uid %s pid %s", client.peer_uid, client.peer_pid)
        client.finish({"ok": True, "message": "shutting down"})
        self.d.shutdown()

    def cmd_logs(self, client, request) -> None:
        name = self._model(request)
        lines = request.get("lines", 50)
        if not isinstance(lines, int) or isinstance(lines, bool) or not 0 <= lines <= MAX_TAIL:
            raise CommandError(f"lines must be an integer from 0 to {MAX_TAIL}")
        path = launch.log_path(self.d.catalog.daemon, name)
        fd = self._open_log(name)
        text, offset = tail(fd, lines) if fd is not None else ("", 0)
        if fd is None:
            # An empty answer reads as a broken command; say why there is nothing.
            text = f"(no log yet: {name} has never been started; {path} does not exist)\n" \
                if lines else ""
        follow = bool(request.get("follow"))
        if not follow and len(text) <= STREAM_CHUNK:
            client.finish({"ok": True, "model": name, "path": path, "text": text})
            return
        client.busy = True

        def sent() -> None:
            if not follow:
                client.finish({"ok": True, "model": name, "path": path, "text": ""})
                return
            self.followers[client] = [name, offset]
            if self._follow_timer is None:
                self._follow_timer = self.d.reactor.call_later(FOLLOW_POLL, self._follow)
        stream(client, name, text, sent)

    def _open_log(self, name: str) -> int | None:
        """The log read back to any client: never through a link (it could point
        at a root-only file); None while it does not exist."""
        try:
            return launch.open_log(self.d.catalog.daemon, name, os.O_RDONLY)
        except FileNotFoundError:
            return None
        except trust.Untrusted as exc:
            raise CommandError(str(exc)) from None
        except OSError as exc:
            raise CommandError(f"cannot read the log of {name}: {exc.strerror or exc}") from None

    def _follow(self) -> None:
        self._follow_timer = None
        for client, entry in list(self.followers.items()):
            name, offset = entry
            try:
                fd = self._open_log(name)
            except CommandError:
                continue
            if fd is None:
                continue
            try:
                with open(fd, "rb") as f:
                    size = os.fstat(f.fileno()).st_size
                    if size < offset:
                        offset = 0  # truncated or replaced
                    f.seek(offset)
                    data = f.read(256 * 1024)
            except OSError:
                continue
            if len(client.outbox) > STREAM_QUEUE:
                continue  # a slow reader: read on once it has caught up, never queue more
            if data:
                entry[1] = offset + len(data)
                client.send({"event": "log", "text": data.decode("utf-8", "replace")})
        if self.followers:
            self._follow_timer = self.d.reactor.call_later(FOLLOW_POLL, self._follow)

    def forget_client(self, client) -> None:
        self.followers.pop(client, None)


def current_level(rt) -> int | None:
    """The level a model sits at, apart from the configured one: the level it slept at,
    5 once its process was stopped (asked, or a sleep that became a stop), None while
    it is awake, on its way, failed, or was never started."""
    if rt.state in S.ASLEEP:
        return rt.asleep_level
    if rt.state == S.STOPPED and (rt.exit_reason is not None or rt.extra.get("degraded")):
        return 5
    return None


def stream(client, name: str, text: str, done) -> None:
    """Send text as log events, at most STREAM_QUEUE bytes queued at a time (the client's
    queue is capped at 1 MiB, and `logs -n 10000` may be several), then call done()."""
    chunks = []
    while text:
        cut = text.rfind("\n", 0, STREAM_CHUNK) + 1 or STREAM_CHUNK
        chunks.append(text[:cut])
        text = text[cut:]
    chunks.reverse()

    def pump() -> None:
        while chunks and not client.closed:
            client.send({"event": "log", "model": name, "text": chunks.pop()})
            if len(client.outbox) > STREAM_QUEUE:
                client.on_drained = pump  # control.Client calls it once the queue is sent
                return
        if not client.closed:
            done()
    pump()


def tail(fd: int, lines: int) -> tuple[str, int]:
    """The last `lines` lines of an open file (closed here) and the offset of its end."""
    try:
        with open(fd, "rb") as f:
            end = f.seek(0, os.SEEK_END)
            start = max(0, end - max(lines, 1) * 512 - 4096)
            f.seek(start)
            data = f.read(end - start)
    except OSError:
        return "", 0
    chunks = data.split(b"\n")
    if data.endswith(b"\n"):
        chunks = chunks[:-1]
    kept = chunks[-lines:] if lines else []
    text = b"\n".join(kept).decode("utf-8", "replace")
    return (text + "\n" if kept else ""), end
