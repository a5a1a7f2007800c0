"""Tests for llmux-sim, the vLLM stand-in: real processes on free local ports."""

import http.client
import json
import os
import signal
import socket
import subprocess
import sys
import time

import pytest

from llmuxd.sim import tp as sim_tp

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def alive(pid):
    """True for a live process; a zombie counts as dead."""
    try:
        with open(f"/proc/{pid}/stat") as f:
            return f.read().rsplit(")", 1)[1].split()[0] != "Z"
    except FileNotFoundError:
        return False


def group_pids(pgid):
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                with open(f"/proc/{entry}/stat") as f:
                    fields = f.read().rsplit(")", 1)[1].split()
            except OSError:
                continue
            if fields[0] != "Z" and int(fields[2]) == pgid:
                pids.append(int(entry))
    return pids


def wait_for(predicate, timeout=3.0, interval=0.05):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if predicate():
            return True
        time.sleep(interval)
    return predicate()


class Sim:
    def __init__(self, proc, port, out, err):
        self.proc, self.port, self.out, self.err = proc, port, out, err

    def request(self, method, path, body=None, headers=None, timeout=5):
        conn = http.client.HTTPConnection("127.0.0.1", self.port, timeout=timeout)
        try:
            if isinstance(body, (dict, list)):
                body = json.dumps(body)
            conn.request(method, path, body=body, headers=dict({"Connection": "close"}, **(headers or {})))
            resp = conn.getresponse()
            return resp.status, resp.read()
        finally:
            conn.close()

    def json(self, method, path, body=None, timeout=5):
        status, data = self.request(method, path, body, timeout=timeout)
        return status, json.loads(data) if data else None

    def complete(self, prompt="hello world", max_tokens=6, **extra):
        return self.json("POST", "/v1/completions", dict(prompt=prompt, max_tokens=max_tokens, **extra))

    def state(self):
        status, st = self.json("GET", "/sim/state")
        assert status == 200
        return st

    def metric(self, name):
        status, data = self.request("GET", "/metrics")
        assert status == 200
        for line in data.decode().splitlines():
            if line.startswith(name) and line[len(name)] in "{ }":
                return float(line.rsplit(" ", 1)[1])
        raise AssertionError(f"{name} not in /metrics")

    def health(self):
        try:
            return self.request("GET", "/health", timeout=1)[0]
        except OSError:
            return None

    def wait_ready(self, timeout=4.0):
        assert wait_for(lambda: self.health() == 200 or self.proc.poll() is not None, timeout)
        assert self.proc.poll() is None, self.err.read_text()

    def log(self):
        return self.out.read_text()


