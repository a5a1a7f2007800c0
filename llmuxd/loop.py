"""The reactor: one selector, one timer heap, one wakeup socket. Knows nothing of models.

Every event source of the daemon enters here: signals (through
`signal.set_wakeup_fd`, so a handler never runs daemon code), sockets (the
control socket, HTTP calls to vLLM), pidfds, timers (a heap of monotonic
deadlines), and the config watcher thread, which may only call `wake()`.
Callbacks run on the loop thread, one at a time; an exception in one is logged
and never stops the loop.
"""

from __future__ import annotations

import heapq
import itertools
import logging
import selectors
import signal
import socket
import time
from typing import Callable

log = logging.getLogger(__name__)

# A namespace init drops signals it has no handler for, so every signal an
# operator may send gets one (a no-op: the wakeup fd carries the number).
HANDLED_SIGNALS = (signal.SIGTERM, signal.SIGINT, signal.SIGHUP, signal.SIGQUIT,
                   signal.SIGUSR1, signal.SIGUSR2, signal.SIGCHLD)
WAKE_BYTE = 0  # not a signal number: a plain "look again" from another thread


class Timer:
    __slots__ = ("when", "callback", "cancelled")

    def __init__(self, when: float, callback: Callable[[], None]) -> None:
        self.when = when
        self.callback = callback
        self.cancelled = False

    def cancel(self) -> None:
        self.cancelled = True


class Reactor:
    def __init__(self, on_signal: Callable[[int], None]) -> None:
        self.selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Timer]] = []
        self._seq = itertools.count()
        self._rsock, self._wsock = socket.socketpair()
        for s in (self._rsock, self._wsock):
            s.setblocking(False)
        self._on_signal = on_signal
        self._old_handlers: dict[int, object] = {}
        self._old_wakeup_fd: int | None = None
        self.after_events: list[Callable[[], None]] = []
        self.add_reader(self._rsock, self._drain_wakeups)

    # -- registration -------------------------------------------------------
    def add_reader(self, fileobj, callback: Callable[[], None]) -> None:
        self._register(fileobj, selectors.EVENT_READ, callback, None)

    def add_writer(self, fileobj, callback: Callable[[], None]) -> None:
        self._register(fileobj, selectors.EVENT_WRITE, None, callback)

    def remove_reader(self, fileobj) -> None:
        self._unregister(fileobj, selectors.EVENT_READ)

    def remove_writer(self, fileobj) -> None:
        self._unregister(fileobj, selectors.EVENT_WRITE)

    def forget(self, fileobj) -> None:
        try:
            self.selector.unregister(fileobj)
        except (KeyError, ValueError):
            pass

    def _register(self, fileobj, event, on_read, on_write) -> None:
        try:
            key = self.selector.get_key(fileobj)
        except (KeyError, ValueError):
            self.selector.register(fileobj, event, [on_read, on_write])
            return
        if key.events & event:  # only the callback changes: no epoll_ctl, no new key
            key.data[0 if on_read else 1] = on_read or on_write
            return
        r, w = key.data
        data = [on_read or r, on_write or w]
        self.selector.modify(fileobj, key.events | event, data)

    def _unregister(self, fileobj, event) -> None:
        try:
            key = self.selector.get_key(fileobj)
        except (KeyError, ValueError):
            return
        events = key.events & ~event
        if not events:
            self.selector.unregister(fileobj)
            return
        r, w = key.data
        data = [None if event == selectors.EVENT_READ else r,
                None if event == selectors.EVENT_WRITE else w]
        self.selector.modify(fileobj, events, data)

    def call_later(self, delay: float, callback: Callable[[], None]) -> Timer:
        timer = Timer(time.monotonic() + max(0.0, delay), callback)
        heapq.heappush(self._timers, (timer.when, next(self._seq), timer))
        return timer

    def wake(self) -> None:
        """Thread-safe: make the loop run a pass (the watcher thread's only call)."""
        try:
            self._wsock.send(bytes([WAKE_BYTE]))
        except (BlockingIOError, OSError):
            pass  # the buffer is full: the loop is going to wake anyway

    # -- signals ------------------------------------------------------------
    def install_signals(self) -> None:
        self._old_wakeup_fd = signal.set_wakeup_fd(self._wsock.fileno(), warn_on_full_buffer=False)
        for sig in HANDLED_SIGNALS:
            self._old_handlers[sig] = signal.signal(sig, _noop)

    def restore_signals(self) -> None:
        for sig, old in self._old_handlers.items():
            signal.signal(sig, old)  # type: ignore[arg-type]
        self._old_handlers.clear()
        if self._old_wakeup_fd is not None:
            signal.set_wakeup_fd(self._old_wakeup_fd)
            self._old_wakeup_fd = None

    def _drain_wakeups(self) -> None:
        while True:
            try:
                data = self._rsock.recv(4096)
            except (BlockingIOError, InterruptedError):
                return
            if not data:
                return
            # The same signal twice in one read still matters (a second TERM
            # means "hurry"), so deliver each byte; SIGCHLD bursts collapse.
            seen_chld = False
            for b in data:
                if b == WAKE_BYTE:
                    self._on_signal(0)
                elif b == signal.SIGCHLD:
                    if not seen_chld:
                        seen_chld = True
                        self._on_signal(b)
                else:
                    self._on_signal(b)

    # -- running ------------------------------------------------------------
    def run_once(self, max_wait: float = 1.0) -> None:
        timeout = max_wait
        while self._timers and self._timers[0][2].cancelled:
            heapq.heappop(self._timers)
        if self._timers:
            timeout = min(timeout, max(0.0, self._timers[0][0] - time.monotonic()))
        for key, mask in self.selector.select(timeout):
            on_read, on_write = key.data
            if mask & selectors.EVENT_READ and on_read:
                self._safely(on_read)
            if mask & selectors.EVENT_WRITE and on_write:
                self._safely(on_write)
        now = time.monotonic()
        while self._timers and self._timers[0][0] <= now:
            _, _, timer = heapq.heappop(self._timers)
            if not timer.cancelled:
                self._safely(timer.callback)
        for hook in self.after_events:
            self._safely(hook)

    def run(self, until: Callable[[], bool]) -> None:
        while not until():
            self.run_once()

    def close(self) -> None:
        self.restore_signals()
        self.selector.close()
        self._rsock.close()
        self._wsock.close()

    @staticmethod
    def _safely(callback: Callable[[], None]) -> None:
        try:
            callback()
        except Exception:  # a bug in one handler must not take the GPU box down
            log.exception("unhandled error in event handler %r", callback)


