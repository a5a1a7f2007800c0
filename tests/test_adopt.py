"""Kill the daemon and nothing is lost: the state file, adoption, crash at every step."""

from __future__ import annotations

import json
import os
import signal
from pathlib import Path

import pytest

from .daemon_fixture import wait_for
from .test_checkpoint import CRIU, needs_criu


def test_state_file_is_written_atomically_on_every_transition(make_daemon):
    d = make_daemon({"a": {"sleep_level": 1}, "b": {"sleep_level": 2}})
    assert d.swap("a")["ok"] and d.swap("b")["ok"]
    stored = d.stored()
    st = d.status()["models"]
    assert stored["version"] == 1 and stored["active"] == "b"
    a = stored["models"]["a"]
    assert (a["state"], a["pid"], a["pgid"], a["port"], a["sleep_level"], a["asleep_level"]) == \
        ("sleeping", st["a"]["pid"], st["a"]["pid"], d.ports["a"], 1, 1)
    assert a["start_time"] > 0 and a["argv_hash"]
    assert not [p for p in (d.tmp / "state").iterdir() if p.name.startswith(".state.")]


def test_restarted_daemon_adopts_running_and_sleeping_models(make_daemon):
    d = make_daemon({"a": {"sleep_level": 1}, "b": {"sleep_level": 2}})
    assert d.swap("b")["ok"] and d.swap("a")["ok"]
    before = {n: m["pid"] for n, m in d.status()["models"].items()}
    d.kill_daemon()
    d.start()
    wait_for(lambda: d.status()["job"] is None and d.status()["active"] == "a", what="adoption")
    st = d.status()["models"]
    assert (st["a"]["state"], st["a"]["pid"]) == ("active", before["a"])
    assert (st["b"]["state"], st["b"]["pid"]) == ("sleeping", before["b"])
    assert not d.status()["models"]["a"].get("restart_pending")
    assert d.swap("b")["ok"]   # an adopted sleeping model wakes
    assert d.status()["models"]["b"]["pid"] == before["b"]
    # An adopted process is not our child: its death is seen through its pidfd.
    assert d.swap("a")["ok"]
    os.kill(before["a"], signal.SIGKILL)
    wait_for(lambda: d.status()["models"]["a"]["pid"] not in (None, before["a"])
             and d.state("a") == "active", timeout=15, what="restart of the adopted model")
    assert "status unknown" in d.status()["models"]["a"]["last_error"]


def test_model_that_died_while_daemon_was_down_is_noticed_and_cleaned(make_daemon):
    d = make_daemon({"a": {}})
    assert d.swap("a")["ok"]
    pid = d.status()["models"]["a"]["pid"]
    engine = d.sim("a")["engine_pid"]
    d.kill_daemon()
    os.kill(pid, signal.SIGKILL)  # the API server dies; its EngineCore would live on
    d.start()
    wait_for(lambda: d.status()["job"] is None and d.state("a") == "stopped", what="noticed")
    assert "while llmuxd was down" in d.status()["models"]["a"]["last_error"]
    wait_for(lambda: not os.path.exists(f"/proc/{engine}") or
             Path(f"/proc/{engine}/stat").read_text().split(") ")[1][0] == "Z",
             what="the leftover EngineCore killed")


def test_reused_pid_is_never_signalled(make_daemon):
    d = make_daemon({"a": {}})
    assert d.swap("a")["ok"]
    d.kill_daemon()
    stranger = os.getpid()  # pretend the recorded PID now belongs to someone else
    stored = d.stored()
    pid = stored["models"]["a"]["pid"]
    stored["models"]["a"].update(pid=stranger, pgid=os.getpgid(0))
    (d.tmp / "state" / "state.json").write_text(json.dumps(stored))
    d.start()
    wait_for(lambda: d.status()["job"] is None, what="adoption")
    assert "belongs to another process" in d.status()["models"]["a"]["last_error"]
    os.kill(pid, signal.SIGKILL)  # we are alive: nothing signalled us or our group


