"""End to end: the real llmuxd and llmuxctl against llmux-sim processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request

from .daemon_fixture import free_port, group_pids, squat, wait_for

THREE = {"a": {"sleep_level": 1}, "b": {"sleep_level": 2}, "c": {"sleep_level": 5}}


def complete(d, name: str, prompt: str = "hello world", max_tokens: int = 4) -> dict:
    body = json.dumps({"model": name, "prompt": prompt, "max_tokens": max_tokens}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{d.ports[name]}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as r:
        return json.loads(r.read())


def test_swaps_through_levels_1_2_5_keep_state_and_processes(make_daemon):
    d = make_daemon(THREE)
    assert d.swap("a")["ok"]
    pid_a = d.status()["models"]["a"]["pid"]
    complete(d, "a")
    assert d.swap("b")["ok"]
    st = d.status()
    assert st["active"] == "b"
    assert (st["models"]["a"]["state"], st["models"]["a"]["pid"]) == ("sleeping", pid_a)
    assert d.sim("a")["sleeping"] is True and d.sim("a")["level"] == 1
    assert d.swap("c")["ok"]
    assert d.sim("b")["sleeping"] is True and d.sim("b")["level"] == 2
    assert d.swap("b")["ok"]   # level-2 wake: weights reloaded, output is not garbage
    assert "!!!" not in complete(d, "b")["choices"][0]["text"]
    assert d.state("c") == "stopped"
    assert not d.status()["models"]["c"]["pid"]
    assert d.swap("a")["ok"]   # level-1 wake keeps the same process and its state
    assert d.status()["models"]["a"]["pid"] == pid_a
    assert d.sim("a")["completions"] == 1


def test_swap_progress_events_and_cli_rendering(make_daemon):
    d = make_daemon(THREE)
    events = d.events({"cmd": "swap", "model": "a"})
    assert [e["phase"] for e in events[:-1]] == ["start", "health"]
    assert events[-1]["ok"] is True and events[-1]["model"] == "a"
    r = d.ctl("swap", "b")
    assert r.returncode == 0, r.stderr
    assert "a: drain" in r.stdout and "b: start" in r.stdout and "b is active" in r.stdout
    r = d.ctl("status")
    assert r.returncode == 0 and "sleeping" in r.stdout and "active: b" in r.stdout
    js = json.loads(d.ctl("status", "--json").stdout)
    assert js["active"] == "b" and js["config"] == {"path": str(d.config), "error": None}
    assert js["models"]["a"]["sleep_level"] == 1 and js["models"]["b"]["port"] == d.ports["b"]


def test_failed_wake_rolls_back_to_previous_model(make_daemon):
    d = make_daemon(THREE)
    assert d.swap("b")["ok"] and d.swap("a")["ok"]
    d.sim("b", "/sim/fail?what=wake", "POST")
    reply = d.swap("b")
    assert not reply["ok"]
    assert "POST /wake_up failed: HTTP 500" in reply["error"] and "a is active again" in reply["error"]
    st = d.status()
    assert st["active"] == "a" and st["models"]["b"]["state"] == "failed"
    assert "wake_up" in st["models"]["b"]["last_error"]
    assert d.swap("b")["ok"]  # a failed model can be started again (cold)


def test_failed_sleep_escalates_to_stop_of_the_whole_group(make_daemon):
    d = make_daemon(THREE)
    assert d.swap("a")["ok"]
    pgid = d.status()["models"]["a"]["pid"]
    d.sim("a", "/sim/fail?what=sleep", "POST")
    assert d.swap("c")["ok"]
    st = d.status()["models"]["a"]
    assert st["state"] == "stopped" and "sleep (level 1) failed" in st["last_error"]
    assert group_pids(pgid) == []


def test_start_that_exits_fails_fast_with_reason(make_daemon):
    d = make_daemon({"a": {"sleep_level": 1}, "bad": {"sleep_level": 1, "args": ["--fail-start"]}})
    assert d.swap("a")["ok"]
    t0 = time.monotonic()
    reply = d.swap("bad")
    assert time.monotonic() - t0 < 5
    assert "bad exited with status 1 before it became healthy" in reply["error"]
    assert d.status()["active"] == "a"
    r = d.ctl("logs", "bad", "-n", "20")
    assert r.returncode == 0 and "llmuxd" in r.stdout


def test_stranger_on_the_port_is_refused_by_name(make_daemon):
    d = make_daemon({"a": {"sleep_level": 1}})
    stranger = squat(d.ports["a"])
    try:
        r = d.ctl("swap", "a")
        assert r.returncode == 1
        assert f"port {d.ports['a']} is already in use by pid {os.getpid()}" in r.stderr
        assert r.stderr.count("\n") == 1  # one line
    finally:
        stranger.close()
    assert d.swap("a")["ok"]


def test_concurrent_swap_is_refused_not_interleaved(make_daemon):
    d = make_daemon({"a": {"args": ["--start-delay", "1.5"]}, "b": {}})
    results = {}
    t = threading.Thread(target=lambda: results.setdefault("a", d.swap("a")))
    t.start()
    wait_for(lambda: d.status()["job"], what="the swap to start")
    second = d.ctl("swap", "b")
    assert second.returncode == 1 and "busy: swap a in progress" in second.stderr
    assert d.status()["models"]["a"]["state"] == "starting"  # status answers during a swap
    t.join()
    assert results["a"]["ok"] and d.state("b") == "stopped"


def test_drain_waits_for_requests_and_force_overrides(make_daemon):
    d = make_daemon({"a": {"args": ["--token-delay", "0.5"]}, "b": {}}, {"drain_timeout": 0.5})
    assert d.swap("a")["ok"]
    t = threading.Thread(target=complete, args=(d, "a", "slow", 8))
    t.start()
    wait_for(lambda: "num_requests_running{" in urllib.request.urlopen(
        f"http://127.0.0.1:{d.ports['a']}/metrics").read().decode() and
        ' 1' in [l for l in urllib.request.urlopen(f"http://127.0.0.1:{d.ports['a']}/metrics")
                 .read().decode().splitlines() if l.startswith("vllm:num_requests_running")][0][-4:],
        what="a request in flight")
    reply = d.swap("b")
    assert not reply["ok"] and "still in flight" in reply["error"] and "--force" in reply["error"]
    assert d.status()["active"] == "a"
    assert d.swap("b", force=True)["ok"]
    t.join()


def test_crashed_active_model_is_restarted_with_its_group_killed(make_daemon):
    d = make_daemon({"a": {}})
    assert d.swap("a")["ok"]
    st = d.status()["models"]["a"]
    old_pid = st["pid"]
    engine = d.sim("a")["engine_pid"]
    try:
        d.sim("a", "/sim/crash", "POST")
    except Exception:
        pass
    wait_for(lambda: d.status()["models"]["a"]["state"] == "active"
             and d.status()["models"]["a"]["pid"] not in (None, old_pid), timeout=15,
             what="restart")
    st = d.status()["models"]["a"]
    assert st["restarts"] == 1 and "crashed: exited with status 1" in st["last_error"]
    wait_for(lambda: group_pids(old_pid) == [], what="the old EngineCore to be killed")
    assert not os.path.exists(f"/proc/{engine}") or engine not in group_pids(old_pid)


def test_crash_loop_ends_in_failed_after_burst_limit(make_daemon):
    d = make_daemon({"a": {"args": ["--crash-after", "0.2"]}},
                    {"restart_limit": 2, "restart_backoff": 0.1})
    d.swap("a")
    wait_for(lambda: d.state("a") == "failed", timeout=20, what="failed")
    st = d.status()["models"]["a"]
    assert "gave up after 2 restart(s)" in st["last_error"]
    assert st["restarts"] == 2 and st["pid"] is None


def test_unhealthy_active_model_is_restarted(make_daemon):
    d = make_daemon({"a": {}}, {"health_interval": 0.2, "health_failures": 2})
    assert d.swap("a")["ok"]
    old = d.status()["models"]["a"]["pid"]
    d.sim("a", "/sim/fail?what=health", "POST")
    wait_for(lambda: d.status()["models"]["a"]["pid"] not in (None, old)
             and d.state("a") == "active", timeout=15, what="restart")
    assert "unhealthy: 2 failed health checks" in d.status()["models"]["a"]["last_error"]


def test_sleep_and_stop_commands(make_daemon):
    d = make_daemon(THREE)
    assert d.swap("a")["ok"]
    r = d.ctl("sleep", "a", "--level", "2")
    assert r.returncode == 0, r.stderr
    assert d.sim("a")["level"] == 2 and d.status()["active"] is None
    pgid = d.status()["models"]["a"]["pid"]
    r = d.ctl("stop", "a")
    assert r.returncode == 0 and d.state("a") == "stopped" and group_pids(pgid) == []
    assert d.ctl("sleep", "nope").returncode == 1
    assert d.ctl("sleep", "a", "--level", "9").returncode == 2


def test_garbage_on_the_socket_never_stalls_or_crashes(make_daemon):
    d = make_daemon({"a": {}})
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(d.socket)  # an idle client must not stall others
    for junk in (b"\xff\xfe\x00garbage\n", b"[1,2,3]\n", b'{"cmd": 5}\n', b'{"cmd":"rm -rf"}\n',
                 b"{" * 10 + b"\n"):
        s = socket.socket(socket.AF_UNIX)
        s.connect(d.socket)
        s.sendall(junk)
        reply = json.loads(s.makefile().readline())
        assert reply["ok"] is False and reply["error"]
        s.close()
    s = socket.socket(socket.AF_UNIX)
    s.connect(d.socket)
    try:
        s.sendall(b"x" * (200 * 1024))  # an endless line is refused, not buffered
    except OSError:
        pass
    data = s.recv(4096)
    assert b"longer than" in data or data == b""
    s.close()
    assert d.status()["ok"]
    idle.close()


def test_model_child_hygiene(make_daemon, tmp_path):
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(tmp_path / "notify"))
    d = make_daemon({"a": {"env": {"EXTRA": "1"}}},
                    env={"NOTIFY_SOCKET": str(tmp_path / "notify"), "WATCHDOG_USEC": "0",
                         "LISTEN_FDS": "1", "VLLM_PORT": "tcp://x"})
    assert d.swap("a")["ok"]
    pid = d.status()["models"]["a"]["pid"]
    env = dict(kv.split("=", 1) for kv in
               open(f"/proc/{pid}/environ").read().split("\0") if "=" in kv)
    assert env["VLLM_SERVER_DEV_MODE"] == "1" and env["EXTRA"] == "1"
    for name in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "LISTEN_FDS", "VLLM_PORT"):
        assert name not in env
    assert os.getpgid(pid) == pid and os.getsid(pid) == pid
    assert os.readlink(f"/proc/{pid}/fd/0") == "/dev/null"
    flags = int(open(f"/proc/{pid}/fdinfo/1").read().split("flags:")[1].split()[0], 8)
    assert flags & os.O_APPEND
    assert os.readlink(f"/proc/{pid}/fd/1").endswith("/logs/a.log")
    cmdline = open(f"/proc/{pid}/cmdline").read().split("\0")
    assert cmdline[cmdline.index("--host") + 1] == "127.0.0.1" and "--enable-sleep-mode" in cmdline
    notify.close()


def test_sigterm_stops_every_model_group_and_exits_0(make_daemon):
    d = make_daemon(THREE)
    assert d.swap("a")["ok"] and d.swap("b")["ok"]
    groups = [m["pid"] for m in d.status()["models"].values() if m["pid"]]
    assert len(groups) == 2
    assert d.stop(signal.SIGTERM) == 0
    for pgid in groups:
        assert group_pids(pgid) == []
    assert not os.path.exists(d.socket)


def test_unreachable_daemon_exit_3_with_hint(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmuxctl", "--socket", str(tmp_path / "none"),
                        "status"], capture_output=True, text=True)
    assert r.returncode == 3 and "--socket" in r.stderr and "Traceback" not in r.stderr


def test_check_reports_file_line_and_exits_1(tmp_path):
    cfg = tmp_path / "bad.toml"
    cfg.write_text('[daemon]\nsocket = "/tmp/x.sock"\n\n[models.a]\nmodel = "m"\nport = "80"\n')
    r = subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(cfg), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and f"{cfg}:6:" in r.stderr and "Traceback" not in r.stderr
    r = subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(cfg)],
                       capture_output=True, text=True, timeout=10)
    assert r.returncode == 1 and f"{cfg}:6:" in r.stderr and "Traceback" not in r.stderr


def test_default_model_is_active_at_start_and_reload_applies_a_diff(make_daemon):
    d = make_daemon({"a": {}, "b": {}}, {"default_model": "a"})
    wait_for(lambda: d.status()["active"] == "a", what="default model")
    pid = d.status()["models"]["a"]["pid"]
    text = d.config.read_text()
    d.config.write_text(text + f'\n[models.new]\nmodel = "org/new"\nport = {free_port()}\n')
    r = d.ctl("reload")  # the watcher may have applied it already: then "no changes"
    assert r.returncode == 0 and ("added new" in r.stdout or "no changes" in r.stdout)
    assert d.state("new") == "stopped" and d.status()["models"]["a"]["pid"] == pid
    d.config.write_text(text + "\n[models.broken]\nport = 'x'\n")
    r = d.ctl("reload")
    assert r.returncode == 1
    err = d.status()["config"]["error"]
    assert f"{d.config}:" in err and "new" in d.status()["models"]  # last good catalog stays
    assert d.status()["active"] == "a" and d.status()["models"]["a"]["pid"] == pid


def test_logs_tail_and_follow(make_daemon):
    d = make_daemon({"a": {}})
    assert d.swap("a")["ok"]
    tail = d.call({"cmd": "logs", "model": "a", "lines": 3})
    assert tail["ok"] and len(tail["text"].splitlines()) == 3
    s = socket.socket(socket.AF_UNIX)
    s.connect(d.socket)
    s.sendall(b'{"cmd":"logs","model":"a","lines":0,"follow":true}\n')
    f = s.makefile("rb")
    assert json.loads(f.readline())["event"] == "log"
    urllib.request.urlopen(f"http://127.0.0.1:{d.ports['a']}/v1/models").read()  # logs a line
    line = json.loads(f.readline())
    assert line["event"] == "log" and "/v1/models" in line["text"]
    s.close()
    r = d.ctl("logs", "a", "-n", "2")
    assert r.returncode == 0 and len(r.stdout.splitlines()) == 2
