"""Row group `timeline`: the phases of a level-2 and a level-4 round trip, as a picture.

llmuxd serves three llmux-sim models: `x` (level 1), `l2` (level 2) and `l4`
(level 4, real CRIU). After cold starts and one unrecorded warm-up cycle, two
round trips are recorded, each starting with the level-N model active:
`swap x` (the level-N model drains and sleeps, x wakes) then `swap lN` (x sleeps,
the level-N model wakes or is restored). Each reply carries the daemon's own
phase events, `phases` = [[seconds since the swap started, phase, model], ...];
a phase lasts until the next one starts, the last until the reply's `elapsed`.
Swaps are placed on the time axis at the moment this process sent them.

benchmarks/timeline.png (matplotlib, optional: without it the row says so and
the phases stay in results.json) shows one panel per round trip and one
horizontal lane per model.
"""

from __future__ import annotations

import time
from pathlib import Path

from .harness import CRIU, Ctx, Daemon
from .report import Row

NAME = "timeline"
DESCRIPTION = (
    "- **timeline** (row 22): one level-2 and one level-4 round trip (the level-N model sleeps "
    "or is checkpointed, then comes back), drawn from the daemon's own phase events "
    "(`reply[\"phases\"]`) into `benchmarks/timeline.png`, one lane per model.")

PNG = Path(__file__).resolve().parent / "timeline.png"
COLORS = {"drain": "#9e9e9e", "sleep": "#42a5f5", "wake": "#66bb6a", "health": "#ffca28",
          "start": "#ab47bc", "stop": "#ef5350", "checkpoint": "#ff7043", "dump": "#d84315",
          "restore": "#26a69a", "resume": "#8d6e63", "suspend": "#8d6e63", "rollback": "#000000"}


def segments(sent_at: float, reply: dict) -> list[dict]:
    """[{model, phase, start, end}] in seconds from `sent_at`'s origin."""
    marks = reply.get("phases") or []
    ends = [m[0] for m in marks[1:]] + [reply["elapsed"]]
    return [{"model": model, "phase": phase, "start": sent_at + s, "end": sent_at + e}
            for (s, phase, model), e in zip(marks, ends)]


def round_trip(d: Daemon, level_model: str) -> dict:
    """swap x, then swap back to `level_model`; -> segments, swap spans and total, in ms."""
    t0 = time.perf_counter()
    segs, swaps = [], []
    for target in ("x", level_model):
        sent = time.perf_counter() - t0
        reply = d.must({"cmd": "swap", "model": target})
        done = time.perf_counter() - t0
        segs += segments(sent, reply)
        swaps.append({"target": target, "start": sent * 1000, "end": done * 1000})
    total = time.perf_counter() - t0
    for s in segs:
        s["start"], s["end"] = s["start"] * 1000, s["end"] * 1000
    return {"segments": segs, "swaps": swaps, "total_ms": total * 1000}


def draw(panels: list[tuple[str, dict]], path: Path) -> str | None:
    """Write the PNG; None on success, else why it was skipped."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Patch
    except ImportError:
        return "matplotlib is not installed (pip install -e '.[bench]'): timeline.png not drawn"
    fig, axes = plt.subplots(len(panels), 1, figsize=(11, 2.3 * len(panels) + 0.8))
    seen = {}
    for ax, (title, data) in zip(axes, panels):
        lanes = sorted({s["model"] for s in data["segments"]}, key=lambda m: m != "x")
        for s in data["segments"]:
            y = lanes.index(s["model"])
            color = COLORS.get(s["phase"], "#607d8b")
            width = max(s["end"] - s["start"], 0.3)
            ax.barh(y, width, left=s["start"], height=0.6, color=color, edgecolor="white")
            seen[s["phase"]] = color
            if width > data["total_ms"] * 0.06:
                ax.text(s["start"] + width / 2, y, s["phase"], ha="center", va="center", fontsize=8)
        for sw in data["swaps"]:
            ax.axvline(sw["start"], color="#455a64", lw=0.8, ls="--")
            ax.text(sw["start"], len(lanes) - 0.45, f" swap {sw['target']}", fontsize=8,
                    color="#455a64", va="bottom")
        ax.set_yticks(range(len(lanes)), lanes)
        ax.set_ylim(-0.6, len(lanes) - 0.1 + 0.3)
        ax.set_xlim(0, data["total_ms"] * 1.02)
        ax.set_title(f"{title}: {data['total_ms']:.0f} ms", fontsize=10, loc="left")
        ax.set_xlabel("ms since the first swap was sent")
        ax.grid(axis="x", alpha=0.3)
    fig.legend(handles=[Patch(color=c, label=p) for p, c in seen.items()], loc="lower center",
               ncol=min(len(seen), 9), fontsize=8, frameon=False)
    fig.suptitle("llmuxd swap phases (daemon phase events; llmux-sim, zero delays; real CRIU "
                 "for level 4)", fontsize=10, x=0.01, ha="left")
    fig.tight_layout(rect=(0, 0.05, 1, 0.95))
    fig.savefig(path, dpi=130)
    plt.close(fig)
    return None


def phase_sums(data: dict) -> str:
    sums: dict[str, float] = {}
    for s in data["segments"]:
        key = f"{s['model']}:{s['phase']}"
        sums[key] = sums.get(key, 0.0) + s["end"] - s["start"]
    return ", ".join(f"{k} {v:.0f}" for k, v in sums.items())


def run(ctx: Ctx) -> list[Row]:
    models = {"x": {"sleep_level": 1}, "l2": {"sleep_level": 2}, "l4": {"sleep_level": 4}}
    with Daemon(ctx, ctx.workdir("timeline"), models, {"checkpoint": {"criu_path": CRIU}}).start() as d:
        for m in ("x", "l2", "l4", "x", "l4", "l2", "x", "l2"):  # cold starts, then a warm cycle
            d.must({"cmd": "swap", "model": m})
        level2 = round_trip(d, "l2")
        d.must({"cmd": "swap", "model": "l4"})
        level4 = round_trip(d, "l4")
    panels = [("level 2 round trip: swap x (l2 sleeps), swap l2 (l2 wakes)", level2),
              ("level 4 round trip: swap x (l4 checkpointed), swap l4 (l4 restored)", level4)]
    skipped = draw(panels, PNG)
    caption = (f"The picture: a level-2 round trip ({level2['total_ms']:.0f} ms) and a level-4 "
               f"round trip ({level4['total_ms']:.0f} ms) on llmux-sim, one lane per model, "
               "phases as llmuxd reports them in each swap reply.")
    notes = [f"level 2 phases (ms): {phase_sums(level2)}",
             f"level 4 phases (ms): {phase_sums(level4)}",
             skipped or f"wrote {PNG.relative_to(PNG.parent.parent)}"]
    return [Row("timeline", "Swap timeline: level-4 vs level-2 round trip (info)", "ms",
                "level 4", [level4["total_ms"]], "level 2", [level2["total_ms"]], notes=notes,
                extra={"level2": level2, "level4": level4, "caption": caption,
                       "png": None if skipped else str(PNG)})]
