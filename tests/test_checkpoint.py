"""Levels 3 and 4 end to end: the real daemon, llmux-sim trees, the cuda-checkpoint
stand-in, and genuine CRIU dump/restore (installed by packaging/install-criu.sh)."""

from __future__ import annotations

import glob
import json
import os
import signal
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest

from .daemon_fixture import group_pids, wait_for

FAKE_CUDA = str(Path(__file__).parent / "fakes" / "fake_cuda_checkpoint.py")
CRIU = os.environ.get("LLMUX_CRIU") or "/opt/llmux-criu/bin/criu"
HAVE_CRIU = os.access(CRIU, os.X_OK) and os.geteuid() == 0
# CI sets LLMUX_REQUIRE_CRIU=1: there a missing CRIU is a failure, not a skip.
needs_criu = pytest.mark.skipif(not HAVE_CRIU and not os.environ.get("LLMUX_REQUIRE_CRIU"),
                                reason="needs root and CRIU (packaging/install-criu.sh)")


def complete(d, name: str) -> dict:
    body = json.dumps({"model": name, "prompt": "count me", "max_tokens": 2}).encode()
    req = urllib.request.Request(f"http://127.0.0.1:{d.ports[name]}/v1/completions", data=body,
                                 headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=10) as r:
        return json.loads(r.read())


def cuda_states(cuda_dir: Path, pids) -> dict[int, str]:
    return {p: (cuda_dir / str(p)).read_text().strip() for p in pids if (cuda_dir / str(p)).exists()}


def tree(pid: int) -> list[int]:
    import psutil
    return [pid] + sorted(c.pid for c in psutil.Process(pid).children(recursive=True))


@pytest.fixture
def cuda_dir(tmp_path):
    path = tmp_path / "cuda"
    path.mkdir()
    return path


def test_level3_suspends_every_cuda_process_lock_then_checkpoint(make_daemon, cuda_dir):
    d = make_daemon({"a": {"sleep_level": 3}, "b": {}},
                    {"checkpoint": {"cuda_checkpoint": FAKE_CUDA}},
                    env={"LLMUX_SIM_FAKE_CUDA_DIR": str(cuda_dir)})
    assert d.swap("a")["ok"]
    pids = tree(d.status()["models"]["a"]["pid"])
    complete(d, "a")
    assert d.swap("b")["ok"]
    st = d.status()["models"]["a"]
    assert st["state"] == "suspended" and st["pid"] == pids[0]
    assert sorted(st["cuda_pids"]) == pids  # the API server holds a context too
    assert set(cuda_states(cuda_dir, pids).values()) == {"checkpointed"}
    with pytest.raises(urllib.error.HTTPError):
        complete(d, "a")  # GPU memory is gone while suspended
    calls = [line.split() for line in (cuda_dir / "calls.log").read_text().splitlines()]
    actions = [c[1] for c in calls if c[1] != "get-state"]
    assert actions == ["lock"] * len(pids) + ["checkpoint"] * len(pids)
    assert d.swap("a")["ok"]
    assert set(cuda_states(cuda_dir, pids).values()) == {"running"}
    assert complete(d, "a")["llmux_sim"]["completions"] == 2  # same process, same state
    actions = [line.split()[1] for line in (cuda_dir / "calls.log").read_text().splitlines()]
    assert actions[-2 * len(pids):] == ["restore"] * len(pids) + ["unlock"] * len(pids)


def test_level3_failed_suspend_is_undone_and_escalates_to_stop(make_daemon, cuda_dir):
    d = make_daemon({"a": {"sleep_level": 3}, "b": {}},
                    {"checkpoint": {"cuda_checkpoint": FAKE_CUDA}},
                    env={"LLMUX_SIM_FAKE_CUDA_DIR": str(cuda_dir),
                         "LLMUX_FAKE_CUDA_FAIL": "checkpoint"})
    assert d.swap("a")["ok"]
    pgid = d.status()["models"]["a"]["pid"]
    assert d.swap("b")["ok"]
    st = d.status()["models"]["a"]
    assert st["state"] == "stopped" and "cuda checkpoint failed" in st["last_error"]
    assert group_pids(pgid) == []


