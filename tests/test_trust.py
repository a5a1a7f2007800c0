"""llmuxd runs as root: files it did not write and processes it did not start are hostile.

Each test here is an attack (or an accident at the worst moment) from issue 12,
defects 1-7; the test name carries the defect's number.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmuxd import procs

from .daemon_fixture import Daemon, free_port, wait_for

NOBODY = 65534


def victim_group() -> tuple[subprocess.Popen, int]:
    """A process group whose leader exited: only a member (sleep) is left."""
    sh = subprocess.Popen(["sh", "-c", "sleep 300 & echo $!"], stdout=subprocess.PIPE,
                          start_new_session=True, text=True)
    member = int(sh.stdout.readline())
    sh.wait()
    return sh, member


def alive(pid: int) -> bool:
    return procs.is_alive(pid)


def exit_of(d: Daemon, timeout: float = 10) -> int:
    wait_for(lambda: d.proc.poll() is not None, timeout=timeout, what="llmuxd to exit")
    return d.proc.returncode


@pytest.mark.parametrize("how", ["foreign_dir", "world_writable_dir", "foreign_file"])
def test_defect1_state_written_by_someone_else_is_refused(make_daemon, how):
    """An unprivileged user's state.json names its own process and a victim's group."""
    own = subprocess.Popen(["sleep", "300"])               # the attacker's process
    victim = subprocess.Popen(["sleep", "300"], start_new_session=True)
    try:
        d = make_daemon({"a": {}}, start=False)
        state = d.tmp / "state"
        state.mkdir(mode=0o755)
        entry = {"state": "active", "pid": own.pid, "pgid": victim.pid, "port": d.ports["a"],
                 "sleep_level": 1, "start_time": procs.process_start_time(own.pid)}
        (state / "state.json").write_text(json.dumps(
            {"version": 1, "active": "a", "resume": None, "models": {"a": entry}}))
        if how == "foreign_dir":
            os.chown(state, NOBODY, NOBODY)
            os.chown(state / "state.json", NOBODY, NOBODY)
        elif how == "world_writable_dir":
            os.chmod(state, 0o777)
        else:
            os.chown(state / "state.json", NOBODY, NOBODY)
        d.start(wait=False)
        assert exit_of(d) == 1
        assert "refusing" in d.daemon_log() and str(state) in d.daemon_log()
        time.sleep(0.3)
        assert alive(victim.pid) and alive(own.pid)
    finally:
        for p in (own, victim):
            p.kill()
            p.wait()


def test_defect1_leftovers_of_a_group_llmuxd_did_not_start_are_never_killed(make_daemon):
    """A dead PID beside someone else's process group is not a licence to kill that group."""
    sh, member = victim_group()
    try:
        d = make_daemon({"a": {}}, start=False)
        state = d.tmp / "state"
        state.mkdir()
        dead = subprocess.Popen(["true"])
        dead.wait()
        entry = {"state": "active", "pid": dead.pid, "pgid": sh.pid, "port": d.ports["a"],
                 "sleep_level": 1, "start_time": time.time() - 5}
        (state / "state.json").write_text(json.dumps(
            {"version": 1, "active": "a", "resume": None, "models": {"a": entry}}))
        d.start()
        wait_for(lambda: d.status()["job"] is None, what="adoption")
        time.sleep(0.3)
        assert alive(member), "llmuxd killed a process group it never started"
    finally:
        os.kill(member, signal.SIGKILL)


def test_defect2_log_file_symlink_is_never_followed(make_daemon, tmp_path):
    secret = tmp_path / "secret"
    secret.write_text("TOPSECRET\n")
    d = make_daemon({"a": {}}, start=False)
    logs = d.tmp / "state" / "logs"
    logs.mkdir(parents=True)
    (logs / "a.log").symlink_to(secret)
    d.start()
    reply = d.logs_reply = d.call({"cmd": "logs", "model": "a", "lines": 10})
    assert "TOPSECRET" not in json.dumps(reply)
    reply = d.swap("a")
    assert not reply["ok"] and "a.log" in reply["error"], reply
    assert secret.read_text() == "TOPSECRET\n"
    assert "TOPSECRET" not in json.dumps(d.call({"cmd": "logs", "model": "a", "lines": 10}))


