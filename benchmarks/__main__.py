"""`python3 -m benchmarks [--quick] [--only NAME]`: run the rows, print one table.

Runs each row group in a fresh temporary directory, sweeps up any process of
the run that is left after it (every child carries LLMUX_BENCH_MARKER), profiles
llmuxd for each missed goal, then prints the table with details, and writes
benchmarks/results.json (results-quick.json for --quick or --only),
benchmarks/timeline.png, and after a full run benchmarks/README-section.md.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import shutil
import sys
import tempfile
import time
import traceback
import uuid
from pathlib import Path

from . import (control_plane, criu_overhead, front, idle, reaping, reload, report, scale,
               swap_overhead, timeline)
from .harness import Ctx, kill_marked, reap_children

GROUPS = [swap_overhead, criu_overhead, reaping, idle, control_plane, reload, scale, front,
          timeline]
HERE = Path(__file__).resolve().parent


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python3 -m benchmarks", description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="a ~2 minute smoke run (fewer rounds)")
    p.add_argument("--only", choices=[g.NAME for g in GROUPS], action="append",
                   help="run only this row group (repeatable)")
    p.add_argument("--keep", action="store_true", help="keep the temporary directory (logs)")
    p.add_argument("--no-profile", action="store_true", help="do not profile missed goals")
    return p.parse_args(argv)


def code_version() -> str:
    """The commit under test, "+changes" if llmuxd/ or llmuxctl/ differ from it."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=HERE.parent, capture_output=True,
                              text=True).stdout.strip()
    head = git("rev-parse", "--short", "HEAD") or "unknown"
    dirty = git("status", "--porcelain", "--", "llmuxd", "llmuxctl")
    return head + ("+changes" if dirty else "")


def main(argv=None) -> int:
    args = parse_args(argv)
    groups = [g for g in GROUPS if not args.only or g.NAME in args.only]
    full = not args.quick and not args.only
    ctx = Ctx(quick=args.quick, root=Path(tempfile.mkdtemp(prefix="llmux-bench-")),
              marker=uuid.uuid4().hex[:12])
    version = code_version()
    print(f"llmux benchmarks ({'quick' if args.quick else 'full'}) of {version}, work dir {ctx.root}",
          flush=True)
    if os.geteuid() != 0:
        print("note: not root; the criu and reaping rows need root and will fail", flush=True)
    rows: list[report.Row] = []
    owner: dict[str, object] = {}
    extra: dict = {}
    t_start = time.monotonic()
    try:
        for group in groups:
            t0 = time.monotonic()
            print(f"== {group.NAME}", flush=True)
            try:
                made = group.run(ctx)
            except Exception as exc:
                traceback.print_exc()
                made = [report.Row(f"{group.NAME}.error", f"{group.NAME}: failed", "", "", [],
                                   notes=[f"{type(exc).__name__}: {exc}"])]
            finally:
                left = kill_marked(ctx.marker)
                reap_children()
                if left:
                    print(f"  !! {group.NAME} left {len(left)} process(es) behind; killed {left}")
            for row in made:
                owner[row.key] = group
                print(f"  {row.title}: {row.verdict()[1]}", flush=True)
            rows += made
            print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)
        if not args.no_profile:
            for row in rows:
                met, _ = row.verdict()
                group = owner.get(row.key)
                if met is False and hasattr(group, "profile"):
                    print(f"== profiling llmuxd for: {row.title}", flush=True)
                    t0 = time.monotonic()
                    try:
                        group.profile(ctx, row)
                    except Exception as exc:
                        traceback.print_exc()
                        row.notes.append(f"profiling failed: {exc}")
                    finally:
                        kill_marked(ctx.marker)
                        reap_children()
                    print(f"  ({time.monotonic() - t0:.0f} s)", flush=True)
    finally:
        left = kill_marked(ctx.marker)
        if left:
            print(f"!! killed leftover processes: {left}")
        if args.keep:
            print(f"kept {ctx.root}")
        else:
            shutil.rmtree(ctx.root, ignore_errors=True)
    elapsed = time.monotonic() - t_start
    extra["code"] = version
    if code_version() != version:
        ctx.log.append(f"llmuxd changed during the run (from {version} to {code_version()}): "
                       "rows may have measured different code; run again")
    print()
    print(report.table(rows))
    print()
    print(report.details(rows))
    if ctx.log:
        print("\nincidents (not measurements):")
        print("\n".join(f"- {line}" for line in ctx.log))
    extra["incidents"] = ctx.log
    for key in ("timeline",):
        for row in rows:
            if row.key.startswith(key) and row.extra.get("png"):
                extra["timeline_png"] = row.extra["png"]
    name = "results.json" if full else "results-quick.json"
    (HERE / name).write_text(report.results_json(rows, "full" if full else
                                                 ("quick" if args.quick else "only"),
                                                 elapsed, extra))
    print(f"\nwrote benchmarks/{name}; total {elapsed / 60:.1f} min")
    if full:
        descriptions = [g.DESCRIPTION for g in GROUPS]
        note = next((r.extra.get("caption", "") for r in rows if r.key.startswith("timeline")), "")
        (HERE / "README-section.md").write_text(report.readme_section(rows, descriptions, elapsed,
                                                                      note, version))
        print("wrote benchmarks/README-section.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
