"""The checks packaging/container/smoke.sh runs inside the llmux container.

smoke.sh mounts this file into the container and runs `python3 smoke_probe.py
STEP ...` with `podman exec`; each step prints one line and exits non-zero with
the reason on stderr when what it checks does not hold.  It drives llmuxd the
way an operator does (llmuxctl, the front's HTTP port) and reads /proc for what
no interface reports (seccomp filters, zombies).  Only the standard library
and psutil (a dependency of llmux, so in the image) are used.
"""

from __future__ import annotations

import glob
import http.client
import json
import os
import subprocess
import sys
import time

FRONT = os.environ.get("SMOKE_FRONT", "127.0.0.1:18000")
DEADLINE = 60.0  # every wait below gives up after this many seconds


def fail(msg: str) -> None:
    sys.exit(f"smoke_probe: {msg}")


def ctl(*args: str, timeout: float = DEADLINE) -> str:
    r = subprocess.run(["llmuxctl", *args], capture_output=True, text=True, timeout=timeout)
    if r.returncode != 0:
        fail(f"llmuxctl {' '.join(args)}: exit {r.returncode}: {r.stderr.strip()}")
    if "warning" in r.stderr:  # a degraded result (a sleep that became a stop, ...)
        fail(f"llmuxctl {' '.join(args)}: {r.stderr.strip()}")
    return r.stdout


def status() -> dict:
    return json.loads(ctl("status", "--json"))


def model(name: str) -> dict:
    return status()["models"][name]


def http_call(path: str, body: dict | None = None) -> tuple[int, dict]:
    """GET (or POST of a JSON body) to the front."""
    host, port = FRONT.rsplit(":", 1)
    conn = http.client.HTTPConnection(host, int(port), timeout=DEADLINE)
    try:
        data = json.dumps(body).encode() if body is not None else None
        conn.request("POST" if data else "GET", path, body=data,
                     headers={"Content-Type": "application/json"})
        r = conn.getresponse()
        raw = r.read()
        try:
            return r.status, json.loads(raw or b"{}")
        except ValueError:
            return r.status, {"text": raw.decode(errors="replace")}
    finally:
        conn.close()


def completions(name: str) -> int:
    """One completion through the front; llmux-sim counts them in its memory."""
    code, reply = http_call("/v1/completions", {"model": name, "prompt": "count me", "max_tokens": 2})
    if code != 200:
        fail(f"completion of {name}: HTTP {code}")
    return reply["llmux_sim"]["completions"]


def tree(pid: int) -> list[int]:
    import psutil
    return [pid] + sorted(c.pid for c in psutil.Process(pid).children(recursive=True))


def seccomp_filters(pid: int) -> int:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("Seccomp_filters:"):
                return int(line.split()[1])
    return 0


def wait_for(what: str, predicate) -> None:
    end = time.monotonic() + DEADLINE
    while not predicate():
        if time.monotonic() > end:
            fail(f"timed out after {DEADLINE:.0f} s waiting for {what}")
        time.sleep(0.1)


def step_ready() -> None:
    """llmuxd answers on its socket and the front's /health; the image's HEALTHCHECK
    is run by smoke.sh itself (podman healthcheck run)."""
    wait_for("the control socket", lambda: subprocess.run(
        ["llmuxctl", "status"], capture_output=True, timeout=10).returncode == 0)
    wait_for("the front's /health", lambda: _health_ok())
    reply = subprocess.run(["llmuxctl", "status", "--json"], capture_output=True, text=True)
    print(f"ready: llmuxd answers, {len(json.loads(reply.stdout)['models'])} models")


def _health_ok() -> bool:
    try:
        return http_call("/health")[0] == 200
    except OSError:
        return False


