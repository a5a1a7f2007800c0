"""`llmuxctl status` as a table: the columns, and no line wider than the terminal."""
from __future__ import annotations

import json
import time

import pytest

from llmuxctl.render import status_table

G = 2 ** 30
LONG_NAME = "qwen3-coder-30b-a3b-instruct-fp8-served-with-a-long-catalog-name"[:64]  # the limit
LONG_ERROR = ("could not reach sleep level 4 (criu dump failed: Error (criu/cr-dump.c:1634): "
              "Dumping FAILED. see /var/lib/llmux/checkpoints/x/dump.log); it was stopped instead")


def status(**models) -> dict:
    return {"active": "a", "resident": ["a"], "gpu": {"budget": 140 * G, "free": 100 * G},
            "models": models, "job": None, "config": {"path": "/etc/llmux/llmux.toml",
                                                       "error": None}}


def model(**kw) -> dict:
    base = {"state": "stopped", "sleep_level": 1, "current_level": None, "pid": None,
            "port": 8001, "since": time.time() - 30, "restarts": 0, "restarts_total": 0,
            "last_error": None, "gpu_memory": None}
    return {**base, **kw}


def rows(text: str) -> dict[str, list[str]]:
    lines = text.splitlines()
    header = lines[0].split()
    return {line.split()[0]: line.split() for line in lines[1:] if line and not
            line.startswith(" ") and ":" not in line.split()[0]} | {"HEADER": header}


def test_columns_gpu_level_since_restarts():
    st = status(
        a=model(state="active", pid=4242, port=8001, since=time.time() - 400, restarts_total=3,
                gpu_memory=30 * G, gpu_measured=28 * G),
        b=model(state="checkpointed", sleep_level=4, current_level=4, port=8002,
                gpu_memory=20 * G, since=time.time() - 7300),
        c=model(state="stopped", sleep_level=4, current_level=5, port=8003, last_error="boom"),
        d=model(state="stopped", sleep_level=2, port=8004))
    text = status_table(st, colour=False)
    r = rows(text)
    assert r["HEADER"] == ["MODEL", "STATE", "LEVEL", "PID", "PORT", "SINCE", "GPU", "RESTARTS",
                           "NOTE"]
    assert r["a"] == ["a", "active", "1/-", "4242", "8001", "7m", "28.0GiB", "3"]  # measured
    assert r["b"] == ["b", "checkpointed", "4/4", "-", "8002", "2.0h", "20.0GiB*", "0"]
    assert r["c"][:8] == ["c", "stopped", "4/5", "-", "8003", "30s", "-", "0"]  # a stop instead
    assert r["c"][8:] == ["boom"]                                              # fits beside
    assert r["d"][2] == "2/-" and r["d"][6] == "-"
    assert "* declared gpu_memory (not measured)" in text


def test_an_older_daemon_without_the_new_keys_still_renders():
    st = status(a={"state": "active", "sleep_level": 1, "pid": 7, "port": 1, "restarts": 2})
    assert rows(status_table(st, colour=False))["a"] == ["a", "active", "1/-", "7", "1", "-",
                                                          "-", "2"]


@pytest.mark.parametrize("width", [80, 100])
def test_no_line_wider_than_the_terminal_with_long_names_and_notes(width):
    st = status(**{
        LONG_NAME: model(state="going_to_sleep", sleep_level=4, pid=4194304, port=65535,
                         gpu_memory=30 * G, gpu_measured=33 * G, gpu_over=True,
                         restart_pending=True, last_error=LONG_ERROR, restarts_total=12),
        "a": model(state="active", last_error="multi\nline\nerror " + "x" * 200)})
    st["config"]["error"] = "/etc/llmux/models.d/x.toml:3: models.q.port: " + "y" * 200
    st["daemon"] = {"state_error": "cannot write the state file in state_dir /var/lib/llmux: "
                                   "No space left on device; " + "z" * 100}
    st["resident"] = [f"model-{i}" for i in range(40)]
    text = status_table(st, colour=False, width=width)
    lines = text.splitlines()
    assert max(len(line) for line in lines) <= width, "\n".join(
        line for line in lines if len(line) > width)
    # The long name is shortened in the table; the long note goes on its own indented line.
    row = next(line for line in lines if line.startswith(LONG_NAME[:10]))
    assert "going_to_sleep" in row and "4/-" in row and "33.0GiB!" in row and "12" in row
    note = lines[lines.index(row) + 1]
    assert note.startswith("    restart pending; holds 33.0GiB, over its gpu_memory 30.0GiB")
    assert note.endswith("...")
    assert not any(line.startswith("line") for line in lines)  # a multi-line error is one line
    assert any(line.startswith("state file: cannot write the state file") for line in lines)
    assert any(line.startswith("  /etc/llmux/models.d/x.toml:3:") for line in lines)


def test_colour_does_not_change_the_layout():
    st = status(a=model(state="active", last_error="x" * 300), b=model(state="failed"))
    plain = status_table(st, colour=False).splitlines()
    coloured = status_table(st, colour=True).splitlines()
    strip = [__import__("click").unstyle(line) for line in coloured]
    assert [line.rstrip() for line in strip] == plain


def test_cli_status_respects_columns_and_json_keeps_every_key(make_daemon):
    d = make_daemon({LONG_NAME: {"sleep_level": 2, "gpu_memory": "1GiB"}, "b": {}},
                    {"gpu_memory": "8GiB"})
    assert d.swap(LONG_NAME)["ok"] and d.swap("b")["ok"]
    import os
    import subprocess
    import sys
    out = subprocess.run([sys.executable, "-m", "llmuxctl", "--socket", d.socket, "status"],
                         capture_output=True, text=True, env={**os.environ, "COLUMNS": "80"})
    assert out.returncode == 0
    assert max(len(line) for line in out.stdout.splitlines()) <= 80, out.stdout
    js = json.loads(d.ctl("status", "--json").stdout)
    m = js["models"][LONG_NAME]
    # v1 keys stay; the new ones are added next to them.
    assert {"state", "sleep_level", "pid", "port", "since", "restarts", "asleep_level",
            "gpu_memory"} <= m.keys()
    assert m["current_level"] == 2 and m["restarts_total"] == 0 and m["state"] == "sleeping"
    assert js["models"]["b"]["current_level"] is None
    assert {"active", "models", "config", "resident", "gpu"} <= js.keys()
