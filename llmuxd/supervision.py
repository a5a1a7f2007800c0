"""Supervision: what the daemon does when a model's process exits, crashes or stops
answering, and after every state change.

A mixin of Daemon (daemon.py), apart because it is the part gunicorn's Arbiter calls
"murder and respawn": an active model that crashes or fails /health
`health_failures` times is restarted with exponential backoff and marked `failed`
after `restart_limit` restarts within `restart_window`; a sleeping model that dies
is marked `stopped`; a model llmuxd asked to stop exiting is not a failure. It
reads and writes only the Daemon's records, on the loop's thread.
"""

from __future__ import annotations

import logging
import signal
import time

from . import checkpoint_io, gpu_memory, launch, procs
from . import states as S
from .actions import HttpResult, describe_http
from .claims import gpus_of, model_claim
from .http import HttpCall
from .runner import Job
from .swap import recover_plan

log = logging.getLogger("llmuxd.daemon")

# Transitions not written to the state file (each write costs an fsync, ~1 ms):
# for these a restarted llmuxd reaches the same conclusion from the state before,
# because adoption asks the process itself (/health, /is_sleeping). A model stored
# as active that was draining or going to sleep is found awake or asleep; one
# stored as sleeping that was waking is found awake and stopped.
UNPERSISTED = frozenset({S.DRAINING, S.GOING_TO_SLEEP, S.WAKING})


