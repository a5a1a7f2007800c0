"""Black-box: the real llmuxd with llmux-sim models that name their GPUs."""
from __future__ import annotations

import subprocess
import sys
import threading
import time

from .daemon_fixture import wait_for
from .test_front import complete as front_complete
from .test_front import front_daemon

G = 2**30
SLOW = ["--start-delay", "1.0"]  # each cold start takes about a second


def timed_swap(d, name, spans):
    """The swap's span on the daemon's clock: it began `elapsed` before its reply came."""
    reply = d.swap(name)
    end = time.monotonic()
    spans[name] = (end - reply["elapsed"], end, reply)


def run_both(d, names):
    spans = {}
    threads = [threading.Thread(target=timed_swap, args=(d, n, spans)) for n in names]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return spans


def test_swaps_on_disjoint_gpus_run_at_once(make_daemon):
    models = {"a": {"gpu_memory": "30GiB", "gpus": [0], "args": SLOW},
              "b": {"gpu_memory": "30GiB", "gpus": [1], "args": SLOW}}
    d = make_daemon(models, {"gpu_memory": "80GiB"})
    spans = run_both(d, ["a", "b"])
    (a0, a1, ra), (b0, b1, rb) = spans["a"], spans["b"]
    assert ra["ok"] and rb["ok"], (ra, rb)
    assert ra["elapsed"] >= 1.0 and rb["elapsed"] >= 1.0
    overlap = min(a1, b1) - max(a0, b0)
    assert overlap > 0.5, spans  # both were starting at the same time
    st = d.status()
    assert st["resident"] and sorted(st["resident"]) == ["a", "b"]
    assert st["gpus"]["0"] == {"budget": 80 * G, "free": 50 * G, "resident": ["a"]}
    assert st["gpus"]["1"] == {"budget": 80 * G, "free": 50 * G, "resident": ["b"]}
    assert st["gpu"] == {"budget": 80 * G, "free": 50 * G}
    assert st["models"]["a"]["gpus"] == [0] and st["models"]["b"]["gpus"] == [1]
    # what each server was given to select its GPU, in NVML's (PCI) order
    assert d.sim("a")["env"] == {"CUDA_VISIBLE_DEVICES": "0", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    assert d.sim("b")["env"] == {"CUDA_VISIBLE_DEVICES": "1", "CUDA_DEVICE_ORDER": "PCI_BUS_ID"}
    text = d.ctl("status").stdout
    assert "gpu 0: budget 80.0GiB, free 50.0GiB, resident: a" in text
    assert "gpu 1: budget 80.0GiB, free 50.0GiB, resident: b" in text


def test_swaps_sharing_a_gpu_are_serialized(make_daemon):
    """a on [0, 1] (TP 2) shares GPU 1 with b: the second swap is refused as busy while the
    first runs (never interleaved), and succeeds after it."""
    models = {"a": {"gpu_memory": "30GiB", "gpus": [0, 1], "args": SLOW + ["--tp", "2"]},
              "b": {"gpu_memory": "30GiB", "gpus": [1], "args": SLOW}}
    d = make_daemon(models, {"gpu_memory": "80GiB"})
    spans = {}
    t = threading.Thread(target=timed_swap, args=(d, "a", spans))
    t.start()
    wait_for(lambda: d.status()["jobs"], what="the swap to a to start")
    second = d.ctl("swap", "b")
    assert second.returncode == 1 and "busy: swap a in progress" in second.stderr
    t.join()
    assert spans["a"][2]["ok"] and d.swap("b")["ok"]
    assert d.status()["gpus"]["1"]["resident"] == ["a", "b"]  # 30 + 30 fit GPU 1's 80
    assert d.sim("a")["env"]["CUDA_VISIBLE_DEVICES"] == "0,1"


def test_front_swaps_disjoint_gpus_at_once_and_a_shared_gpu_in_turn(make_daemon):
    models = {"a": {"gpu_memory": "30GiB", "gpus": [0], "args": SLOW},
              "b": {"gpu_memory": "30GiB", "gpus": [1], "args": SLOW},
              "c": {"gpu_memory": "30GiB", "gpus": [1], "args": SLOW}}
    d = front_daemon(make_daemon, models, gpu_memory="80GiB")
    seen = []
    done = threading.Event()

    def watch():
        while not done.is_set():
            seen.append(sorted(j["model"] for j in d.status()["jobs"]))
            time.sleep(0.05)
    watcher = threading.Thread(target=watch)
    watcher.start()
    try:
        results = {}
        threads = [threading.Thread(target=lambda n=n: results.setdefault(n, front_complete(d, n)))
                   for n in ("a", "b", "c")]
        for t in threads:
            t.start()
            time.sleep(0.05)  # a, then b, then c: the order the front queues them
        for t in threads:
            t.join()
    finally:
        done.set()
        watcher.join()
    assert {n: r[0] for n, r in results.items()} == {"a": 200, "b": 200, "c": 200}
    assert ["a", "b"] in seen            # disjoint GPUs: both swaps at once
    assert not any("b" in s and "c" in s for s in seen)  # GPU 1: one after the other
    assert d.status()["gpus"]["1"]["resident"] == ["b", "c"]


def check(d, *lines):
    text = "".join(lines)
    d.config.write_text(d.config.read_text() + text)
    return subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(d.config), "--check"],
                          capture_output=True, text=True)


