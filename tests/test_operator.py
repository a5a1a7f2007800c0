"""What an operator sees (issue 12, the operator's items)."""

from __future__ import annotations

import subprocess
import sys

from .daemon_fixture import squat, wait_for


def test_llmux_sim_help_hides_its_internal_subcommand():
    r = subprocess.run([sys.executable, "-m", "llmuxd.sim", "--help"], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0 and "SUPPRESS" not in r.stdout and "engine" not in r.stdout


def test_missing_config_names_the_way_to_pass_one(tmp_path):
    r = subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(tmp_path / "nope.toml")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 1 and ":0:" not in r.stderr and "--config" in r.stderr


def test_logs_of_a_never_started_model_say_so(make_daemon):
    d = make_daemon({"a": {}})
    r = d.ctl("logs", "a")
    assert r.returncode == 0 and "never been started" in r.stdout


def test_stop_names_the_signal_llmuxd_sent(make_daemon):
    d = make_daemon({"a": {}})
    assert d.swap("a")["ok"] and d.call({"cmd": "stop", "model": "a"})["ok"]
    wait_for(lambda: "after llmuxd's SIGTERM" in d.daemon_log(), what="the exit line")
    assert "as asked" not in d.daemon_log()


def test_ctrl_c_of_swap_says_the_swap_goes_on(make_daemon):
    import signal
    import time
    d = make_daemon({"a": {"args": ["--start-delay", "3"]}})
    p = subprocess.Popen([sys.executable, "-m", "llmuxctl", "--socket", d.socket, "swap", "a"],
                         stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    wait_for(lambda: (d.status().get("job") or {}).get("model") == "a", what="the swap")
    time.sleep(0.3)
    p.send_signal(signal.SIGINT)
    _, err = p.communicate(timeout=10)
    assert "Aborted" not in err and "the swap a goes on in llmuxd" in err
    assert "`llmuxctl status` or `llmuxctl logs a -f`" in err and p.returncode == 130
    wait_for(lambda: d.state("a") == "active", timeout=15, what="the swap to finish anyway")


def test_llmuxctl_shutdown_stops_the_daemon(make_daemon):
    d = make_daemon({"a": {}})
    r = d.ctl("shutdown")
    assert r.returncode == 0, r.stderr
    wait_for(lambda: d.proc.poll() is not None, what="llmuxd to exit")


def test_long_start_shows_elapsed_time_and_the_latest_log_line(make_daemon):
    d = make_daemon({"a": {"args": ["--start-delay", "6"]}})
    r = d.ctl("swap", "a")
    assert r.returncode == 0, r.stderr
    waiting = [ln for ln in r.stdout.splitlines() if "still waiting" in ln]
    assert waiting and "log: " in waiting[0], r.stdout
    assert "(start took " in r.stdout


def test_swap_to_a_model_whose_port_is_taken_evicts_nothing(make_daemon):
    d = make_daemon({"a": {}, "b": {}})
    assert d.swap("a")["ok"]
    pid = d.status()["models"]["a"]["pid"]
    stranger = squat(d.ports["b"])
    try:
        r = d.ctl("swap", "b")
        assert r.returncode == 1 and "already in use" in r.stderr, r.stderr
    finally:
        stranger.close()
    st = d.status()["models"]
    assert st["a"]["state"] == "active" and st["a"]["pid"] == pid  # never put to sleep
    assert st["b"]["state"] in ("stopped", "failed")
    assert "a: drain" not in r.stdout and "a: sleep" not in r.stdout


def readme_blocks(section: str) -> list[str]:
    import re
    from pathlib import Path
    text = (Path(__file__).resolve().parents[1] / "README.md").read_text()
    body = text.split(f"## {section}\n", 1)[1].split("\n## ", 1)[0]
    return re.findall(r"```(?:sh)?\n(.*?)```", body, re.S)


def test_readme_setup_makes_a_venv_and_the_second_terminal_uses_it():
    first, second = readme_blocks("Try it (no GPU needed)")[:2]
    # Debian 12 / Ubuntu 24.04 refuse `pip install` into the system Python (PEP 668).
    assert first.index("python3 -m venv .venv") < first.index(". .venv/bin/activate") \
        < first.index("pip install")
    assert second.splitlines()[0].strip() == ". .venv/bin/activate"


def test_readme_lists_no_command_llmuxctl_lacks():
    from llmuxctl.cli import main
    listed = set()
    for block in readme_blocks("llmuxctl") + readme_blocks("Try it (no GPU needed)"):
        for line in block.splitlines():
            import re
            words = re.sub(r"\[[^]]*\]", "", line.split("#")[0]).split()
            if words[:1] == ["llmuxctl"] and len(words) > 1:
                listed.add(words[1])
    assert {"status", "swap", "sleep", "stop", "logs", "shutdown"} <= listed
    assert listed <= set(main.commands), listed - set(main.commands)
