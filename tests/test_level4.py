"""Level 4 against what a real vLLM holds: an io_uring instance (blocked by llmux's
seccomp rule), a loky named semaphore (link_remap files, stashed per checkpoint),
the weights axis (vLLM sleep before the dump), and honest results. llmux-sim holds
both, as vLLM 0.26 does (llmuxd/sim/host.py); the CRIU tests use the real CRIU."""

from __future__ import annotations

import glob
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmuxd import seccomp
from llmuxd.link_remap import named_link_remaps

from .daemon_fixture import wait_for
from .test_checkpoint import CRIU, complete, needs_criu, tree


def seccomp_filters(pid: int) -> int:
    return seccomp.filtered(pid)


def test_checkpointable_models_start_without_io_uring(make_daemon):
    d = make_daemon({"a": {"sleep_level": 4}, "b": {"sleep_level": 1}},
                    {"checkpoint": {"criu_path": "/nonexistent/criu"}})
    assert d.swap("b")["ok"]
    b = d.status()["models"]["b"]
    assert seccomp_filters(b["pid"]) == 0 and b["io_uring_blocked"] is False
    assert "io_uring instance on fd" in (d.tmp / "state" / "logs" / "b.log").read_text()
    d.call({"cmd": "stop", "model": "b"})
    assert d.swap("a")["ok"]
    a = d.status()["models"]["a"]
    assert a["io_uring_blocked"] is True
    assert all(seccomp_filters(p) >= 1 for p in tree(a["pid"]))  # the whole tree, EngineCore too
    assert "io_uring unavailable (ENOSYS): using epoll" in \
        (d.tmp / "state" / "logs" / "a.log").read_text()


def test_shutdown_checkpoint_puts_every_model_under_the_rule(make_daemon):
    d = make_daemon({"a": {"sleep_level": 1}}, {"shutdown": "checkpoint"})
    assert d.swap("a")["ok"]
    assert seccomp_filters(d.status()["models"]["a"]["pid"]) >= 1


@pytest.mark.parametrize("machine", ["x86_64", "aarch64", "ppc64le", "s390x", "riscv64"])
def test_seccomp_program_checks_the_arch_and_returns_enosys(machine):
    insns = seccomp.program(machine)
    assert insns[0] == (0x20, 0, 0, 4)          # first: load the arch field
    assert insns[-1][3] == seccomp.SECCOMP_RET_ERRNO | 38  # ENOSYS
    assert insns[-2][3] == seccomp.SECCOMP_RET_ALLOW       # an unknown ABI passes
    jumps = [i for i, ins in enumerate(insns) if ins[0] == 0x15 and ins[3] in range(425, 428)]
    assert jumps and all(i + 1 + insns[i][1] == len(insns) - 1 for i in jumps)


