"""The control socket: permissions, authorization by peer credentials, limits, load."""

from __future__ import annotations

import json
import os
import socket
import stat
import subprocess
import sys
import threading
import time

import psutil
import pytest

from .daemon_fixture import wait_for

NOBODY = 65534


@pytest.fixture
def sockdir():
    """A socket directory other users can traverse (pytest's tmp_path is 0700)."""
    import shutil
    import tempfile
    path = tempfile.mkdtemp(prefix="llmux-sock-")
    os.chmod(path, 0o755)
    yield path
    shutil.rmtree(path, ignore_errors=True)


def as_user(uid: int, gid: int, groups: list[int], path: str, request: dict) -> dict | str:
    """Send one request as another user (fork, drop privileges, connect): the reply,
    or the connect error's name."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:  # child: no pytest machinery past this point
        try:
            os.close(r)
            os.setgroups(groups)
            os.setgid(gid)
            os.setuid(uid)
            s = socket.socket(socket.AF_UNIX)
            s.settimeout(10)
            try:
                s.connect(path)
            except OSError as exc:
                os.write(w, json.dumps({"connect_error": exc.errno}).encode())
                os._exit(0)
            s.sendall(json.dumps(request).encode() + b"\n")
            data = b""
            while not data.endswith(b"\n") or b'"ok"' not in data.splitlines()[-1]:
                chunk = s.recv(65536)
                if not chunk:
                    break
                data += chunk
            os.write(w, data.splitlines()[-1] if data else b"{}")
        finally:
            os._exit(0)
    os.close(w)
    out = b""
    while chunk := os.read(r, 65536):
        out += chunk
    os.close(r)
    os.waitpid(pid, 0)
    reply = json.loads(out or b"{}")
    if "connect_error" in reply:
        import errno
        return errno.errorcode[reply["connect_error"]]
    return reply


def test_socket_mode_is_there_from_the_first_instant(make_daemon):
    d = make_daemon({"a": {}}, {"socket_mode": "0660"}, start=False)
    d.start(wait=False)
    seen = wait_for(lambda: os.path.exists(d.socket) and os.stat(d.socket), timeout=10,
                    interval=0.0005, what="the socket")
    assert stat.S_IMODE(seen.st_mode) == 0o660
    wait_for(d.ping, what="llmuxd")
    assert stat.S_IMODE(os.stat(os.path.dirname(d.socket)).st_mode) & 0o002 == 0


def test_world_writable_socket_directory_is_refused(make_daemon, tmp_path):
    open_dir = tmp_path / "open"
    open_dir.mkdir()
    os.chmod(open_dir, 0o777)
    d = make_daemon({"a": {}}, {"socket": str(open_dir / "s.sock")}, start=False)
    r = subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(d.config)],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 1 and "world-writable" in r.stderr and "Traceback" not in r.stderr


def test_readers_may_read_only_steerers_may_steer(make_daemon, sockdir):
    d = make_daemon({"a": {}}, {"socket_mode": "0666", "socket": f"{sockdir}/s.sock"})
    assert as_user(NOBODY, NOBODY, [], d.socket, {"cmd": "status"})["ok"] is True
    reply = as_user(NOBODY, NOBODY, [], d.socket, {"cmd": "swap", "model": "a"})
    assert reply["ok"] is False and reply["error"].startswith("permission denied")
    for cmd in ("sleep", "stop", "reload", "restart", "shutdown"):
        assert "permission denied" in as_user(NOBODY, NOBODY, [], d.socket,
                                              {"cmd": cmd, "model": "a"})["error"]
    assert d.state("a") == "stopped" and d.ping()
    assert f"permission denied: swap from uid {NOBODY}" in d.daemon_log()
    assert d.swap("a")["ok"]  # root may
    assert "swap to a asked by uid 0" in d.daemon_log()


def test_access_table_and_socket_group_grant_steering(make_daemon, sockdir):
    d = make_daemon({"a": {}}, {"socket_mode": "0660", "socket_group": "12345",
                                "socket": f"{sockdir}/s.sock", "access": {"users": [NOBODY - 1]}})
    st = os.stat(d.socket)
    assert st.st_gid == 12345 and stat.S_IMODE(st.st_mode) == 0o660
    # Not in the group: cannot even connect.
    assert as_user(NOBODY, NOBODY, [], d.socket, {"cmd": "status"}) == "EACCES"
    # A supplementary member of socket_group may steer.
    assert as_user(NOBODY, NOBODY, [12345], d.socket, {"cmd": "swap", "model": "a"})["ok"]
    # A user listed in [daemon.access] may steer (here given the group to connect).
    reply = as_user(NOBODY - 1, NOBODY - 1, [12345], d.socket, {"cmd": "stop", "model": "a"})
    assert reply["ok"], reply


def test_stale_socket_is_replaced_and_a_live_daemon_is_not(make_daemon):
    d = make_daemon({"a": {}}, start=False)
    os.makedirs(os.path.dirname(d.socket), exist_ok=True)
    stale = socket.socket(socket.AF_UNIX)
    stale.bind(d.socket)
    stale.close()  # the file stays, nobody listens: a crashed daemon's leftover
    d.start()
    r = subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(d.config)],
                       capture_output=True, text=True, timeout=20)
    assert r.returncode == 4 and "already answering" in r.stderr
    assert d.ping()


def test_too_many_clients_get_an_error_and_others_go_on(make_daemon):
    d = make_daemon({"a": {}}, {"max_clients": 5})
    held = []
    for _ in range(5):
        s = socket.socket(socket.AF_UNIX)
        s.connect(d.socket)
        held.append(s)
    extra = socket.socket(socket.AF_UNIX)
    extra.connect(d.socket)
    extra.settimeout(5)
    assert b"too many clients" in extra.recv(4096)
    assert extra.recv(4096) == b""  # closed
    held.pop().close()
    wait_for(d.ping, what="a free slot")
    for s in held:
        s.close()


def test_idle_and_slow_clients_time_out(make_daemon):
    d = make_daemon({"a": {}}, {"client_timeout": 1})
    idle = socket.socket(socket.AF_UNIX)
    idle.connect(d.socket)
    slow = socket.socket(socket.AF_UNIX)
    slow.connect(d.socket)
    slow.sendall(b'{"cmd": "sta')   # and never the rest
    for s in (idle, slow):
        s.settimeout(10)
        assert s.recv(4096) == b""  # the daemon closed it
    assert d.ping()


def test_client_that_never_reads_cannot_grow_the_daemon(make_daemon):
    d = make_daemon({"a": {}})
    greedy = socket.socket(socket.AF_UNIX)
    greedy.connect(d.socket)
    greedy.setblocking(False)
    request = b'{"cmd":"status"}\n' * 1000
    sent = 0
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        try:
            sent += greedy.send(request)
        except BlockingIOError:
            time.sleep(0.01)
        except OSError:
            break  # dropped: good
        if sent > 20 * 1024 * 1024:
            break
    assert d.ping()
    rss = psutil.Process(d.proc.pid).memory_info().rss
    assert rss < 150 * 1024 * 1024, rss
    assert "does not read its replies" in d.daemon_log()
    greedy.close()


def test_500_clients_polling_status_during_a_swap_are_all_answered(make_daemon):
    d = make_daemon({"a": {"args": ["--start-delay", "1"]}, "b": {}})
    answered = [0] * 500
    errors = []
    stop = threading.Event()

    def poll(i: int) -> None:
        try:
            s = socket.socket(socket.AF_UNIX)
            s.connect(d.socket)
            f = s.makefile("rwb")
            while not stop.is_set():
                f.write(b'{"cmd":"status"}\n')
                f.flush()
                if json.loads(f.readline())["ok"]:
                    answered[i] += 1
            s.close()
        except Exception as exc:
            errors.append(repr(exc))

    threads = [threading.Thread(target=poll, args=(i,), daemon=True) for i in range(500)]
    for t in threads:
        t.start()
    t0 = time.monotonic()
    reply = d.swap("a")
    elapsed = time.monotonic() - t0
    stop.set()
    for t in threads:
        t.join(10)
    assert reply["ok"] and not errors
    assert all(n > 0 for n in answered)
    assert elapsed < 10  # the swap went on (start delay 1 s)
    assert psutil.Process(d.proc.pid).memory_info().rss < 150 * 1024 * 1024
