"""Black-box: the real llmuxd and llmux-sim models that declare sizes stay resident together."""
from __future__ import annotations

import signal

from .test_daemon import complete

G = 2**30


def test_two_resident_then_a_third_evicts_the_lru(make_daemon):
    models = {n: {"sleep_level": 1, "gpu_memory": "30GiB"} for n in ("a", "b", "c")}
    d = make_daemon(models, {"gpu_memory": "80GiB"})
    assert d.swap("a")["ok"]
    assert d.swap("b")["ok"]
    st = d.status()
    assert st["resident"] == ["a", "b"] and st["active"] == "b"
    assert st["gpu"] == {"budget": 80 * G, "free": 20 * G}
    assert st["models"]["a"]["gpu_memory"] == 30 * G
    complete(d, "a"), complete(d, "b")  # both answer without a swap
    assert d.swap("c")["ok"]            # 30 more do not fit: a (least recent) sleeps
    st = d.status()
    assert st["resident"] == ["b", "c"] and st["active"] == "c"
    assert st["models"]["a"]["state"] == "sleeping" and d.sim("a")["sleeping"] is True
    assert d.sim("b")["sleeping"] is False
    assert d.swap("b")["message"].endswith("already active")
    # supervision covers every resident model: b crashes and is restarted, c serves on
    pid_b = st["models"]["b"]["pid"]
    import os
    os.kill(pid_b, signal.SIGKILL)
    from .daemon_fixture import wait_for
    wait_for(lambda: d.state("b") == "active" and d.status()["models"]["b"]["pid"] != pid_b,
             timeout=30, what="b restarted")
    assert d.state("c") == "active"


def test_v1_catalog_without_sizes_keeps_one_active(make_daemon):
    d = make_daemon({n: {"sleep_level": 1} for n in ("a", "b")}, {"gpu_memory": "80GiB"})
    assert d.swap("a")["ok"] and d.swap("b")["ok"]
    st = d.status()
    assert st["resident"] == ["b"] and st["models"]["a"]["state"] == "sleeping"
    assert st["gpu"]["free"] is None  # an exclusive model holds the whole GPU


def test_model_over_budget_refused_by_check(make_daemon):
    d = make_daemon({"a": {"gpu_memory": "90GiB"}}, {"gpu_memory": "80GiB"}, start=False)
    import subprocess
    import sys
    r = subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(d.config), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "larger than the budget" in r.stderr


def test_status_table_shows_resident_set_and_budget():
    from llmuxctl.render import status_table
    st = {"active": "b", "resident": ["a", "b"], "gpu": {"budget": 80 * G, "free": 20 * G},
          "models": {"a": {"state": "active", "sleep_level": 1, "gpu_memory": 30 * G,
                           "gpu_measured": 32 * G, "gpu_over": True},
                     "b": {"state": "active", "sleep_level": 1, "gpu_memory": 30 * G}}}
    text = status_table(st, colour=False)
    assert "resident: a, b" in text and "gpu budget: 80.0GiB, free: 20.0GiB" in text
    assert "32.0GiB!" in text and "holds 32.0GiB, over its gpu_memory 30.0GiB" in text
    v1 = status_table({"active": "a", "resident": ["a"], "gpu": {"budget": None, "free": None},
                       "models": {"a": {"state": "active", "sleep_level": 1}}}, colour=False)
    assert "resident" not in v1 and "gpu" not in v1


def test_front_routes_to_every_resident_model_without_a_swap(make_daemon):
    from .test_front import complete as front_complete
    from .test_front import front_daemon, swaps_to
    models = {n: {"gpu_memory": "30GiB"} for n in ("a", "b", "c")}
    d = front_daemon(make_daemon, models, front={"min_active": "1h"}, gpu_memory="80GiB")
    assert front_complete(d, "a")[0] == 200
    # b fits beside a: a's min_active does not hold it back, and a stays resident
    assert front_complete(d, "b")[0] == 200
    for _ in range(3):
        assert front_complete(d, "a")[0] == 200 and front_complete(d, "b")[0] == 200
    assert swaps_to(d, "a") == 1 and swaps_to(d, "b") == 1
    assert d.status()["resident"] == ["a", "b"]


def test_eviction_is_least_recently_used_not_least_recently_woken(make_daemon):
    """a was woken first, but the front served it last: c evicts b, not a; a swap to an
    already active model counts as a use too."""
    from .test_front import complete as front_complete
    from .test_front import front_daemon
    models = {n: {"sleep_level": 1, "gpu_memory": "30GiB"} for n in ("a", "b", "c")}
    d = front_daemon(make_daemon, models, gpu_memory="80GiB")
    for name in ("a", "b", "a"):
        assert front_complete(d, name)[0] == 200
    assert front_complete(d, "c")[0] == 200
    st = d.status()
    assert st["models"]["b"]["state"] == "sleeping" and sorted(st["resident"]) == ["a", "c"]
    assert d.swap("a")["message"].endswith("already active")  # a used again: c is the LRU
    assert front_complete(d, "b")[0] == 200
    st = d.status()
    assert st["models"]["c"]["state"] == "sleeping" and sorted(st["resident"]) == ["a", "b"]
