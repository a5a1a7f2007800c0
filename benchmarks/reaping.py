"""Row group `reaping`: llmuxd vs tini as PID 1 of a PID namespace.

Each side runs as `unshare --pid --fork --mount-proc ...`: A is
`python3 -m llmuxd --config C` with a catalog of no models, B is Debian's
`tini -- sleep infinity` (installed with apt-get when missing). Orphans are made
inside the namespace by `nsenter --target <PID 1's host PID> --pid --mount sh -c
'...( sleep N & )...'`: each subshell exits at once, so its `sleep` is reparented
to the namespace's PID 1. Reaping is observed from outside through
/proc/<pid1>/task/<pid1>/children, where a reparented orphan stays listed (as a
zombie once it exits) until PID 1 waits for it, polled every 0.5 ms.

Per trial, on each side:
- burst: 500 `sleep 0.5` orphans; time from launching nsenter until the last is
  reaped. Forking 500 shells and the 0.5 s sleep dominate, the same on both sides.
- simultaneous deaths: 500 `sleep 1000` orphans, all in nsenter's new process
  group; once all 500 are listed under PID 1, one killpg(SIGKILL) kills them at
  once; time from that call until PID 1 has reaped every one. This isolates the
  reaping itself: 500 SIGCHLDs, 500 zombies to collect.
- SIGTERM to PID 1, then the time until it is gone, from its pidfd.
"""

from __future__ import annotations

import os
import re
import select
import signal
import statistics
import subprocess
import sys
import time

from . import profiling
from .harness import Ctx, Daemon, alternate, children, ensure_tool, percentile, wait_for
from .report import Goal, Row

NAME = "reaping"
DESCRIPTION = (
    "- **reaping** (rows 8-10): llmuxd (no models) versus Debian's `tini`, each as PID 1 under "
    "`unshare --pid --fork --mount-proc`; `nsenter` into the namespace starts a shell that "
    "double-forks 500 `sleep 0.5` and exits: time from the burst to the last orphan reaped "
    "(PID 1's children in /proc, polled every 0.5 ms); 500 orphans `sleep 1000` killed at once "
    "by one killpg: time until all are reaped; SIGTERM to PID 1: time until it is gone (pidfd).")

BURST = 500


def script(seconds: float) -> str:
    return f'i=0; while [ "$i" -lt {BURST} ]; do ( sleep {seconds:g} & ); i=$((i + 1)); done'
UNSHARE = ["unshare", "--pid", "--fork", "--mount-proc"]


def ensure_tini(ctx: Ctx) -> tuple[str, str]:
    """The tini binary, installed with apt-get if missing -> (path, note)."""
    return ensure_tool(ctx, "tini", "tini")


