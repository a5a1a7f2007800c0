"""The control socket server: listening, per-client buffers, limits.

Owns the AF_UNIX listening socket and one `Client` per connection. Complete
request lines go to `on_request(client, line)`; replies are queued on the
client and written as the socket allows, so a client that never reads can
never block the loop (its queue is capped, then it is dropped). Bounded line
length, a maximum number of clients, and an idle timeout keep one bad client
from stalling the rest. What a request means is the daemon's business.
"""

from __future__ import annotations

import errno
import logging
import os
import socket
import time
from typing import Callable

from . import trust
from .loop import Outbox
from .protocol import MAX_LINE, LineBuffer, ProtocolError, encode

log = logging.getLogger(__name__)

MAX_QUEUED = 1024 * 1024       # bytes of unsent replies before a client is dropped
SO_PEERGROUPS = getattr(socket, "SO_PEERGROUPS", 59)


class AlreadyRunning(Exception):
    pass


class Client:
    def __init__(self, server: "ControlServer", sock: socket.socket) -> None:
        self.server = server
        self.sock = sock
        self.buffer = LineBuffer(MAX_LINE)
        self.outbox = Outbox(server.reactor, sock, self.close)
        self.closed = False
        self.busy = False          # waiting on a job or following logs: not idle
        self.last_active = time.monotonic()
        self.partial_since: float | None = None  # when an unfinished request line began
        try:
            creds = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, 12)
            self.peer_pid, self.peer_uid, self.peer_gid = (int.from_bytes(creds[i:i + 4], "little")
                                                           for i in (0, 4, 8))
        except OSError:
            self.peer_pid = self.peer_uid = self.peer_gid = -1

    def __repr__(self) -> str:
        return f"<client pid={self.peer_pid} uid={self.peer_uid}>"

    def groups(self) -> set[int]:
        """The peer's primary and supplementary groups, as the kernel saw them at connect."""
        found = {self.peer_gid}
        try:
            raw = self.sock.getsockopt(socket.SOL_SOCKET, SO_PEERGROUPS, 4 * 256)
            found.update(int.from_bytes(raw[i:i + 4], "little") for i in range(0, len(raw), 4))
        except OSError:
            pass
        return found

    @property
    def on_drained(self) -> Callable[[], None] | None:
        return self.outbox.on_drained

    @on_drained.setter
    def on_drained(self, more: Callable[[], None] | None) -> None:  # streaming: queue sent
        self.outbox.on_drained = more

    def close_when_flushed(self) -> None:
        self.outbox.on_flushed = self.close
        self._flush()

    def send(self, obj: dict) -> None:
        if self.closed:
            return
        self.outbox.write(encode(obj))
        if len(self.outbox) > MAX_QUEUED:
            log.warning("dropping %r: it does not read its replies", self)
            self.close()

    def finish(self, obj: dict) -> None:
        """Send the final reply of a request; the connection stays open for more."""
        self.busy = False
        self.send(obj)

    def _flush(self) -> None:
        self.outbox.flush()

    def on_readable(self) -> None:
        try:
            data = self.sock.recv(65536)
        except (BlockingIOError, InterruptedError):
            return
        except OSError:
            data = b""
        if not data:
            self.close()
            return
        self.last_active = time.monotonic()
        try:
            lines = self.buffer.feed(data)
            if self.buffer.pending():
                self.partial_since = self.partial_since or self.last_active
            else:
                self.partial_since = None
        except ProtocolError as exc:
            self.send({"ok": False, "error": str(exc)})
            self.close_when_flushed()
            return
        for line in lines:
            if self.closed:
                return
            self.server.on_request(self, line)

    def close(self) -> None:
        if self.closed:
            return
        self.closed = self.outbox.closed = True
        self.server.reactor.forget(self.sock)
        self.sock.close()
        self.server.clients.discard(self)
        for hook in self.server.on_close:
            hook(self)