@needs_criu
def test_level4_five_step_cycle_preserves_state_and_pids(make_daemon, cuda_dir):
    d = make_daemon({"a": {"sleep_level": 4}, "b": {}},
                    {"checkpoint": {"criu_path": CRIU, "cuda_checkpoint": FAKE_CUDA}},
                    env={"LLMUX_SIM_FAKE_CUDA_DIR": str(cuda_dir)})
    assert d.swap("a")["ok"]
    pids = tree(d.status()["models"]["a"]["pid"])
    start_time = d.status()["models"]["a"].get("since")
    complete(d, "a")
    images = Path(d.tmp / "state" / "checkpoints" / "a")
    for cycle in range(2):
        reply = d.swap("b")                       # A -> B dumps A (the restored A, 2nd time)
        assert reply["ok"], reply
        st = d.status()["models"]["a"]
        assert st["state"] == "checkpointed" and st["criu_mode"] == "suspend"
        assert st["pid"] is None and all(not os.path.exists(f"/proc/{p}") for p in pids)
        manifest = json.loads((images / "manifest.json").read_text())
        assert manifest["pids"] == pids and manifest["level"] == 4 and manifest["bytes"] > 0
        assert sorted(manifest["cuda_pids"]) == pids  # suspend mode: CUDA suspended first
        assert not glob.glob(str(images) + ".partial-*")
        reply = d.swap("a")                       # B -> A restores A
        assert reply["ok"], reply
        st = d.status()["models"]["a"]
        assert st["state"] == "active" and tree(st["pid"]) == pids  # same PIDs
        # The restored tree is ours: reparented to the daemon (its subreaper).
        ppid = int(Path(f"/proc/{pids[0]}/stat").read_text().rsplit(")", 1)[1].split()[1])
        assert ppid == d.proc.pid
        assert set(cuda_states(cuda_dir, pids).values()) == {"running"}
        assert complete(d, "a")["llmux_sim"]["completions"] == cycle + 2  # memory survived
        assert not images.exists()  # deleted after a good restore (keep_images = false)
    assert start_time is not None


@needs_criu
def test_level4_restored_model_can_be_stopped_or_crash_like_any_child(make_daemon):
    d = make_daemon({"a": {"sleep_level": 4}, "b": {}}, {"checkpoint": {"criu_path": CRIU}})
    assert d.swap("a")["ok"] and d.swap("b")["ok"] and d.swap("a")["ok"]
    pid = d.status()["models"]["a"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: d.status()["models"]["a"]["state"] == "active"
             and d.status()["models"]["a"]["pid"] not in (None, pid), timeout=15,
             what="restart of the crashed restored model")
    assert "killed by SIGKILL" in d.status()["models"]["a"]["last_error"]
    assert d.swap("b")["ok"] and d.state("a") == "checkpointed"
    assert d.call({"cmd": "stop", "model": "a"})["ok"]
    assert d.state("a") == "stopped" and not (d.tmp / "state" / "checkpoints" / "a").exists()


@needs_criu
def test_level4_dump_failure_stops_the_model_and_the_swap_goes_on(make_daemon, tmp_path):
    wrapper = tmp_path / "criu-failing-dump"
    wrapper.write_text(f'#!/bin/sh\nif [ "$1" = dump ]; then echo "Error (fake): injected" >&2; '
                       f'exit 1; fi\nexec {CRIU} "$@"\n')
    wrapper.chmod(0o755)
    d = make_daemon({"a": {"sleep_level": 4}, "b": {}}, {"checkpoint": {"criu_path": str(wrapper)}})
    assert d.swap("a")["ok"]
    pgid = d.status()["models"]["a"]["pid"]
    assert d.swap("b")["ok"]
    st = d.status()["models"]["a"]
    assert st["state"] == "stopped" and "criu dump failed (exit 1)" in st["last_error"]
    assert group_pids(pgid) == []
    wait_for(lambda: not glob.glob(str(d.tmp / "state" / "checkpoints" / "a*")),
             what="no partial checkpoint left")  # deleted in the background


