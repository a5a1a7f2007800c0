"""The API server's side of the EngineCore: spawning it, talking to it, and
rendering its stats as vLLM's /metrics.

The API server (server.py) and the EngineCore (engine.py) are two processes
joined by a socketpair of newline-delimited JSON, one request at a time.  This
module is everything the API server needs of that split, and nothing the engine
runs: EngineClient starts `python -m llmuxd.sim engine --fd N --config JSON` in
the server's process group and owns its end of the socketpair; start_engine
waits for "ready" with vLLM's signal behaviour during loading; metrics_text turns
the engine's last state snapshot into Prometheus text.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading

ENGINE_STOP_TIMEOUT_S = 5.0  # vLLM joins EngineCore for 5 s, then kill_process_tree


# --- metrics: what vLLM's stats loggers publish about the engine -----------

def metrics_text(model, state, running):
    """Prometheus text for /metrics; `state` is the engine's last snapshot."""
    labels = 'model_name="%s",engine="0"' % model.replace("\\", "\\\\").replace('"', '\\"')
    level = state["level"] if state["sleeping"] else 0
    lines = []

    def metric(name, kind, help_, samples):
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{lbl} {float(v)}" for lbl, v in samples)

    metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
           [("{%s}" % labels, running)])
    metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
           [("{%s}" % labels, 0)])
    metric("vllm:engine_sleep_state", "gauge", "Engine sleep state; awake = 0 means engine is "
           "sleeping; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
           [('{%s,sleep_state="%s"}' % (labels, name), on) for name, on in (
               ("awake", not state["sleeping"]), ("weights_offloaded", level == 1),
               ("discard_all", level == 2))])
    metric("llmux_sim_completions_total", "counter", "Completions served by the simulated engine.",
           [("", state["completions"])])
    return "\n".join(lines) + "\n"


# --- the API server's side of the socketpair ---------------------------------

class EngineDead(Exception):
    pass


class EngineClient:
    """The API server's end of the socketpair: one request/response at a time."""

    def __init__(self, cfg):
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # The engine re-imports this package; make that work from any cwd.
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        # No setsid/setpgid: like vLLM, the engine stays in our process group.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmuxd.sim", "engine", "--fd", str(theirs.fileno()),
             "--config", json.dumps(cfg)], pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self.sock, self.rfile = ours, ours.makefile("rb")
        self.lock = threading.Lock()
        self.dead = False

    def read_reply(self):
        try:
            line = self.rfile.readline()
        except OSError:
            line = b""
        if not line:
            self.dead = True
            raise EngineDead("EngineCore died")
        return json.loads(line)

    def call(self, op, **kw):
        with self.lock:
            if self.dead:
                raise EngineDead("EngineCore died")
            try:
                self.sock.sendall(json.dumps(dict(kw, op=op)).encode() + b"\n")
            except OSError:
                self.dead = True
                raise EngineDead("EngineCore died")
            return self.read_reply()

    def alive(self):
        return not self.dead and self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(ENGINE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_engine(cfg, on_signal):
    """Spawn the EngineCore child, wait until it has "loaded the model", then
    hand SIGTERM and SIGINT to on_signal.

    Until then, as vLLM does, both raise KeyboardInterrupt("terminated"); left
    uncaught, CPython then dies by SIGINT.  The engine is stopped first; a
    signal landing mid-spawn is deferred until there is a child to stop.
    Raises EngineDead if the engine exits instead of becoming ready.
    """
    client, interrupted = None, []

    def interrupt(signum, frame):
        interrupted.append(signum)
        if client is not None:
            raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        client = EngineClient(cfg)
        if interrupted:
            raise KeyboardInterrupt("terminated")
        try:
            client.read_reply()  # the engine's "ready"
        except EngineDead:
            raise EngineDead(f"Failed core proc(s): {{'EngineCore_DP0': {client.proc.wait()}}}") from None
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        return client
    except KeyboardInterrupt:
        if client is not None:
            client.stop()
        raise
