"""Row group `swap`: what llmuxd adds to a swap, levels 1, 2 and 5 (cold start).

Level 1 and 2 (A vs B, alternating): A is a round trip X -> Y -> X through the
daemon (two `swap` requests on the control socket from this process, so no
Python start-up of a CLI is counted); B is a minimal script issuing the same HTTP
calls to the same two llmux-sim servers with plain http.client, one connection
per call as llmuxd does: GET /metrics (drain check), POST /sleep?level=N,
GET /is_sleeping, POST /wake_up (level 2: POST /collective_rpc reload_weights and
POST /reset_prefix_cache), GET /is_sleeping, GET /health. The raw round trip
leaves both servers as the daemon recorded them (X awake, Y asleep). The sims
run with zero delays, so only the control path is measured.

Cold start (level 5): readiness detection = time from the simulator being
healthy to `swap` returning. A thread of this process polls the target's
/health every 1 ms (connections are refused until llmux-sim listens, which it
does only once its engine is ready) and stamps the first 200; detection = reply
received - that stamp. The stamp is at most ~1 ms late, so this slightly
under-states the detection time.

`llmuxctl swap` CLI wall time (A, a subprocess per swap) is reported next to the
same swap sent on the socket (B), for information.
"""

from __future__ import annotations

import subprocess
import sys
import threading
import time

from . import profiling
from .harness import Ctx, Daemon, alternate, http_call
from .report import Goal, Row

NAME = "swap"
DESCRIPTION = (
    "- **swap** (rows 1-4): a level-1 and a level-2 round trip A -> B -> A through llmuxd "
    "(control socket from Python) against llmux-sim with zero delays, versus the same HTTP "
    "calls made directly with http.client (drain check, sleep, is_sleeping, wake_up "
    "[+ reload_weights, reset_prefix_cache], is_sleeping, health); cold-start readiness "
    "detection (a 1 ms /health poller stamps when the sim turns healthy; detection = swap "
    "reply - stamp); `llmuxctl swap` wall time versus the same swap on the socket.")

MODELS = {"a": {"sleep_level": 1}, "b": {"sleep_level": 1},
          "c": {"sleep_level": 2}, "d": {"sleep_level": 2},
          "e": {"sleep_level": 5}}
PAIRS = {1: ("a", "b"), 2: ("c", "d")}


def drained(metrics: bytes) -> bool:
    depth = 0.0
    for line in metrics.decode("utf-8", "replace").splitlines():
        name = line.split("{", 1)[0].split(" ", 1)[0]
        if name in ("vllm:num_requests_running", "vllm:num_requests_waiting"):
            depth += float(line.rsplit(" ", 1)[1])
    return depth == 0


def ok(port: int, method: str, path: str, body: bytes | None = None) -> bytes:
    status, data = http_call(port, method, path, body)
    if status != 200:
        raise RuntimeError(f"{method} {path} on port {port}: HTTP {status} {data[:200]!r}")
    return data


def raw_swap(src: int, dst: int, level: int) -> dict[str, float]:
    """The HTTP calls of one swap src -> dst, timed by llmuxd's phase names."""
    t = [time.perf_counter()]
    if not drained(ok(src, "GET", "/metrics")):
        raise RuntimeError("raw swap: requests in flight")
    t.append(time.perf_counter())
    ok(src, "POST", f"/sleep?level={level}")
    if b"true" not in ok(src, "GET", "/is_sleeping"):
        raise RuntimeError("raw swap: still awake")
    t.append(time.perf_counter())
    ok(dst, "POST", "/wake_up")
    if level == 2:
        ok(dst, "POST", "/collective_rpc", b'{"method": "reload_weights"}')
        ok(dst, "POST", "/reset_prefix_cache")
    if b"false" not in ok(dst, "GET", "/is_sleeping"):
        raise RuntimeError("raw swap: still asleep")
    t.append(time.perf_counter())
    ok(dst, "GET", "/health")
    t.append(time.perf_counter())
    return {"drain": t[1] - t[0], "sleep": t[2] - t[1], "wake": t[3] - t[2], "health": t[4] - t[3]}


def phase_durations(reply: dict) -> dict[str, float]:
    """Seconds spent in each phase of a swap reply (the last ends at `elapsed`)."""
    marks = reply.get("phases") or []
    ends = [m[0] for m in marks[1:]] + [reply["elapsed"]]
    out: dict[str, float] = {}
    for (start, phase, _model), end in zip(marks, ends):
        out[phase] = out.get(phase, 0.0) + end - start
    return out


