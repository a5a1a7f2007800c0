"""llmux-sim: a stand-in for `vllm serve`, so llmuxd can be tested without a GPU.

It imitates what llmuxd depends on in vLLM 0.10-0.16 (shared/research/vllm-api.md):

- Two processes, as vLLM: this API server and an EngineCore child
  (llmuxd/sim/engine.py; our side of it is client.py) in the same process
  group, so a supervisor must kill the group; the engine outlives a SIGKILLed
  API server.
- With --tensor-parallel-size N > 1 (-tp N), N worker processes more
  (llmuxd/sim/worker.py), children of the engine, in the same group: they hold
  the GPU state and an NCCL group, torn down and rebuilt by the collective_rpc
  methods suspend_nccl and resume_nccl of llmux's vLLM patch.
- The port is bound before the engine loads but listen() only once it is
  ready, so early connections are refused, as with uvicorn.
- The HTTP surface: /health, /v1/models, /v1/completions (also streamed),
  /metrics, and the dev endpoints gated by VLLM_SERVER_DEV_MODE=1, with vLLM's
  quirks (level != 1 acts as 2, sleep "works" without --enable-sleep-mode,
  garbage after a level-2 wake until reload_weights).
- SIGTERM: terminate the engine (5 s, then SIGKILL) and exit 0.  SIGTERM during
  loading raises KeyboardInterrupt, so the process dies by SIGINT, as vLLM does.

Simulator knobs (delays, failure injection, fake or real CUDA state) make the
supervisor's error paths reachable; /sim/* endpoints expose and steer them.
Standard library only, plain sockets and threads, so CRIU can dump it. This module
is the HTTP surface; process.py is the process (arguments, engine child, signals).
"""

import json
import os
import socket
import socketserver
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

from llmuxd.sim import client as sim_client

SIM_VERSION = "0.0.0+llmux.sim"


def log(msg):
    print(f"INFO {time.strftime('%m-%d %H:%M:%S')} [llmux-sim pid={os.getpid()}] {msg}", flush=True)