@pytest.fixture
def start_sim(tmp_path):
    procs = []

    def start(*args, env=None, wait=True):
        port = free_port()
        e = dict(os.environ, PYTHONPATH=ROOT, VLLM_SERVER_DEV_MODE="1")
        for key in ("LLMUX_SIM_FAKE_CUDA_DIR", "VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "LLMUX_SIM_WATCHDOG_S"):
            e.pop(key, None)
        for key, value in (env or {}).items():
            if value is None:
                e.pop(key, None)
            else:
                e[key] = value
        out, err = tmp_path / f"sim-{port}.out", tmp_path / f"sim-{port}.err"
        with open(out, "wb") as o, open(err, "wb") as r:
            proc = subprocess.Popen(
                [sys.executable, "-m", "llmuxd.sim", "serve", "test-model", "--host", "127.0.0.1",
                 "--port", str(port), *args],
                stdin=subprocess.DEVNULL, stdout=o, stderr=r, env=e, cwd=tmp_path,
                start_new_session=True)
        procs.append(proc)
        sim = Sim(proc, port, out, err)
        if wait:
            sim.wait_ready()
        return sim

    yield start
    for proc in procs:
        try:
            os.killpg(proc.pid, signal.SIGKILL)
        except ProcessLookupError:
            pass
        proc.wait()


def test_listens_only_once_ready(start_sim):
    t0 = time.monotonic()
    sim = start_sim("--start-delay", "1.0", "--gpu-memory-utilization", "0.8",
                    "--tensor-parallel-size", "1", "--enforce-eager", wait=False)
    time.sleep(0.4)
    with pytest.raises(ConnectionRefusedError):
        socket.create_connection(("127.0.0.1", sim.port), timeout=1).close()
    sim.wait_ready()
    assert time.monotonic() - t0 >= 1.0
    assert f"Starting vLLM API server 0 on http://127.0.0.1:{sim.port}" in sim.log()
    status, models = sim.json("GET", "/v1/models")
    assert status == 200 and [m["id"] for m in models["data"]] == ["test-model"]
    st = sim.state()
    assert st["ready"] and st["pid"] == sim.proc.pid and st["engine_pid"] in group_pids(sim.proc.pid)
    assert st["tp"] == 1 and st["workers"] == [] and st["nccl"] is None  # TP=1: no workers
    assert sorted(group_pids(sim.proc.pid)) == sorted([sim.proc.pid, st["engine_pid"]])


def test_dev_endpoints_need_dev_mode(start_sim):
    sim = start_sim("--enable-sleep-mode", env={"VLLM_SERVER_DEV_MODE": "0"})
    for method, path in [("POST", "/sleep?level=1"), ("POST", "/wake_up"), ("GET", "/is_sleeping"),
                         ("POST", "/collective_rpc"), ("POST", "/reset_prefix_cache")]:
        assert sim.request(method, path, b"{}")[0] == 404, path
    assert sim.health() == 200
    assert sim.complete()[0] == 200
    assert sim.state()["sleeping"] is False


def test_sleep_wake_level1(start_sim):
    sim = start_sim("--enable-sleep-mode", "--sleep-delay", "0.3", "--wake-delay", "0.2")
    status, before = sim.complete()
    assert status == 200
    t0 = time.monotonic()
    assert sim.request("POST", "/sleep?level=1") == (200, b"")
    assert time.monotonic() - t0 >= 0.3
    assert sim.json("GET", "/is_sleeping") == (200, {"is_sleeping": True})
    assert sim.health() == 200  # vLLM: a sleeping engine is healthy
    labels = 'model_name="test-model",engine="0"'
    assert sim.metric('vllm:engine_sleep_state{%s,sleep_state="weights_offloaded"}' % labels) == 1
    assert sim.metric('vllm:engine_sleep_state{%s,sleep_state="awake"}' % labels) == 0
    status, err = sim.complete()
    assert status == 503 and "sleeping" in err["error"]
    t0 = time.monotonic()
    assert sim.request("POST", "/sleep?level=2")[0] == 200  # already asleep: no change
    assert time.monotonic() - t0 < 0.3 and sim.state()["level"] == 1
    t0 = time.monotonic()
    assert sim.request("POST", "/wake_up") == (200, b"")
    assert time.monotonic() - t0 >= 0.2
    assert sim.json("GET", "/is_sleeping")[1] == {"is_sleeping": False}
    status, after = sim.complete()
    assert status == 200 and after["choices"][0]["text"] == before["choices"][0]["text"]
    assert sim.state()["weights_ok"] is True
    assert sim.request("POST", "/wake_up")[0] == 200  # awake already: no-op


def test_sleep_level2_serves_garbage_until_reload(start_sim):
    sim = start_sim("--enable-sleep-mode")
    good = sim.complete()[1]["choices"][0]["text"]
    assert set(good) != {"!"}
    for level in ("2", "3"):  # vLLM <= 0.16: any level other than 1 acts as 2
        assert sim.request("POST", f"/sleep?level={level}")[0] == 200
        assert sim.state()["level"] == 2
        assert sim.request("POST", "/wake_up")[0] == 200
        status, bad = sim.complete()
        assert status == 200 and bad["choices"][0]["text"] == "!" * 6
        assert sim.state()["weights_ok"] is False
        assert sim.json("POST", "/collective_rpc", {"method": "reload_weights"}) == (200, {"results": [None]})
        assert sim.request("POST", "/reset_prefix_cache")[0] == 200
        assert sim.complete()[1]["choices"][0]["text"] == good
    assert sim.request("POST", "/sleep?level=abc")[0] == 500
    assert sim.json("POST", "/collective_rpc", {"method": "no_such"})[0] == 500
    assert sim.request("POST", "/collective_rpc", b"not json")[0] == 400
    assert sim.request("POST", "/collective_rpc", {"args": []})[0] == 400


def test_partial_wake_by_tags(start_sim):
    sim = start_sim("--enable-sleep-mode")
    assert sim.request("POST", "/sleep?level=1")[0] == 200
    assert sim.request("POST", "/wake_up?tags=weights")[0] == 200
    assert sim.json("GET", "/is_sleeping")[1] == {"is_sleeping": True}
    assert sim.complete()[0] == 503
    assert sim.request("POST", "/wake_up?tags=bogus")[0] == 200  # ignored, like vLLM
    assert sim.state()["sleeping_tags"] == ["kv_cache"]
    assert sim.request("POST", "/wake_up?tags=kv_cache")[0] == 200
    assert sim.json("GET", "/is_sleeping")[1] == {"is_sleeping": False}
    assert sim.complete()[0] == 200


def test_sleep_without_sleep_mode_frees_nothing(start_sim):
    sim = start_sim()
    good = sim.complete()[1]["choices"][0]["text"]
    assert sim.request("POST", "/sleep?level=2")[0] == 200
    st = sim.state()
    assert st["sleeping"] is True and st["sleep_mode_enabled"] is False and st["freed_mb"] == 0
    assert sim.request("POST", "/wake_up")[0] == 200
    assert sim.complete()[1]["choices"][0]["text"] == good  # nothing was discarded


def test_running_gauge_during_streamed_completion(start_sim):
    sim = start_sim("--token-delay", "0.1")
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=5)
    conn.request("POST", "/v1/completions", json.dumps({"prompt": "x", "max_tokens": 10, "stream": True}),
                  {"Connection": "close"})
    resp = conn.getresponse()
    assert resp.status == 200 and resp.getheader("Content-Type").startswith("text/event-stream")
    first = resp.readline()
    assert first.startswith(b"data: {")
    assert sim.metric("vllm:num_requests_running") == 1
    assert sim.metric("vllm:num_requests_waiting") == 0
    events = [first] + [line for line in resp.read().split(b"\n") if line.startswith(b"data: ")]
    conn.close()
    assert events[-1] == b"data: [DONE]"
    chunks = [json.loads(e[6:]) for e in events[:-1]]
    assert len(chunks) == 10 and chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert chunks[0]["llmux_sim"]["completions"] == 1
    assert sim.metric("vllm:num_requests_running") == 0
    assert sim.metric("llmux_sim_completions_total") == 1