class Pid1:
    """llmuxd or tini as PID 1 of a fresh PID namespace."""

    def __init__(self, ctx: Ctx, kind: str, tini: str, profile=None,
                 module: str = "llmuxd") -> None:
        self.ctx, self.kind = ctx, kind
        self.daemon = None
        if kind == "llmuxd":
            # As PID 1, llmuxd ends with os._exit: profile through benchmarks/cprofile_exit.py.
            self.daemon = Daemon(ctx, ctx.workdir("pid1"), {}, profile=profile,
                                 profile_os_exit=True, module=module)
            self.daemon.start(prefix=UNSHARE)
            self.outer = self.daemon.proc
        else:
            self.outer = subprocess.Popen(UNSHARE + [tini, "--", "sleep", "infinity"],
                                          stdin=subprocess.DEVNULL, start_new_session=True,
                                          env=ctx.env())
        self.pid = wait_for(lambda: (children(self.outer.pid) or [None])[0], timeout=10,
                            interval=0.001, what=f"{kind} as PID 1")
        if kind == "tini":  # ready once its child runs
            wait_for(lambda: children(self.pid), timeout=10, interval=0.001, what="tini's child")
        self.base = set(children(self.pid))

    def orphans(self) -> list[int]:
        return [p for p in children(self.pid) if p not in self.base]

    def spawn_orphans(self, seconds: float) -> subprocess.Popen:
        """nsenter a shell that leaves BURST `sleep` orphans, in a process group of their own."""
        return subprocess.Popen(["nsenter", "--target", str(self.pid), "--pid", "--mount",
                                 "sh", "-c", script(seconds)], env=self.ctx.env(),
                                start_new_session=True)

    def wait_reaped(self, t0: float, proc: subprocess.Popen) -> float:
        """Poll until the burst's shell is gone and no orphan is left; -> that moment."""
        while True:
            now = time.perf_counter()
            if proc.poll() is not None and not self.orphans():
                if proc.returncode:
                    raise RuntimeError(f"nsenter burst failed with {proc.returncode}")
                return now
            if now - t0 > 120:
                raise RuntimeError(f"{self.kind}: orphans not reaped after 120 s")
            time.sleep(0.0005)

    def burst(self) -> float:
        """500 `sleep 0.5` orphans: launch -> last reaped, seconds."""
        t0 = time.perf_counter()
        proc = self.spawn_orphans(0.5)
        return self.wait_reaped(t0, proc) - t0

    def simultaneous(self) -> float:
        """500 live orphans killed by one killpg: kill -> all reaped, seconds."""
        proc = self.spawn_orphans(1000)
        try:
            wait_for(lambda: proc.poll() is not None and len(self.orphans()) >= BURST, timeout=60,
                     interval=0.005, what=f"{BURST} orphans under {self.kind}")
            if proc.returncode:
                raise RuntimeError(f"nsenter burst failed with {proc.returncode}")
            t0 = time.perf_counter()
            os.killpg(proc.pid, signal.SIGKILL)
        except BaseException:
            try:
                os.killpg(proc.pid, signal.SIGKILL)
            except OSError:
                pass
            raise
        return self.wait_reaped(t0, proc) - t0

    def terminate(self) -> float:
        fd = os.pidfd_open(self.pid)
        try:
            self.term_wall = time.time()   # to compare with llmuxd's log timestamps
            t0 = time.perf_counter()
            os.kill(self.pid, signal.SIGTERM)
            if not select.select([fd], [], [], 60)[0]:
                raise RuntimeError(f"{self.kind} did not exit after SIGTERM")
            elapsed = time.perf_counter() - t0
        finally:
            os.close(fd)
        self.outer.wait(30)
        return elapsed

    def kill(self) -> None:
        if self.outer.poll() is None:
            try:
                os.killpg(self.outer.pid, signal.SIGKILL)
            except OSError:
                pass
            self.outer.wait()


def trial(ctx: Ctx, kind: str, tini: str, profile=None) -> dict:
    p = Pid1(ctx, kind, tini, profile)
    try:
        out = {"burst": p.burst(), "simultaneous": p.simultaneous(), "term": p.terminate()}
        if p.daemon is not None:
            out["term_to_last_log"] = last_log_line(p.daemon.log) - p.term_wall
        return out
    finally:
        p.kill()


def run(ctx: Ctx) -> list[Row]:
    if os.geteuid() != 0:
        raise RuntimeError("needs root (unshare --pid, nsenter)")
    tini, note = ensure_tini(ctx)
    trial(ctx, "tini", tini), trial(ctx, "llmuxd", tini)  # warm-up
    n = ctx.n(8, 2)
    ctx.say(f"{n} trials each: PID 1, burst of {BURST} orphans, SIGTERM")
    a, b = alternate(n, lambda: trial(ctx, "llmuxd", tini), lambda: trial(ctx, "tini", tini))
    col = lambda rs, k: [r[k] * 1000 for r in rs]  # noqa: E731
    notes = [note] if note else []
    logged = statistics.median(col(a, "term_to_last_log"))
    logged_text = "under 1 ms" if logged < 1 else f"{logged:.0f} ms"
    return [
        Row("reaping.burst", f"PID 1: burst of {BURST} orphans (sleep 0.5) -> last reaped (info)",
            "ms", "llmuxd", col(a, "burst"), "tini", col(b, "burst"),
            notes=notes + ["from launching the burst: forking 500 shells and the 0.5 s sleep "
                           "dominate, the same on both sides"], extra={"llmuxd": a, "tini": b}),
        Row("reaping.kill", f"PID 1: {BURST} orphans killed at once -> all reaped", "ms", "llmuxd",
            col(a, "simultaneous"), "tini", col(b, "simultaneous"),
            goal=Goal("faster than tini", "ratio", 1.0, strict=True),
            notes=["one killpg(SIGKILL) of 500 live `sleep 1000` orphans; then poll PID 1's "
                   "children until none is left"]),
        Row("reaping.term", "PID 1: SIGTERM -> exited", "ms", "llmuxd", col(a, "term"), "tini",
            col(b, "term"), goal=Goal("faster than tini", "ratio", 1.0, strict=True),
            notes=["tini forwards TERM to its child (sleep) and exits with it; llmuxd runs its "
                   "shutdown job (no models) and exits",
                   f"llmuxd: SIGTERM -> its last log line (\"exiting with status 0\"): median "
                   f"{logged_text} (log timestamps, truncated to the ms); the rest comes after it: "
                   "the loop closing and the process exiting"],
            extra={"term_to_last_log_ms": col(a, "term_to_last_log")}),
    ]


