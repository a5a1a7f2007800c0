"""Row group `idle`: what an idle llmuxd costs with three models (one active, two asleep).

llmuxd runs a catalog with the defaults that matter here (health_interval 10 s,
catalog watcher on) and three llmux-sim models at level 1: `a` active, `b` and
`c` sleeping. After a 2 s settle, the daemon is sampled every 10 s for 60 s
(30 s with --quick):
- CPU: the sum over its threads of /proc/PID/task/TID/schedstat (nanoseconds on
  CPU), per 10 s slice, as % of one core; the whole-window utime+stime from
  /proc/PID/stat (10 ms ticks) is given as a cross-check;
- RSS: VmRSS from /proc/PID/status;
- wakeups/s: voluntary + involuntary context switches summed over all threads
  (/proc/PID/task/TID/status; /proc/PID/status alone counts only the main
  thread), per second, and per thread to tell who wakes.
Side by side, at the same time, B is a python3 that imported llmuxd's modules and
sleeps: the floor for RSS (and for wakeups, zero).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time

import llmuxd.watch

from . import profiling
from .harness import Ctx, Daemon, cpu_ticks, rss_kb, thread_sample
from .report import Goal, Row

NAME = "idle"
DESCRIPTION = (
    "- **idle** (rows 11-13): llmuxd with three level-1 models (one active, two asleep) left "
    "alone for 60 s: CPU (schedstat of all threads), RSS, and wakeups per second (context "
    "switches of all threads), sampled in 10 s slices, next to a python3 that only imported "
    "llmuxd's modules (the floor).")

FLOOR = ("import signal, sys, time, llmuxd.cli, llmuxd.daemon\n"
         "signal.signal(signal.SIGTERM, lambda *a: sys.exit(0))\n"
         "while True: time.sleep(3600)\n")
SLICE = 10.0


def start_daemon(ctx: Ctx, profile=None) -> Daemon:
    d = Daemon(ctx, ctx.workdir("idle"), {m: {"sleep_level": 1} for m in ("a", "b", "c")},
               profile=profile).start()
    for m in ("b", "c", "a"):
        d.must({"cmd": "swap", "model": m})
    return d


def name_threads(pid: int, sample: dict) -> dict[int, str]:
    """main / python thread (the catalog watcher) / the comm of native threads."""
    names = {}
    for tid, s in sample.items():
        if tid == pid:
            names[tid] = "main loop"
        elif s["comm"].startswith("python"):
            names[tid] = "catalog-watcher (python thread)"
        else:
            names[tid] = f"{s['comm']} (native thread)"
    return names


def delta(now: dict, before: dict, key: str) -> float:
    """Sum over threads of a counter's growth (a thread born meanwhile counts from 0)."""
    return sum(v[key] - before.get(tid, {key: 0})[key] for tid, v in now.items())


def measure(pid: int, floor_pid: int, seconds: float) -> dict:
    """Slices of CPU %, wakeups/s and RSS for the daemon and the floor process."""
    def sample() -> dict:
        return {"d": thread_sample(pid), "f": thread_sample(floor_pid), "t": time.monotonic()}

    first = last = sample()
    ticks0 = cpu_ticks(pid)
    slices = []
    while last["t"] - first["t"] < seconds - 0.5:
        time.sleep(max(0.0, first["t"] + SLICE * (len(slices) + 1) - time.monotonic()))
        now = sample()
        dt = now["t"] - last["t"]
        slices.append({who: {"cpu_pct": delta(now[who], last[who], "cpu_ns") / 1e9 / dt * 100,
                             "wakeups": delta(now[who], last[who], "switches") / dt,
                             "rss_mb": rss_kb(p) / 1024}
                       for who, p in (("d", pid), ("f", floor_pid))})
        last = now
    span = last["t"] - first["t"]
    names = name_threads(pid, last["d"])
    per_thread = {}
    for tid, s in last["d"].items():
        one = {tid: s}
        per_thread[names[tid]] = {"wakeups_per_s": delta(one, first["d"], "switches") / span,
                                  "cpu_pct": delta(one, first["d"], "cpu_ns") / 1e9 / span * 100}
    return {"slices": slices, "per_thread": per_thread, "seconds": span,
            "stat_cpu_pct": (cpu_ticks(pid) - ticks0) / os.sysconf("SC_CLK_TCK") / span * 100}