def test_shutdown_keep_leaves_models_for_the_next_daemon(make_daemon):
    d = make_daemon({"a": {}, "b": {}}, {"shutdown": "keep"})
    assert d.swap("b")["ok"] and d.swap("a")["ok"]
    pids = {n: m["pid"] for n, m in d.status()["models"].items()}
    assert d.stop(signal.SIGTERM) == 0
    assert all(os.path.exists(f"/proc/{p}") for p in pids.values())
    d.start()
    wait_for(lambda: d.status()["job"] is None and d.status()["active"] == "a", what="adopted")
    assert {n: m["pid"] for n, m in d.status()["models"].items()} == pids


def test_shutdown_stop_leaves_nothing(make_daemon):
    d = make_daemon({"a": {}, "b": {"sleep_level": 2}})
    assert d.swap("b")["ok"] and d.swap("a")["ok"]
    assert d.stop(signal.SIGTERM) == 0
    assert d.processes() == []


@needs_criu
def test_shutdown_checkpoint_restores_in_the_next_daemon(make_daemon):
    d = make_daemon({"a": {"sleep_level": 1}, "b": {}},
                    {"shutdown": "checkpoint", "checkpoint": {"criu_path": CRIU}})
    assert d.swap("a")["ok"]
    d.sim("a", "/v1/models")
    assert d.stop(signal.SIGTERM) == 0
    assert d.processes() == []
    assert d.stored()["models"]["a"]["state"] == "checkpointed"
    d.start()
    # The model that was active comes back by itself, restored rather than cold-started.
    wait_for(lambda: d.status()["job"] is None and d.state("a") == "active", timeout=20,
             what="the restore at start")
    assert "restored pid" in d.daemon_log() or "tracking restored pid" in d.daemon_log()
    assert d.stored()["resume"] is None or d.stored()["resume"] == "a"


@needs_criu
def test_shutdown_checkpoint_puts_the_whole_resident_set_to_disk_and_back(make_daemon):
    sized = {"sleep_level": 1, "gpu_memory": "30GiB"}
    d = make_daemon({"a": dict(sized), "b": dict(sized), "c": dict(sized)},
                    {"shutdown": "checkpoint", "gpu_memory": "80GiB",
                     "checkpoint": {"criu_path": CRIU}})
    assert d.swap("b")["ok"] and d.swap("a")["ok"] and d.swap("b")["ok"]  # b: the last used
    assert sorted(d.status()["resident"]) == ["a", "b"]
    assert d.stop(signal.SIGTERM) == 0
    assert d.processes() == []
    stored = d.stored()
    assert {n: stored["models"][n]["state"] for n in "ab"} == \
        {"a": "checkpointed", "b": "checkpointed"}
    assert stored["resume"] == "b" and stored["resume_also"] == ["a"]
    d.start()
    wait_for(lambda: d.status()["job"] is None and d.status()["resident"] == ["a", "b"],
             timeout=30, what="both restored at start")
    assert d.status()["active"] == "b"  # the last used is the one v1 clients see
    assert d.daemon_log().count("tracking restored pid") >= 2


def test_shutdown_checkpoint_that_became_a_stop_exits_1(make_daemon, tmp_path):
    wrapper = tmp_path / "criu-failing-dump"
    wrapper.write_text('#!/bin/sh\nif [ "$1" = dump ]; then echo "Error (fake): injected" >&2; '
                       'exit 1; fi\nexit 0\n')
    wrapper.chmod(0o755)
    d = make_daemon({"a": {"sleep_level": 1}},
                    {"shutdown": "checkpoint", "checkpoint": {"criu_path": str(wrapper)}})
    assert d.swap("a")["ok"]
    assert d.stop(signal.SIGTERM) == 1  # stopped, not checkpointed: not the shutdown asked for
    assert d.processes() == []
    assert "could not reach sleep level 4" in d.daemon_log()
    assert d.stored()["models"]["a"]["state"] == "stopped"