def test_completions_counter_and_shape(start_sim):
    sim = start_sim("--served-model-name", "alias")
    engine_pid = sim.state()["engine_pid"]
    texts = []
    for n in (1, 2, 3):
        status, body = sim.json("POST", "/v1/completions", {"model": "alias", "prompt": "same prompt"})
        assert status == 200 and body["object"] == "text_completion" and body["model"] == "alias"
        assert body["llmux_sim"] == {"completions": n, "engine_pid": engine_pid}
        assert body["usage"]["completion_tokens"] == 16  # vLLM's default max_tokens
        texts.append(body["choices"][0]["text"])
    assert len(set(texts)) == 1 and len(texts[0].split()) == 16
    assert sim.complete(prompt="another prompt", max_tokens=16)[1]["choices"][0]["text"] != texts[0]
    assert sim.state()["completions"] == 4 and sim.metric("llmux_sim_completions_total") == 4
    assert sim.json("POST", "/v1/completions", {"model": "test-model", "prompt": "x"})[0] == 404
    assert sim.request("POST", "/v1/completions", b"{")[0] == 400
    assert sim.complete(max_tokens=0)[0] == 400
    # keep-alive: two requests on one connection
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=5)
    for _ in range(2):
        conn.request("GET", "/health")
        assert conn.getresponse().read() == b""
    conn.close()


def test_sigterm_stops_api_and_engine(start_sim, tmp_path):
    cuda = tmp_path / "cuda"
    cuda.mkdir()
    sim = start_sim("--fake-cuda-dir", str(cuda))
    engine_pid = sim.state()["engine_pid"]
    assert sorted(os.listdir(cuda)) == sorted([str(sim.proc.pid), str(engine_pid)])
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.proc.wait(5) == 0
    assert not alive(engine_pid) and group_pids(sim.proc.pid) == []
    assert os.listdir(cuda) == []


