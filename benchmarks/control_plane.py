"""Row group `control`: status latency with 500 concurrent clients during a swap.

A: 500 clients, each its own connection to the control socket, driven by one
selector loop in this process (RLIMIT_NOFILE raised): every client sends
`{"cmd": "status"}`, waits for the reply line and sends the next at once
(closed loop, no think time: the daemon always has up to 500 requests queued).
Meanwhile another thread swaps to a level-5 model started with `--start-delay 2`,
so the swap (drain, sleep of the active model, cold start, health polling) lasts
over 2 s. Latencies of requests sent and answered while the swap runs count.

B: one client, the same closed loop, for 1 s, with no swap running; then the
same swap with no client at all, to see whether the load slowed the swap.

A and B alternate, round by round; each round also swaps back (unmeasured).
"""

from __future__ import annotations

import resource
import selectors
import socket
import threading
import time

from .harness import Ctx, Daemon, alternate, percentile
from .report import Row

NAME = "control"
DESCRIPTION = (
    "- **control** (rows 14-16): status latency p50/p99 with 500 concurrent clients (one "
    "selector loop, closed loop, each resends as soon as it is answered) during a swap to a model "
    "with `--start-delay 2`, versus one client with no swap; and that swap's duration with and "
    "without the 500 clients.")

CLIENTS = 500
REQUEST = b'{"cmd":"status"}\n'


def raise_nofile(wanted: int = 4096) -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft < wanted:
        resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, hard), hard))


class Load:
    """`n` control-socket clients in a closed loop of status requests."""

    def __init__(self, path: str, n: int) -> None:
        raise_nofile(n + 256)
        self.sel = selectors.DefaultSelector()
        self.sent: dict[socket.socket, float] = {}
        self.bufs: dict[socket.socket, bytes] = {}
        self.samples: list[tuple[float, float]] = []   # (sent at, latency s)
        self.errors = 0
        for _ in range(n):
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            s.connect(path)
            s.setblocking(False)
            self.sel.register(s, selectors.EVENT_READ)
            self.bufs[s] = b""

    def _send(self, s: socket.socket) -> None:
        self.sent[s] = time.perf_counter()
        s.sendall(REQUEST)   # 17 bytes into an empty socket buffer: never blocks

    def run(self, until, after_start=None) -> None:
        for s in self.bufs:
            self._send(s)
        if after_start:
            after_start()
        stopping = False
        while self.sent:
            stopping = stopping or until()
            for key, _ in self.sel.select(0.05):
                s = key.fileobj
                data = s.recv(65536)
                if not data:
                    self.errors += 1
                    self.sel.unregister(s)
                    self.sent.pop(s, None)
                    continue
                buf = self.bufs[s] + data
                while b"\n" in buf:
                    line, buf = buf.split(b"\n", 1)
                    t_sent = self.sent.pop(s)
                    self.samples.append((t_sent, time.perf_counter() - t_sent))
                    if not line.startswith(b'{"ok":true'):
                        self.errors += 1
                    if not stopping:
                        self._send(s)
                self.bufs[s] = buf

    def close(self) -> None:
        for s in self.bufs:
            self.sel.unregister(s) if s in self.sel.get_map() else None
            s.close()
        self.sel.close()


def loaded_round(d: Daemon) -> dict:
    """500 clients while swapping to `slow`; then swap back."""
    load = Load(d.socket, CLIENTS)
    box: dict = {}

    def swap() -> None:
        box["t0"] = time.perf_counter()
        box["reply"] = d.call({"cmd": "swap", "model": "slow"})
        box["t1"] = time.perf_counter()

    thread = threading.Thread(target=swap, daemon=True)
    try:
        load.run(until=lambda: "t1" in box, after_start=lambda: (time.sleep(0.1), thread.start()))
    finally:
        load.close()
    thread.join()
    if not box["reply"].get("ok"):
        raise RuntimeError(f"swap under load failed: {box['reply'].get('error')}")
    window = [lat for sent, lat in load.samples if sent >= box["t0"] and sent + lat <= box["t1"]]
    d.must({"cmd": "swap", "model": "a"})
    return {"p50": percentile(window, 50) * 1000, "p99": percentile(window, 99) * 1000,
            "n": len(window), "throughput": len(window) / (box["t1"] - box["t0"]),
            "swap_s": box["t1"] - box["t0"], "errors": load.errors}


def idle_round(d: Daemon, seconds: float = 1.0, swap: bool = True) -> dict:
    """1 client for `seconds` with no swap; then the same swap as under load, unloaded."""
    load = Load(d.socket, 1)
    end = time.perf_counter() + seconds
    try:
        load.run(until=lambda: time.perf_counter() >= end)
    finally:
        load.close()
    lat = [x for _, x in load.samples]
    out = {"p50": percentile(lat, 50) * 1000, "p99": percentile(lat, 99) * 1000, "n": len(lat),
           "throughput": len(lat) / seconds, "errors": load.errors, "swap_s": 0.0}
    if swap:
        out["swap_s"] = d.timed({"cmd": "swap", "model": "slow"})[0]
        d.must({"cmd": "swap", "model": "a"})
    return out


def run(ctx: Ctx) -> list[Row]:
    models = {"a": {"sleep_level": 1}, "slow": {"sleep_level": 5, "args": ["--start-delay", "2"]}}
    with Daemon(ctx, ctx.workdir("control"), models).start() as d:
        d.must({"cmd": "swap", "model": "a"})
        loaded_round(d), idle_round(d, 0.3, swap=False)   # warm-up
        n = ctx.n(5, 2)
        ctx.say(f"{n} rounds: {CLIENTS} clients during a swap / 1 client idle")
        a, b = alternate(n, lambda: loaded_round(d), lambda: idle_round(d))
    errors = sum(r["errors"] for r in a + b)
    tput = sorted(r["throughput"] for r in a)[len(a) // 2]
    notes = [f"{sum(r['n'] for r in a)} requests measured under load, median throughput "
             f"{tput:.0f} status/s; pure queueing would give p50 = {CLIENTS} / throughput = "
             f"{CLIENTS / tput * 1000:.0f} ms", f"errors or dropped clients: {errors}"]
    return [
        Row("control.p50", f"Status latency p50: {CLIENTS} clients during a swap vs 1 client idle",
            "ms", f"{CLIENTS} clients", [r["p50"] for r in a], "1 client", [r["p50"] for r in b],
            notes=notes, extra={"loaded": a, "idle": b}),
        Row("control.p99", f"Status latency p99: {CLIENTS} clients during a swap vs 1 client idle",
            "ms", f"{CLIENTS} clients", [r["p99"] for r in a], "1 client", [r["p99"] for r in b]),
        Row("control.swap", f"Swap to a --start-delay 2 model: with {CLIENTS} clients vs none (info)",
            "s", f"{CLIENTS} clients", [r["swap_s"] for r in a], "no client",
            [r["swap_s"] for r in b],
            notes=["the daemon and the load generator saturate both cores, so the simulator's own "
                   "Python start-up is slower too; the health polling must not starve behind the "
                   "status traffic"]),
    ]
