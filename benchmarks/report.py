"""Rows, goals and output: the printed table, results.json and the README section.

A `Row` holds the samples of side A (llmux) and side B (the baseline) of one
measurement, in round order, and the per-round ratios A/B. Its cells show the
median and, in brackets, the p10-p90 spread (linear interpolation, so with few
rounds it is close to min-max). A `Goal` judges either the median ratio A/B or
the median of A against a limit and prints met/missed with the number.
"""

from __future__ import annotations

import json
import math
import re
import platform
import time
from dataclasses import dataclass, field

from .harness import paired_ratios, summary


@dataclass
class Goal:
    text: str             # e.g. "within 2x of raw"
    on: str               # "ratio" (median A/B) or "value" (median A)
    limit: float
    unit: str = ""
    strict: bool = False  # ratio goals: "<" instead of "<=" (e.g. "faster than")
    at_least: bool = False  # ratio goals: ">=" (e.g. "at least 90% of direct")

    def judge(self, row: "Row") -> tuple[bool | None, str]:
        stats = summary(row.ratios if self.on == "ratio" else row.a)
        if not stats.get("n"):
            return None, "not measured"
        got = stats["median"]
        if self.on == "ratio":
            met = got >= self.limit if self.at_least else \
                got < self.limit if self.strict else got <= self.limit
            sign = ">=" if self.at_least else "<" if self.strict else "<="
            digits = 3 if abs(got - self.limit) < 0.01 else 2   # 1.052x, not "1.05x > 1.05x"
            noise = ("; within noise: the p10-p90 of the ratio spans the goal"
                     if stats["n"] > 1 and stats["p10"] <= self.limit <= stats["p90"] else "")
            return met, (f"{'met' if met else 'MISSED'} ({got:.{digits}f}x, goal "
                         f"{sign} {self.limit:g}x{noise})")
        met = got < self.limit
        return met, (f"{'met' if met else 'MISSED'} ({fmt(got)} {self.unit} < {self.limit:g} {self.unit}: "
                     f"{got / self.limit:.2f} of the limit)" if met else
                     f"MISSED ({fmt(got)} {self.unit}, goal < {self.limit:g} {self.unit}: "
                     f"{got / self.limit:.2f}x the limit)")


@dataclass
class Row:
    key: str
    title: str
    unit: str
    a_label: str
    a: list[float]
    b_label: str = ""
    b: list[float] = field(default_factory=list)
    goal: Goal | None = None
    notes: list[str] = field(default_factory=list)
    extra: dict = field(default_factory=dict)
    explain: str = ""
    profile: str = ""
    ratios: list[float] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.b and not self.ratios:
            self.ratios = paired_ratios(self.a, self.b)

    def verdict(self) -> tuple[bool | None, str]:
        return self.goal.judge(self) if self.goal else (None, "info")

    def as_json(self) -> dict:
        met, verdict = self.verdict()
        return {"key": self.key, "title": self.title, "unit": self.unit,
                "a": {"label": self.a_label, "samples": self.a, **summary(self.a)},
                "b": {"label": self.b_label, "samples": self.b, **summary(self.b)} if self.b else None,
                "ratio_a_over_b": {"samples": self.ratios, **summary(self.ratios)} if self.ratios else None,
                "goal": self.goal.text if self.goal else None, "met": met, "verdict": verdict,
                "notes": self.notes, "explain": self.explain, "profile_top10": self.profile,
                "extra": self.extra}