def test_sigterm_while_loading_dies_by_sigint(start_sim):
    sim = start_sim("--start-delay", "3", wait=False)
    assert wait_for(lambda: len(group_pids(sim.proc.pid)) == 2)
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.proc.wait(5) == -signal.SIGINT  # vLLM: KeyboardInterrupt("terminated")
    assert group_pids(sim.proc.pid) == []


def test_sigkill_of_api_server_orphans_engine(start_sim):
    sim = start_sim()
    engine_pid = sim.state()["engine_pid"]
    sim.proc.kill()
    sim.proc.wait()
    time.sleep(0.5)
    assert alive(engine_pid) and group_pids(sim.proc.pid) == [engine_pid]
    assert sim.health() is None  # port closed, yet the engine lives on


def test_crash_endpoint_and_crash_after(start_sim):
    sim = start_sim()
    engine_pid = sim.state()["engine_pid"]
    assert sim.json("POST", "/sim/crash") == (200, {"crashing": True})
    assert sim.proc.wait(3) == 1
    assert alive(engine_pid)
    t0 = time.monotonic()
    sim = start_sim("--crash-after", "0.5")
    assert sim.proc.wait(3) == 1 and time.monotonic() - t0 >= 0.5


def test_fail_start(start_sim):
    t0 = time.monotonic()
    sim = start_sim("--fail-start", "--start-delay", "0.3", wait=False)
    assert sim.proc.wait(4) == 1
    assert time.monotonic() - t0 >= 0.3
    assert "Engine core initialization failed" in sim.err.read_text()
    assert group_pids(sim.proc.pid) == []


def test_failure_injection(start_sim):
    sim = start_sim("--enable-sleep-mode", "--fail-sleep", "--fail-wake")
    assert sim.request("POST", "/sleep?level=1")[0] == 500
    assert sim.state()["sleeping"] is False
    cleared = {"sleep": False, "wake": False, "health": False}
    assert sim.json("POST", "/sim/fail?what=none")[1]["fail"] == cleared
    assert sim.request("POST", "/sleep?level=1")[0] == 200
    assert sim.request("POST", "/sim/fail?what=wake")[0] == 200
    assert sim.request("POST", "/wake_up")[0] == 500
    assert sim.state()["sleeping"] is True
    assert sim.request("POST", "/sim/fail?what=none")[0] == 200
    assert sim.request("POST", "/wake_up")[0] == 200
    assert sim.request("POST", "/sim/fail?what=health")[0] == 200
    assert sim.health() == 503
    assert sim.request("POST", "/sim/fail?what=bogus")[0] == 400


def test_engine_death(start_sim):
    sim = start_sim(env={"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"})
    os.kill(sim.state()["engine_pid"], signal.SIGKILL)
    assert wait_for(lambda: sim.health() == 503)
    assert sim.complete()[0] == 500
    assert sim.proc.poll() is None
    # Without keep-alive, the watchdog stops the API server (vLLM: within 5 s).
    sim = start_sim(env={"LLMUX_SIM_WATCHDOG_S": "0.3"})
    os.kill(sim.state()["engine_pid"], signal.SIGKILL)
    assert sim.proc.wait(3) == 1


def test_fake_cuda_state_gates_completions(start_sim, tmp_path):
    cuda = tmp_path / "cuda"
    cuda.mkdir()
    sim = start_sim(env={"LLMUX_SIM_FAKE_CUDA_DIR": str(cuda)})
    st = sim.state()
    engine_file = cuda / str(st["engine_pid"])
    assert (cuda / str(st["pid"])).read_text() == "running" and engine_file.read_text() == "running"
    assert st["fake_cuda"] == "running" and sim.complete()[0] == 200
    for state in ("locked", "checkpointed"):
        engine_file.write_text(state)
        assert sim.complete() == (503, {"error": f"CUDA state is {state}"})
        assert sim.state()["fake_cuda"] == state
    engine_file.write_text("running")
    assert sim.complete()[0] == 200
    assert sim.state()["completions"] == 2


def _torch_cuda():
    try:
        import torch
        return torch.cuda.is_available()
    except ImportError:
        return False


@pytest.mark.skipif(_torch_cuda(), reason="torch with CUDA is available")
def test_cuda_mb_without_gpu_is_ignored(start_sim):
    sim = start_sim("--cuda-mb", "8")
    assert sim.state()["cuda"] is None
    assert "--cuda-mb 8 ignored" in sim.err.read_text()


