"""Row group `front`: the OpenAI-compatible front against direct, nginx, and on demand.

One llmuxd with [daemon.front] and one active llmux-sim model (zero delays), and
nginx (one worker, keep-alive upstream) in front of the same model. Side by side
in one run: each round measures direct, the front and nginx, in a rotating
order, so the load of the engineers sharing these cores hits all three alike.
- latency of a non-streamed /v1/completions (max_tokens 1) from 64 keep-alive
  clients (8 with --quick), each thinking 100-300 ms between an answer and its
  next request (about 320 requests/s in all, several times what 64 users of
  one real GPU send): the added latency of a proxy is its p50 (p99) minus
  direct's in the same round; rows give the median over rounds. Clients that
  send back to back instead measure capacity, not latency: on 2 shared cores
  the closed loop makes every added microsecond of CPU a queueing delay for
  all 64 (latency = clients / throughput); that is the requests/s row;
- streamed events per second: one connection, /v1/completions stream=true of
  1,000 tokens back to back for 3 s; events = completed streams x 1,001.
The load generator is wrk (benchmarks/http_load.py): compiled, one thread, a
process of its own, so the client's cost is neither Python's nor shared with
the proxy under test.

On demand (a second llmuxd, models a and b, min_active 2 s): 8 connections whose
requests alternate between a and b for 20 s (8 s with --quick): swaps per minute,
requests lost (errors or non-200: goal 0), p99 wait.

llama-swap is not a row: it cannot be built here (README, "Benchmarks").
"""

from __future__ import annotations

import statistics

from .harness import Ctx, Daemon, free_port, wait_for
from .http_load import Nginx, wrk
from .report import Goal, Row

NAME = "front"
TOKENS = 1000
THINK_MS = 200


def _front_daemon(ctx: Ctx, name: str, models: dict, **front) -> tuple[Daemon, int]:
    port = free_port()
    args = {"args": ["--disable-uvicorn-access-log"]}
    d = Daemon(ctx, ctx.workdir(name), {m: dict(args) for m in models},
               {"front": {"listen": f"127.0.0.1:{port}", **front}, "default_model": models[0]})
    return d.start(), port


def run(ctx: Ctx) -> list[Row]:
    rows = _proxies(ctx)
    rows += _on_demand(ctx)
    return rows


