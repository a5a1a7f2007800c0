"""llmuxd's own Prometheus metrics, black-box: real llmuxd, llmux-sim models, http.client."""
from __future__ import annotations

import http.client
import os
import re
import signal
import subprocess
import sys
import threading

from .daemon_fixture import free_port, wait_for
from .test_front import call, complete, front_daemon

SAMPLE = re.compile(r'([a-zA-Z_:][a-zA-Z0-9_:]*)(\{(?:[a-zA-Z_][a-zA-Z0-9_]*="(?:[^"\\\n]|\\.)*",?)*\})?'
                    r' (\S+)')
LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\\n]|\\.)*)"')


def parse(text: str) -> dict:
    """{(name, frozenset of label pairs): value}, checking the 0.0.4 text format as it goes:
    every sample belongs to a family whose HELP and TYPE came first, once each."""
    samples, typed = {}, {}
    for line in text.splitlines():
        if line.startswith("# TYPE "):
            _, _, name, kind = line.split(" ", 3)
            assert name not in typed, f"family {name} twice"
            assert kind in ("gauge", "counter", "histogram", "summary", "untyped"), line
            typed[name] = kind
            continue
        if line.startswith("#") or not line:
            continue
        m = SAMPLE.fullmatch(line)
        assert m, f"not a sample line: {line!r}"
        name = m.group(1)
        family = re.sub(r"_(bucket|sum|count)$", "", name) if name not in typed else name
        assert family in typed, f"{name} has no TYPE line before it"
        labels = frozenset(LABEL.findall(m.group(2) or ""))
        assert (name, labels) not in samples, f"{line} twice"
        samples[(name, labels)] = float(m.group(3))
    return samples


def value(samples: dict, name: str, **labels) -> float | None:
    return samples.get((name, frozenset(labels.items())))


def scrape(port: int, path: str = "/metrics", headers=None) -> tuple[int, dict, str]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    conn.request("GET", path, headers=headers or {})
    r = conn.getresponse()
    body = r.read().decode()
    conn.close()
    return r.status, dict(r.getheaders()), body


def metrics(port: int, **kw) -> dict:
    status, headers, body = scrape(port, **kw)
    assert status == 200, body
    assert headers["Content-Type"] == "text/plain; version=0.0.4; charset=utf-8"
    return parse(body)


def in_background(fn, *args, **kw):
    out = {}
    t = threading.Thread(target=lambda: out.setdefault("result", fn(*args, **kw)), daemon=True)
    t.start()
    return t, out


def test_front_metrics_follow_swaps_restarts_and_queued_requests(make_daemon):
    d = front_daemon(make_daemon, {"a": {"args": ["--token-delay", "0.4"]},
                                   "b": {"args": ["--start-delay", "1.5"]}})
    m = metrics(d.front)
    assert value(m, "llmuxd_model_state", model="a", state="stopped") == 1
    assert value(m, "llmuxd_model_state", model="a", state="active") == 0
    assert value(m, "llmuxd_resident_models") == 0
    assert value(m, "llmuxd_model_restarts_total", model="a") == 0
    assert [k for k in m if k[0] == "llmuxd_build_info"]
    # A swap: the state flips, and the swap and its phases are counted.
    assert d.swap("a")["ok"]
    m = metrics(d.front)
    assert value(m, "llmuxd_model_state", model="a", state="active") == 1
    assert value(m, "llmuxd_model_state", model="a", state="stopped") == 0
    assert value(m, "llmuxd_resident_models") == 1
    assert value(m, "llmuxd_swap_duration_seconds_count", model="a", result="ok") == 1
    assert value(m, "llmuxd_swap_duration_seconds_bucket", model="a", result="ok", le="+Inf") == 1
    assert value(m, "llmuxd_jobs_total", kind="swap", result="ok") == 1
    phases = {dict(k[1])["phase"] for k in m if k[0] == "llmuxd_phase_duration_seconds_count"}
    assert {"start", "health"} <= phases, phases  # a cold start's phases, as the reply lists
    # A request being answered is in flight; one for a model on its way is queued.
    slow, _ = in_background(complete, d, "a", max_tokens=4)       # 4 x 0.4 s
    wait_for(lambda: value(metrics(d.front), "llmuxd_front_in_flight", model="a") == 1,
             what="a's request in flight")
    waiting, result = in_background(complete, d, "b")
    m = wait_for(lambda: (lambda m: m if value(m, "llmuxd_front_queue_depth", model="b") == 1
                          else None)(metrics(d.front)), timeout=10, what="b's request queued")
    assert value(m, "llmuxd_front_queue_depth", model="a") == 0
    waiting.join(30)
    slow.join(30)
    assert result["result"][0] == 200
    m = metrics(d.front)
    assert value(m, "llmuxd_front_queue_depth", model="b") == 0
    assert value(m, "llmuxd_front_in_flight", model="a") == 0
    assert value(m, "llmuxd_swap_duration_seconds_count", model="b", result="ok") == 1
    # b took at least its 1.5 s start: the histogram's sum says so, and a phase does too.
    assert value(m, "llmuxd_swap_duration_seconds_sum", model="b", result="ok") >= 1.5
    assert value(m, "llmuxd_swap_duration_seconds_bucket", model="b", result="ok", le="1.0") == 0
    longest = max(v for k, v in m.items() if k[0] == "llmuxd_phase_duration_seconds_sum")
    assert longest >= 1.4
    assert value(m, "llmuxd_model_state", model="a", state="sleeping") == 1
    assert value(m, "llmuxd_front_requests_total") >= 2
    # SIGKILL of the active model: supervision restarts it, and the counters say so.
    pid = d.status()["models"]["b"]["pid"]
    os.kill(pid, signal.SIGKILL)
    wait_for(lambda: value(metrics(d.front), "llmuxd_model_restarts_total", model="b") == 1,
             timeout=15, what="the restart counted")
    wait_for(lambda: value(metrics(d.front), "llmuxd_model_state", model="b", state="active")
             == 1, timeout=20, what="b active again")
    m = metrics(d.front)
    assert value(m, "llmuxd_model_crashes_total", model="b") == 1
    assert value(m, "llmuxd_model_restarts_total", model="a") == 0
    assert value(m, "llmuxd_jobs_total", kind="recover", result="ok") == 1
    # vLLM's own /metrics stays where it was: under /upstream/NAME/.
    status, _, body = call(d, "GET", "/upstream/b/metrics")
    assert status == 200 and "vllm:num_requests_running" in str(body)
    assert not [k for k in m if k[0].startswith("vllm:")]