@pytest.mark.skipif(not _torch_cuda(), reason="needs torch with CUDA")
def test_real_cuda_memory_follows_sleep_levels(start_sim):
    sim = start_sim("--cuda-mb", "64", "--enable-sleep-mode", wait=False)
    sim.wait_ready(timeout=30)

    def cuda():
        return sim.state()["cuda"]

    assert cuda()["mb"] == 64 and cuda()["intact"] is True
    sim.request("POST", "/sleep?level=1")
    assert cuda()["resident"] is False
    sim.request("POST", "/wake_up")
    assert cuda()["intact"] is True
    sim.request("POST", "/sleep?level=2")
    sim.request("POST", "/wake_up")
    assert cuda() == dict(cuda(), resident=True, intact=False)
    sim.json("POST", "/collective_rpc", {"method": "reload_weights"})
    assert cuda()["intact"] is True


# --- tensor parallelism: Worker_TP<i> processes and their NCCL group ---------

def ppid(pid):
    with open(f"/proc/{pid}/stat") as f:
        return int(f.read().rsplit(")", 1)[1].split()[1])


NCCL_DOWN = (503, {"error": "NCCL group is down"})


@pytest.mark.parametrize("flag", [["--tensor-parallel-size", "2"], ["-tp", "2"],
                                  ["--tensor-parallel-size=2"], ["-tp=2"]])
def test_tp_spawns_workers_in_the_process_group(start_sim, flag):
    sim = start_sim(*flag)
    st = sim.state()
    assert st["tp"] == 2 and st["nccl"] == "up" and st["cuda"] is None
    workers = st["workers"]
    assert [w["rank"] for w in workers] == [0, 1]
    assert all(w["nccl"] == "up" and w["cuda"] is None and w["fake_cuda"] is None for w in workers)
    pids = [w["pid"] for w in workers]
    # No setsid: API server, engine and both workers share one group; the engine spawned them.
    assert sorted(group_pids(sim.proc.pid)) == sorted([sim.proc.pid, st["engine_pid"], *pids])
    assert [ppid(p) for p in pids] == [st["engine_pid"]] * 2
    assert sim.json("POST", "/sim/allreduce") == (
        200, {"ok": True, "expected": 3, "values": [3, 3], "real": False})
    status, body = sim.complete()
    assert status == 200 and body["llmux_sim"]["completions"] == 1
    assert sim.state()["completions"] == 1


def test_allreduce_at_tp1(start_sim):
    sim = start_sim()
    assert sim.json("POST", "/sim/allreduce") == (
        200, {"ok": True, "expected": 1, "values": [1], "real": False})
    # TP=1 has no NCCL group: unpatched vLLM's answer, as before
    assert sim.json("POST", "/collective_rpc", {"method": "suspend_nccl"})[0] == 500


def test_tp_suspend_and_resume_nccl(start_sim):
    sim = start_sim("-tp", "3", "--enable-sleep-mode")
    good = sim.complete()[1]["choices"][0]["text"]
    status, body = sim.json("POST", "/collective_rpc", {"method": "suspend_nccl"})
    assert status == 200 and body["results"] == [
        {"rank": r, "nccl": "down", "changed": True} for r in range(3)]
    st = sim.state()
    assert st["nccl"] == "down" and [w["nccl"] for w in st["workers"]] == ["down"] * 3
    assert sim.complete() == NCCL_DOWN
    assert sim.json("POST", "/sim/allreduce") == NCCL_DOWN
    # twice is harmless
    status, body = sim.json("POST", "/collective_rpc", {"method": "suspend_nccl"})
    assert status == 200 and [r["changed"] for r in body["results"]] == [False] * 3
    # sleep and wake need no collectives
    assert sim.request("POST", "/sleep?level=1")[0] == 200
    assert sim.request("POST", "/wake_up")[0] == 200
    assert sim.complete() == NCCL_DOWN
    status, body = sim.json("POST", "/collective_rpc", {"method": "resume_nccl"})
    assert status == 200 and body["results"] == [
        {"rank": r, "nccl": "up", "changed": True} for r in range(3)]
    st = sim.state()
    assert st["nccl"] == "up" and st["nccl_generation"] == 1
    status, body = sim.json("POST", "/collective_rpc", {"method": "resume_nccl"})  # up already
    assert status == 200 and [r["changed"] for r in body["results"]] == [False] * 3
    assert sim.state()["nccl_generation"] == 1
    assert sim.json("POST", "/sim/allreduce") == (
        200, {"ok": True, "expected": 6, "values": [6, 6, 6], "real": False})
    status, body = sim.complete()
    assert status == 200 and body["choices"][0]["text"] == good
    assert body["llmux_sim"]["completions"] == 2  # the refused ones were not counted
    # level 2 applies to every worker: garbage until reload_weights, one result per rank
    assert sim.request("POST", "/sleep?level=2")[0] == 200
    assert sim.request("POST", "/wake_up")[0] == 200
    assert sim.complete()[1]["choices"][0]["text"] == "!" * 6
    assert sim.json("POST", "/collective_rpc", {"method": "reload_weights"}) == (
        200, {"results": [None, None, None]})
    assert sim.complete()[1]["choices"][0]["text"] == good
    assert sim.json("POST", "/collective_rpc", {"method": "no_such"})[0] == 500