def _proxies(ctx: Ctx) -> list[Row]:
    d, front = _front_daemon(ctx, "front", ["a"])
    nginx = None
    try:
        wait_for(lambda: d.status().get("active") == "a", timeout=30, what="a active")
        direct = d.port("a")
        nginx = Nginx(ctx, direct).start()
        sides = {"direct": direct, "front": front, "nginx": nginx.port}
        conns, rounds, secs = ctx.n(64, 8), ctx.n(5, 3), ctx.n(4, 2)
        for port in sides.values():  # warm every path (pools, caches, the sim's threads)
            wrk(ctx, port, conns, 1)
        lat = {k: [] for k in sides}
        full = {k: [] for k in sides}
        ev = {k: [] for k in sides}
        order = list(sides)
        for i in range(rounds):
            for side in order[i % 3:] + order[:i % 3]:
                lat[side].append(wrk(ctx, sides[side], conns, secs, think_ms=THINK_MS))
            for side in order[i % 3:] + order[:i % 3]:
                r = wrk(ctx, sides[side], conns, ctx.n(2, 1))
                full[side].append(r["requests"] / r["seconds"])
            for side in order[i % 3:] + order[:i % 3]:
                r = wrk(ctx, sides[side], 1, secs, tokens=TOKENS, stream=True, timeout=30)
                ev[side].append(r["requests"] * (TOKENS + 1) / r["seconds"])
        reused = d.status()["front"].get("upstream_reused")
    finally:
        if nginx is not None:
            nginx.stop()
        d.stop()
    lost = {k: sum(r["lost"] for r in v) for k, v in lat.items()}
    if any(lost.values()):
        raise RuntimeError(f"requests failed during the latency rounds: {lost}")

    def added(side: str, q: str) -> list[float]:
        return [round(p[q] - q0[q], 3) for p, q0 in zip(lat[side], lat["direct"])]

    def col(side: str, q: str) -> list[float]:
        return [r[q] for r in lat[side]]

    rps = {k: statistics.median(r["requests"] / r["seconds"] for r in v) for k, v in lat.items()}
    load = (f"{conns} keep-alive clients (wrk), {THINK_MS} ms mean think time; requests/s "
            f"(median): direct {rps['direct']:.0f}, front {rps['front']:.0f}, nginx "
            f"{rps['nginx']:.0f}; p99 direct {statistics.median(col('direct', 'p99')):.2f} ms, "
            f"front {statistics.median(col('front', 'p99')):.2f} ms")
    return [
        Row("front.latency", f"/v1/completions p50 latency, {conns} clients", "ms",
            "through the front", col("front", "p50"), "direct to vLLM (sim)",
            col("direct", "p50"), notes=[load, f"upstream connections reused: {reused}"]),
        Row("front.added_p50", "added p50 latency: front - direct (per round)", "ms",
            "llmux front", added("front", "p50"), goal=Goal("p50 under 1 ms", "value", 1.0, "ms")),
        Row("front.added_p99", "added p99 latency: front - direct (per round)", "ms",
            "llmux front", added("front", "p99"), goal=Goal("p99 under 5 ms", "value", 5.0, "ms")),
        Row("front.nginx_p50", "added p50 latency: nginx - direct (per round)", "ms",
            "nginx", added("nginx", "p50")),
        Row("front.nginx_p99", "added p99 latency: nginx - direct (per round)", "ms",
            "nginx", added("nginx", "p99")),
        Row("front.capacity", f"requests/s, {conns} clients back to back", "req/s",
            "through the front", full["front"], "direct to vLLM (sim)", full["direct"]),
        Row("front.capacity_nginx", f"requests/s via nginx, {conns} clients back to back",
            "req/s", "through nginx", full["nginx"], "direct to vLLM (sim)", full["direct"]),
        Row("front.stream", f"Streamed events/s, {TOKENS}-token streams", "events/s",
            "through the front", ev["front"], "direct to vLLM (sim)", ev["direct"],
            goal=Goal("at least 90% of direct", "ratio", 0.9, at_least=True)),
        Row("front.stream_nginx", f"Streamed events/s via nginx, {TOKENS}-token streams",
            "events/s", "through nginx", ev["nginx"], "direct to vLLM (sim)", ev["direct"]),
    ]


def _on_demand(ctx: Ctx) -> list[Row]:
    d, front = _front_daemon(ctx, "front-mix", ["a", "b"], min_active="2s")
    secs = ctx.n(20, 8)
    try:
        wait_for(lambda: d.status().get("active") == "a", timeout=30, what="a active")
        before = d.log.read_text().count("swapping to it")
        r = wrk(ctx, front, 8, secs, models=("a", "b"), timeout=60)
        swaps = d.log.read_text().count("swapping to it") - before
    finally:
        d.stop()
    per_min = swaps * 60 / r["seconds"]
    return [
        Row("front.mix_swaps", "on demand, a/b alternating: swaps per minute", "/min",
            "llmux front, min_active 2s", [round(per_min, 1)],
            notes=[f"{r['requests']} requests in {r['seconds']:.1f} s, 8 connections"]),
        Row("front.mix_lost", "on demand: requests lost", "requests", "llmux front",
            [r["lost"]], goal=Goal("none lost", "value", 0.5, "requests")),
        Row("front.mix_wait", "on demand: p99 wait (request to answer)", "ms", "llmux front",
            [r["p99"]], notes=[f"p50 {r['p50']:.1f} ms, max {r['max']:.0f} ms"]),
    ]
