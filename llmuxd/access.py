"""Who may steer llmuxd: authorization by the peer credentials of the socket.

Anyone who can connect may read (status, logs, doctor, ping). Commands that
change state (swap, sleep, stop, reload, restart, shutdown) need one of: root,
llmuxd's own user or group (not root's group), a member of `socket_group`, or a user or group listed in
`[daemon.access]`. Credentials come from the kernel (SO_PEERCRED, SO_PEERGROUPS),
never from what the client says.
"""

from __future__ import annotations

import grp
import logging
import os
import pwd

log = logging.getLogger(__name__)


def _resolve(name: str, lookup, kind: str) -> int:
    """A user or group given by number or by name -> its id."""
    if name.isdigit():
        return int(name)
    try:
        return lookup(name)
    except KeyError:
        raise ValueError(f"unknown {kind} {name!r}") from None


def resolve_group(name: str) -> int:
    return _resolve(name, lambda n: grp.getgrnam(n).gr_gid, "group")


def resolve_user(name: str) -> int:
    return _resolve(name, lambda n: pwd.getpwnam(n).pw_uid, "user")


class Access:
    def __init__(self, settings, strict: bool = True) -> None:
        """strict: unknown names are an error (at start); else they are logged and skipped."""
        self.uids = {0, os.geteuid()}
        self.gids: set[int] = {os.getegid()} if os.getegid() != 0 else set()
        self.socket_gid = None
        entries = [(resolve_user, self.uids, n) for n in settings.access.users]
        entries += [(resolve_group, self.gids, n) for n in settings.access.groups]
        if settings.socket_group:
            entries.append((resolve_group, self.gids, settings.socket_group))
        for resolve, into, name in entries:
            try:
                into.add(resolve(name))
            except ValueError as exc:
                if strict:
                    raise
                log.error("daemon.access: %s (ignored)", exc)
        if settings.socket_group:
            try:
                self.socket_gid = resolve_group(settings.socket_group)
            except ValueError:
                self.socket_gid = None

    def allows(self, client) -> bool:
        return client.peer_uid in self.uids or bool(client.groups() & self.gids)