_PROFILED: dict = {}   # profile path -> the trial's timings


def profile(ctx: Ctx, row: Row) -> None:
    """One cProfile trial of llmuxd as PID 1 serves both reaping rows."""
    path = ctx.root / "profile-reaping.pstats"
    tini, _ = ensure_tini(ctx)
    if path not in _PROFILED:
        _PROFILED[path] = trial(ctx, "llmuxd", tini, profile=path)
    result = _PROFILED[path]
    row.profile = profiling.top_cumulative(path)
    if row.key == "reaping.term":
        floor = statistics.median(python_exit_ms(ctx) for _ in range(3))
        measured = statistics.median(row.a)
        logged = statistics.median(row.extra.get("term_to_last_log_ms") or [0.0])
        logged = max(logged, 0.0)
        with_w, without = alternate(5, lambda: term_ms(ctx, tini, "llmuxd"),
                                    lambda: term_ms(ctx, tini, "benchmarks.nowatch"))
        row.explain = (f"of llmuxd's {measured:.0f} ms, {logged:.0f} ms pass until its last log line "
                       f"(the shutdown job included) and {measured - logged:.0f} ms after it, closing the "
                       "loop and exiting the process. Measured now, 5 trials each, alternating: "
                       f"llmuxd as PID 1 exits in {statistics.median(with_w):.1f} ms (p10-p90 "
                       f"{percentile(with_w, 10):.1f}-{percentile(with_w, 90):.1f}) with its catalog "
                       f"watcher and {statistics.median(without):.1f} ms (p10-p90 "
                       f"{percentile(without, 10):.1f}-{percentile(without, 90):.1f}) with the watcher "
                       "disabled (benchmarks/nowatch.py): the difference is the teardown of the "
                       "watcher thread and its inotify instance at exit; a python3 that only "
                       f"imported llmuxd's modules needs {floor:.0f} ms from SIGTERM to exit through "
                       "the interpreter's teardown, which llmuxd as PID 1 skips. tini is a C program "
                       "that exits with its child. The profile covers a whole trial (bursts, then "
                       "SIGTERM)")
    else:
        eager = profiling.calls(path, "describe_exit")
        row.explain = ("tini reaps in a C loop of waitpid; llmuxd handles each wakeup in Python: "
                       "drain the wakeup socket, then waitpid(-1, WNOHANG) until empty"
                       + (f", with describe_exit() evaluated {eager} times for a debug log line "
                          "that is off" if eager >= BURST else "")
                       + "; both wait mostly for the kernel to kill the 500 processes, on 2 cores "
                       f"(one trial under cProfile: {result.get('simultaneous', 0) * 1000:.0f} ms)"
                       ". Profile of one trial: " + profiling.describe(path))


def python_exit_ms(ctx: Ctx) -> float:
    """SIGTERM -> exit of a python3 that imported what llmuxd imports (the floor)."""
    code = ("import signal, sys, time, llmuxd.cli, llmuxd.daemon\n"
            "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
            "print('ready', flush=True)\ntime.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, env=ctx.env())
    try:
        proc.stdout.readline()
        fd = os.pidfd_open(proc.pid)
        t0 = time.perf_counter()
        proc.send_signal(signal.SIGTERM)
        select.select([fd], [], [], 30)
        os.close(fd)
        return (time.perf_counter() - t0) * 1000
    finally:
        proc.kill()
        proc.wait()


def term_ms(ctx: Ctx, tini: str, module: str) -> float:
    """SIGTERM -> gone of llmuxd (or a variant module) as PID 1 with no models, in ms."""
    p = Pid1(ctx, "llmuxd", tini, module=module)
    try:
        time.sleep(0.2)
        return p.terminate() * 1000
    finally:
        p.kill()


def last_log_line(log) -> float:
    """Wall-clock time (s) of llmuxd's last "exiting with status" log line; ms resolution."""
    stamp = 0.0
    for line in log.read_text(errors="replace").splitlines():
        m = re.match(r"(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3}) ", line)
        if m and "exiting with status" in line:
            stamp = time.mktime(time.strptime(m.group(1), "%Y-%m-%d %H:%M:%S")) + int(m.group(2)) / 1000
    if not stamp:
        raise RuntimeError(f"no 'exiting with status' line in {log}")
    return stamp