def test_unknown_architecture_gets_a_check_warning_not_a_crash(tmp_path, monkeypatch):
    with pytest.raises(ValueError, match="no io_uring syscall table for architecture mips"):
        seccomp.program("mips")
    cfg = tmp_path / "c.toml"
    cfg.write_text('[models.a]\nmodel = "m"\nport = 9000\nsleep_level = 4\n')
    code = ("import os, sys; from llmuxd import cli; real = os.uname\n"
            "class U: pass\n"
            "def fake():\n    u = real(); f = U(); f.__dict__.update(sysname=u.sysname,"
            " release=u.release, machine='mips'); return f\n"
            "os.uname = fake; sys.argv = ['llmuxd', '--config', sys.argv[1], '--check']; cli.main()")
    r = subprocess.run([sys.executable, "-c", code, str(cfg)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert "models.a: no io_uring syscall table for mips" in r.stderr


def test_link_remap_names_are_read_from_the_images(tmp_path):
    path = b"/dev/shm/link_remap.37"
    (tmp_path / "files.img").write_bytes(b"\x08\x01\x12" + bytes([len(path)]) + path + b"3\x18\x02"
                                         + b"\x12\x05/dev/shm/link_remap.x")
    assert named_link_remaps(str(tmp_path)) == {"link_remap.37"}


def sim_log(d, name: str) -> str:
    return (d.tmp / "state" / "logs" / f"{name}.log").read_text()


@needs_criu
def test_two_level4_models_checkpointed_at_once_in_any_order(make_daemon):
    foreign = Path("/dev/shm/link_remap.987654")  # someone else's: never touched
    foreign.write_text("not llmux's")
    ino = foreign.stat().st_ino
    try:
        d = make_daemon({"a": {"sleep_level": 4}, "b": {"sleep_level": 4}, "c": {"sleep_level": 1}},
                        {"checkpoint": {"criu_path": CRIU}})
        served = {"a": 0, "b": 0}
        for target in ["a", "b", "c", "a", "b", "a", "c", "b", "c"]:
            reply = d.swap(target)
            assert reply["ok"] and not reply.get("warnings"), reply
            if target in served:
                served[target] += 1
                # the same process state: its completions counter went on
                assert complete(d, target)["llmux_sim"]["completions"] == served[target]
            ours = [p for p in glob.glob("/dev/shm/link_remap.*") if p != str(foreign)]
            assert ours == [], f"after swap {target}: {ours}"
        states = {n: m["state"] for n, m in d.status()["models"].items()}
        assert states == {"a": "checkpointed", "b": "active", "c": "sleeping"} or \
            states["c"] == "active"
        assert d.call({"cmd": "stop", "model": "a"})["ok"]
        assert not glob.glob("/dev/shm/llmux-remap-a-*")  # its stash went with its images
        assert foreign.stat().st_ino == ino and foreign.read_text() == "not llmux's"
    finally:
        foreign.unlink()


@needs_criu
def test_weights_axis_sleeps_before_the_dump_and_wakes_after_the_restore(make_daemon):
    d = make_daemon({"a": {"sleep_level": 4}, "z": {"sleep_level": 4, "checkpoint_sleep": 0},
                     "b": {}}, {"checkpoint": {"criu_path": CRIU}})
    assert d.swap("a")["ok"] and d.swap("b")["ok"]
    st = d.status()["models"]["a"]
    assert st["state"] == "checkpointed" and st["checkpoint_sleep"] == 1
    assert d.swap("a")["ok"]
    log = sim_log(d, "a")
    assert "--enable-sleep-mode" in log.splitlines()[0]  # launch adds it for the weights axis
    sleep_at, weights_at = log.index("sleep(level=1)"), log.index("wake_up(tags=['weights'])")
    kv_at = log.index("wake_up(tags=['kv_cache'])")
    assert sleep_at < weights_at < kv_at
    assert complete(d, "a")["llmux_sim"]["completions"] == 1
    assert d.swap("z")["ok"] and d.swap("b")["ok"] and d.swap("z")["ok"]
    assert "sleep(level=" not in sim_log(d, "z") and \
        "--enable-sleep-mode" not in sim_log(d, "z").splitlines()[0]


def test_failed_dump_warns_and_sleep_that_missed_its_level_exits_1(make_daemon, tmp_path):
    wrapper = tmp_path / "criu-failing-dump"
    wrapper.write_text('#!/bin/sh\nif [ "$1" = dump ]; then echo "Error (fake): injected" >&2; '
                       'exit 1; fi\nexit 0\n')
    wrapper.chmod(0o755)
    d = make_daemon({"a": {"sleep_level": 4}, "b": {}}, {"checkpoint": {"criu_path": str(wrapper)}})
    assert d.swap("a")["ok"]
    r = d.ctl("swap", "b")
    assert r.returncode == 0, r.stderr
    assert "llmuxctl: warning: a could not reach sleep level 4" in r.stderr
    assert "criu dump failed" in r.stderr and "stopped instead" in r.stderr
    assert d.swap("a")["ok"]
    r = d.ctl("sleep", "a", "--level", "4")
    assert r.returncode == 1
    assert "a did not reach sleep level 4: it is stopped" in r.stderr


def test_level3_without_cuda_is_refused_and_nothing_changes(make_daemon):
    d = make_daemon({"a": {"sleep_level": 3}, "b": {}})
    assert d.swap("a")["ok"]
    pid = d.status()["models"]["a"]["pid"]
    reply = d.swap("b")
    assert not reply["ok"] and "level 3 is impossible: no process of its tree holds CUDA" \
        in reply["error"]
    st = d.status()["models"]
    assert st["a"]["state"] == "active" and st["a"]["pid"] == pid and st["b"]["state"] == "stopped"
    r = d.ctl("sleep", "a", "--level", "3")
    assert r.returncode == 1 and "nothing changed" in r.stderr
    assert complete(d, "a")["llmux_sim"]["completions"] == 1


def test_level4_without_working_criu_is_refused_and_nothing_changes(make_daemon):
    d = make_daemon({"a": {"sleep_level": 4}, "b": {}},
                    {"checkpoint": {"criu_path": "/nonexistent/criu"}})
    assert d.swap("a")["ok"]
    pid = d.status()["models"]["a"]["pid"]
    reply = d.swap("b")
    assert not reply["ok"] and "level 4 is unavailable: criu check failed" in reply["error"]
    st = d.status()["models"]["a"]
    assert st["state"] == "active" and st["pid"] == pid


def test_restore_failure_never_kills_a_process_the_restore_did_not_make(tmp_path):
    from llmuxd.checkpoint_io import kill_own_restore
    stranger = subprocess.Popen(["sleep", "30"], start_new_session=True)
    try:
        (tmp_path / "restore.pid").write_text(str(stranger.pid))  # even if CRIU's pidfile says so

        class D:  # our child, but started before the restore began
            pass
        assert kill_own_restore(D(), "a", str(tmp_path), stranger.pid, since=10**10) == []
        assert stranger.poll() is None
    finally:
        stranger.kill()
        stranger.wait()


def test_last_error_has_its_time_and_clears_once_healthy_again(make_daemon, tmp_path):
    wrapper = tmp_path / "criu-failing-dump"
    wrapper.write_text('#!/bin/sh\nif [ "$1" = dump ]; then exit 1; fi\nexit 0\n')
    wrapper.chmod(0o755)
    d = make_daemon({"a": {"sleep_level": 4}, "b": {}}, {"checkpoint": {"criu_path": str(wrapper)},
                                                         "health_failures": 2})
    assert d.swap("a")["ok"] and d.swap("b")["ok"]
    a = d.status()["models"]["a"]
    assert "criu dump failed" in a["last_error"] and abs(a["last_error_at"] - time.time()) < 30
    assert d.swap("a")["ok"]  # a cold start; the error stays until it has been healthy a while
    assert d.status()["models"]["a"]["last_error"]
    wait_for(lambda: d.status()["models"]["a"]["last_error"] is None, timeout=15,
             what="last_error cleared by health checks")


@needs_criu
def test_images_dir_someone_else_can_write_is_never_used(make_daemon, tmp_path):
    images = tmp_path / "foreign-images"
    images.mkdir()
    os.chown(images, 65534, 65534)  # nobody's: a restore would run what nobody wrote
    d = make_daemon({"a": {"sleep_level": 4}, "b": {}},
                    {"checkpoint": {"criu_path": CRIU, "images_dir": str(images)}})
    assert d.swap("a")["ok"]
    reply = d.swap("b")
    assert reply["ok"] and "images_dir" in " ".join(reply.get("warnings", []))
    assert d.status()["models"]["a"]["state"] == "stopped" and list(images.iterdir()) == []
