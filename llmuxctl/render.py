"""Human output for llmuxctl: the status table and progress lines."""

from __future__ import annotations

import time

import click

STATE_COLOURS = {"active": "green", "failed": "red", "starting": "yellow", "waking": "yellow",
                 "restarting": "red", "stopping": "yellow", "draining": "yellow"}


def ago(since: float | None) -> str:
    if not since:
        return "-"
    seconds = max(0, time.time() - since)
    if seconds < 120:
        return f"{seconds:.0f}s"
    if seconds < 7200:
        return f"{seconds / 60:.0f}m"
    return f"{seconds / 3600:.1f}h"


COLUMNS = ("MODEL", "STATE", "LEVEL", "PID", "PORT", "SINCE", "GPU", "RESTARTS")


def level_cell(m: dict) -> str:
    """configured/current: "4/4" asleep at its level, "4/5" stopped instead, "4/-" awake."""
    current = m.get("current_level")
    return f"{m.get('sleep_level', '?')}/{current if current is not None else '-'}"


def gpu_cell(m: dict) -> str:
    """Measured (NVML) when known, else the declared size marked "*", else "-"."""
    if m.get("gpu_measured"):
        return size(m["gpu_measured"]) + ("!" if m.get("gpu_over") else "")
    if m.get("gpu_memory"):
        return size(m["gpu_memory"]) + "*"
    return "-"


def notes_of(m: dict) -> list[str]:
    notes = []
    if m.get("restart_pending"):
        notes.append("restart pending")
    if m.get("removal_pending"):
        notes.append("removal pending")
    if m.get("gpu_over"):
        notes.append(f"holds {size(m.get('gpu_measured'))}, over its gpu_memory "
                     f"{size(m.get('gpu_memory'))}")
    if m.get("last_error"):
        notes.append(" ".join(str(m["last_error"]).split()))
    return notes


def clip(text: str, width: int) -> str:
    """One line of at most `width` columns; the whole text is in `status --json`."""
    return text if len(text) <= width else text[:max(0, width - 3)] + "..."


def status_table(status: dict, colour: bool, width: int = 80) -> str:
    """The table and its footer, no line wider than `width`: a model name too long
    for the row is shortened, a note that does not fit beside its row goes on its
    own indented line, clipped."""
    rows = []
    for name, m in status.get("models", {}).items():
        restarts = m.get("restarts_total", m.get("restarts", 0))
        rows.append(([name, m.get("state", "?"), level_cell(m), str(m.get("pid") or "-"),
                      str(m.get("port", "-")), ago(m.get("since")), gpu_cell(m), str(restarts)],
                     "; ".join(notes_of(m))))
    widths = [max([len(COLUMNS[i])] + [len(r[0][i]) for r in rows]) for i in range(len(COLUMNS))]
    rest = sum(widths[1:]) + 2 * (len(COLUMNS) - 1)
    widths[0] = max(len(COLUMNS[0]), min(widths[0], width - rest))
    lines = []
    for i, (cells, note) in enumerate([(list(COLUMNS), "NOTE")] + rows):
        cells = [clip(cells[0], widths[0])] + cells[1:]
        plain = "  ".join(c.ljust(w) for c, w in zip(cells, widths))
        if colour and i > 0:
            padded = cells[1].ljust(widths[1])
            cells[1] = click.style(padded, fg=STATE_COLOURS.get(cells[1]))
            line = "  ".join([cells[0].ljust(widths[0]), cells[1]]
                             + [c.ljust(w) for c, w in zip(cells[2:], widths[2:])])
        else:
            line = plain
        if note and len(plain) + 2 + len(note) <= width:
            line, note = f"{line}  {note}", ""
        lines.append(line.rstrip())
        if note and i > 0:
            lines.append(clip("    " + note, width))
    footer = [f"active: {status.get('active') or '-'}"]
    resident = status.get("resident") or []
    if len(resident) > 1 or (status.get("gpu") or {}).get("budget"):
        footer.append(f"resident: {', '.join(resident) or '-'}")
    gpu = status.get("gpu") or {}
    per_gpu = status.get("gpus") or {}
    if len(per_gpu) > 1:  # several GPUs: each its own budget and resident set
        for index, g in sorted(per_gpu.items(), key=lambda item: int(item[0])):
            budget = f"budget {size(g['budget'])}, free {free_text(g)}, " if g.get("budget") else ""
            footer.append(f"gpu {index}: {budget}resident: {', '.join(g['resident']) or '-'}")
    elif gpu.get("budget"):
        footer.append(f"gpu budget: {size(gpu['budget'])}, free: {free_text(gpu, resident)}")
    if any(gpu_cell(m).endswith("*") for m in status.get("models", {}).values()):
        footer.append("GPU: measured by NVML; * declared gpu_memory (not measured)")
    job = status.get("job")
    for running in status.get("jobs") or ([job] if job else []):
        footer.append(f"running: {running['kind']} {running.get('model') or ''} "
                      f"({running.get('phase') or 'starting'}, {running['elapsed']:.1f}s)")
    state_error = (status.get("daemon") or {}).get("state_error")
    if state_error:
        footer.append(f"state file: {state_error}")
    error = (status.get("config") or {}).get("error")
    if error:
        footer.append("catalog error (last good catalog in force):")
        footer += ["  " + line for line in str(error).splitlines()]
    return "\n".join(lines + [""] + [clip(line, width) for line in footer])