STEPS = [  # (failpoint, swap that reaches it)
    ("drain", ["a", "b"]), ("sleep", ["a", "b"]), ("start:b", ["a", "b"]), ("health:b", ["a", "b"]),
    ("transition:going_to_sleep", ["a", "b"]), ("transition:waking", ["a", "b", "a"]),
    ("wake", ["a", "b", "a"]), ("stop", ["c", "a"]),
]
CRIU_STEPS = [("checkpoint", ["d", "a"]), ("tool:dump", ["d", "a"]), ("transition:checkpointed", ["d", "a"]),
              ("restore", ["d", "a", "d"]), ("tool:restore", ["d", "a", "d"]),
              ("transition:restoring", ["d", "a", "d"])]


def crash_and_converge(make_daemon, failpoint, swaps, criu=False):
    models = {"a": {"sleep_level": 1}, "b": {"sleep_level": 2}, "c": {"sleep_level": 5}}
    settings = {}
    if criu:
        models["d"] = {"sleep_level": 4}
        settings["checkpoint"] = {"criu_path": CRIU}
    d = make_daemon(models, settings)
    for name in swaps[:-1]:
        assert d.swap(name)["ok"]
    d.kill_daemon()
    d.start(env={"LLMUX_FAILPOINT": failpoint})
    try:
        d.swap(swaps[-1])
    except Exception:
        pass  # the daemon dies under our feet
    wait_for(lambda: d.proc.poll() is not None, what=f"the failpoint {failpoint}: {d.daemon_log()[-3000:]}")
    assert d.proc.returncode == -signal.SIGKILL, d.daemon_log()[-2000:]
    images_before = sorted(str(p) for p in (d.tmp / "state" / "checkpoints").glob("*/manifest.json")) \
        if criu else []
    d.start()
    wait_for(lambda: d.status()["job"] is None, timeout=20, what="convergence")
    st = d.status()
    # Consistent: at most one active; every live model process belongs to a model
    # whose state has a process, under the recorded PID; nothing orphaned.
    assert [n for n, m in st["models"].items() if m["state"] == "active"] in ([], [st["active"]])
    known = {m["pid"] for m in st["models"].values() if m["pid"]}
    wait_for(lambda: all(p in known or os.getpgid(p) in known for p in d.processes()),
             timeout=10, what="no orphaned model process")
    for name, m in st["models"].items():
        assert m["state"] in ("active", "sleeping", "stopped", "checkpointed", "failed"), (name, m)
        if m["state"] == "checkpointed":
            assert Path(m["images"], "manifest.json").exists()
    for manifest in images_before:  # no good checkpoint deleted
        assert Path(manifest).exists(), manifest
    # And it works: every model can be made active again.
    for name in models:
        reply = d.swap(name)
        assert reply["ok"], reply


@pytest.mark.parametrize("failpoint,swaps", STEPS, ids=[s[0] for s in STEPS])
def test_kill_at_every_step_of_a_swap_converges(make_daemon, failpoint, swaps):
    crash_and_converge(make_daemon, failpoint, swaps)


@needs_criu
@pytest.mark.parametrize("failpoint,swaps", CRIU_STEPS, ids=[s[0] for s in CRIU_STEPS])
def test_kill_at_every_step_of_a_checkpoint_converges(make_daemon, failpoint, swaps):
    crash_and_converge(make_daemon, failpoint, swaps, criu=True)


def test_catalog_changed_while_daemon_was_down_shows_restart_pending(make_daemon):
    d = make_daemon({"a": {}})
    assert d.swap("a")["ok"]
    pid = d.status()["models"]["a"]["pid"]
    d.kill_daemon()
    d.config.write_text(d.config.read_text().replace('model = "org/a"',
                                                     'model = "org/a"\nargs = ["--max-model-len", "9"]'))
    d.start()
    st = d.status()["models"]["a"]
    assert st["state"] == "active" and st["pid"] == pid and st["restart_pending"] is True