def test_check_refuses_bad_gpu_lists(make_daemon):
    d = make_daemon({"a": {"gpus": [0]}}, start=False)
    r = check(d, '\n[models.b]\nmodel = "x"\nport = 1\ngpus = [1]\n'
                 'env = { CUDA_VISIBLE_DEVICES = "2" }\n',
              '\n[models.c]\nmodel = "x"\nport = 2\ngpus = [2]\nargs = ["-tp", "2"]\n',
              '\n[models.e]\nmodel = "x"\nport = 3\ngpus = [3, 3]\n',
              '\n[models.f]\nmodel = "x"\nport = 4\ngpus = [-1]\n')
    assert r.returncode == 1
    errors = r.stderr.splitlines()
    assert any("models.b.env: CUDA_VISIBLE_DEVICES conflicts with models.b.gpus" in e
               for e in errors), r.stderr
    assert any("models.c.gpus: tensor-parallel size 2 needs 2 GPUs, but gpus lists 1" in e
               for e in errors), r.stderr
    assert any("models.e.gpus: GPU 3 is listed twice" in e for e in errors), r.stderr
    assert any("models.f.gpus[0]: must be between 0 and 1023, got -1" in e for e in errors)
    assert all(e.startswith(str(d.config)) for e in errors)  # FILE:LINE: message, one line each


def test_a_stopped_model_moved_to_another_gpu_by_a_reload_is_placed_there(make_daemon):
    """Review: a stopped model kept the definition of its last run in specs_in_use, so
    after a reload moved it to GPU 1 its swap claimed and made room on GPU 0, and it
    started on GPU 1 beside b over the budget."""
    models = {"a": {"gpu_memory": "50GiB", "gpus": [0]},
              "b": {"gpu_memory": "50GiB", "gpus": [1]}}
    d = make_daemon(models, {"gpu_memory": "80GiB"})
    assert d.swap("a")["ok"] and d.call({"cmd": "stop", "model": "a"})["ok"]
    assert d.swap("b")["ok"]
    d.config.write_text(d.config.read_text().replace("gpus = [0]", "gpus = [1]"))
    assert d.call({"cmd": "reload"})["ok"]
    assert d.status()["models"]["a"]["gpus"] == [1]
    reply = d.swap("a")
    assert reply["ok"], reply
    st = d.status()
    assert st["resident"] == ["a"] and st["models"]["b"]["state"] != "active", st["resident"]


def test_a_model_removed_while_asleep_goes_while_a_swap_runs_on_another_gpu(make_daemon):
    """Review: removal waited for no job at all (`self.job is None`), so a sleeping
    model removed from the catalog stayed while any job ran on any GPU."""
    models = {"a": {"gpu_memory": "30GiB", "gpus": [0], "args": ["--start-delay", "8"]},
              "b": {"gpu_memory": "30GiB", "gpus": [1]}}
    d = make_daemon(models, {"gpu_memory": "80GiB"})
    assert d.swap("b")["ok"] and d.call({"cmd": "sleep", "model": "b"})["ok"]
    thread = threading.Thread(target=d.swap, args=("a",))
    thread.start()
    try:
        wait_for(lambda: d.status()["jobs"], timeout=5, what="the swap to a running")
        d.config.write_text(d.config.read_text().split("\n[models.b]")[0] + "\n")
        assert d.call({"cmd": "reload"})["ok"]
        wait_for(lambda: "b" not in d.status()["models"], timeout=5, what="b removed")
        assert [j["model"] for j in d.status()["jobs"]] == ["a"]  # while a still starts
    finally:
        thread.join()