def test_front_metrics_need_the_api_key_like_the_rest(make_daemon):
    d = front_daemon(make_daemon, {"a": {}}, front={"api_keys": ["sekrit"]})
    status, headers, _ = scrape(d.front)
    assert status == 401 and headers.get("WWW-Authenticate") == "Bearer"
    assert scrape(d.front, headers={"Authorization": "Bearer wrong"})[0] == 401
    m = metrics(d.front, headers={"Authorization": "Bearer sekrit"})
    assert value(m, "llmuxd_model_state", model="a", state="stopped") == 1
    assert scrape(d.front, path="/health")[0] == 200  # the load balancer's, without a key


def test_metrics_listen_serves_metrics_without_a_front(make_daemon):
    port = free_port()
    d = make_daemon({"a": {}, "b": {}}, {"metrics_listen": f"127.0.0.1:{port}"})
    m = metrics(port)
    assert value(m, "llmuxd_model_state", model="b", state="stopped") == 1
    assert not [k for k in m if k[0].startswith("llmuxd_front_")]  # there is no front
    assert d.swap("b")["ok"] and d.swap("a")["ok"]
    m = metrics(port)
    assert value(m, "llmuxd_model_state", model="b", state="sleeping") == 1
    assert value(m, "llmuxd_model_state", model="a", state="active") == 1
    assert value(m, "llmuxd_swap_duration_seconds_count", model="a", result="ok") == 1
    assert value(m, "llmuxd_jobs_total", kind="swap", result="ok") == 2
    assert scrape(port, path="/v1/models")[0] == 404    # only /metrics here
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    conn.request("POST", "/metrics", body=b"{}")
    assert conn.getresponse().status == 405


def test_check_refuses_a_metrics_port_beyond_loopback(make_daemon):
    d = make_daemon({"a": {}}, {"metrics_listen": "0.0.0.0:9464"}, start=False)
    r = subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(d.config), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 1
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "daemon.metrics_listen: '0.0.0.0:9464' is not a loopback " \
        "address" in lines[0] and lines[0].startswith(f"{d.config}:")
    taken = make_daemon({"a": {}}, start=False)
    taken.config.write_text(taken.config.read_text().replace(
        "[daemon]\n", f'[daemon]\nmetrics_listen = "127.0.0.1:{taken.ports["a"]}"\n'))
    r = subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(taken.config), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 1 and "is also the port of model 'a'" in r.stderr


def test_a_taken_metrics_port_is_a_one_line_error(make_daemon):
    from .daemon_fixture import squat
    port = free_port()
    stranger = squat(port)
    try:
        d = make_daemon({"a": {}}, {"metrics_listen": f"127.0.0.1:{port}"}, start=False)
        d.start(wait=False)
        assert d.proc.wait(30) == 1
    finally:
        stranger.close()
    assert f"llmuxd: daemon.metrics_listen 127.0.0.1:{port}: Address already in use" \
        in d.daemon_log()


def test_job_running_counts_every_concurrent_job():
    """Review: with jobs on disjoint GPUs at once, llmuxd_job_running showed the newest
    only (a swap on GPU 0 beside a sleep on GPU 1 read as the sleep alone)."""
    from types import SimpleNamespace

    from llmuxd import metrics
    from llmuxd import states as S
    from llmuxd.runner import Job

    jobs = [Job("swap", "a", None), Job("swap", "b", None), Job("sleep", "c", None)]
    spec = SimpleNamespace(sleep_level=1, gpu_memory=None)
    d = SimpleNamespace(runtimes={n: S.Runtime(n) for n in "abc"}, started_wall=0.0,
                        spec_in_use=lambda n: spec, resident=lambda: [],
                        catalog=SimpleNamespace(daemon=SimpleNamespace(gpu_memory=None)),
                        stats=metrics.Stats(), jobs=jobs, job=jobs[-1], front=None,
                        config_error=None, state_error=None)
    samples = parse(metrics.render(d).decode())
    assert value(samples, "llmuxd_job_running", kind="swap") == 2
    assert value(samples, "llmuxd_job_running", kind="sleep") == 1