class RoundTrips:
    """Both sides of the level-1/2 comparison, keeping per-phase detail for the explanation."""

    def __init__(self, d: Daemon, level: int) -> None:
        self.d, self.level = d, level
        self.x, self.y = PAIRS[level]
        self.daemon_phases: list[dict] = []
        self.raw_phases: list[dict] = []
        self.outside: list[float] = []   # client wall - job elapsed (socket, JSON, job setup)

    def daemon(self) -> float:
        t0 = time.perf_counter()
        replies = [self.d.must({"cmd": "swap", "model": m}) for m in (self.y, self.x)]
        total = time.perf_counter() - t0
        for r in replies:
            self.daemon_phases.append(phase_durations(r))
        self.outside.append((total - sum(r["elapsed"] for r in replies)) / 2)
        return total * 1000

    def raw(self) -> float:
        px, py = self.d.port(self.x), self.d.port(self.y)
        t0 = time.perf_counter()
        self.raw_phases += [raw_swap(px, py, self.level), raw_swap(py, px, self.level)]
        return (time.perf_counter() - t0) * 1000


def mean_phases(samples: list[dict]) -> dict[str, float]:
    keys = {k for s in samples for k in s}
    return {k: sum(s.get(k, 0.0) for s in samples) / len(samples) * 1000 for k in sorted(keys)}


PHASES = ("drain", "sleep", "wake", "health")


def breakdown(rt: RoundTrips) -> str:
    dp, rp = mean_phases(rt.daemon_phases), mean_phases(rt.raw_phases)
    parts = [f"{k} {dp.get(k, 0):.1f} vs {rp.get(k, 0):.1f}" for k in PHASES]
    outside = sum(rt.outside) / len(rt.outside) * 1000
    return (f"per swap, llmuxd phase vs raw calls (ms, mean): {', '.join(parts)}; "
            f"outside the job (socket request/reply): {outside:.1f}")


def overhead(row: Row) -> str:
    """Where llmuxd's extra time per swap goes, phase by phase (from the run's phases)."""
    dp, rp = row.extra.get("daemon_phases_ms", {}), row.extra.get("raw_phases_ms", {})
    deltas = sorted(((dp.get(k, 0) - rp.get(k, 0), k) for k in PHASES), reverse=True)
    total = sum(d for d, _ in deltas)
    return (f"llmuxd adds {total:.1f} ms per swap over the raw calls, most in "
            + ", ".join(f"{k} (+{d:.1f} ms)" for d, k in deltas[:3]))


class Poller(threading.Thread):
    """Polls GET /health on a port every `interval` s; stamps the first 200 (perf_counter)."""

    def __init__(self, port: int, interval: float = 0.001) -> None:
        super().__init__(daemon=True)
        self.port, self.interval = port, interval
        self.healthy_at: float | None = None
        self.stop_event = threading.Event()

    def run(self) -> None:
        while not self.stop_event.is_set():
            try:
                if http_call(self.port, "GET", "/health", timeout=1.0)[0] == 200:
                    self.healthy_at = time.perf_counter()
                    return
            except OSError:
                pass
            time.sleep(self.interval)


def cold_start(d: Daemon, back: str) -> tuple[float, float]:
    """Swap to the level-5 model e (cold start), then back. -> (detection ms, swap ms)."""
    poller = Poller(d.port("e"))
    poller.start()
    t0 = time.perf_counter()
    try:
        d.must({"cmd": "swap", "model": "e"})
        done = time.perf_counter()
    finally:
        poller.stop_event.set()
        poller.join(5)
    d.must({"cmd": "swap", "model": back})
    if poller.healthy_at is None:
        raise RuntimeError("the poller never saw e healthy")
    return (done - poller.healthy_at) * 1000, (done - t0) * 1000


def cli_swap(d: Daemon, model: str) -> float:
    t0 = time.perf_counter()
    proc = subprocess.run([sys.executable, "-m", "llmuxctl", "--socket", d.socket, "swap", model],
                          capture_output=True, text=True, env=d.ctx.env(), timeout=120)
    if proc.returncode:
        raise RuntimeError(f"llmuxctl swap {model}: {proc.stderr.strip()}")
    return (time.perf_counter() - t0) * 1000


