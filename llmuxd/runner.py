"""Runs plans: performs the operations they yield and feeds back results.

This is where pure plans meet the world. Synchronous operations (the clock, a
state transition, a port probe, a signal) are answered at once; waiting ones
(HTTP, pauses, waiting for a process group to vanish, helper tools) register
with the reactor and resume the plan from a later callback. Every job that
changes a model claims what it may touch (claims.py: GPUs, and CRIU); jobs whose
claims are disjoint run at once, and none starts while it overlaps a running
one, so GPU memory still changes strictly one step at a time on each GPU.
`doctor` claims nothing and only reads.
"""

from __future__ import annotations

import logging
import os
import signal
import time
from dataclasses import dataclass, field
from typing import Callable

from . import adopt_io, checkpoint_io, launch, link_remap, procs
from . import states as S
from .claims import EVERYTHING, conflicts
from .actions import (CheckExited, CheckPort, Degraded, Http, InFlight, Io, IoFailed, Now, Pause,
                      Phase, RunTool, RunTools, SignalGroup, Spawn, StepFailed, ToolResult,
                      Transition, WaitGone)
from .commands import tail
from .http import HttpCall

log = logging.getLogger(__name__)
PENDING = object()
WAITING_EVERY = 5.0  # seconds between "still waiting" events of one long phase
GONE_POLL = 0.02  # a /proc scan for the group: swaps wait on it, so poll briskly


def failpoint(*names: str) -> None:
    """Crash tests: LLMUX_FAILPOINT=<name> makes llmuxd SIGKILL itself at that step
    (a phase such as `dump` or `start:b`, `transition:<state>`, or `tool:<criu verb>`)."""
    wanted = os.environ.get("LLMUX_FAILPOINT")
    if wanted and wanted in names:
        log.warning("failpoint %s: killing llmuxd", wanted)
        os.kill(os.getpid(), signal.SIGKILL)


@dataclass(frozen=True)
class _Throw:
    exc: Exception


@dataclass
class Job:
    kind: str                 # swap, sleep, stop, restart, remove, recover, adopt, shutdown, doctor
    model: str | None
    plan: object              # the generator
    on_done: Callable[["Job"], None] | None = None
    waiters: list = field(default_factory=list)
    started: float = field(default_factory=time.monotonic)
    phases: list = field(default_factory=list)   # (seconds since start, phase, model)
    phase: str | None = None
    warnings: list = field(default_factory=list)  # Degraded texts, in order
    cancel: Callable[[], None] | None = None
    ok: bool | None = None
    message: str = ""
    result: object = None
    exclusive: bool = True    # holds its claim (changes GPU memory); doctor does not
    claim: frozenset | None = EVERYTHING  # GPUs (and CRIU) it may touch; see claims.py

    def describe(self) -> str:
        return f"{self.kind} {self.model}" if self.model else self.kind


