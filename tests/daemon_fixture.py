"""Run the real llmuxd against llmux-sim in a temporary directory (honcho style)."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

from llmuxctl.client import request

SIM = [sys.executable, "-m", "llmuxd.sim"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def squat(port: int) -> socket.socket:
    """A stranger listening on a model's port (close it when done)."""
    stranger = socket.socket()
    stranger.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    stranger.bind(("127.0.0.1", port))
    stranger.listen()
    return stranger


def wait_for(predicate, timeout=10.0, interval=0.02, what="condition"):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def toml_value(v) -> str:
    return json.dumps(v) if not isinstance(v, dict) else \
        "{ " + ", ".join(f"{k} = {json.dumps(x)}" for k, x in v.items()) + " }"


class Daemon:
    def __init__(self, tmp: Path, models: dict[str, dict], daemon: dict | None = None) -> None:
        self.tmp = tmp
        self.socket = (daemon or {}).get("socket") or str(tmp / "llmux.sock")
        self.ports = {}
        settings = {"socket": self.socket, "state_dir": str(tmp / "state"), "vllm_command": SIM,
                    "stop_timeout": 5, "drain_timeout": 2, "health_interval": 0.5,
                    "restart_backoff": 0.1, **(daemon or {})}
        nested = {k: settings.pop(k) for k in list(settings) if isinstance(settings[k], dict)}
        lines = ["[daemon]"] + [f"{k} = {toml_value(v)}" for k, v in settings.items()]
        for table, values in nested.items():
            lines.append(f"[daemon.{table}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in values.items()]
        for name, m in models.items():
            m = dict(m)
            self.ports[name] = m.setdefault("port", free_port())
            m.setdefault("model", f"org/{name}")
            lines.append(f"\n[models.{name}]")
            lines += [f"{k} = {toml_value(v)}" for k, v in m.items()]
        self.config = tmp / "llmux.toml"
        self.config.write_text("\n".join(lines) + "\n")
        self.proc: subprocess.Popen | None = None
        self.log = tmp / "llmuxd.log"
        self.marker = f"llmux-test-{os.getpid()}-{id(self)}"  # inherited by every model process

    def start(self, env: dict | None = None, wait: bool = True) -> "Daemon":
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmuxd", "--config", str(self.config), "--log-level", "debug"],
            stdout=open(self.log, "ab"), stderr=subprocess.STDOUT, start_new_session=True,
            env={**os.environ, "LLMUX_TEST_MARKER": self.marker, **(env or {})})
        if wait:
            wait_for(lambda: self.ping(), what="llmuxd to listen")
            wait_for(lambda: (self.status().get("job") or {}).get("kind") != "adopt",
                     what="adoption to finish")
        return self

    def ping(self) -> bool:
        try:
            return self.call({"cmd": "ping"})["ok"]
        except Exception:
            return False

    def call(self, obj: dict, timeout: float = 60.0) -> dict:
        return list(request(self.socket, obj, timeout=timeout))[-1]

    def events(self, obj: dict, timeout: float = 60.0) -> list[dict]:
        return list(request(self.socket, obj, timeout=timeout))

    def status(self) -> dict:
        return self.call({"cmd": "status"})

    def state(self, name: str) -> str:
        return self.status()["models"][name]["state"]

    def swap(self, name: str, **kw) -> dict:
        return self.call({"cmd": "swap", "model": name, **kw})

    def sim(self, name: str, path: str = "/sim/state", method: str = "GET") -> dict:
        import urllib.request
        req = urllib.request.Request(f"http://127.0.0.1:{self.ports[name]}{path}", method=method)
        with urllib.request.urlopen(req, timeout=5) as r:
            body = r.read()
        return json.loads(body) if body else {}

    def ctl(self, *args: str, timeout: float = 60) -> subprocess.CompletedProcess:
        return subprocess.run([sys.executable, "-m", "llmuxctl", "--socket", self.socket, *args],
                              capture_output=True, text=True, timeout=timeout)

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int | None:
        if self.proc is None or self.proc.poll() is not None:
            return self.proc.returncode if self.proc else None
        self.proc.send_signal(sig)
        try:
            return self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
            raise AssertionError("llmuxd did not exit after " + signal.Signals(sig).name)

    def processes(self) -> list[int]:
        """Every live process started on behalf of this test's daemons (by env marker)."""
        found = []
        needle = f"LLMUX_TEST_MARKER={self.marker}".encode()
        for name in os.listdir("/proc"):
            if not name.isdigit() or int(name) == (self.proc.pid if self.proc else -1):
                continue
            try:
                env = Path(f"/proc/{name}/environ").read_bytes()
                stat = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            if needle in env.split(b"\0") and stat[stat.rfind(b")") + 2:][:1] != b"Z":
                found.append(int(name))
        return found

    def kill_daemon(self) -> None:
        """SIGKILL llmuxd only (its models live on, as after a crash)."""
        self.proc.kill()
        self.proc.wait()

    def stored(self) -> dict:
        return json.loads((self.tmp / "state" / "state.json").read_text())

    def cleanup(self) -> None:
        """Kill anything left (the test failed): the daemon and every model group."""
        for pid in self.processes():
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass
        pgids = set()
        try:
            for m in self.status()["models"].values():
                if m.get("pid"):
                    pgids.add(m["pid"])
        except Exception:
            pass
        if self.proc is not None and self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait()
        for pgid in pgids:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass

    def daemon_log(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""


def proc_table() -> list[tuple[int, str, int, int]]:
    """(pid, state, ppid, pgid) of every process, from /proc/PID/stat."""
    rows = []
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                stat = Path(f"/proc/{name}/stat").read_bytes()
            except OSError:
                continue
            rest = stat[stat.rfind(b")") + 2:].split()
            rows.append((int(name), rest[0].decode(), int(rest[1]), int(rest[2])))
    return rows


def group_pids(pgid: int) -> list[int]:
    return [pid for pid, state, _, group in proc_table() if group == pgid and state != "Z"]
