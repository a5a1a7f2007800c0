"""HTTP load for the front rows: wrk as the load generator, nginx as the C reference proxy.

The client must not be what is measured: Python clients (threads under one GIL)
spent more CPU per request than the proxy under test, and their queueing showed
up as latency on both sides. wrk (Debian's `wrk`, C, epoll) drives the
connections instead, in a process of its own with one thread; its Lua hook
`done` prints the latency percentiles and error counts as one JSON line.

nginx (Debian's `nginx-light`) runs from a temporary prefix with its own config:
one worker (the front is one thread too), an upstream block with keep-alive
connections, and proxy_buffering off so SSE events pass as they come, as the
front passes them.
"""

from __future__ import annotations

import json
import socket
import subprocess

from .harness import Ctx, ensure_tool, free_port, wait_for

WRK_SCRIPT = r"""
local bodies = {}
for m in string.gmatch(os.getenv("BENCH_MODELS") or "a", "[^,]+") do
  bodies[#bodies + 1] = string.format(
    '{"model": "%s", "prompt": "hi", "max_tokens": %s, "stream": %s}',
    m, os.getenv("BENCH_TOKENS") or "1", os.getenv("BENCH_STREAM") or "false")
end
local think = tonumber(os.getenv("BENCH_THINK_MS") or "0")
if think > 0 then
  -- a client that reads its answer, then thinks: uniform in [think/2, 3 think/2] ms
  delay = function() return math.random(math.floor(think / 2), math.floor(think * 3 / 2)) end
end
local n = 0
request = function()
  -- each request names the model after the one its predecessor named
  n = n + 1
  return wrk.format("POST", "/v1/completions", {["Content-Type"] = "application/json"},
                    bodies[(n % #bodies) + 1])
end
done = function(summary, latency, requests)
  local e = summary.errors
  io.write(string.format(
    '{"p50_us": %d, "p99_us": %d, "max_us": %d, "requests": %d, "duration_us": %d, ' ..
    '"socket_errors": %d, "non2xx": %d}\n',
    latency:percentile(50), latency:percentile(99), latency.max, summary.requests,
    summary.duration, e.connect + e.read + e.write + e.timeout, e.status))
end
"""


def wrk(ctx: Ctx, port: int, connections: int, seconds: float, models=("a",), tokens: int = 1,
        stream: bool = False, timeout: float = 10.0, think_ms: int = 0) -> dict:
    """One wrk run against 127.0.0.1:port; its summary, latencies in ms. think_ms: each
    connection waits about that long between an answer and its next request."""
    script = ctx.root / "front.lua"
    if not script.exists():
        script.write_text(WRK_SCRIPT)
    env = ctx.env(BENCH_MODELS=",".join(models), BENCH_TOKENS=str(tokens),
                  BENCH_STREAM="true" if stream else "false", BENCH_THINK_MS=str(think_ms))
    argv = [ensure_tool(ctx, "wrk", "wrk")[0], "-t1", f"-c{connections}", f"-d{seconds:g}s", f"--timeout={timeout:g}s",
            "-s", str(script), f"http://127.0.0.1:{port}/v1/completions"]
    out = subprocess.run(argv, capture_output=True, text=True, env=env, timeout=seconds + 60)
    line = [x for x in out.stdout.splitlines() if x.startswith("{")]
    if out.returncode != 0 or not line:
        raise RuntimeError(f"wrk failed ({out.returncode}): {out.stdout[-500:]} {out.stderr[-500:]}")
    r = json.loads(line[-1])
    r["p50"], r["p99"], r["max"] = r["p50_us"] / 1000, r["p99_us"] / 1000, r["max_us"] / 1000
    r["seconds"] = r["duration_us"] / 1e6
    r["lost"] = r["socket_errors"] + r["non2xx"]
    return r


NGINX_CONF = """
daemon off;
master_process on;
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  client_body_temp_path {dir}/body;
  proxy_temp_path {dir}/proxy;
  fastcgi_temp_path {dir}/fastcgi;
  uwsgi_temp_path {dir}/uwsgi;
  scgi_temp_path {dir}/scgi;
  upstream model {{ server 127.0.0.1:{upstream}; keepalive 128; }}
  server {{
    listen 127.0.0.1:{port};
    keepalive_requests 1000000;
    location / {{
      proxy_pass http://model;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_buffering off;
      proxy_request_buffering off;
    }}
  }}
}}
"""


class Nginx:
    """nginx as a plain keep-alive reverse proxy to one upstream port."""

    def __init__(self, ctx: Ctx, upstream: int) -> None:
        self.ctx = ctx
        self.dir = ctx.workdir("nginx")
        self.dir.chmod(0o755)  # the worker runs as nobody
        self.port = free_port()
        (self.dir / "nginx.conf").write_text(NGINX_CONF.format(dir=self.dir, port=self.port,
                                                               upstream=upstream))
        self.proc: subprocess.Popen | None = None

    def start(self) -> "Nginx":
        binary, _ = ensure_tool(self.ctx, "nginx", "nginx-light")
        self.proc = subprocess.Popen([binary, "-p", str(self.dir), "-c", str(self.dir / "nginx.conf")],
                                     stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                     stderr=open(self.dir / "stderr.log", "ab"),
                                     start_new_session=True, env=self.ctx.env())
        wait_for(self._answers, timeout=10, what="nginx to listen")
        return self

    def _answers(self) -> bool:
        if self.proc.poll() is not None:
            raise RuntimeError(f"nginx exited: {(self.dir / 'stderr.log').read_text()[-500:]}"
                               f"{(self.dir / 'error.log').read_text()[-500:]}")
        try:
            socket.create_connection(("127.0.0.1", self.port), timeout=1).close()
            return True
        except OSError:
            return False

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()  # SIGTERM: the master stops its worker and exits
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