class ControlServer:
    def __init__(self, reactor, path: str, mode: int,
                 on_request: Callable[[Client, bytes], None], group: int | None = None,
                 max_clients: int = 512, idle_timeout: float = 60.0,
                 may_steer: Callable[[Client], bool] = lambda client: True) -> None:
        self.reactor = reactor
        self.max_clients = max_clients
        # Read-only clients never get the last slots, and no uid but root's may hold more
        # than a quarter: anyone may connect, so anyone could otherwise lock root out.
        self.reserved = max(1, max_clients // 8)
        self.per_uid = max(1, max_clients // 4)
        self.may_steer = may_steer
        self.idle_timeout = idle_timeout               # no request for this long: closed
        self.request_timeout = min(10.0, idle_timeout)  # a started line must end this soon
        self.path = path
        self.mode = mode
        self.group = group
        self.on_request = on_request
        self.on_close: list[Callable[[Client], None]] = []
        self.clients: set[Client] = set()
        self.sock: socket.socket | None = None

    def start(self) -> None:
        parent = os.path.dirname(self.path) or "."
        # Anyone who may write the directory could replace our socket with theirs.
        trust.ensure_dir(parent, "the control socket's directory")
        if os.path.exists(self.path) or os.path.islink(self.path):
            self._remove_stale()
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        # The mode must hold from the first instant the path exists: no window
        # in which anyone could connect to a more permissive socket.
        old = os.umask(0o777 & ~self.mode)
        try:
            sock.bind(self.path)
        finally:
            os.umask(old)
        if self.group is not None:  # from root:root 0660 to root:group 0660: never wider
            os.chown(self.path, -1, self.group)
        os.chmod(self.path, self.mode)
        sock.listen(512)
        sock.setblocking(False)
        self.sock = sock
        self.reactor.add_reader(sock, self._accept)
        self._sweeping = False

    def _remove_stale(self) -> None:
        probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        probe.settimeout(1.0)
        try:
            probe.connect(self.path)
        except OSError as exc:
            if exc.errno not in (errno.ECONNREFUSED, errno.ENOENT, errno.ENOTSOCK):
                raise
            os.unlink(self.path)  # left behind by a daemon that died
            return
        finally:
            probe.close()
        raise AlreadyRunning(f"another llmuxd is already answering on {self.path}")

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except (BlockingIOError, InterruptedError):
                return
            except OSError as exc:
                log.warning("accept failed: %s", exc)
                return
            conn.setblocking(False)
            client = Client(self, conn)
            refusal = self._refusal(client)
            if refusal:
                log.warning("refusing %r: %s", client, refusal)
                client.send({"ok": False, "error": refusal})
                client.close()
                continue
            self.clients.add(client)
            self.reactor.add_reader(conn, client.on_readable)
            if not self._sweeping:  # an idle daemon with no clients has no timer to run
                self._sweeping = True
                self.reactor.call_later(min(1.0, self.request_timeout / 2), self._sweep_timer)

    def _refusal(self, client: Client) -> str | None:
        if len(self.clients) >= self.max_clients:
            return f"too many clients (limit {self.max_clients})"
        if client.peer_uid in (0, os.geteuid()):
            return None
        same_uid = sum(1 for c in self.clients if c.peer_uid == client.peer_uid)
        if same_uid >= self.per_uid:
            return f"too many clients of uid {client.peer_uid} (limit {self.per_uid})"
        if len(self.clients) >= self.max_clients - self.reserved and not self.may_steer(client):
            return f"too many clients (the last {self.reserved} are kept for those who may steer)"
        return None

    def _sweep_timer(self) -> None:
        now = time.monotonic()
        for client in list(self.clients):
            if not client.busy and now - client.last_active > self.idle_timeout:
                client.close()
            elif client.partial_since and now - client.partial_since > self.request_timeout:
                log.warning("dropping %r: its request did not arrive within %gs", client,
                            self.request_timeout)
                client.close()
        if self.clients:
            self.reactor.call_later(min(1.0, self.request_timeout / 2), self._sweep_timer)
        else:
            self._sweeping = False

    def close(self) -> None:
        for client in list(self.clients):
            client._flush()
            client.close()
        if self.sock is not None:
            self.reactor.forget(self.sock)
            self.sock.close()
            self.sock = None
            try:
                os.unlink(self.path)
            except OSError:
                pass
