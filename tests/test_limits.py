"""Robustness under abuse and accidents: issue 12, defects 9-14 (the name carries the number)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time

import pytest

from llmuxd.protocol import MAX_LINE, LineBuffer, ProtocolError

from .daemon_fixture import free_port, wait_for

NOBODY = 65534


def test_defect9_logs_of_4000_long_lines_are_streamed(make_daemon):
    d = make_daemon({"a": {}}, start=False)
    logs = d.tmp / "state" / "logs"
    logs.mkdir(parents=True)
    line = "x" * 400
    (logs / "a.log").write_text("".join(f"{i} {line}\n" for i in range(5000)))
    d.start()
    r = d.ctl("logs", "a", "-n", "4000")
    assert r.returncode == 0, r.stderr
    out = r.stdout.splitlines()
    assert len(out) == 4000 and out[0].startswith("1000 ") and out[-1].startswith("4999 ")


@pytest.fixture
def small_fs(tmp_path):
    """Mount a tiny tmpfs (root only); yields a function that mounts one at a path."""
    mounted = []

    def mount(path, size="1m"):
        path.mkdir(parents=True, exist_ok=True)
        r = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs",
                            str(path)], capture_output=True)
        if r.returncode != 0:
            pytest.skip(f"cannot mount a tmpfs: {r.stderr.decode().strip()}")
        mounted.append(path)
        return path
    yield mount
    for path in reversed(mounted):
        subprocess.run(["umount", "-l", str(path)])


def fill(path):
    """Write until the file system is full."""
    fd = os.open(path / "filler", os.O_WRONLY | os.O_CREAT | os.O_APPEND)
    try:
        for size in (65536, 4096, 512, 1):
            try:
                while True:
                    os.write(fd, b"\0" * size)
            except OSError:
                pass
    finally:
        os.close(fd)


def test_defect10_full_log_dir_is_a_clear_error(make_daemon, small_fs):
    d = make_daemon({"a": {}}, start=False)
    logs = small_fs(d.tmp / "state" / "logs", "64k")
    d.start()
    fill(logs)
    reply = d.swap("a")
    assert not reply["ok"]
    assert "log file" in reply["error"] and "No space left on device" in reply["error"], reply
    assert "No space left on device" in d.status()["models"]["a"]["last_error"]


def test_defect10_full_state_dir_still_persists_and_is_reported(make_daemon, small_fs,
                                                                tmp_path):
    d = make_daemon({"a": {}}, {"log_dir": str(tmp_path / "logs")}, start=False)
    state = small_fs(d.tmp / "state", "4m")
    d.start()
    fill(state)
    reply = d.swap("a")
    assert reply["ok"], reply
    assert "state_dir" in (reply.get("warning") or ""), reply
    assert "state_dir" in (d.status()["daemon"].get("state_error") or "")
    pid = d.status()["models"]["a"]["pid"]
    assert d.stored()["models"]["a"]["pid"] == pid
    d.kill_daemon()
    d.start()
    wait_for(lambda: d.status()["job"] is None, what="adoption")
    st = d.status()["models"]["a"]
    assert (st["state"], st["pid"]) == ("active", pid)


def hold_connections(path: str, count: int, uid: int) -> tuple[subprocess.Popen, int]:
    """A process of uid that opens up to count connections and keeps them; -> (proc, opened)."""
    code = ("import os, socket, sys, time\n"
            f"os.setgroups([]); os.setgid({uid}); os.setuid({uid})\n"
            "held = []\n"
            f"for _ in range({count}):\n"
            "    s = socket.socket(socket.AF_UNIX)\n"
            "    try:\n"
            f"        s.connect({path!r}); s.sendall(b'{{\"cmd\": \"ping\"}}\\n')\n"
            "        s.settimeout(2); data = s.recv(4096)\n"
            "    except OSError:\n"
            "        break\n"
            "    if b'too many' in data or not data:\n"
            "        break\n"
            "    held.append(s)\n"
            "print(len(held), flush=True)\n"
            "time.sleep(60)\n")
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    return proc, int(proc.stdout.readline())


def test_defect11_read_only_clients_cannot_lock_root_out(make_daemon):
    sockdir = tempfile.mkdtemp(prefix="llmux-sock-")
    os.chmod(sockdir, 0o755)
    held = []
    try:
        d = make_daemon({"a": {}}, {"socket": f"{sockdir}/llmux.sock", "socket_mode": "0666",
                                    "max_clients": 16})
        proc, opened = hold_connections(d.socket, 16, NOBODY)
        held.append(proc)
        assert 0 < opened < 16
        assert d.status()["ok"] and d.swap("a")["ok"]   # root still gets in
    finally:
        for p in held:
            p.kill()
            p.wait()
        shutil.rmtree(sockdir, ignore_errors=True)


def test_defect12_fifo_drop_in_does_not_hang(make_daemon, tmp_path):
    d = make_daemon({"a": {}}, start=False)
    (tmp_path / "models.d").mkdir()
    os.mkfifo(tmp_path / "models.d" / "x.toml")
    r = subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(d.config), "--check"],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "x.toml:0: not a regular file" in r.stderr, r.stderr
    d.start(wait=False)   # the daemon refuses the catalog the same way, at once
    wait_for(lambda: d.proc.poll() is not None, what="llmuxd to refuse the catalog")
    assert "not a regular file" in d.daemon_log()


def test_defect12_fifo_drop_in_added_live_does_not_block_the_loop(make_daemon, tmp_path):
    d = make_daemon({"a": {}})
    (tmp_path / "models.d").mkdir()
    os.mkfifo(tmp_path / "models.d" / "x.toml")
    os.kill(d.proc.pid, 1)   # SIGHUP: reload now
    wait_for(lambda: "not a regular file" in (d.status()["config"]["error"] or ""), timeout=5,
             what="the reload to refuse the FIFO")
    assert d.swap("a")["ok"]


def test_defect12_catalog_size_is_bounded(make_daemon, tmp_path):
    d = make_daemon({"a": {}}, start=False)
    (tmp_path / "models.d").mkdir()
    port = 20000
    text = "".join(f'[models.m{i}]\nmodel = "x"\nport = {port + i}\n' for i in range(1001))
    (tmp_path / "models.d" / "many.toml").write_text(text)
    r = subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(d.config), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "too many models" in r.stderr, r.stderr
    (tmp_path / "models.d" / "many.toml").write_text("# " + "x" * (2 << 20) + "\n")
    r = subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(d.config), "--check"],
                       capture_output=True, text=True, timeout=60)
    assert r.returncode == 1 and "larger than" in r.stderr, r.stderr


def test_defect13_request_line_limit_is_exact():
    buf = LineBuffer(MAX_LINE)
    assert buf.feed(b"x" * MAX_LINE + b"\n") == [b"x" * MAX_LINE]
    buf = LineBuffer(MAX_LINE)
    buf.feed(b"x" * 60000)
    with pytest.raises(ProtocolError):
        buf.feed(b"x" * (MAX_LINE + 1 - 60000) + b"\n")


def test_defect13_socket_refuses_a_line_just_over_64k(make_daemon):
    d = make_daemon({"a": {}})
    pad = "x" * (MAX_LINE + 100 - 40)
    line = json.dumps({"cmd": "status", "pad": pad}).encode() + b"\n"
    assert MAX_LINE < len(line) - 1 < 128 * 1024
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(10)
    s.connect(d.socket)
    s.sendall(line)
    data = b""
    while not data.endswith(b"\n"):
        chunk = s.recv(65536)
        if not chunk:
            break
        data += chunk
    s.close()
    reply = json.loads(data.splitlines()[-1])
    assert not reply["ok"] and f"longer than {MAX_LINE}" in reply["error"], reply


def test_defect14_models_d_created_after_start_is_watched(make_daemon, tmp_path):
    d = make_daemon({"a": {}})
    time.sleep(0.5)
    (tmp_path / "models.d").mkdir()
    time.sleep(0.5)
    (tmp_path / "models.d" / "b.toml").write_text(f'[models.b]\nmodel = "x"\nport = {free_port()}\n')
    wait_for(lambda: "b" in d.status()["models"], timeout=5, what="models.d/b.toml to apply")
