"""Shared machinery: a real llmuxd against llmux-sim, statistics, /proc readers, cleanup.

`Daemon` starts `python3 -m llmuxd --config PATH` (optionally under cProfile) on a
catalog generated into a fresh directory, the way tests/daemon_fixture.py does,
but with production-like defaults: the catalog lives in a directory of its own
(etc/), so the daemon's log and state files do not wake its catalog watcher.

Every process started for the benchmarks carries LLMUX_BENCH_MARKER=<run id> in
its environment (model servers and CRIU-restored trees inherit it), so the
final sweep finds and kills whatever a failed row left behind, by PID.
"""

from __future__ import annotations

import http.client
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

from llmuxctl.client import request
from tests.daemon_fixture import free_port, wait_for  # noqa: F401  (used by the row modules)

REPO = Path(__file__).resolve().parent.parent
SIM = [sys.executable, "-m", "llmuxd.sim"]
CRIU = "/opt/llmux-criu/bin/criu"
MARKER_VAR = "LLMUX_BENCH_MARKER"


@dataclass
class Ctx:
    """One benchmark run: quick or full, its temporary root and its process marker."""
    quick: bool
    root: Path
    marker: str
    log: list = field(default_factory=list)

    def n(self, full: int, quick: int) -> int:
        """A round count: `full` normally, `quick` under --quick."""
        return quick if self.quick else full

    def workdir(self, name: str) -> Path:
        path = self.root / name
        n = 1
        while path.exists():
            n += 1
            path = self.root / f"{name}-{n}"
        path.mkdir(mode=0o700, parents=True)
        return path

    def env(self, **extra) -> dict:
        """Environment for every child: the marker, and this checkout's llmux first."""
        pythonpath = os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))
        return {**os.environ, MARKER_VAR: self.marker, "PYTHONPATH": pythonpath, **extra}

    def say(self, text: str) -> None:
        print(f"  .. {text}", flush=True)


# -- small helpers ------------------------------------------------------------------
# free_port and wait_for are the test suite's own (tests/daemon_fixture.py).

def toml_value(v) -> str:
    if isinstance(v, dict):
        return "{ " + ", ".join(f"{k} = {toml_value(x)}" for k, x in v.items()) + " }"
    return json.dumps(v)


def catalog_text(daemon: dict, models: dict[str, dict]) -> str:
    """TOML for [daemon], its sub-tables ([daemon.checkpoint]) and [models.NAME]."""
    plain = {k: v for k, v in daemon.items() if not isinstance(v, dict)}
    lines = ["[daemon]"] + [f"{k} = {toml_value(v)}" for k, v in plain.items()]
    for table, values in daemon.items():
        if isinstance(values, dict):
            lines.append(f"\n[daemon.{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
    for name, m in models.items():
        lines.append(f"\n[models.{name}]")
        lines += [f"{k} = {toml_value(v)}" for k, v in m.items()]
    return "\n".join(lines) + "\n"


def write_atomic(path: Path, text: str) -> None:
    """Write like an editor does: a new file renamed over the old one."""
    tmp = path.with_name(path.name + ".bench-tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def ensure_tool(ctx: Ctx, binary: str, package: str) -> tuple[str, str]:
    """A Debian tool's path, installed with apt-get if missing -> (path, note)."""
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}")
                                    else None)
    if path:
        return path, ""
    ctx.say(f"{binary} is missing: apt-get install -y {package}")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    argv = ["apt-get", "install", "-y", "--no-install-recommends", package]
    proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    if proc.returncode:
        subprocess.run(["apt-get", "update"], capture_output=True, env=env)
        proc = subprocess.run(argv, capture_output=True, text=True, env=env)
    path = shutil.which(binary) or (f"/usr/sbin/{binary}" if os.path.exists(f"/usr/sbin/{binary}")
                                    else None)
    if not path:
        raise RuntimeError(f"cannot install {package}: {proc.stderr.strip()[-300:]}")
    return path, f"{binary} was missing and was installed with `apt-get install {package}` by this run"