def step_cycle(name: str, other: str, cycles: str) -> None:
    """The seed's five-step level-4 cycle, `cycles` times: NAME active and serving,
    swap to OTHER (NAME is dumped by CRIU), swap back (restored), same PIDs, and the
    memory of the process survived (its completion counter goes on)."""
    ctl("swap", name)
    served = completions(name)
    pids = tree(model(name)["pid"])
    for _ in range(int(cycles)):
        ctl("swap", other)                                   # dump
        st = model(name)
        if st["state"] != "checkpointed" or st["pid"] is not None:
            fail(f"{name} after swap {other}: {st['state']}, pid {st['pid']}")
        alive = [p for p in pids if os.path.exists(f"/proc/{p}")]
        if alive:
            fail(f"{name} is checkpointed but its processes {alive} still exist")
        manifest = json.load(open(f"/var/lib/llmux/checkpoints/{name}/manifest.json"))
        if manifest["pids"] != pids or manifest["level"] != 4 or manifest["bytes"] <= 0:
            fail(f"manifest of {name}: {manifest}")
        ctl("swap", name)                                    # restore
        st = model(name)
        if st["state"] != "active" or tree(st["pid"]) != pids:
            fail(f"{name} after the restore: {st['state']}, tree {tree(st['pid'])} != {pids}")
        served += 1
        got = completions(name)
        if got != served:
            fail(f"{name} restored without its memory: {got} completions, expected {served}")
    print(f"cycle: {name} checkpointed and restored {cycles}x (criu mode {st['criu_mode']}), "
          f"pids {pids}, {served} completions remembered")


def step_seccomp(name: str) -> None:
    """llmux's io_uring rule is in force in every process of a level-4 model (and
    comes from llmuxd: a --privileged container has no seccomp filter of its own)."""
    st = model(name)
    pids = tree(st["pid"])
    filters = {p: seccomp_filters(p) for p in pids}
    if not st.get("io_uring_blocked") or min(filters.values()) < 1:
        fail(f"{name}: io_uring_blocked={st.get('io_uring_blocked')}, seccomp filters {filters}")
    own = seccomp_filters(os.getpid())
    log = open(f"/var/lib/llmux/logs/{name}.log").read()
    if "io_uring unavailable (ENOSYS): using epoll" not in log:
        fail(f"{name}'s log does not show io_uring refused")
    print(f"seccomp: {name}'s {len(pids)} processes have {sorted(set(filters.values()))} "
          f"filter(s), io_uring refused (ENOSYS); this probe has {own}")


def step_resumed(name: str, served: str) -> None:
    """A new container restored NAME from the volume at start (shutdown = "checkpoint")."""
    wait_for(f"{name} active", lambda: model(name)["state"] == "active")
    st = model(name)
    if st.get("last_error"):
        fail(f"{name} came back degraded: {st['last_error']}")
    got = completions(name)
    if got != int(served) + 1:
        fail(f"{name} in the new container: {got} completions, expected {int(served) + 1} "
             "(a cold start instead of a restore?)")
    print(f"resumed: {name} restored in the new container, pid {st['pid']}, "
          f"{got} completions remembered")


def step_pid1(name: str, orphans: str) -> None:
    """llmuxd is PID 1 of the container's PID namespace and reaps the orphans that
    come to it (made by `sh -c '(sleep &)'`: the subshell exits, sleep is orphaned)."""
    ping = json.loads(subprocess.run(["llmuxctl", "status", "--json"], capture_output=True,
                                     text=True, timeout=DEADLINE).stdout)
    ctl("swap", name)
    comm = open("/proc/1/cmdline", "rb").read().split(b"\0")
    if not any(b"llmuxd" in part for part in comm):
        fail(f"PID 1 is {comm}, not llmuxd")
    subprocess.run(["sh", "-c", f"i=0; while [ $i -lt {orphans} ]; do (sleep 0.3 &); "
                    "i=$((i+1)); done"], check=True, timeout=DEADLINE)
    wait_for("every orphan reaped", lambda: not _zombies() and not _sleeps())
    print(f"pid1: llmuxd is PID 1, {orphans} orphans reaped, no zombie left "
          f"({len(ping['models'])} models)")


def _zombies() -> list[int]:
    out = []
    for path in glob.glob("/proc/[0-9]*/stat"):
        try:
            if open(path).read().rsplit(")", 1)[1].split()[0] == "Z":
                out.append(int(path.split("/")[2]))
        except (OSError, IndexError):
            pass
    return out


def _sleeps() -> list[int]:
    out = []
    for path in glob.glob("/proc/[0-9]*/comm"):
        try:
            if open(path).read().strip() == "sleep":
                out.append(int(path.split("/")[2]))
        except OSError:
            pass
    return out


STEPS = {"ready": step_ready, "cycle": step_cycle, "seccomp": step_seccomp,
         "resumed": step_resumed, "pid1": step_pid1}

if __name__ == "__main__":
    if len(sys.argv) < 2 or sys.argv[1] not in STEPS:
        sys.exit(f"usage: smoke_probe.py {{{'|'.join(STEPS)}}} ARGS...")
    STEPS[sys.argv[1]](*sys.argv[2:])
