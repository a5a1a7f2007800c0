"""The daemon: wires the catalog, the runtime records, the loop and the runner.

It owns all state and runs on one thread. Events arrive from the reactor
(signals, the control socket, child exits, timers); the daemon turns them into
jobs (plans run by the runner; at once only when their claims on GPUs are
disjoint, see claims.py), into supervision (supervision.py: restarts, health,
what every state change sets off) or into a catalog reload (reload.py). Those two
are mixins of the one Daemon object, so there is still a single owner of the state.
"""

from __future__ import annotations

import logging
import os
import signal
import time

from . import gpu_memory, launch, metrics, procs, seccomp, store, trust
from . import states as S
from .access import Access
from .catalog import Catalog
from .commands import Commands
from .control import ControlServer
from .front import Front, MetricsPort
from .loop import Reactor
from .notify import Notifier
from .runner import Job, Runner
from .adopt import adopt_plan
from .claims import resident_set, swap_claim
from .placement import lru
from .reload import CatalogReload
from .supervision import Supervision
from .swap import shutdown_plan, swap_plan
from .watch import CatalogWatcher

log = logging.getLogger(__name__)
REAP_SWEEP = 2.0  # SIGCHLD does the reaping; this sweep only heals a lost signal



class Daemon(Supervision, CatalogReload):
    """The state and the wiring; supervision.py and reload.py hold the two other
    concerns of the same object (mixins: one owner of the state, three modules)."""
    def __init__(self, catalog: Catalog) -> None:
        self.catalog = catalog
        self.config_path = catalog.path
        self.config_error: str | None = None
        self.runtimes: dict[str, S.Runtime] = {n: S.Runtime(n) for n in catalog.models}
        self.specs_in_use: dict[str, object] = {}
        self.criu_ok: set[str] = set()  # criu paths whose `criu check` passed (level 4 preflight)
        self.children: dict[str, procs.Child] = {}
        self.reactor = Reactor(self._on_signal)
        self.reaper = procs.Reaper()
        self.runner = Runner(self)
        self.notifier = Notifier()
        self.commands = Commands(self)
        self.access = Access(catalog.daemon)   # raises ValueError for an unknown user/group
        self.control = ControlServer(self.reactor, catalog.daemon.socket, catalog.daemon.socket_mode,
                                     self.commands.handle, group=self.access.socket_gid,
                                     max_clients=catalog.daemon.max_clients,
                                     idle_timeout=catalog.daemon.client_timeout,
                                     may_steer=lambda client: self.access.allows(client))
        self.control.on_close.append(self.commands.forget_client)
        self.front = Front(self) if catalog.daemon.front.listen else None
        self.stats = metrics.Stats()
        # /metrics is served by the front when there is one; metrics_listen adds a port.
        self.metrics_port = MetricsPort(self) if catalog.daemon.metrics_listen else None
        # Injectable so that tests (and CPU-only hosts) can say what a tree holds.
        self.gpu_reader = gpu_memory.nvml_device_memory
        self.jobs: list[Job] = []   # running jobs that hold a claim, oldest first
        self.shutting_down = False
        self.hurry = False
        self.killed_any = False
        self.exit_code: int | None = None
        self.started = time.monotonic()
        self.started_wall = time.time()
        self.is_pid1 = os.getpid() == 1
        self.pending_pidfds: dict[str, int] = {}
        # Checkpointed at shutdown, least recently used first: restored at the next start.
        self.resume: list[str] = []
        # State-file entries adoption has not settled yet, written back as they were.
        self.unadopted: dict[str, dict] = {}
        self.unadopted_active: str | None = None
        self.state_error: str | None = None   # the last state-file write went wrong
        self.watcher = CatalogWatcher(self.config_path, self.reactor.wake)
        self.reactor.after_events.append(self.reconcile)

    # -- lifecycle ---------------------------------------------------------------
    def run(self) -> int:
        procs.close_inherited_fds()
        procs.reset_inherited_signals()
        procs.raise_fd_limit()  # every client, HTTP call and tool pipe is an fd
        if not self.is_pid1 and not procs.become_subreaper():
            log.warning("could not become a child subreaper; orphaned model processes go to init")
        d = self.catalog.daemon
        # Before anything is read or signalled: the directories must be ours alone,
        # and no other llmuxd may be using them (it would adopt our models).
        trust.ensure_dir(d.state_dir, "state_dir")
        trust.ensure_dir(d.log_dir, "log_dir")
        self.reactor.install_signals()
        try:
            self.control.start()  # first: a live daemon on our socket is the likelier clash
            self.lock_fd = store.lock(d.state_dir)
            store.keep_reserve(d.state_dir)
            if self.front is not None:
                self.front.start()
            if self.metrics_port is not None:
                self.metrics_port.start()
            stored = store.load(d.state_dir)
            log.info("llmuxd %d listening on %s with %d model(s)", os.getpid(), d.socket,
                     len(self.catalog.models))
            self._periodic_reap()
            self._health_tick()
            self._watchdog_tick()
            self.watcher.start()
            self.resume = store.resume_list(stored)
            if stored.get("models"):
                self.unadopted = dict(stored["models"])
                self.unadopted_active = stored.get("active")
                self.notifier.status("adopting models left by an earlier llmuxd")
                self.start_job("adopt", None, adopt_plan(self, stored), on_done=self._started)
            else:
                self._started(None)
            while self.exit_code is None:
                self.reactor.run_once(max_wait=self._idle_wait())
            return self.exit_code
        finally:
            self.watcher.stop()
            if self.front is not None:
                self.front.close()
            if self.metrics_port is not None:
                self.metrics_port.close()
            self.control.close()
            self.reactor.close()

    def _started(self, job: Job | None) -> None:
        d = self.catalog.daemon
        if job is not None:
            if job.ok:  # every entry was looked at; cut short, the rest stays recorded
                self.unadopted.clear()
            self.save_state()
        # What a `shutdown = "checkpoint"` put to disk comes back first (the resident set,
        # in the order it was used); else the default model.
        targets = [n for n in self.resume if n in self.runtimes] if self.active() is None else []
        self.resume = []  # once asked for, they are ordinary swaps
        if not targets and d.default_model and self.active() is None:
            targets = [d.default_model]
        self._start_next(targets)

    def _start_next(self, targets: list[str]) -> None:
        """One swap after the other (they may share a GPU), then READY=1."""
        if self.shutting_down:
            return  # STOPPING=1 was sent: no READY=1 after it
        if not targets:
            self.notifier.ready(self.status_line())
            return
        target, rest = targets[0], targets[1:]
        claim = swap_claim(self, target)
        if self.runner.conflicting(claim) is not None:
            # the front (or a command) got there first on those GPUs: wait for it, as a
            # restart does, rather than have the runner refuse this swap
            self.reactor.call_later(0.5, lambda: self._start_next(targets))
            return
        self.notifier.status(f"starting {target}")
        self.start_job("swap", target, swap_plan(self, target),
                       on_done=lambda job: self._start_next(rest), claim=claim)

    def _idle_wait(self) -> float:
        return 30.0  # timers bound the wait anyway; this only caps a quiet loop

    def _watchdog_tick(self) -> None:
        """WATCHDOG=1 from the loop itself: a wedged loop stops the pings."""
        interval = self.notifier.watchdog_interval
        if interval:
            self.notifier.watchdog()
            self.reactor.call_later(interval, self._watchdog_tick)

    def reconcile(self) -> None:
        """After every pass: re-derive what is wanted from what is (gunicorn's manage_workers)."""
        if self.watcher.changed.is_set():
            self.watcher.changed.clear()
            log.info("catalog changed on disk: reloading")
            self.reload()
        if not self.shutting_down:
            self.remove_pending()

    def save_state(self) -> None:
        """Persist; what went wrong stays in status (daemon.state_error) and in the
        reply of the job that made the change, until a write succeeds with room to spare."""
        state_dir = self.catalog.daemon.state_dir
        try:
            problem = store.save(state_dir, store.snapshot(self))
        except OSError as exc:
            problem = (f"cannot write the state file in state_dir {state_dir}: "
                       f"{exc.strerror or exc}; a restarted llmuxd would not know this change")
        if problem and problem != self.state_error:
            log.error("%s", problem)
        elif self.state_error and not problem:
            log.info("state file written again")
        self.state_error = problem

    def status_line(self) -> str:
        active = self.active()
        return f"active: {active}" if active else "no active model"

    def active(self) -> str | None:
        """The most recently activated model (v1 clients read `active`; `resident` has all)."""
        resident = self.resident()
        return max(resident, key=lambda n: self.runtimes[n].since) if resident else None

    def resident_by_use(self) -> list[str]:
        """Every active model, least recently used first (as placement counts it)."""
        return [r.name for r in lru(resident_set(self))]

    def resident(self) -> list[str]:
        """Every active model, least recently activated first."""
        return sorted((n for n, rt in self.runtimes.items() if rt.state == S.ACTIVE),
                      key=lambda n: self.runtimes[n].since)

    def _on_signal(self, signum: int) -> None:
        if signum == signal.SIGCHLD:
            self.reaper.reap()
        elif signum in (signal.SIGTERM, signal.SIGINT):
            self.shutdown()
        elif signum == signal.SIGQUIT:
            self.shutdown(hurry=True)
        elif signum == signal.SIGHUP:
            self.reload()
        elif signum in (signal.SIGUSR1, signal.SIGUSR2):
            log.info("received %s: nothing to do", signal.Signals(signum).name)

    def _periodic_reap(self) -> None:
        self.reaper.reap()
        self.reactor.call_later(REAP_SWEEP, self._periodic_reap)

    # -- jobs ----------------------------------------------------------------------
    @property
    def job(self) -> Job | None:
        """The newest running job (status's `job`; `is not None`: something runs)."""
        return self.jobs[-1] if self.jobs else None

    def start_job(self, kind: str, model: str | None, plan, client=None, on_done=None,
                  exclusive: bool = True, claim: frozenset | None = None) -> Job:
        def done(job: Job) -> None:
            reply = {"ok": job.ok, "model": job.model,
                     "elapsed": round(time.monotonic() - job.started, 3), "phases": job.phases}
            reply["message" if job.ok else "error"] = job.message
            if job.warnings:
                reply["warnings"] = list(job.warnings)
            if self.state_error:
                reply["warning"] = self.state_error
            if isinstance(job.result, dict):
                reply[kind] = job.result
            self.stats.job_done(kind, job.model, bool(job.ok), reply["elapsed"], job.phases,
                                job.warnings)
            for waiter in job.waiters:
                waiter.finish(reply)
            self.notifier.status(self.status_line())
            if on_done is not None:
                on_done(job)
        job = Job(kind, model, plan, on_done=done, exclusive=exclusive, claim=claim)
        if client is not None:
            client.busy = True
            job.waiters.append(client)
        self.runner.start(job)
        return job

    def shutdown(self, hurry: bool = False) -> None:
        if self.shutting_down:
            if self.hurry:
                return
            hurry = True  # a second TERM/INT: short grace, then KILL
            log.warning("second stop request: killing models now")
        else:
            log.info("shutting down: stopping every model")
        self.shutting_down = True
        self.hurry = hurry
        self.killed_any = False  # the exit status speaks of this shutdown only
        mode = self.catalog.daemon.shutdown
        self.notifier.stopping()
        if self.front is not None:
            self.front.shutdown()
        for job in list(self.jobs):
            self.runner.abort(job, "cancelled: llmuxd is shutting down")
        if mode == "keep" and not hurry:
            # Models stay up for the next llmuxd to adopt (see README: KillMode).
            log.info("shutdown = keep: leaving every model running")
            self.save_state()
            self.exit_code = 0
            return
        checkpoint = mode == "checkpoint" and not hurry
        if checkpoint:
            self.resume = self.resident_by_use()
        self.start_job("shutdown", None, shutdown_plan(self, hurry, checkpoint=checkpoint),
                       on_done=self._shutdown_done)

    def _shutdown_done(self, job: Job) -> None:
        if self.job is not None or not job.message or job.message.startswith("cancelled"):
            return  # superseded by a faster shutdown
        self.reaper.reap()
        # A checkpoint that became a stop is not the shutdown that was asked for: say so
        # with the exit status too (systemd shows the unit failed; the log says why).
        degraded = bool(job.warnings)
        self.exit_code = 0 if job.ok and not self.killed_any and not degraded else 1
        log.info("llmuxd exiting with status %d%s", self.exit_code,
                 f" ({'; '.join(job.warnings)})" if degraded else "")

    # -- model processes -----------------------------------------------------------
    def spec_in_use(self, name: str):
        return self.specs_in_use.get(name) or self.catalog.models[name]

    def spawn_model(self, name: str) -> str | None:
        spec = self.catalog.models[name]
        d = self.catalog.daemon
        argv = launch.model_argv(d, spec)
        checkpoint = launch.checkpointable(d, spec)
        env = launch.model_env(spec, procs.clean_env(dict(os.environ), {}), checkpoint)
        # io_uring cannot be dumped: a checkpointable tree starts without it.
        no_io_uring = checkpoint and seccomp.supported()
        where = launch.log_path(d, name)
        try:
            log_fd = launch.open_log(d, name, os.O_WRONLY | os.O_APPEND | os.O_CREAT)
        except trust.Untrusted as exc:
            return str(exc)
        except OSError as exc:
            return f"cannot open its log file {where}: {exc.strerror or exc}"
        try:
            try:
                os.write(log_fd, f"=== llmuxd {time.strftime('%Y-%m-%d %H:%M:%S')}: starting "
                                 f"{name}: {' '.join(argv)}\n".encode())
            except OSError as exc:  # ENOSPC above all: say it is the log, not the model
                return f"cannot write its log file {where}: {exc.strerror or exc}"
            child, _ = procs.spawn(argv, env=env, log_fd=log_fd, cwd=spec.cwd,
                                   no_io_uring=no_io_uring)
        except (OSError, ValueError) as exc:  # ValueError: a NUL in argv or env
            return f"{argv[0]}: {getattr(exc, 'strerror', None) or exc}"
        finally:
            os.close(log_fd)
        rt = self.runtimes[name]
        rt.pid, rt.pgid, rt.start_time, rt.exit_reason = child.pid, child.pid, child.start_time, None
        rt.extra.pop("stop_requested", None)
        rt.extra.pop("restart_pending", None)
        rt.extra.pop("degraded", None)
        rt.extra["argv_hash"] = launch.argv_hash(argv, spec.env_dict())
        rt.extra["io_uring_blocked"] = no_io_uring
        self.children[name] = child
        self.specs_in_use[name] = spec
        self.reaper.register(child.pid, lambda status: self.on_model_exit(name, child, status))
        log.info("%s: started pid %d: %s", name, child.pid, " ".join(argv))
        self.save_state()
        return None

    def adopt_process(self, name: str, pid: int) -> float:
        """Track a process we did not spawn (restored by CRIU) as the model's main process."""
        rt = self.runtimes[name]
        start_time = procs.process_start_time(pid)
        if start_time is None:
            raise ValueError(f"process {pid} vanished")
        child = procs.Child(pid, [], start_time, None)
        rt.pid, rt.pgid, rt.start_time, rt.exit_reason = pid, os.getpgid(pid), start_time, None
        rt.extra.pop("stop_requested", None)
        self.children[name] = child
        self.reaper.register(pid, lambda status: self.on_model_exit(name, child, status))
        log.info("%s: tracking restored pid %d (start time %.2f)", name, pid, start_time)
        self.save_state()
        return start_time

    def run_in_background(self, argv: list[str]) -> None:
        """A helper whose result nobody waits for (deleting images): the reaper still
        collects it, and the loop never blocks on the work."""
        try:
            child, _ = procs.spawn(argv, env=procs.clean_env(dict(os.environ), {}))
        except OSError as exc:
            log.error("cannot run %s: %s", argv[0], exc)
            return
        self.reaper.register(child.pid, lambda status: procs.mark_reaped(child, status))

    def watch_pidfd(self, name: str, pid: int, pidfd: int, start_time: float) -> None:
        """Supervise a process that is not our child: its pidfd turns readable at exit."""
        child = procs.Child(pid, [], start_time, None)
        self.children[name] = child

        def exited() -> None:
            self.reactor.forget(pidfd)
            os.close(pidfd)
            self.on_model_exit(name, child, None)
        self.reactor.add_reader(pidfd, exited)