@needs_criu
def test_level4_corrupt_images_cold_start_and_are_kept_aside(make_daemon):
    d = make_daemon({"a": {"sleep_level": 4}, "b": {}}, {"checkpoint": {"criu_path": CRIU}})
    assert d.swap("a")["ok"]
    complete(d, "a")
    assert d.swap("b")["ok"]
    images = d.tmp / "state" / "checkpoints" / "a"
    for core in images.glob("core-*.img"):
        core.write_bytes(b"\0" * 16)
    reply = d.swap("a")
    assert reply["ok"], reply
    st = d.status()["models"]["a"]
    assert st["state"] == "active" and "criu restore failed" in st["last_error"]
    assert "cold start instead" in st["last_error"]
    assert complete(d, "a")["llmux_sim"]["completions"] == 1  # a fresh process
    assert glob.glob(str(images) + ".failed-*") and not images.exists()


@needs_criu
def test_level4_too_little_disk_stops_instead_and_says_why(make_daemon, tmp_path):
    small = tmp_path / "small"
    small.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m", "tmpfs", str(small)]).returncode:
        pytest.skip("cannot mount a tmpfs here")
    try:
        d = make_daemon({"a": {"sleep_level": 4}, "b": {}},
                        {"checkpoint": {"criu_path": CRIU, "images_dir": str(small)}})
        assert d.swap("a")["ok"] and d.swap("b")["ok"]
        st = d.status()["models"]["a"]
        assert st["state"] == "stopped" and "not enough disk" in st["last_error"]
        assert os.listdir(small) == []
    finally:
        subprocess.run(["umount", "-l", str(small)])


@needs_criu
def test_level4_keep_images_keeps_them_after_restore(make_daemon):
    d = make_daemon({"a": {"sleep_level": 4, "keep_images": True}, "b": {}},
                    {"checkpoint": {"criu_path": CRIU}})
    assert d.swap("a")["ok"] and d.swap("b")["ok"] and d.swap("a")["ok"]
    assert (d.tmp / "state" / "checkpoints" / "a" / "manifest.json").exists()
    assert d.swap("b")["ok"] and d.state("a") == "checkpointed"  # a fresh dump replaces them


def test_doctor_reports_tools_and_modes(make_daemon, cuda_dir, tmp_path):
    missing = str(tmp_path / "no-criu")
    d = make_daemon({"a": {}}, {"checkpoint": {"cuda_checkpoint": FAKE_CUDA, "criu_path": missing}},
                    env={"LLMUX_SIM_FAKE_CUDA_DIR": str(cuda_dir)})
    facts = d.call({"cmd": "doctor"})["doctor"]
    assert facts["cuda_checkpoint"]["api"] is True  # the stand-in answers like the driver
    assert facts["levels"]["3"] == "available"
    assert facts["levels"]["4"].startswith("unavailable (criu: cannot run")
    assert facts["kernel"] == os.uname().release and "images_free_bytes" in facts
    r = d.ctl("doctor")
    assert r.returncode == 0 and "level 4" in r.stdout and "unavailable" in r.stdout


@needs_criu
def test_doctor_with_criu_chooses_suspend_mode_without_plugin(make_daemon):
    d = make_daemon({"a": {}}, {"checkpoint": {"criu_path": CRIU}})
    facts = d.call({"cmd": "doctor"})["doctor"]
    assert facts["criu"]["check"] == "ok" and facts["criu"]["version"].startswith("Version: 4.")
    assert facts["levels"]["4"].startswith("suspend mode") and facts["plugin"] is False