class Supervision:
    def on_model_exit(self, name: str, child: procs.Child, status: int | None) -> None:
        procs.mark_reaped(child, status)
        rt = self.runtimes.get(name)
        if rt is None or rt.pid != child.pid:
            return
        expected = bool(rt.extra.get("stop_requested"))
        reason = procs.describe_exit(status, expected)
        rt.exit_reason, rt.pid = reason, None
        if expected:
            # Name what llmuxd sent: a server may die of another signal than the one asked
            # (vLLM turns SIGTERM into SIGINT), and "killed by SIGINT, as asked" misleads.
            sent = rt.extra.pop("signal_sent", None)
            log.info("%s: pid %d %s%s", name, child.pid, reason,
                     f" after llmuxd's {sent}" if sent else " (stopped by llmuxd)")
            return
        log.warning("%s: pid %d %s unexpectedly (state %s)", name, child.pid, reason, rt.state)
        if rt.state in (S.ACTIVE, S.SLEEPING, S.SUSPENDED):
            self.on_crash(name, f"{reason}")
        else:
            self.save_state()
        # In a transitional state the running plan notices (CheckExited, HTTP).

    def advance(self, name: str, state: str, error: str | None = None) -> None:
        """A transition decided by supervision (not by a plan): same table, same hooks."""
        rt = self.runtimes[name]
        before = rt.state
        S.advance(rt, state, error)
        log.info("%s: %s -> %s%s", name, before, state, f" ({error})" if error else "")
        self.on_transition(name, before, state)

    def strays(self, name: str) -> set[int]:
        """Processes of the model outside its process group (see procs.strays)."""
        rt = self.runtimes[name]
        tracked = {r.pid for r in self.runtimes.values() if r.pid}
        return procs.strays(rt.pid, rt.pgid, launch.marker(name),
                            lambda pid: pid in tracked or self.reaper.owns(pid))

    def signal_model(self, name: str, sig: int) -> bool:
        """The model's process group and its strays; False when nothing of it was left."""
        rt = self.runtimes[name]
        sent = rt.pgid is not None and procs.kill_group(rt.pgid, sig)
        return procs.signal_strays(lambda: self.strays(name), sig) > 0 or sent

    def on_crash(self, name: str, reason: str) -> None:
        rt = self.runtimes[name]
        self.stats.crash(name)
        if rt.pgid is not None:
            self.signal_model(name, signal.SIGKILL)  # EngineCore outlives its API server
        if rt.state == S.ACTIVE:
            self.advance(name, S.RESTARTING, error=f"crashed: {reason}")
            self.schedule_restart(name)
        else:
            self.advance(name, S.STOPPED, error=f"died while {rt.state}: {reason}")

    def schedule_restart(self, name: str) -> None:
        rt, d = self.runtimes[name], self.catalog.daemon
        now = time.monotonic()
        rt.restarts = [t for t in rt.restarts if now - t < d.restart_window]
        if len(rt.restarts) >= d.restart_limit or self.shutting_down:
            if rt.pgid is not None:
                procs.kill_group(rt.pgid, signal.SIGKILL)
            self.advance(name, S.FAILED, error=f"{rt.last_error}; gave up after "
                         f"{len(rt.restarts)} restart(s) within {d.restart_window:g}s")
            log.error("%s: %s", name, rt.last_error)
            return
        delay = min(60.0, d.restart_backoff * 2 ** len(rt.restarts))
        rt.restarts.append(now)
        rt.restarts_total += 1
        log.warning("%s: restarting in %.1fs (restart %d of %d)", name, delay, len(rt.restarts),
                    d.restart_limit)
        self.reactor.call_later(delay, lambda: self._restart_due(name))

    def _restart_due(self, name: str) -> None:
        rt = self.runtimes.get(name)
        if rt is None or rt.state != S.RESTARTING or self.shutting_down:
            return
        claim = model_claim(self, name)
        if self.runner.conflicting(claim) is not None:  # a job on its GPUs: after it
            self.reactor.call_later(0.5, lambda: self._restart_due(name))
            return
        self.start_job("recover", name, recover_plan(self, name), on_done=self._recover_done,
                       claim=claim)

    def _recover_done(self, job: Job) -> None:
        rt = self.runtimes.get(job.model)
        if job.ok or rt is None or rt.state != S.FAILED or self.shutting_down:
            return
        self.advance(job.model, S.RESTARTING)
        self.schedule_restart(job.model)

    def on_transition(self, name: str, before: str | None, after: str) -> None:
        """Hook for every state change (the state file and notifications attach here)."""
        if after != S.ADOPTING:  # settled (or being stopped): from now on the record is ours
            self.unadopted.pop(name, None)
        if after in (S.STOPPED, S.FAILED):
            # No process runs it now: the catalog's definition is the one that counts
            # (its gpus above all: claims and placement read them before it starts).
            self.specs_in_use.pop(name, None)
        if after not in UNPERSISTED:
            self.save_state()
        if self.front is not None:
            self.front.on_transition(name, after)
        if after == S.ACTIVE:
            self.notifier.status(f"active: {name}")
            self._measure(name)

    def _measure(self, name: str) -> None:
        """Record what the newly active model really holds (NVML; absent without a GPU)."""
        rt = self.runtimes[name]
        try:
            pids = checkpoint_io.process_tree(self, name) if rt.pid else []
            warning = gpu_memory.record_measured(rt, self.spec_in_use(name).gpu_memory, pids,
                                                 self.gpu_reader)
        except Exception as exc:  # a measurement must never break a swap
            log.debug("%s: GPU memory not measured: %s", name, exc)
            return
        if warning:
            log.warning("%s", warning)
            rt.extra["gpu_over"] = True
        else:
            rt.extra.pop("gpu_over", None)

    def _in_a_job(self, name: str) -> bool:
        """A running job may change this model (health waits for it to finish)."""
        return self.runner.conflicting(gpus_of(self, name)) is not None

    def _health_tick(self) -> None:
        self.reactor.call_later(self.catalog.daemon.health_interval, self._health_tick)
        if self.shutting_down:
            return
        for name, rt in self.runtimes.items():
            if rt.state == S.ACTIVE and not self._in_a_job(name):
                spec = self.spec_in_use(name)
                HttpCall(self.reactor, launch.connect_host(spec), spec.port, "GET", "/health", None,
                         5.0, lambda result, name=name: self._health_result(name, result))

    def _health_result(self, name: str, result) -> None:
        rt = self.runtimes.get(name)
        if rt is None or rt.state != S.ACTIVE or self._in_a_job(name):
            return
        if isinstance(result, HttpResult) and result.ok:
            rt.health_failures = 0
            d = self.catalog.daemon
            # Healthy again for as long as it takes to call it unhealthy: the error is history.
            if rt.last_error and time.time() - (rt.last_error_at or 0) >= \
                    d.health_interval * d.health_failures:
                log.info("%s: healthy again; last error cleared (%s)", name, rt.last_error)
                rt.last_error = rt.last_error_at = None
            return
        rt.health_failures += 1
        limit = self.catalog.daemon.health_failures
        log.warning("%s: health check failed (%d of %d): %s", name, rt.health_failures, limit,
                    describe_http(result))
        if rt.health_failures >= limit:
            self.stats.crash(name)
            self.advance(name, S.RESTARTING,
                         error=f"unhealthy: {limit} failed health checks ({describe_http(result)})")
            self.schedule_restart(name)