class Outbox:
    """The unsent bytes of one non-blocking stream socket, written as the peer takes them.

    The control socket and the HTTP front both answer peers that may read slowly or
    never (llmuxd is root: they are hostile): nothing here blocks, and a writer is
    registered with the reactor only while bytes wait, so a send that completes at
    once costs no selector call. `on_drained` fires once (then is cleared) when the
    backlog falls to `low_water`: a streaming producer's cue to send more.
    `corked`: writes are held, then leave in one send at flush(). The owner bounds
    the backlog (it knows whether to drop the peer or to stop producing)."""

    __slots__ = ("reactor", "sock", "buf", "low_water", "corked", "closed", "last_sent",
                 "on_drained", "on_flushed", "_on_error", "_writing")

    def __init__(self, reactor: Reactor, sock, on_error: Callable[[], None],
                 low_water: int = 0) -> None:
        self.reactor, self.sock, self._on_error = reactor, sock, on_error
        self.buf = bytearray()
        self.low_water = low_water
        self.corked = False
        self.closed = False               # the owner closed the socket: write nothing more
        self.last_sent = time.monotonic()  # when the peer last took bytes
        self.on_drained: Callable[[], None] | None = None
        self.on_flushed: Callable[[], None] | None = None  # everything sent (close after it)
        self._writing = False

    def __len__(self) -> int:
        return len(self.buf)

    def write(self, data) -> None:
        if self.closed or not data:
            return
        if self.buf or self.corked:
            self.buf += data
            return
        try:  # the common case: straight out, no copy
            sent = self.sock.send(data)
        except (BlockingIOError, InterruptedError):
            sent = 0
        except OSError:
            self._on_error()
            return
        if sent:
            self.last_sent = time.monotonic()
        if sent < len(data):
            self.buf += memoryview(data)[sent:]
            self._wait()

    def flush(self) -> None:
        while self.buf and not self.closed:
            try:
                sent = self.sock.send(self.buf)
            except (BlockingIOError, InterruptedError):
                self._wait()
                return
            except OSError:
                self._on_error()
                return
            self.last_sent = time.monotonic()
            del self.buf[:sent]
            self._drained()
        if self.closed:
            return
        if self._writing:
            self._writing = False
            self.reactor.remove_writer(self.sock)
        self._drained()
        if self.on_flushed is not None and not self.buf and not self.closed:
            self.on_flushed()

    def _drained(self) -> None:
        if self.on_drained is not None and len(self.buf) <= self.low_water and not self.closed:
            more, self.on_drained = self.on_drained, None
            more()

    def _wait(self) -> None:
        if not self._writing:
            self._writing = True
            self.reactor.add_writer(self.sock, self.flush)


def _noop(signum, frame) -> None:  # the wakeup fd does the work
    pass