def http_call(port: int, method: str, path: str, body: bytes | None = None,
              timeout: float = 10.0) -> tuple[int, bytes]:
    """One plain http.client request on a fresh connection (llmuxd opens one per call too)."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout)
    try:
        headers = {"Content-Type": "application/json"} if body is not None else {}
        conn.request(method, path, body=body, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    finally:
        conn.close()


# -- the daemon -----------------------------------------------------------------------

class Daemon:
    """A real llmuxd on a generated catalog in `workdir` (etc/llmux.toml, state/, llmuxd.log)."""

    def __init__(self, ctx: Ctx, workdir: Path, models: dict[str, dict],
                 daemon: dict | None = None, profile: Path | None = None,
                 profile_os_exit: bool = False, module: str = "llmuxd") -> None:
        self.ctx = ctx
        self.workdir = workdir
        self.socket = str(workdir / "llmux.sock")
        self.profile = profile
        self.profile_os_exit = profile_os_exit  # see benchmarks/cprofile_exit.py
        self.module = module  # "benchmarks.nowatch" for a diagnosis; llmuxd otherwise
        # stop_timeout 5 (default 30): no row measures a stop, and a model that ignores
        # SIGTERM (seen once from llmux-sim: see Daemon.stop) must not stall the run.
        self.settings = {"socket": self.socket, "state_dir": str(workdir / "state"),
                         "vllm_command": SIM, "stop_timeout": 5, **(daemon or {})}
        self.models: dict[str, dict] = {}
        for name, m in models.items():
            m = dict(m)
            m.setdefault("model", f"org/{name}")
            m.setdefault("port", free_port())
            self.models[name] = m
        (workdir / "etc").mkdir(exist_ok=True)
        self.config = workdir / "etc" / "llmux.toml"
        self.write_catalog()
        self.log = workdir / "llmuxd.log"
        self.proc: subprocess.Popen | None = None
        self.spawned_at = 0.0

    def port(self, name: str) -> int:
        return self.models[name]["port"]

    def write_catalog(self) -> None:
        write_atomic(self.config, catalog_text(self.settings, self.models))

    def argv(self) -> list[str]:
        """python3 -m llmuxd; with a profile: python3 -m cProfile -o FILE -m llmuxd."""
        if self.profile and self.profile_os_exit:
            return [sys.executable, "-m", "benchmarks.cprofile_exit", str(self.profile),
                    "--config", str(self.config)]
        prof = ["-m", "cProfile", "-o", str(self.profile)] if self.profile else []
        return [sys.executable, *prof, "-m", self.module, "--config", str(self.config)]

    def start(self, wait: bool = True, prefix: list[str] | None = None) -> "Daemon":
        self.spawned_at = time.monotonic()
        self.proc = subprocess.Popen([*(prefix or []), *self.argv()], stdin=subprocess.DEVNULL,
                                     stdout=open(self.log, "ab"), stderr=subprocess.STDOUT,
                                     start_new_session=True, env=self.ctx.env())
        if wait:
            wait_for(self.ping, timeout=30, interval=0.002, what="llmuxd to answer")
        return self

    def ping(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            raise RuntimeError(f"llmuxd exited with {self.proc.returncode}:\n{self.log_tail()}")
        try:
            return bool(self.call({"cmd": "ping"}, timeout=5)["ok"])
        except Exception:
            return False

    def call(self, obj: dict, timeout: float = 120.0) -> dict:
        return list(request(self.socket, obj, timeout=timeout))[-1]

    def timed(self, obj: dict, timeout: float = 120.0) -> tuple[float, dict]:
        t0 = time.perf_counter()
        reply = self.call(obj, timeout)
        return time.perf_counter() - t0, reply

    def must(self, obj: dict, timeout: float = 120.0) -> dict:
        reply = self.call(obj, timeout)
        if not reply.get("ok"):
            raise RuntimeError(f"llmuxd refused {obj}: {reply.get('error')}\n{self.log_tail()}")
        return reply

    def status(self) -> dict:
        return self.call({"cmd": "status"})

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 60.0) -> int | None:
        """SIGTERM and wait (the daemon stops its models first); SIGKILL the group if stuck.
        A slow or unclean stop (a model had to be killed) is recorded in ctx.log."""
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGTERM)
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            rc = None
        took = time.monotonic() - t0
        if rc != 0 or took > 4:
            killed = [line for line in self.log_tail(200).splitlines() if "SIGKILL" in line]
            self.ctx.log.append(f"{self.workdir.name}: llmuxd took {took:.1f} s to stop, exit "
                                f"status {rc}; {' | '.join(killed[-3:]) or 'no SIGKILL logged'}")
        return rc

    def kill(self) -> None:
        """Kill the daemon's group and every model group it recorded (a failed row)."""
        pgids = set()
        try:
            state = json.loads((Path(self.settings["state_dir"]) / "state.json").read_text())
            pgids = {m.get("pgid") for m in state.get("models", {}).values() if m.get("pgid")}
        except (OSError, ValueError):
            pass
        if self.proc is not None and self.proc.poll() is None:
            kill_group(self.proc.pid)
            self.proc.wait()
        for pgid in pgids:
            kill_group(pgid)

    def log_tail(self, n: int = 30) -> str:
        try:
            return "\n".join(self.log.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return ""

    def __enter__(self) -> "Daemon":
        return self

    def __exit__(self, *exc) -> None:
        try:
            self.stop()
        finally:
            self.kill()


def kill_group(pgid: int) -> None:
    try:
        os.killpg(pgid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass


# -- statistics -------------------------------------------------------------------------

def percentile(values, q: float) -> float:
    """Linear-interpolated percentile, q in [0, 100]."""
    xs = sorted(values)
    if not xs:
        return float("nan")
    k = (len(xs) - 1) * q / 100.0
    lo, hi = int(k), min(int(k) + 1, len(xs) - 1)
    return xs[lo] + (xs[hi] - xs[lo]) * (k - lo)


def summary(values) -> dict:
    """median, p10, p90, min, max, n of a list of numbers."""
    xs = list(values)
    if not xs:
        return {"n": 0}
    return {"median": statistics.median(xs), "p10": percentile(xs, 10), "p90": percentile(xs, 90),
            "min": min(xs), "max": max(xs), "n": len(xs)}


def paired_ratios(a: list[float], b: list[float]) -> list[float]:
    """A_i / B_i for the rounds of a side-by-side run."""
    return [x / y for x, y in zip(a, b) if y > 0]


def alternate(rounds: int, run_a, run_b) -> tuple[list, list]:
    """Run A and B `rounds` times each, alternating which goes first, so drift and noise
    hit both alike; return (results of A, results of B) in round order."""
    a, b = [], []
    for i in range(rounds):
        if i % 2 == 0:
            a.append(run_a())
            b.append(run_b())
        else:
            b.append(run_b())
            a.append(run_a())
    return a, b


# -- /proc -----------------------------------------------------------------------------

def proc_stat(pid: int) -> list[str]:
    """Fields of /proc/PID/stat after the command name (index 0 = state)."""
    raw = Path(f"/proc/{pid}/stat").read_bytes()
    return raw[raw.rfind(b")") + 2:].decode().split()


def cpu_ticks(pid: int) -> int:
    """utime + stime of the whole process (all threads), in clock ticks."""
    fields = proc_stat(pid)
    return int(fields[11]) + int(fields[12])


def threads(pid: int) -> list[int]:
    return sorted(int(t) for t in os.listdir(f"/proc/{pid}/task"))


def thread_sample(pid: int) -> dict[int, dict]:
    """Per thread: on-CPU nanoseconds (schedstat), context switches, and name."""
    out = {}
    for tid in threads(pid):
        base = f"/proc/{pid}/task/{tid}"
        try:
            cpu_ns = int(Path(f"{base}/schedstat").read_text().split()[0])
            status = Path(f"{base}/status").read_text()
            comm = Path(f"{base}/comm").read_text().strip()
        except OSError:
            continue
        switches = sum(int(line.split()[1]) for line in status.splitlines()
                       if line.startswith(("voluntary_ctxt_switches", "nonvoluntary_ctxt_switches")))
        out[tid] = {"cpu_ns": cpu_ns, "switches": switches, "comm": comm}
    return out


def rss_kb(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    return 0


def children(pid: int) -> list[int]:
    """Direct children of a process's main thread (zombies included, until reaped)."""
    try:
        return [int(x) for x in Path(f"/proc/{pid}/task/{pid}/children").read_text().split()]
    except OSError:
        return []


def is_zombie(pid: int) -> bool | None:
    """True zombie, False live, None gone."""
    try:
        return proc_stat(pid)[0] in ("Z", "X")
    except (OSError, IndexError):
        return None


def marked_processes(marker: str) -> list[int]:
    """Live processes whose environment carries this run's marker."""
    needle = f"{MARKER_VAR}={marker}".encode()
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit() or int(name) == os.getpid():
            continue
        try:
            if needle in Path(f"/proc/{name}/environ").read_bytes().split(b"\0") \
                    and is_zombie(int(name)) is False:
                found.append(int(name))
        except OSError:
            continue
    return found


def kill_marked(marker: str) -> list[int]:
    """SIGKILL every live process of this run (by PID); return the PIDs killed."""
    killed = []
    for _ in range(3):
        pids = marked_processes(marker)
        if not pids:
            break
        for pid in pids:
            try:
                os.kill(pid, signal.SIGKILL)
                killed.append(pid)
            except OSError:
                pass
        time.sleep(0.2)
    reap_children()
    return sorted(set(killed))


def reap_children() -> None:
    """Collect zombies that are our own children (e.g. reparented to us while we were a
    subreaper); called between rows and at the end, when no Popen is waiting any more."""
    for pid in children(os.getpid()):
        if is_zombie(pid):
            try:
                os.waitpid(pid, os.WNOHANG)
            except ChildProcessError:
                pass
