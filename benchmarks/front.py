"""Row group `front`: what the OpenAI-compatible front adds, against llmux-sim directly.

One llmuxd with [daemon.front] and one active llmux-sim model (zero delays). Side by
side in one run, alternating rounds, with A through the front and B straight to
the model's port:
- latency of a non-streamed /v1/completions (max_tokens 1) with C concurrent
  keep-alive clients (64; 8 with --quick), each sending requests back to back;
  the front's added latency is median(A) - median(B) (and the same at p99);
- streamed events per second of one /v1/completions with stream=true and
  2,000 tokens (500 with --quick): events read by the client / seconds.
Clients are threads of this process, so both sides share their cost.
"""

from __future__ import annotations

import http.client
import json
import threading
import time

from .harness import Ctx, Daemon, free_port, percentile, wait_for
from .report import Row

NAME = "front"


def _body(stream: bool, tokens: int) -> bytes:
    return json.dumps({"model": "a", "prompt": "hi", "max_tokens": tokens,
                       "stream": stream}).encode()


def latencies(port: int, clients: int, per_client: int) -> list[float]:
    out: list[float] = []
    lock = threading.Lock()
    body = _body(False, 1)

    def client() -> None:
        conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
        mine = []
        for _ in range(per_client):
            t0 = time.perf_counter()
            conn.request("POST", "/v1/completions", body=body,
                         headers={"Content-Type": "application/json"})
            r = conn.getresponse()
            r.read()
            mine.append((time.perf_counter() - t0) * 1000)
            assert r.status == 200, r.status
        conn.close()
        with lock:
            out.extend(mine)
    threads = [threading.Thread(target=client) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return out


def events_per_second(port: int, tokens: int) -> float:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=60)
    t0 = time.perf_counter()
    conn.request("POST", "/v1/completions", body=_body(True, tokens),
                 headers={"Content-Type": "application/json"})
    r = conn.getresponse()
    events = 0
    for line in r:
        if line.startswith(b"data: "):
            events += 1
    conn.close()
    return events / (time.perf_counter() - t0)


def run(ctx: Ctx) -> list[Row]:
    port = free_port()
    d = Daemon(ctx, ctx.workdir("front"), {"a": {"args": ["--disable-uvicorn-access-log"]}},
               {"front": {"listen": f"127.0.0.1:{port}"}, "default_model": "a"}).start()
    try:
        wait_for(lambda: d.status().get("active") == "a", timeout=30, what="a active")
        direct = d.port("a")
        clients, per_client = ctx.n(64, 8), ctx.n(40, 20)
        tokens, rounds = ctx.n(2000, 500), ctx.n(5, 3)
        latencies(port, 4, 5), latencies(direct, 4, 5)  # warm both paths
        lat_a, lat_b, ev_a, ev_b = [], [], [], []
        for _ in range(rounds):
            lat_a += latencies(port, clients, per_client)
            lat_b += latencies(direct, clients, per_client)
            ev_a.append(events_per_second(port, tokens))
            ev_b.append(events_per_second(direct, tokens))
    finally:
        d.stop()
    added = {q: round(percentile(lat_a, q) - percentile(lat_b, q), 3) for q in (50, 99)}
    ratio = sum(ev_a) / max(1e-9, sum(ev_b))
    note = (f"{clients} concurrent clients; added latency p50 {added[50]} ms, "
            f"p99 {added[99]} ms (goal: p50 < 1 ms, p99 < 5 ms)")
    return [
        Row("front.latency", f"/v1/completions latency, {clients} clients", "ms",
            "through the front", lat_a, "direct to vLLM (sim)", lat_b, notes=[note],
            extra={"added_ms": added}),
        Row("front.stream", f"Streamed events/s, {tokens} tokens", "events/s",
            "through the front", ev_a, "direct to vLLM (sim)", ev_b,
            notes=[f"through the front: {ratio:.0%} of direct (goal: at least 90%)"],
            extra={"ratio": round(ratio, 3)}),
    ]
