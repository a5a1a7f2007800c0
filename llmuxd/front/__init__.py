"""The OpenAI-compatible front: one endpoint for every model of the catalog.

server.py speaks HTTP to clients, routes.py decides what a request needs,
demand.py queues requests for models that are not active and asks for swaps,
proxy.py streams a request to its model's server and the answer back. This
module wires them to the daemon: authentication, and the daemon's view
(catalog, runtime records, jobs) that the others read but never change.
"""

from __future__ import annotations

import hmac
import json
import logging
import time

from .. import launch, metrics
from .. import states as S
from ..catalog_values import is_loopback, split_listen
from .demand import Demand, Task
from .pool import Pool
from .proxy import Upstream, request_headers
from .routes import (FRONT_HEALTH, FRONT_METRICS, FRONT_MODELS, Reply, Route, error, json_reply,
                     models_list, route)
from .server import FrontServer

log = logging.getLogger(__name__)
# A model's server that refuses connections while llmuxd still has it active has
# most likely just died: supervision notices within moments, and the request then
# waits for the restart in the queue. Until then it is tried again every
# REFUSED_RETRY; after REFUSED_GRACE it gets its 502.
REFUSED_RETRY = 0.05
REFUSED_GRACE = 5.0


def metrics_reply(daemon) -> Reply:
    return Reply(200, metrics.render(daemon), (("Content-Type", metrics.CONTENT_TYPE),))


class Front:
    def __init__(self, daemon) -> None:
        self.d = daemon
        s = daemon.catalog.daemon.front
        self.server = FrontServer(daemon.reactor, s.host, s.port, self.on_request,
                                  self.abandon)
        self.demand = Demand(daemon, self._dispatch)
        self.pool = Pool(daemon.reactor, self._keeps)
        self.requests = 0

    @property
    def settings(self):
        return self.d.catalog.daemon.front

    def start(self) -> None:
        self.server.start()
        self.d.reactor.after_events.append(self.demand.pump)
        s = self.settings
        log.info("front listening on %s (%s)", s.listen,
                 f"{len(s.api_keys)} API key(s)" if s.api_keys else "no API keys")
        if not s.api_keys and not is_loopback(s.host):
            log.warning("front: listening on %s beyond loopback WITHOUT api_keys: anyone who "
                        "reaches this port can use, and swap, every model (set "
                        "[daemon.front] api_keys)", s.listen)

    def shutdown(self) -> None:
        """Stop taking requests; answer the waiting ones; streams run on until their
        model stops."""
        self.server.stop_listening()
        self.demand.fail_all("llmuxd is shutting down")

    def close(self) -> None:
        # An answer still running ends as a failure its client can read (a stream: an
        # error event), not as a bare close that looks like a network fault.
        for conn in list(self.server.conns):
            upstream = getattr(conn.task, "upstream", None)
            if upstream is not None and not upstream.finished:
                upstream.timed_out("llmuxd stopped before the answer was complete")
        self.server.close()
        self.pool.close()

    # -- what the daemon asks ----------------------------------------------------------
    def in_flight(self, name: str) -> int:
        return self.demand.in_flight.get(name, 0)

    def total_in_flight(self) -> int:
        return sum(self.demand.in_flight.values())

    def on_transition(self, name: str, after: str) -> None:
        if after != S.ACTIVE:
            self.pool.drop(name)  # drained, asleep, stopped or dead: its connections are over
        self.demand.on_transition(name, after)

    def _keeps(self, name: str) -> bool:
        rt = self.d.runtimes.get(name)
        return rt is not None and rt.state == S.ACTIVE and not self.d.shutting_down

    def status(self) -> dict:
        return {"listen": self.settings.listen, "queued": self.demand.queued(),
                "in_flight": {k: v for k, v in self.demand.in_flight.items() if v},
                "requests": self.requests, "upstream_reused": self.pool.reused,
                "upstream_idle": self.pool.count()}

    # -- one request --------------------------------------------------------------------
    def _authorized(self, headers) -> bool:
        keys = self.settings.api_keys
        if not keys:
            return True
        given = b""
        for name, value in headers:
            if name == b"authorization" and value[:7].lower() == b"bearer ":
                given = value[7:].strip()
        # Every key is compared, whatever matched: the time taken says nothing.
        ok = False
        for key in keys:
            ok |= hmac.compare_digest(given, key.encode())
        return ok

    def on_request(self, conn) -> None:
        self.requests += 1
        req = conn.request
        method, target = req.method.decode("ascii", "replace"), req.target.decode("latin-1")
        what = route(method, target, bytes(conn.body), self.d.catalog)
        if what == FRONT_HEALTH:
            conn.reply(json_reply(200, {"status": "ok"}))  # no key needed: a load balancer's
            return
        if not self._authorized(req.headers):
            conn.reply_error(401, "missing or wrong API key (Authorization: Bearer KEY)")
            return
        if what == FRONT_MODELS:
            conn.reply(models_list(self.d.catalog, self.d.runtimes, target.partition("?")[0]))
        elif what == FRONT_METRICS:  # behind the key like everything but /health: it names
            conn.reply(metrics_reply(self.d))  # every model and what it is doing
        elif isinstance(what, Reply):
            conn.reply(what)
        else:
            task = Task(conn, what)
            conn.task = task
            self.demand.admit(task)

    def abandon(self, task: Task) -> None:
        """Its client went away: out of the queue, or its upstream closed."""
        if task.queued:
            self.demand.abandon(task)
        elif task.upstream is not None:
            task.upstream.cancel()

    def _dispatch(self, task: Task) -> None:
        r: Route = task.route
        if task.conn.closed:
            return
        spec = self.d.spec_in_use(r.model)
        body = upstream_body(spec, r.body) if r.target.startswith("/v1/") else r.body
        req = task.conn.request
        host = launch.connect_host(spec)
        headers = request_headers(req.headers, host, spec.port, body,
                                  strip_auth=bool(self.settings.api_keys))
        self.demand.started(r.model)
        self.d.runtimes[r.model].last_used = time.time()  # LRU: served now
        task.upstream = Upstream(self.d.reactor, host, spec.port, req.method.decode(), r.target,
                                 headers, body, task.conn,
                                 done=lambda: self.demand.ended(r.model),
                                 pool=self.pool, model=r.model,
                                 refused=lambda: self._refused(task))

    def _refused(self, task: Task) -> None:
        task.upstream = None
        if task.conn.closed:
            return
        now = time.monotonic()
        if task.refused_at is None:
            task.refused_at = now
        if now - task.refused_at > REFUSED_GRACE:
            task.conn.reply_error(502, f"{task.route.model}'s server refused connections for "
                                       f"{REFUSED_GRACE:g}s")
            return
        self.d.reactor.call_later(REFUSED_RETRY, lambda: task.conn.closed or self.demand.admit(task))