def socket_swap(d: Daemon, model: str) -> float:
    t0 = time.perf_counter()
    d.must({"cmd": "swap", "model": model})
    return (time.perf_counter() - t0) * 1000


def start_daemon(ctx: Ctx, names=("c", "d", "e", "a", "b"), profile=None) -> Daemon:
    """llmuxd with `names`; every sleeping model cold-started once, the first pair's x active."""
    d = Daemon(ctx, ctx.workdir("swap"), {m: MODELS[m] for m in names}, profile=profile).start()
    for m in [m for m in names if MODELS[m]["sleep_level"] < 5] + [names[-2]]:
        d.must({"cmd": "swap", "model": m})
    return d


def run(ctx: Ctx) -> list[Row]:
    rows = []
    with start_daemon(ctx) as d:
        for level in (1, 2):
            x, y = PAIRS[level]
            d.must({"cmd": "swap", "model": x})
            rt = RoundTrips(d, level)
            rt.daemon(), rt.raw()  # warm-up
            rt.daemon_phases.clear(), rt.raw_phases.clear(), rt.outside.clear()
            n = ctx.n(30, 8)
            ctx.say(f"level {level}: {n} round trips each side")
            a, b = alternate(n, rt.daemon, rt.raw)
            rows.append(Row(f"swap.l{level}", f"Swap round trip A->B->A, level {level}", "ms",
                            "llmuxd", a, "raw http.client", b,
                            goal=Goal("llmux within 2x of raw", "ratio", 2.0),
                            notes=[breakdown(rt)],
                            extra={"daemon_phases_ms": mean_phases(rt.daemon_phases),
                                   "raw_phases_ms": mean_phases(rt.raw_phases)}))
        n = ctx.n(8, 3)
        ctx.say(f"cold start: {n} rounds")
        d.must({"cmd": "swap", "model": "c"})
        cold = [cold_start(d, "c") for _ in range(n)]
        rows.append(Row("swap.cold", "Cold start (level 5): readiness detection", "ms", "llmuxd",
                        [c[0] for c in cold], goal=Goal("under 100 ms", "value", 100.0, "ms"),
                        notes=["method: a thread polls the target's /health every 1 ms "
                               "(refused until llmux-sim listens, i.e. is ready) and stamps the "
                               "first 200; detection = swap reply received - stamp (llmuxd polls "
                               "/health every 50 ms during a start, steps.HEALTH_POLL_FAST)",
                               f"whole cold-start swap (c sleeps at level 2, e starts): median "
                               f"{sorted(c[1] for c in cold)[len(cold) // 2]:.0f} ms"],
                        extra={"swap_ms": [c[1] for c in cold]}))
        n = ctx.n(8, 3)
        ctx.say(f"llmuxctl CLI: {n} rounds")
        d.must({"cmd": "swap", "model": "a"})
        a, b = alternate(n, lambda: (cli_swap(d, "b") + cli_swap(d, "a")) / 2,
                         lambda: (socket_swap(d, "b") + socket_swap(d, "a")) / 2)
        rows.append(Row("swap.cli", "`llmuxctl swap` wall time, level 1 (info)", "ms",
                        "CLI", a, "socket", b,
                        notes=["per swap; the CLI side includes starting Python and importing "
                               "llmuxctl (click)"]))
    return rows


def profile(ctx: Ctx, row: Row) -> None:
    """Rerun the missed scenario under cProfile and explain what dominates."""
    path = ctx.root / f"profile-{row.key}.pstats"
    level = {"swap.l1": 1, "swap.l2": 2}.get(row.key)
    x, y = PAIRS[level or 2]
    d = start_daemon(ctx, (x, y) if level else ("c", "d", "e"), profile=path)
    swaps = 2
    try:
        if level:
            for _ in range(10):
                for m in (y, x):
                    d.must({"cmd": "swap", "model": m})
                    swaps += 1
        else:
            d.must({"cmd": "swap", "model": "c"})
            for _ in range(3):
                cold_start(d, "c")
                swaps += 2
    finally:
        d.stop()
        d.kill()
    row.profile = profiling.top_cumulative(path)
    dominant = profiling.describe(path, per=max(swaps, 1), what="swap")
    row.explain = (f"{overhead(row)}. " if level else "") + f"Profile: {dominant}"