def run(ctx: Ctx) -> list[Row]:
    seconds = ctx.n(60, 30)
    with start_daemon(ctx) as d:
        floor = subprocess.Popen([sys.executable, "-c", FLOOR], env=ctx.env(), start_new_session=True)
        try:
            time.sleep(2.0)
            ctx.say(f"sampling the idle daemon for {seconds} s")
            m = measure(d.pid, floor.pid, seconds)
        finally:
            floor.kill()
            floor.wait()
    col = lambda who, k: [s[who][k] for s in m["slices"]]  # noqa: E731
    threads = "; ".join(f"{name}: {v['wakeups_per_s']:.1f}/s, {v['cpu_pct']:.3f}% CPU"
                        for name, v in sorted(m["per_thread"].items(),
                                              key=lambda kv: -kv[1]["wakeups_per_s"]))
    extra = {"per_thread": m["per_thread"], "slices": m["slices"], "seconds": m["seconds"]}
    return [
        Row("idle.cpu", "Idle, 3 models: daemon CPU (% of one core)", "%", "llmuxd",
            col("d", "cpu_pct"), "python floor", col("f", "cpu_pct"),
            goal=Goal("under 0.1% of a core", "value", 0.1, "%"),
            notes=[f"{len(m['slices'])} slices of {SLICE:g} s; whole window from /proc/PID/stat "
                   f"utime+stime: {m['stat_cpu_pct']:.3f}%", f"per thread: {threads}"],
            extra=extra),
        Row("idle.rss", "Idle, 3 models: daemon RSS", "MB", "llmuxd", col("d", "rss_mb"),
            "python floor", col("f", "rss_mb"), goal=Goal("under 40 MB", "value", 40.0, "MB"),
            notes=["the floor is python3 with llmuxd's modules imported and nothing else"],
            extra=extra),
        Row("idle.wakeups", "Idle, 3 models: daemon wakeups (context switches/s, all threads)",
            "/s", "llmuxd", col("d", "wakeups"), "python floor", col("f", "wakeups"),
            goal=Goal("no busy polling: under 10/s", "value", 10.0, "/s"),
            notes=["by design the main loop wakes for timers only: the reaper sweep (1 s) and "
                   "the health check of the active model (health_interval, 10 s)",
                   f"per thread: {threads}"],
            extra=extra),
    ]


def profile(ctx: Ctx, row: Row) -> None:
    """One cProfile run of the idle daemon serves every missed idle row."""
    path = ctx.root / "profile-idle.pstats"
    seconds = ctx.n(20, 10)
    if not path.exists():
        d = start_daemon(ctx, profile=path)
        try:
            time.sleep(seconds)
        finally:
            d.stop()
            d.kill()
    row.profile = profiling.top_cumulative(path)
    if row.key == "idle.rss":
        floor = min((s["f"]["rss_mb"] for s in row.extra.get("slices", [])), default=0.0)
        rss = max((s["d"]["rss_mb"] for s in row.extra.get("slices", [])), default=0.0)
        row.explain = (f"a python3 that only imported llmuxd's modules already holds {floor:.1f} MB "
                       f"of llmuxd's {rss:.1f} MB: the interpreter and its imports dominate")
        return
    per = row.extra.get("per_thread") or {}
    worst = max(per.items(), key=lambda kv: kv[1]["wakeups_per_s"], default=None)
    busiest = max(per.items(), key=lambda kv: kv[1]["cpu_pct"], default=None)
    parts = []
    if worst:
        parts.append(f"most wakeups: {worst[0]} ({worst[1]['wakeups_per_s']:.0f}/s)")
    if busiest:
        parts.append(f"most CPU: {busiest[0]} ({busiest[1]['cpu_pct']:.3f}% of a core)")
    if worst and worst[0].startswith("catalog-watcher"):
        step = getattr(llmuxd.watch, "STEP_MS", "?")
        parts.append(f"the catalog watcher runs watchfiles.watch(step={step} ms), whose Rust loop "
                     "wakes every step to check the stop event")
    row.explain = ("; ".join(parts) + ". The profile covers the main thread only, set-up swaps "
                   "included: " + profiling.describe(path, per=int(seconds), what="s"))