def test_tp_fake_cuda_per_worker_gates_work(start_sim, tmp_path):
    cuda = tmp_path / "cuda"
    cuda.mkdir()
    sim = start_sim("-tp", "2", env={"LLMUX_SIM_FAKE_CUDA_DIR": str(cuda)})
    st = sim.state()
    pids = [w["pid"] for w in st["workers"]]
    assert sorted(os.listdir(cuda)) == sorted(str(p) for p in [st["pid"], st["engine_pid"], *pids])
    assert [w["fake_cuda"] for w in st["workers"]] == ["running", "running"]
    rank1 = cuda / str(pids[1])
    for state in ("locked", "checkpointed"):
        rank1.write_text(state)
        refused = (503, {"error": f"CUDA state is {state} (Worker_TP1)"})
        assert sim.complete() == refused
        assert sim.json("POST", "/sim/allreduce") == refused
        assert sim.json("POST", "/collective_rpc", {"method": "suspend_nccl"}) == refused
        assert [w["fake_cuda"] for w in sim.state()["workers"]] == ["running", state]
    assert sim.state()["nccl"] == "up"  # the refused suspend changed nothing
    rank1.write_text("running")
    assert sim.complete()[0] == 200 and sim.json("POST", "/sim/allreduce")[0] == 200
    assert sim.state()["completions"] == 1


def test_tp_sigterm_leaves_no_worker(start_sim, tmp_path):
    cuda = tmp_path / "cuda"
    cuda.mkdir()
    sim = start_sim("--tensor-parallel-size", "2", "--fake-cuda-dir", str(cuda))
    st = sim.state()
    pids = [st["engine_pid"]] + [w["pid"] for w in st["workers"]]
    assert len(os.listdir(cuda)) == 4
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.proc.wait(5) == 0
    assert not any(alive(p) for p in pids) and group_pids(sim.proc.pid) == []
    assert os.listdir(cuda) == []
    assert not [f for f in os.listdir(sim_tp.store_dir())
                if f.startswith(f"llmux-sim-{st['engine_pid']}-")]


def test_tp_workers_exit_when_the_engine_dies(start_sim):
    sim = start_sim("-tp", "2", env={"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"})
    st = sim.state()
    pids = [w["pid"] for w in st["workers"]]
    os.kill(st["engine_pid"], signal.SIGKILL)
    t0 = time.monotonic()
    assert wait_for(lambda: not any(alive(p) for p in pids), timeout=2)
    assert time.monotonic() - t0 < 1.5  # the death pipe, not a timeout
    assert wait_for(lambda: sim.health() == 503)
    assert group_pids(sim.proc.pid) == [sim.proc.pid]


