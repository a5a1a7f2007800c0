"""Keep-alive connections to the models' servers, kept per model between requests.

A connect costs little on loopback, but not nothing: through the front every
request used to pay a connect, the server's accept and a close on both sides,
and a burst of clients overflowed a small listen backlog (a 1 s SYN retry).
So an upstream connection whose exchange ended cleanly (request sent, response
read to its end, keep-alive on both sides)
comes back here, and the next request for that model takes it.

What makes it safe:
- A connection belongs to one model and one address: never lent to another.
- Only a model that is active keeps connections: the moment it leaves the
  active state (drain, sleep, stop, crash) every idle one is closed
  (`drop`), and an exchange that ends later is not taken back.
- An idle connection is watched: a byte or an EOF from the server (it closed
  its end, uvicorn does after 5 s idle) drops it at once, and none is kept
  longer than IDLE_LIMIT, shorter than that timeout. The race that is left,
  a close in flight as a request goes out, is the proxy's to retry (proxy.py).
- Any error, a cancelled request, a response that must close: the socket is
  closed, never pooled.
"""

from __future__ import annotations

import socket
import time
from typing import Callable

IDLE_LIMIT = 4.0       # uvicorn's (vLLM's) keep-alive timeout is 5 s
MAX_IDLE = 128         # per model: more than the clients of one burst need
SWEEP = 1.0


class Pooled:
    """One idle connection, its last exchange complete, ready for a next request."""
    __slots__ = ("model", "addr", "sock", "since")

    def __init__(self, model: str, addr: tuple[str, int], sock: socket.socket) -> None:
        self.model, self.addr, self.sock = model, addr, sock
        self.since = time.monotonic()


class Pool:
    def __init__(self, reactor, keeps: Callable[[str], bool]) -> None:
        self.reactor = reactor
        self.keeps = keeps                  # model -> may it hold connections now
        self.idle: dict[str, list[Pooled]] = {}
        self._sweeping = False
        self.reused = 0                     # for status and the benchmarks

    def take(self, model: str, addr: tuple[str, int]) -> Pooled | None:
        """The most recently used idle connection of `model` to `addr`, or None.
        Its idle reader goes (a close by the server while a long request is being
        sent would wake a level-triggered loop on every pass); the taker sets its own
        once the request is out."""
        idle = self.idle.get(model)
        while idle:
            p = idle.pop()
            if p.addr == addr:
                self.reused += 1
                self.reactor.remove_reader(p.sock)
                return p
            self._close(p)  # the model moved (a reload changed its port)
        return None

    def give(self, model: str, addr: tuple[str, int], sock: socket.socket) -> bool:
        """Take back a connection whose exchange ended cleanly (the whole request sent,
        the whole response read, keep-alive on both sides: the caller knows); False:
        the caller closes it."""
        if not self.keeps(model):
            return False
        idle = self.idle.setdefault(model, [])
        if len(idle) >= MAX_IDLE:
            return False
        p = Pooled(model, addr, sock)
        idle.append(p)
        self.reactor.add_reader(sock, lambda: self._gone(p))
        if not self._sweeping:
            self._sweeping = True
            self.reactor.call_later(SWEEP, self._sweep)
        return True

    def drop(self, model: str) -> None:
        """`model` left the active state: none of its connections is used again."""
        for p in self.idle.pop(model, []):
            self._close(p)

    def close(self) -> None:
        for model in list(self.idle):
            self.drop(model)

    def count(self) -> int:
        return sum(len(v) for v in self.idle.values())

    def _gone(self, p: Pooled) -> None:
        # Idle means the server has nothing to say: a byte is a protocol error, an
        # EOF its close. Either way the connection is finished.
        # Not idle any more: taken in this same loop pass (the selector handed out this
        # callback before the taker set its own): the taker owns the socket now, and
        # finds the close itself (and tries again on a new connection).
        idle = self.idle.get(p.model)
        if idle is None or p not in idle:
            return
        idle.remove(p)
        self._close(p)

    def _close(self, p: Pooled) -> None:
        self.reactor.forget(p.sock)
        p.sock.close()

    def _sweep(self) -> None:
        limit = time.monotonic() - IDLE_LIMIT
        for model, idle in list(self.idle.items()):
            old = [p for p in idle if p.since < limit]
            for p in old:
                idle.remove(p)
                self._close(p)
            if not idle:
                del self.idle[model]
        if self.idle:
            self.reactor.call_later(SWEEP, self._sweep)
        else:
            self._sweeping = False