def upstream_body(spec, body: bytes) -> bytes:
    """vLLM answers only to its served names: when `args` chose those, the name the
    client sent (the catalog's) becomes the first of them."""
    served = launch.served_names(spec.args)
    if not served:
        return body  # started with --served-model-name NAME ALIASES...: it knows them all
    try:
        request = json.loads(body)
    except ValueError:
        return body
    if request.get("model") in served:
        return body
    request["model"] = served[0]
    return json.dumps(request).encode()


class MetricsPort:
    """`[daemon] metrics_listen`: GET /metrics and nothing else, on a loopback port
    (the catalog refuses any other), through the front's HTTP server and limits."""

    def __init__(self, daemon) -> None:
        self.d = daemon
        self.listen = daemon.catalog.daemon.metrics_listen
        host, port = split_listen(self.listen)
        self.server = FrontServer(daemon.reactor, host, port, self.on_request, lambda task: None)

    def start(self) -> None:
        self.server.start("daemon.metrics_listen")
        log.info("metrics on http://%s/metrics", self.listen)

    def close(self) -> None:
        self.server.close()

    def on_request(self, conn) -> None:
        req = conn.request
        path = req.target.decode("latin-1").partition("?")[0]
        if path != "/metrics":
            conn.reply(error(404, f"{path[:200]}: only /metrics is served here"))
        elif req.method not in (b"GET", b"HEAD"):
            conn.reply(error(405, "only GET /metrics is served here"))
        else:
            conn.reply(metrics_reply(self.d))