def test_defect3_kill_during_adoption_keeps_unadopted_models_recorded(make_daemon):
    d = make_daemon({"a": {"sleep_level": 1}, "b": {"sleep_level": 2}})
    assert d.swap("b")["ok"] and d.swap("a")["ok"]
    pids = {n: m["pid"] for n, m in d.status()["models"].items()}
    d.kill_daemon()
    d.start(env={"LLMUX_FAILPOINT": "adopt:b"}, wait=False)   # a adopted, b not yet
    exit_of(d)
    stored = d.stored()["models"]
    assert (stored["a"]["state"], stored["b"]["state"]) == ("active", "sleeping"), stored
    d.start()
    wait_for(lambda: d.status()["job"] is None, what="adoption")
    st = d.status()["models"]
    assert (st["a"]["state"], st["a"]["pid"]) == ("active", pids["a"])
    assert (st["b"]["state"], st["b"]["pid"]) == ("sleeping", pids["b"])


def test_defect4_adoption_probes_the_port_the_process_was_started_with(make_daemon):
    d = make_daemon({"a": {"sleep_level": 1}, "b": {"sleep_level": 1}})
    assert d.swap("b")["ok"] and d.swap("a")["ok"]
    pids = {n: m["pid"] for n, m in d.status()["models"].items()}
    old_port = d.ports["a"]
    d.kill_daemon()
    d.config.write_text(d.config.read_text().replace(f"port = {old_port}",
                                                     f"port = {free_port()}"))
    d.start()
    wait_for(lambda: d.status()["job"] is None, what="adoption")
    st = d.status()["models"]
    assert (st["a"]["state"], st["a"]["pid"], st["a"]["port"]) == ("active", pids["a"], old_port)
    assert st["a"].get("restart_pending")
    assert (st["b"]["state"], st["b"]["pid"]) == ("sleeping", pids["b"])
    assert d.sim("b")["sleeping"] and not d.sim("a")["sleeping"]


def test_defect5_second_daemon_on_the_same_state_dir_is_refused(make_daemon, tmp_path):
    d = make_daemon({"a": {}})
    assert d.swap("a")["ok"]
    pid = d.status()["models"]["a"]["pid"]
    (tmp_path / "two").mkdir()
    other = Daemon(tmp_path / "two", {"a": {"port": d.ports["a"]}},
                   {"state_dir": str(tmp_path / "state")})
    try:
        other.start(wait=False)
        assert exit_of(other) == 4
        assert "state" in other.daemon_log() and "in use" in other.daemon_log()
    finally:
        other.cleanup()
    st = d.status()["models"]["a"]
    assert (st["state"], st["pid"]) == ("active", pid)


CORRUPT = {
    "resume_list": '{"version": 1, "models": {}, "resume": ["a"]}',
    "deep_nesting": '{"version": 1, "models": ' + "[" * 100000 + "]" * 100000 + "}",
    "active_list": '{"version": 1, "models": {}, "active": ["a"]}',
    "entry_not_object": '{"version": 1, "models": {"a": [1]}}',
    "pid_not_int": '{"version": 1, "models": {"a": {"state": "active", "pid": "1"}}}',
}


@pytest.mark.parametrize("text", CORRUPT.values(), ids=CORRUPT.keys())
def test_defect6_corrupt_state_file_is_set_aside(make_daemon, text):
    d = make_daemon({"a": {}}, start=False)
    (d.tmp / "state").mkdir()
    (d.tmp / "state" / "state.json").write_text(text)
    d.start()
    assert "set aside" in d.daemon_log()
    aside = [p for p in (d.tmp / "state").iterdir() if p.name.startswith("state.json.bad-")]
    assert len(aside) == 1 and aside[0].read_text() == text
    assert d.swap("a")["ok"]


DAEMONIZING = ["sh", "-c", '(setsid sleep 1000 &); exec "$0" -m llmuxd.sim "$@"', sys.executable]


def helpers(d: Daemon) -> list[int]:
    return [p for p in d.processes()
            if Path(f"/proc/{p}/cmdline").read_bytes().split(b"\0")[0] == b"sleep"]


@pytest.mark.parametrize("how", ["stop", "shutdown"])
def test_defect7_daemonized_helper_is_stopped_with_its_model(make_daemon, how):
    d = make_daemon({"a": {}}, {"vllm_command": DAEMONIZING})
    assert d.swap("a")["ok"]
    found = wait_for(lambda: helpers(d), what="the daemonized helper")
    assert os.getsid(found[0]) != d.status()["models"]["a"]["pid"]
    if how == "stop":
        assert d.call({"cmd": "stop", "model": "a"})["ok"]
    else:
        assert d.stop(signal.SIGTERM) == 0
    wait_for(lambda: not any(alive(p) for p in found), timeout=5, what="the helper to go")