class SimServer(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True
    request_queue_size = 2048  # uvicorn's backlog; socketserver's 5 drops a burst's SYNs

    def __init__(self, args):
        host = args.host
        self.address_family = socket.AF_INET6 if ":" in host else socket.AF_INET
        super().__init__((host, args.port), Handler, bind_and_activate=False)
        self.args = args
        self.names = args.served_model_name or [args.model or args.model_tag]
        self.model = self.names[0]
        self.dev_mode = bool(int(os.environ.get("VLLM_SERVER_DEV_MODE", "0")))
        self.fail = {"sleep": args.fail_sleep, "wake": args.fail_wake, "health": False}
        self.in_flight = 0
        self.counter_lock = threading.Lock()
        self.state = {"sleeping": False, "level": 0, "weights_ok": True, "completions": 0}
        self.engine = None

    def server_bind(self):
        # vLLM <= 0.16 sets SO_REUSEPORT unconditionally, so a stale twin on the
        # same port can bind too: keep that hazard visible to the supervisor.
        if hasattr(socket, "SO_REUSEPORT"):
            self.socket.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
        socketserver.TCPServer.server_bind(self)  # skip HTTPServer's slow getfqdn()
        self.server_name, self.server_port = self.server_address[:2]

    def engine_call(self, op, **kw):
        reply = self.engine.call(op, **kw)
        self.state.update(reply.get("state", {}))  # /metrics reads this without the engine
        return reply

    def count(self, delta):
        with self.counter_lock:
            self.in_flight += delta


def openai_error(status, message, kind):
    return {"error": {"message": message, "type": kind, "param": None, "code": status}}


class Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    disable_nagle_algorithm = True  # as uvicorn: head and body must not wait for an ACK
    timeout = 60  # a request that stalls half way must not pin a thread forever
    # vLLM's uvicorn closes a keep-alive connection idle for 5 s between requests
    # (VLLM_HTTP_TIMEOUT_KEEP_ALIVE): a proxy that pools connections meets closed ones.
    keep_alive = float(os.environ.get("VLLM_HTTP_TIMEOUT_KEEP_ALIVE", "5"))

    def handle(self):
        self.close_connection = True
        self.handle_one_request()
        while not self.close_connection:
            self.connection.settimeout(self.keep_alive)  # waiting for the next request
            self.handle_one_request()

    def parse_request(self):
        self.connection.settimeout(self.timeout)  # the request line came: its rest may take longer
        return super().parse_request()

    ROUTES = {  # path: (method, handler suffix, needs VLLM_SERVER_DEV_MODE)
        "/health": ("GET", "health", False),
        "/ping": ("GET", "health", False),
        "/version": ("GET", "version", False),
        "/v1/models": ("GET", "models", False),
        "/v1/completions": ("POST", "completions", False),
        "/metrics": ("GET", "metrics", False),
        "/sleep": ("POST", "sleep", True),
        "/wake_up": ("POST", "wake_up", True),
        "/is_sleeping": ("GET", "is_sleeping", True),
        "/collective_rpc": ("POST", "collective_rpc", True),
        "/reset_prefix_cache": ("POST", "reset_prefix_cache", True),
        "/sim/state": ("GET", "sim_state", False),
        "/sim/fail": ("POST", "sim_fail", False),
        "/sim/crash": ("POST", "sim_crash", False),
        "/sim/allreduce": ("POST", "sim_allreduce", False),
    }

    def do_GET(self):
        self.dispatch("GET")

    def do_POST(self):
        self.dispatch("POST")

    def dispatch(self, method):
        srv = self.server
        url = urlsplit(self.path)
        self.query = parse_qs(url.query)
        try:
            self.body = self.rfile.read(int(self.headers.get("Content-Length") or 0))
        except ValueError:
            self.close_connection = True
            return self.send_json(400, {"detail": "bad Content-Length"})
        route = self.ROUTES.get(url.path)
        if route is None or (route[2] and not srv.dev_mode):
            return self.send_json(404, {"detail": "Not Found"})
        if route[0] != method:
            return self.send_json(405, {"detail": "Method Not Allowed"})
        try:
            getattr(self, "route_" + route[1])(srv)
        except sim_client.EngineDead:
            self.send_json(500, {"error": "EngineCore died (EngineDeadError)"})
        except (BrokenPipeError, ConnectionResetError):
            self.close_connection = True  # the client went away; nothing to answer

    # --- plumbing ------------------------------------------------------------

    def send_body(self, status, body=b"", ctype="application/json"):
        self.send_response(status)
        if body:
            self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def send_json(self, status, obj):
        self.send_body(status, json.dumps(obj).encode())

    def send_chunk(self, data):
        self.wfile.write(b"%x\r\n%s\r\n" % (len(data), data))

    def version_string(self):
        return "uvicorn"

    def log_request(self, code="-", size="-"):
        if not self.server.args.disable_uvicorn_access_log:
            host, port = self.client_address[:2]
            print(f'INFO:     {host}:{port} - "{self.requestline}" {int(code)}', flush=True)

    def log_message(self, fmt, *args):
        if fmt.startswith("Request timed out"):
            return  # an idle keep-alive connection closed: uvicorn says nothing either
        print("WARNING: " + fmt % args, flush=True)

    # --- vLLM routes ---------------------------------------------------------

    def route_health(self, srv):
        # vLLM's check_health() only asks "is the engine dead?", so a sleeping
        # model is healthy.
        self.send_body(200 if srv.engine.alive() and not srv.fail["health"] else 503)

    def route_version(self, srv):
        self.send_json(200, {"version": SIM_VERSION})

    def route_models(self, srv):
        now = int(time.time())
        perm = dict(id=f"modelperm-{uuid.uuid4().hex}", object="model_permission", created=now,
                    allow_create_engine=False, allow_sampling=True, allow_logprobs=True,
                    allow_search_indices=False, allow_view=True, allow_fine_tuning=False,
                    organization="*", group=None, is_blocking=False)
        card = {"id": srv.model, "object": "model", "created": now, "owned_by": "vllm",
                "root": srv.args.model or srv.args.model_tag, "parent": None,
                "max_model_len": srv.args.max_model_len, "permission": [perm]}
        self.send_json(200, {"object": "list", "data": [card]})

    def route_completions(self, srv):
        try:
            req = json.loads(self.body)
            assert isinstance(req, dict)
        except (ValueError, AssertionError):
            return self.send_json(400, openai_error(400, "body must be a JSON object", "BadRequestError"))
        model = req.get("model") or srv.model
        if model not in srv.names:  # vLLM answers to every --served-model-name
            return self.send_json(404, openai_error(404, f"The model `{model}` does not exist.",
                                                    "NotFoundError"))
        prompt = req.get("prompt")
        if isinstance(prompt, list):
            prompt = " ".join(map(str, prompt))
        max_tokens = req.get("max_tokens")
        max_tokens = 16 if max_tokens is None else max_tokens
        if not isinstance(prompt, str) or type(max_tokens) is not int or max_tokens < 1:
            return self.send_json(400, openai_error(
                400, "prompt must be a string and max_tokens a positive integer", "BadRequestError"))
        srv.count(+1)  # "running" from now until the engine is done with it
        self.running = True
        try:
            reply = srv.engine_call("generate", prompt=prompt, max_tokens=max_tokens)
            if not reply["ok"]:
                return self.send_json(reply["status"], {"error": reply["error"]})
            base = {"id": f"cmpl-{uuid.uuid4().hex}", "object": "text_completion",
                    "created": int(time.time()), "model": model,
                    "llmux_sim": {"completions": reply["completions"], "engine_pid": reply["engine_pid"]}}
            if req.get("stream"):
                self.stream(base, reply["tokens"], srv.args.token_delay)
            else:
                for _ in reply["tokens"]:
                    time.sleep(srv.args.token_delay)
                self.leave_running_gauge()
                n_prompt = max(1, len(prompt.split()))
                choice = {"index": 0, "text": "".join(reply["tokens"]), "logprobs": None,
                          "finish_reason": "length", "stop_reason": None, "prompt_logprobs": None}
                usage = {"prompt_tokens": n_prompt, "total_tokens": n_prompt + max_tokens,
                         "completion_tokens": max_tokens, "prompt_tokens_details": None}
                self.send_json(200, dict(base, choices=[choice], usage=usage))
        finally:
            self.leave_running_gauge()

    def leave_running_gauge(self):
        # Leave the running gauge before the last bytes go out, as vLLM's engine
        # does, so a client that read its answer never sees itself still running.
        if self.running:
            self.running = False
            self.server.count(-1)

    def stream(self, base, tokens, delay):
        self.send_response(200)
        self.send_header("Content-Type", "text/event-stream; charset=utf-8")
        self.send_header("Transfer-Encoding", "chunked")
        self.end_headers()
        for i, tok in enumerate(tokens):
            time.sleep(delay)
            last = i == len(tokens) - 1
            if last:
                self.leave_running_gauge()
            choice = {"index": 0, "text": tok, "logprobs": None,
                      "finish_reason": "length" if last else None, "stop_reason": None}
            self.send_chunk(b"data: %s\n\n" % json.dumps(dict(base, choices=[choice])).encode())
        self.send_chunk(b"data: [DONE]\n\n")
        self.wfile.write(b"0\r\n\r\n")

    def route_metrics(self, srv):
        text = sim_client.metrics_text(srv.model, srv.state, srv.in_flight)
        self.send_body(200, text.encode(), "text/plain; version=0.0.4; charset=utf-8")

    def route_sleep(self, srv):
        try:
            level = int(self.query.get("level", ["1"])[0])
        except ValueError as e:  # vLLM <= 0.16 does int(level) unguarded: a 500
            return self.send_json(500, {"error": f"ValueError: {e}"})
        if srv.fail["sleep"]:
            return self.send_json(500, {"error": "Call to sleep method failed: simulated failure"})
        log(f"sleep(level={level})")
        srv.engine_call("sleep", level=level)
        self.send_body(200)

    def route_wake_up(self, srv):
        if srv.fail["wake"]:
            return self.send_json(500, {"error": "Call to wake_up method failed: simulated failure "
                                                 "(CUDA Error: out of memory)"})
        tags = self.query.get("tags", [])
        log(f"wake_up(tags={tags or 'all'})")
        srv.engine_call("wake_up", tags=tags)
        self.send_body(200)

    def route_is_sleeping(self, srv):
        self.send_json(200, {"is_sleeping": srv.engine_call("state")["state"]["sleeping"]})

    def route_collective_rpc(self, srv):
        try:
            body = json.loads(self.body)
        except ValueError as e:
            return self.send_json(400, {"error": f"JSON decode error: {e}"})
        method = body.get("method") if isinstance(body, dict) else None
        if method is None:
            return self.send_json(400, {"error": "Missing 'method' in request body"})
        reply = srv.engine_call("collective_rpc", method=method)
        if not reply["ok"]:
            return self.send_json(reply["status"], {"error": reply["error"]})
        self.send_json(200, {"results": reply["results"]})

    def route_reset_prefix_cache(self, srv):
        srv.engine_call("reset_prefix_cache")
        self.send_body(200)

    # --- simulator routes ----------------------------------------------------

    def route_sim_state(self, srv):
        r = srv.engine_call("state")
        self.send_json(200, dict(
            r["state"], pid=os.getpid(), engine_pid=r["engine_pid"], model=srv.model, ready=True,
            cuda=r["cuda"], fake_cuda=r["fake_cuda"], sleep_mode_enabled=r["sleep_mode_enabled"],
            freed_mb=r["freed_mb"], sleeping_tags=r["sleeping_tags"], in_flight=srv.in_flight,
            fail=srv.fail, tp=r["tp"], workers=r["workers"], nccl=r["nccl"],
            nccl_generation=r["nccl_generation"],
            # What llmuxd gave this server to select its GPUs (the tests check it).
            env={k: os.environ.get(k) for k in ("CUDA_VISIBLE_DEVICES", "CUDA_DEVICE_ORDER")}))

    def route_sim_allreduce(self, srv):
        # Every rank all-reduces rank + 1 (NCCL on its GPU when real): a check
        # that the group works, e.g. after resume_nccl.  500 on a wrong sum.
        reply = srv.engine_call("allreduce")
        if not reply["ok"]:
            return self.send_json(reply["status"], {"error": reply["error"]})
        result = reply["allreduce"]
        self.send_json(200 if result["ok"] else 500, result)

    def route_sim_fail(self, srv):
        what = self.query.get("what", [""])[0]
        if what == "none":
            srv.fail.update(dict.fromkeys(srv.fail, False))
        elif what in srv.fail:
            srv.fail[what] = True
        else:
            return self.send_json(400, {"error": "what must be one of sleep, wake, health, none"})
        log(f"failure injection now {srv.fail}")
        self.send_json(200, {"fail": srv.fail})

    def route_sim_crash(self, srv):
        self.send_json(200, {"crashing": True})
        crash("/sim/crash")


def crash(why):
    print(f"llmux-sim: simulated crash ({why})", file=sys.stderr, flush=True)
    os._exit(1)