class Runner:
    def __init__(self, daemon) -> None:
        self.d = daemon
        self.ops = {Now: self._now, Phase: self._phase, Degraded: self._degraded,
                    Transition: self._transition,
                    CheckPort: self._check_port, CheckExited: self._check_exited,
                    Spawn: self._spawn, SignalGroup: self._signal, WaitGone: self._wait_gone,
                    Pause: self._pause, Http: self._http, RunTool: self._run_tool,
                    RunTools: self._run_tools, Io: self._io, InFlight: self._in_flight}

    # -- driving ---------------------------------------------------------------
    def conflicting(self, claim: frozenset | None) -> Job | None:
        """The oldest running job whose claim overlaps `claim` (None when it may start)."""
        return next((j for j in self.d.jobs if conflicts(j.claim, claim)), None)

    def start(self, job: Job) -> None:
        log.info("job started: %s%s", job.describe(), "" if job.claim is EVERYTHING else
                 f" (claims {', '.join(map(str, sorted(job.claim, key=str)))})")
        if job.exclusive:
            running = self.conflicting(job.claim)
            if running is not None:  # callers check first: this is the last line of defence
                log.error("refused to start %s beside %s (a bug)", job.describe(), running.describe())
                self._finish(job, False, f"busy: {running.describe()} in progress")
                return
            self.d.jobs.append(job)
        self._step(job, None)

    def _resume(self, job: Job, value) -> None:
        if job.ok is not None:
            return  # aborted meanwhile: the result belongs to nobody
        job.cancel = None
        self._step(job, value)

    def _step(self, job: Job, value) -> None:
        while True:
            try:
                if isinstance(value, _Throw):  # the operation itself was refused
                    op = job.plan.throw(value.exc)
                else:
                    op = job.plan.send(value)
            except StopIteration as stop:
                job.result = stop.value
                self._finish(job, True, stop.value if isinstance(stop.value, str) else "done")
                return
            except StepFailed as exc:
                self._finish(job, False, str(exc))
                return
            except Exception as exc:  # a bug: report it, keep the daemon
                log.exception("plan %s crashed", job.describe())
                self._finish(job, False, f"internal error: {exc}")
                return
            try:
                value = self.ops[type(op)](job, op)
            except Exception as exc:  # a bug or an OS surprise: the plan must still end
                log.exception("%s: operation %r failed", job.describe(), op)
                value = _Throw(StepFailed(f"internal error in {type(op).__name__}: {exc}"))
            if value is PENDING:
                return

    def _finish(self, job: Job, ok: bool, message: str) -> None:
        job.ok, job.message = ok, message
        if job in self.d.jobs:
            self.d.jobs.remove(job)
        elapsed = time.monotonic() - job.started
        (log.info if ok else log.error)("job %s %s after %.2fs: %s", job.describe(),
                                        "succeeded" if ok else "failed", elapsed, message)
        if job.on_done is not None:
            job.on_done(job)

    def abort(self, job: Job, why: str) -> None:
        """Stop driving a plan now (shutdown); its models are left to the next plan."""
        if job.cancel is not None:
            job.cancel()
            job.cancel = None
        job.plan.close()
        self._finish(job, False, why)

    # -- synchronous operations -----------------------------------------------
    def _now(self, job, op):
        return time.monotonic()

    def _phase(self, job, op: Phase):
        elapsed = time.monotonic() - job.started
        job.phase = op.name
        job.phases.append((round(elapsed, 4), op.name, op.model))
        log.info("%s: %s (%.2fs)", op.model, op.name, elapsed)
        event = {"event": "progress", "phase": op.name, "model": op.model,
                 "elapsed": round(elapsed, 3)}
        for client in job.waiters:
            client.send(event)
        if job.kind == "shutdown":  # tell systemd a long stop or dump is progress, not a hang
            self.d.notifier.extend_timeout(self.d.catalog.daemon.stop_timeout + 60)
        failpoint(f"{op.name}:{op.model}", op.name)
        if job.waiters and op.model in self.d.runtimes:
            self.d.reactor.call_later(WAITING_EVERY, lambda: self._waiting(job, len(job.phases)))
        return None

    def _degraded(self, job, op: Degraded):
        job.warnings.append(op.text)
        self.d.stats.degrade(op.model)
        if op.model in self.d.runtimes:  # status shows the level it ended at (spawn clears it)
            self.d.runtimes[op.model].extra["degraded"] = op.text
        log.warning("%s: %s", op.model, op.text)
        event = {"event": "warning", "model": op.model, "text": op.text}
        for client in job.waiters:
            client.send(event)
        return None

    def _waiting(self, job, phases: int) -> None:
        """A long phase (a 10-minute vLLM start): tell the waiting clients how long it has
        been, with the model's latest log line (vLLM logs its loading progress there)."""
        if job.ok is not None or len(job.phases) != phases or not job.waiters:
            return  # finished, or on to the next phase (which has its own timer)
        _, phase, model = job.phases[-1]
        try:
            fd = launch.open_log(self.d.catalog.daemon, model, os.O_RDONLY)
            line = tail(fd, 1)[0].strip()[-300:]
        except OSError:  # trust.Untrusted included: then no line at all
            line = ""
        event = {"event": "waiting", "phase": phase, "model": model,
                 "elapsed": round(time.monotonic() - job.started, 3), "log": line}
        for client in job.waiters:
            client.send(event)
        self.d.reactor.call_later(WAITING_EVERY, lambda: self._waiting(job, phases))

    def _transition(self, job, op: Transition):
        rt = self.d.runtimes[op.model]
        before = rt.state
        try:
            S.advance(rt, op.state, op.error, **op.fields)
        except S.IllegalTransition as exc:
            log.error("refused transition (a bug): %s", exc)
            return _Throw(StepFailed(f"internal error: {exc}"))
        if op.state in (S.STOPPING, S.CHECKPOINTING):
            rt.extra["stop_requested"] = True
        log.info("%s: %s -> %s%s", op.model, before, op.state, f" ({op.error})" if op.error else "")
        self.d.on_transition(op.model, before, op.state)
        failpoint(f"transition:{op.state}")
        return None

    def _check_port(self, job, op: CheckPort):
        spec = self.d.catalog.models[op.model]
        return procs.port_holder(launch.connect_host(spec), spec.port)

    def _in_flight(self, job, op: InFlight):
        return self.d.front.in_flight(op.model) if self.d.front is not None else 0

    def _check_exited(self, job, op: CheckExited):
        rt = self.d.runtimes[op.model]
        if rt.exit_reason is not None:
            return rt.exit_reason
        if rt.pid is None or not procs.is_alive(rt.pid):
            return "exited"
        return None

    def _spawn(self, job, op: Spawn):
        return self.d.spawn_model(op.model)

    def _signal(self, job, op: SignalGroup):
        rt = self.d.runtimes[op.model]
        rt.extra["stop_requested"] = True
        rt.extra["signal_sent"] = signal.Signals(op.signal).name
        if rt.pgid is not None:
            # The group and what left it (a daemonized helper): all of it was started by us.
            if self.d.signal_model(op.model, op.signal) and op.signal == signal.SIGKILL:
                self.d.killed_any = True
            log.info("%s: sent %s to process group %d", op.model, signal.Signals(op.signal).name,
                     rt.pgid)
        return None

    # -- waiting operations ------------------------------------------------------
    def _pause(self, job, op: Pause):
        timer = self.d.reactor.call_later(op.seconds, lambda: self._resume(job, None))
        job.cancel = timer.cancel
        return PENDING

    def _http(self, job, op: Http):
        spec = self.d.spec_in_use(op.model)
        call = HttpCall(self.d.reactor, launch.connect_host(spec), spec.port, op.method, op.path,
                        op.body, op.timeout, lambda result: self._resume(job, result))
        job.cancel = call.cancel
        return PENDING

    def _wait_gone(self, job, op: WaitGone):
        rt = self.d.runtimes[op.model]
        deadline = time.monotonic() + op.timeout
        state = {"timer": None}

        def gone() -> bool:
            if rt.pid is not None and procs.is_alive(rt.pid):
                return False
            if rt.pgid is not None and procs.group_members(rt.pgid):
                return False
            return not self.d.strays(op.model)

        def check() -> None:
            self.d.reaper.reap()  # zombies of the group are ours as subreaper
            if gone():
                rt.pgid = None if rt.pid is None else rt.pgid
                self._resume(job, True)
            elif time.monotonic() >= deadline:
                self._resume(job, False)
            else:
                state["timer"] = self.d.reactor.call_later(GONE_POLL, check)

        state["timer"] = self.d.reactor.call_later(0, check)
        job.cancel = lambda: state["timer"].cancel()
        return PENDING

    def _run_tool(self, job, op: RunTool):
        cancel = self._launch_tool(op.argv, op.timeout, lambda result: self._resume(job, result),
                                   dict(op.env))
        job.cancel = cancel
        if len(op.argv) > 1:
            failpoint(f"tool:{op.argv[1]}")  # e.g. tool:dump: killed while criu runs
        return PENDING

    def _run_tools(self, job, op: RunTools):
        results: list = [None] * len(op.argvs)
        left = [len(op.argvs)]
        if not op.argvs:
            return []

        def one_done(i: int, result: ToolResult) -> None:
            results[i] = result
            left[0] -= 1
            if left[0] == 0:
                self._resume(job, results)
        cancels = [self._launch_tool(argv, op.timeout, lambda r, i=i: one_done(i, r))
                   for i, argv in enumerate(op.argvs)]
        job.cancel = lambda: [c() for c in cancels]
        return PENDING

    def _io(self, job, op: Io):
        try:
            operation = (checkpoint_io.OPERATIONS.get(op.name) or link_remap.OPERATIONS.get(op.name)
                         or adopt_io.OPERATIONS[op.name])
            return operation(self.d, *op.args)
        except Exception as exc:  # psutil.Error, a malformed manifest...: the plan decides
            log.warning("%s%s failed: %s", op.name, op.args, exc)
            return IoFailed(f"{op.name}: {exc}")

    def _launch_tool(self, argv, timeout: float, done: Callable[[ToolResult], None],
                     env: dict[str, str] | None = None):
        """Run a helper through the one spawn function; its status comes from the reaper."""
        reactor = self.d.reactor
        try:
            child, read_fd = procs.spawn(list(argv), env=procs.clean_env(dict(os.environ), env or {}),
                                         capture=True)
        except OSError as exc:
            result = ToolResult(127, f"cannot run {argv[0]}: {exc.strerror or exc}")
            reactor.call_later(0, lambda: done(result))
            return lambda: None
        log.debug("running %s", " ".join(argv))
        chunks: list[bytes] = []
        state: dict = {}

        def finish(force: bool = False) -> None:
            if "sent" in state or not (force or ("status" in state and "eof" in state)):
                return
            state["sent"] = True
            timer.cancel()
            if "eof" not in state:  # a grandchild may hold the pipe: stop reading
                reactor.remove_reader(read_fd)
                os.close(read_fd)
                state["eof"] = True
            rc = None if state.get("killed") or "status" not in state else \
                os.waitstatus_to_exitcode(state["status"])
            text = b"".join(chunks).decode("utf-8", "replace")
            done(ToolResult(rc, text[-8000:]))

        def on_output() -> None:
            if "eof" in state:
                return
            try:
                data = os.read(read_fd, 65536)
            except BlockingIOError:
                return
            if data:
                if sum(map(len, chunks)) < 1 << 20:
                    chunks.append(data)
                return
            reactor.remove_reader(read_fd)
            os.close(read_fd)
            state["eof"] = True
            finish()

        def on_exit(status: int) -> None:
            procs.mark_reaped(child, status)
            state["status"] = status
            finish()

        def kill() -> None:
            if "status" not in state:  # once reaped, its group id may be someone else's
                procs.kill_group(child.pid, signal.SIGKILL)

        def on_deadline() -> None:
            state["killed"] = True
            kill()
            log.error("%s: killed at its deadline (%gs)", argv[0], timeout)
            finish(force=True)  # even if it is stuck in the kernel: the plan goes on

        def cancel() -> None:
            kill()
            finish(force=True)

        self.d.reaper.register(child.pid, on_exit)
        reactor.add_reader(read_fd, on_output)
        timer = reactor.call_later(timeout, on_deadline)
        return cancel