def free_text(gpu: dict, resident=None) -> str:
    """A GPU's free budget; null means an exclusive model holds it (when anyone does)."""
    if gpu.get("free") is not None:
        return size(gpu["free"])
    held = gpu.get("resident") if resident is None else resident
    return "0 (an exclusive model holds it)" if held else size(gpu["budget"])


def size(n: int | None) -> str:
    if n is None:
        return "-"
    return f"{n / 2**30:.1f}GiB" if n >= 2**30 else f"{n / 2**20:.0f}MiB"


def progress(event: dict, previous: dict | None = None) -> str:
    """A phase line; with the previous phase's event, how long that one took."""
    line = f"[{event.get('elapsed', 0):7.2f}s] {event.get('model', '')}: {event.get('phase', '')}"
    if event.get("event") == "waiting":
        log = " ".join(str(event.get("log") or "").split())
        return f"{line} ... still waiting" + (f"; log: {log[:120]}" if log else "")
    if previous is not None:
        took = event.get("elapsed", 0) - previous.get("elapsed", 0)
        line += f"   ({previous.get('phase')} took {took:.2f}s)"
    return line


def _io_uring(facts: dict) -> str:
    """How checkpointable models are kept off io_uring (CRIU cannot dump it)."""
    host = {0: "allowed host-wide", 1: "privileged only (kernel.io_uring_disabled=1)",
            2: "disabled host-wide (kernel.io_uring_disabled=2)"}.get(
                facts.get("io_uring_disabled"), "kernel.io_uring_disabled absent")
    rule = "llmux's seccomp rule blocks it for checkpointable models" \
        if facts.get("seccomp_io_uring") else "no seccomp rule for this architecture"
    return f"{host}; {rule}"


def doctor(facts: dict) -> str:
    criu = facts.get("criu", {})
    cuda = facts.get("cuda_checkpoint", {})
    levels = facts.get("levels", {})
    rows = [
        ("kernel", facts.get("kernel")),
        ("privileges", f"euid {facts.get('euid')}, CAP_SYS_ADMIN "
                       f"{'yes' if facts.get('cap_sys_admin') else 'no'}, CAP_CHECKPOINT_RESTORE "
                       f"{'yes' if facts.get('cap_checkpoint_restore') else 'no'}"),
        ("NVIDIA driver", facts.get("driver") or "none"),
        ("CUDA checkpoint API", ("available" if cuda.get("api") else "unavailable")
         + f" ({cuda.get('answer')}) via {cuda.get('tool')}"),
        ("criu", f"{criu.get('version') or criu.get('error')} at {criu.get('path')}"),
        ("criu check", criu.get("check", "-")),
        ("io_uring", _io_uring(facts)),
        ("CUDA plugin", f"{'present' if facts.get('plugin') else 'absent'} ({facts.get('plugin_path')})"),
        ("images dir", f"{facts.get('images_dir')} "
                       f"({(facts.get('images_free_bytes') or 0) / 2**30:.1f} GiB free)"),
        ("level 3", levels.get("3")),
        ("level 4", levels.get("4")),
    ]
    width = max(len(k) for k, _ in rows)
    return "\n".join(f"{k.ljust(width)}  {v}" for k, v in rows)