def test_tp_worker_death_kills_the_engine(start_sim, tmp_path):
    # vLLM's executor watches its workers: one dies, the engine shuts down.
    cuda = tmp_path / "cuda"
    sim = start_sim("-tp", "2", "--fake-cuda-dir", str(cuda),
                    env={"VLLM_KEEP_ALIVE_ON_ENGINE_DEATH": "1"})
    st = sim.state()
    assert (cuda / str(st["engine_pid"])).exists()
    os.kill(st["workers"][1]["pid"], signal.SIGKILL)
    assert wait_for(lambda: group_pids(sim.proc.pid) == [sim.proc.pid])
    assert sim.health() == 503 and sim.complete()[0] == 500
    assert "Worker_TP1" in sim.err.read_text()
    # the engine's exit from its monitor thread still removes its fake CUDA file
    assert not (cuda / str(st["engine_pid"])).exists()


def _gpus():
    try:
        import torch
        return torch.cuda.device_count() if torch.cuda.is_available() else 0
    except ImportError:
        return 0


@pytest.mark.skipif(_gpus() < 2, reason="needs torch with 2 GPUs")
def test_real_nccl_tp2(start_sim):
    sim = start_sim("-tp", "2", "--cuda-mb", "64", "--enable-sleep-mode", wait=False)
    sim.wait_ready(timeout=120)
    st = sim.state()
    engine_pid = st["engine_pid"]

    def workers_cuda():
        return [w["cuda"] for w in sim.state()["workers"]]

    assert [c["mb"] for c in workers_cuda()] == [64, 64]
    assert all(c["intact"] and c["resident"] for c in workers_cuda())
    assert st["cuda"]["intact"] is True and st["cuda"]["mb"] == 128
    real_ok = (200, {"ok": True, "expected": 3, "values": [3, 3], "real": True})
    assert sim.json("POST", "/sim/allreduce") == real_ok
    gen0 = os.path.join(sim_tp.store_dir(), f"llmux-sim-{engine_pid}-gen0")
    for _ in range(2):
        assert sim.json("POST", "/collective_rpc", {"method": "suspend_nccl"}, timeout=120)[0] == 200
        assert not os.path.exists(gen0)  # no store is left between generations
        assert sim.json("POST", "/sim/allreduce") == NCCL_DOWN
        assert all(c["intact"] for c in workers_cuda())
        assert sim.json("POST", "/collective_rpc", {"method": "resume_nccl"}, timeout=120)[0] == 200
        assert sim.json("POST", "/sim/allreduce") == real_ok
        assert sim.complete()[0] == 200
    assert all(c["intact"] for c in workers_cuda())
    sim.request("POST", "/sleep?level=1")
    assert [c["resident"] for c in workers_cuda()] == [False, False]
    sim.request("POST", "/wake_up")
    assert all(c["intact"] for c in workers_cuda())
    sim.request("POST", "/sleep?level=2")
    sim.request("POST", "/wake_up")
    assert [c["intact"] for c in workers_cuda()] == [False, False]
    sim.json("POST", "/collective_rpc", {"method": "reload_weights"})
    assert all(c["intact"] for c in workers_cuda())
    assert sim.json("POST", "/sim/allreduce") == real_ok
    sim.proc.send_signal(signal.SIGTERM)
    assert sim.proc.wait(30) == 0 and group_pids(sim.proc.pid) == []


@pytest.mark.skipif(not _torch_cuda(), reason="needs torch with CUDA")
def test_tp_larger_than_the_gpu_count_fails_start(start_sim):
    sim = start_sim("-tp", str(_gpus() + 1), "--cuda-mb", "8", wait=False)
    assert sim.proc.wait(120) == 1
    err = sim.err.read_text()
    assert "Engine core initialization failed" in err and f"needs {_gpus() + 1} GPUs" in err
    assert group_pids(sim.proc.pid) == []


def test_idle_keep_alive_connection_is_closed_after_5_s_as_uvicorn_does(start_sim):
    """vLLM's uvicorn closes a keep-alive connection idle for 5 s (seen under the front's
    pool on the GPU machine); a request in progress keeps its connection."""
    sim = start_sim(env={"VLLM_HTTP_TIMEOUT_KEEP_ALIVE": "1"})
    conn = http.client.HTTPConnection("127.0.0.1", sim.port, timeout=10)
    conn.request("GET", "/health")
    assert conn.getresponse().read() is not None
    conn.request("GET", "/health")  # at once: the same connection serves it
    assert conn.getresponse().status == 200
    sock = conn.sock
    time.sleep(1.6)
    assert sock.recv(1) == b""  # the server closed it: EOF
    conn.close()
