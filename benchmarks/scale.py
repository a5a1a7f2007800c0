"""Row group `scale`: a catalog of 200 models vs one of 3, side by side.

A: 200 models, all stopped (never started), ports 20000-20199. B: 3 models,
also stopped. Rounds alternate A and B; each round starts a fresh llmuxd and
measures:
- start: from just before spawning `python3 -m llmuxd` until the control socket
  answers `ping` (polled every 1 ms): interpreter start-up, imports, catalog
  parse and validation, socket;
- status: the median latency of 30 sequential `status` requests (the reply
  grows with the catalog);
- reload: three catalog edits that each add one model (new file renamed over
  the catalog), time until `status` lists it, polled every 5 ms (the status
  polls themselves cost more with 200 models);
- `reload` command: three explicit reloads with nothing changed, timed on the
  socket (parse and diff of the whole catalog, without the watcher).
"""

from __future__ import annotations

import statistics
import time

from . import profiling
from .harness import Ctx, Daemon, alternate, free_port, wait_for
from .reload import add_model, wait_listed
from .report import Row

NAME = "scale"
DESCRIPTION = (
    "- **scale** (rows 18-21): a catalog of 200 stopped models versus one of 3: daemon start "
    "(spawn to the socket answering), status latency, catalog edit to applied (one model added), "
    "and an explicit no-op `reload`.")

BIG = 200


def catalog(big: bool) -> dict[str, dict]:
    if big:
        return {f"m{i:03d}": {"port": 20000 + i, "sleep_level": 1 + i % 5} for i in range(BIG)}
    return {f"m{i:03d}": {"port": free_port(), "sleep_level": 1 + i % 5} for i in range(3)}


def one_round(ctx: Ctx, big: bool, edits: int = 3, profile=None) -> dict:
    d = Daemon(ctx, ctx.workdir("scale-200" if big else "scale-3"), catalog(big), profile=profile)
    t0 = time.perf_counter()
    try:
        d.start(wait=False)
        wait_for(d.ping, timeout=60, interval=0.001, what="llmuxd to answer")
        start = time.perf_counter() - t0
        if len(d.status()["models"]) != len(d.models):
            raise RuntimeError("status does not list the whole catalog")
        status = [d.timed({"cmd": "status"})[0] for _ in range(30)]
        reloads = []
        for i in range(edits):
            name = f"added{i}"
            t_edit = add_model(d, name)
            reloads.append(wait_listed(d, name, poll=0.005) - t_edit)
            time.sleep(0.1)
        command = [d.timed({"cmd": "reload"})[0] for _ in range(3)]
    finally:
        d.stop()
        d.kill()
    return {"start": start * 1000, "status": statistics.median(status) * 1000,
            "reload": statistics.median(reloads) * 1000, "command": statistics.median(command) * 1000}


def run(ctx: Ctx) -> list[Row]:
    one_round(ctx, True, edits=1), one_round(ctx, False, edits=1)   # warm-up (page cache)
    n = ctx.n(5, 2)
    ctx.say(f"{n} rounds each: {BIG}-model and 3-model catalogs")
    a, b = alternate(n, lambda: one_round(ctx, True), lambda: one_round(ctx, False))
    col = lambda rs, k: [r[k] for r in rs]  # noqa: E731
    label_a, label_b = f"{BIG} models", "3 models"
    return [
        Row("scale.start", f"Daemon start (spawn -> socket answers), {BIG} vs 3 models", "ms",
            label_a, col(a, "start"), label_b, col(b, "start"), extra={"a": a, "b": b}),
        Row("scale.status", f"Status latency, {BIG} vs 3 models", "ms", label_a, col(a, "status"),
            label_b, col(b, "status")),
        Row("scale.reload", f"Catalog edit (add 1 model) -> applied, {BIG} vs 3 models", "ms",
            label_a, col(a, "reload"), label_b, col(b, "reload"),
            notes=["median of 3 edits per round; status polled every 5 ms"]),
        Row("scale.command", f"`reload` command with nothing changed, {BIG} vs 3 models", "ms",
            label_a, col(a, "command"), label_b, col(b, "command"),
            notes=["parse + validate + diff of the whole catalog, on the loop thread"]),
    ]


def profile(ctx: Ctx, row: Row) -> None:
    path = ctx.root / f"profile-{row.key}.pstats"
    one_round(ctx, True, profile=path)
    row.profile = profiling.top_cumulative(path)
    row.explain = "Profile of one 200-model round: " + profiling.describe(path)