def fmt(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "-"
    ax = abs(x)
    if ax >= 100:
        return f"{x:.0f}"
    if ax >= 10:
        return f"{x:.1f}"
    if ax >= 0.1:
        return f"{x:.2f}"
    return f"{x:.3g}"


def cell(values: list[float], unit: str, label: str = "") -> str:
    s = summary(values)
    if not s.get("n"):
        return "-"
    spread = f" [{fmt(s['p10'])}-{fmt(s['p90'])}]" if s["n"] > 1 else ""
    head = f"{label}: " if label else ""
    return f"{head}{fmt(s['median'])} {unit}{spread}".strip()


def ratio_cell(ratios: list[float]) -> str:
    s = summary(ratios)
    if not s.get("n"):
        return "-"
    spread = f" [{fmt(s['p10'])}-{fmt(s['p90'])}]" if s["n"] > 1 else ""
    return f"{fmt(s['median'])}x{spread}"


def table(rows: list[Row]) -> str:
    """A Markdown table: readable as printed text and pasteable into the README."""
    head = ["#", "measurement", "A: median [p10-p90]", "B: median [p10-p90]",
            "A/B median [p10-p90]", "rounds", "goal", "result"]
    lines = [head]
    for i, r in enumerate(rows, 1):
        met, verdict = r.verdict()
        lines.append([str(i), r.title, cell(r.a, r.unit, r.a_label),
                      cell(r.b, r.unit, r.b_label) if r.b else "-", ratio_cell(r.ratios),
                      str(len(r.a)), r.goal.text if r.goal else "-", verdict])
    widths = [max(len(line[c]) for line in lines) for c in range(len(head))]
    out = []
    for n, line in enumerate(lines):
        out.append("| " + " | ".join(v.ljust(w) for v, w in zip(line, widths)) + " |")
        if n == 0:
            out.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(out)


def details(rows: list[Row]) -> str:
    """Notes, explanations of missed goals, and their profiles, row by row."""
    out = []
    printed: dict[str, int] = {}
    for i, r in enumerate(rows, 1):
        met, verdict = r.verdict()
        if not (r.notes or r.explain or r.profile):
            continue
        out.append(f"{i}. {r.title}: {verdict}")
        out += [f"   - {n}" for n in r.notes]
        if r.explain:
            out.append(f"   - why: {r.explain}")
        if r.profile and r.profile in printed:
            out.append(f"   - cProfile: the same run as for row {printed[r.profile]}")
        elif r.profile:
            printed[r.profile] = i
            out.append("   - cProfile of llmuxd in this scenario, top 10 by cumulative time:")
            out += ["       " + line for line in r.profile.splitlines()]
    return "\n".join(out)


def results_json(rows: list[Row], mode: str, elapsed: float, extra: dict) -> str:
    return json.dumps({"mode": mode, "finished": time.strftime("%Y-%m-%d %H:%M:%S"),
                       "elapsed_s": round(elapsed, 1),
                       "host": {"python": platform.python_version(), "kernel": platform.release(),
                                "machine": platform.machine(), "cpus": _cpus()},
                       **extra, "rows": [r.as_json() for r in rows]}, indent=1, default=str)


def _cpus() -> int:
    import os
    return len(os.sched_getaffinity(0))


def missed_summary(rows: list[Row]) -> list[str]:
    """One bullet per missed goal: the verdict and the first sentence of its explanation."""
    out = []
    for i, r in enumerate(rows, 1):
        met, verdict = r.verdict()
        if met is False:
            why = re.split(r"\.? (?:Profile|The profile)\b", r.explain)[0].rstrip(".") \
                if r.explain else "not profiled"
            out.append(f"- row {i}, {r.title}: {verdict}. {why}.")
    return (["Missed goals (the run prints the full explanation and the profile):", ""] + out + [""]
            if out else [])


def readme_section(rows: list[Row], descriptions: list[str], elapsed: float,
                   timeline_note: str, version: str) -> str:
    """The "## Benchmarks" section for README.md (written after a full run)."""
    return "\n".join([
        "## Benchmarks",
        "",
        "```sh",
        "pip install -e '.[bench]'      # matplotlib, for the timeline picture (optional)",
        "sudo python3 -m benchmarks     # everything (under 15 minutes on 2 cores)",
        "sudo python3 -m benchmarks --quick          # a 2-minute smoke run",
        "sudo python3 -m benchmarks --only reaping   # one row group (names below)",
        "```",
        "",
        "Root is needed for CRIU (level 4) and PID namespaces; `tini` is installed with",
        "apt-get when missing. Every row runs A (llmux) and B (the baseline) side by",
        "side in the same run, alternating round after round, and reports the median",
        "and the p10-p90 spread, so machine noise hits both sides alike. Results go to",
        "`benchmarks/results.json` (`results-quick.json` for `--quick` and `--only`).",
        "Where a goal is missed, the run profiles llmuxd (cProfile) in that scenario",
        "and prints the top 10 entries.",
        "",
        *descriptions,
        "",
        f"Full run of {version} on a 2-core VM ({elapsed / 60:.1f} minutes), llmux-sim as the "
        "model server:",
        "",
        table(rows),
        "",
        *missed_summary(rows),
        "![swap timeline](benchmarks/timeline.png)",
        "",
        timeline_note,
        "",
    ])
