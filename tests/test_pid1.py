"""PID 1 and systemd duties: signals, reaping orphans, shutdown, sd_notify, child hygiene."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from .daemon_fixture import SIM, proc_table, wait_for

ORPHANS = [str(Path(__file__).parent / "fakes" / "orphans.sh")]


def comm(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/comm").read_text().strip()
    except OSError:
        return ""


def zombies_of(ppid: int) -> list[int]:
    return [pid for pid, state, parent, _ in proc_table() if state == "Z" and parent == ppid]


def test_orphan_burst_is_reaped_and_managed_status_is_not_lost(make_daemon):
    d = make_daemon({"a": {}}, {"vllm_command": ["sh", *ORPHANS, "300", *SIM]})
    assert d.swap("a")["ok"]
    # 300 orphans reparented to llmuxd (its subreaper) exit 0.2 s later: all reaped.
    wait_for(lambda: not zombies_of(d.proc.pid) and not [p for p in d.processes()
             if comm(p) == "sleep"], timeout=10,
             what="every orphan reaped")
    # ...and the managed child's own status still arrives, with its real exit code.
    try:
        d.sim("a", "/sim/crash", "POST")
    except Exception:
        pass
    wait_for(lambda: "crashed: exited with status 1" in (d.status()["models"]["a"]["last_error"] or ""),
             what="the crash with its status")


def test_as_pid1_in_a_pid_namespace(tmp_path, make_daemon):
    if subprocess.run(["unshare", "--pid", "--fork", "--mount-proc", "true"]).returncode:
        pytest.skip("unshare --pid is not permitted here")
    d = make_daemon({"a": {}}, {"vllm_command": ["sh", *ORPHANS, "200", *SIM]}, start=False)
    cmd = ["unshare", "--pid", "--fork", "--mount-proc", sys.executable, "-m", "llmuxd",
           "--config", str(d.config)]
    d.proc = subprocess.Popen(cmd, stdout=open(d.log, "ab"), stderr=subprocess.STDOUT,
                              start_new_session=True,
                              env={**os.environ, "LLMUX_TEST_MARKER": d.marker})
    wait_for(d.ping, what="llmuxd as PID 1")
    assert d.call({"cmd": "ping"})["pid"] == 1
    assert d.swap("a")["ok"]
    # In the namespace llmuxd is init: orphans come to it and must not pile up.
    wait_for(lambda: not zombies_of(daemon_pid_in_ns(d)) and not [
        p for p in d.processes() if comm(p) == "sleep"], timeout=10, what="no zombies")
    # Signals without handlers are dropped for an init: each one must still work.
    for sig in (signal.SIGUSR1, signal.SIGUSR2):
        os.kill(daemon_pid_in_ns(d), sig)
    time.sleep(0.2)
    assert d.ping()  # USR1/USR2 handled, not fatal
    os.kill(daemon_pid_in_ns(d), signal.SIGTERM)
    assert d.proc.wait(30) == 0
    assert d.processes() == []


def daemon_pid_in_ns(d) -> int:
    """The host PID of the llmuxd that is PID 1 inside the namespace (child of unshare)."""
    for name in os.listdir("/proc"):
        if name.isdigit():
            try:
                status = Path(f"/proc/{name}/status").read_text()
            except OSError:
                continue
            if f"PPid:\t{d.proc.pid}\n" in status:
                return int(name)
    raise AssertionError("no llmuxd inside the namespace")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_term_or_int_stops_everything_and_exits_0(make_daemon, sig):
    d = make_daemon({"a": {}, "b": {"sleep_level": 2}})
    assert d.swap("b")["ok"] and d.swap("a")["ok"]
    assert d.stop(sig) == 0
    assert d.processes() == []


def test_second_term_hurries_and_exit_status_says_something_was_killed(make_daemon):
    # A model that ignores SIGTERM: the first TERM waits stop_timeout, the second kills.
    d = make_daemon({"a": {}}, {"stop_timeout": 60,
                                "vllm_command": ["sh", "-c", 'trap "" TERM; exec "$@"', "sh", *SIM]})
    assert d.swap("a")["ok"]
    d.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: "stopping" == d.state("a"), what="stopping")
    t0 = time.monotonic()
    d.proc.send_signal(signal.SIGTERM)
    assert d.proc.wait(20) == 1  # something had to be killed
    assert time.monotonic() - t0 < 15
    assert d.processes() == []


def test_refuses_swaps_while_shutting_down(make_daemon):
    d = make_daemon({"a": {}, "b": {}}, {"stop_timeout": 60,
                                         "vllm_command": ["sh", "-c", 'trap "" TERM; exec "$@"',
                                                          "sh", *SIM]})
    assert d.swap("a")["ok"]
    d.proc.send_signal(signal.SIGTERM)
    wait_for(lambda: d.status()["daemon"]["shutting_down"], what="shutdown")
    reply = d.swap("b")
    assert not reply["ok"] and "shutting down" in reply["error"]
    d.proc.send_signal(signal.SIGTERM)
    d.proc.wait(20)


class NotifyListener:
    def __init__(self, path: Path) -> None:
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[str] = []

    def drain(self) -> list[str]:
        while True:
            try:
                self.messages.append(self.sock.recv(4096).decode())
            except socket.timeout:
                return self.messages

    def wait(self, text: str, timeout=10.0) -> str:
        return wait_for(lambda: next((m for m in self.drain() if text in m), None),
                        timeout=timeout, what=f"sd_notify {text!r}")


def test_sd_notify_ready_reload_status_watchdog_stopping(make_daemon, tmp_path):
    listener = NotifyListener(tmp_path / "notify")
    d = make_daemon({"a": {}}, {"default_model": "a"}, start=False)
    d.start(env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "200000"}, wait=False)
    ready = listener.wait("READY=1")
    assert d.state("a") == "active"  # READY only once the default model is active
    assert "STATUS=active: a" in ready
    assert listener.wait("WATCHDOG=1")
    n = len(listener.drain())
    time.sleep(0.5)
    assert len([m for m in listener.drain()[n:] if m == "WATCHDOG=1"]) >= 3  # every 0.1 s
    d.proc.send_signal(signal.SIGHUP)
    reloading = listener.wait("RELOADING=1")
    assert "MONOTONIC_USEC=" in reloading  # one datagram, as Type=notify-reload wants
    usec = int(reloading.split("MONOTONIC_USEC=")[1].split()[0])
    assert abs(usec - time.monotonic_ns() // 1000) < 10_000_000
    messages = listener.drain()
    assert any("READY=1" in m for m in messages[messages.index(reloading):])
    d.config.write_text(d.config.read_text() + "\n[broken\n")
    d.proc.send_signal(signal.SIGHUP)
    failed = listener.wait("STATUS=reload failed")
    assert "READY=1" in failed
    d.proc.send_signal(signal.SIGTERM)
    assert "STOPPING=1" in listener.wait("STOPPING=1")
    d.proc.wait(20)
    # The model never saw llmuxd's notify socket.
    log = (d.tmp / "state" / "logs" / "a.log").read_text()
    assert "NOTIFY_SOCKET" not in log


def test_children_get_default_signals_and_empty_mask(make_daemon):
    # Started the way a background shell job is: INT and QUIT ignored, some signals blocked.
    d = make_daemon({"a": {}}, start=False)
    script = ("import signal, os, sys; signal.signal(signal.SIGINT, signal.SIG_IGN); "
              "signal.signal(signal.SIGQUIT, signal.SIG_IGN); signal.signal(signal.SIGTSTP, signal.SIG_IGN); "
              "signal.pthread_sigmask(signal.SIG_BLOCK, [signal.SIGUSR1, signal.SIGTERM]); "
              "os.execv(sys.executable, [sys.executable, '-m', 'llmuxd', '--config', sys.argv[1]])")
    d.proc = subprocess.Popen([sys.executable, "-c", script, str(d.config)],
                              stdout=open(d.log, "ab"), stderr=subprocess.STDOUT,
                              start_new_session=True,
                              env={**os.environ, "LLMUX_TEST_MARKER": d.marker})
    wait_for(d.ping, what="llmuxd")
    assert d.swap("a")["ok"]
    pid = d.status()["models"]["a"]["pid"]
    status = Path(f"/proc/{pid}/status").read_text()
    fields = dict(line.split(":\t", 1) for line in status.splitlines() if ":\t" in line)
    assert int(fields["SigBlk"], 16) == 0
    ignored = int(fields["SigIgn"], 16)
    for sig in (signal.SIGINT, signal.SIGQUIT, signal.SIGTSTP, signal.SIGTERM, signal.SIGHUP):
        assert not ignored & (1 << (sig - 1)), sig
    assert os.readlink(f"/proc/{d.proc.pid}/cwd") == "/"
    assert sorted(os.listdir(f"/proc/{pid}/fd"))[:3] == ["0", "1", "2"]
