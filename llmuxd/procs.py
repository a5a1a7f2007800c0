"""Processes: the one spawn function, the one reaper, process groups, ports.

Every child of the daemon (vLLM servers, criu, cuda-checkpoint helpers) is
started by `spawn()` and its exit status arrives through `Reaper.reap()`, the
only place that calls wait: `waitpid(-1, WNOHANG)` until nothing is left.
Statuses go to whoever registered the PID; orphans reparented to us (as PID 1
or a subreaper: vLLM's EngineCore outlives a killed API server) are reaped and
logged. Nothing else may wait, or a status is lost (subprocess reports a child
it cannot wait for as exit 0).
"""

from __future__ import annotations

import ctypes
import errno
import logging
import os
import resource
import signal
import socket
import subprocess
from dataclasses import dataclass
from typing import Callable

import psutil

from . import seccomp

log = logging.getLogger(__name__)

PR_SET_CHILD_SUBREAPER = 36
# Variables that belong to llmuxd's own supervisor (systemd), never to a child.
SCRUBBED_PREFIXES = ("WATCHDOG_", "LISTEN_")
SCRUBBED_NAMES = ("NOTIFY_SOCKET", "VLLM_PORT")


def describe_exit(status: int | None, expected: bool = False) -> str:
    """Human text for a wait status (None: not our child, status unknown).
    `expected`: we killed it ourselves (a stop, or CRIU after a dump): no guessing why."""
    if status is None:
        return "exited (status unknown: not our child)"
    if os.WIFSIGNALED(status):
        sig = os.WTERMSIG(status)
        try:
            name = signal.Signals(sig).name
        except ValueError:
            name = f"signal {sig}"
        hint = " (out of memory?)" if sig == signal.SIGKILL and not expected else ""
        return f"killed by {name}{hint}"
    if os.WIFEXITED(status):
        return f"exited with status {os.WEXITSTATUS(status)}"
    return f"wait status {status}"


def clean_env(base: dict[str, str], extra: dict[str, str]) -> dict[str, str]:
    env = {k: v for k, v in base.items()
           if k not in SCRUBBED_NAMES and not k.startswith(SCRUBBED_PREFIXES)}
    env.update(extra)
    return env


def close_inherited_fds() -> None:
    """Mark every fd above 2 close-on-exec, so children inherit only 0-2.

    Python creates its own fds non-inheritable; this catches those the daemon
    itself inherited (from a shell, a test harness, or systemd).
    """
    try:
        fds = [int(n) for n in os.listdir("/proc/self/fd")]
    except OSError:
        return
    for fd in fds:
        if fd > 2:
            try:
                os.set_inheritable(fd, False)
            except OSError:
                pass


def reset_inherited_signals() -> None:
    """Children must start with no blocked and no ignored signals.

    exec keeps the signal mask and SIG_IGN dispositions; a daemon started from
    `nohup` or a background shell job ignores HUP/INT/QUIT, and vLLM would then
    never see them. We reset ours once, so every child inherits defaults
    (SIGPIPE stays ignored for Python; Popen restores it in the child).
    """
    signal.pthread_sigmask(signal.SIG_SETMASK, [])
    for sig in signal.valid_signals():
        if sig in (signal.SIGPIPE, signal.SIGKILL, signal.SIGSTOP):
            continue
        try:
            if signal.getsignal(sig) == signal.SIG_IGN:
                signal.signal(sig, signal.SIG_DFL)
        except (OSError, ValueError):
            pass


def raise_fd_limit() -> None:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    wanted = hard if hard != resource.RLIM_INFINITY else 65536
    if soft < wanted:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (min(wanted, 65536), hard))
        except (ValueError, OSError):
            pass


def become_subreaper() -> bool:
    """Orphaned grandchildren (and CRIU-restored trees) come to us, not to init."""
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0) == 0
    except OSError:
        return False


@dataclass
class Child:
    pid: int
    argv: list[str]
    start_time: float
    popen: subprocess.Popen | None = None
    status: int | None = None  # wait status once reaped


_seccomp_installer = None


def io_uring_blocker():
    """The prepared seccomp installer (built once: the child must not allocate much)."""
    global _seccomp_installer
    if _seccomp_installer is None:
        _seccomp_installer = seccomp.Installer()
    return _seccomp_installer


def spawn(argv: list[str], *, env: dict[str, str], log_path: str | None = None,
          cwd: str | None = None, new_session: bool = True,
          capture: bool = False, log_fd: int | None = None,
          no_io_uring: bool = False) -> tuple[Child, int | None]:
    """Start a child: stdin /dev/null, stdout+stderr appended to log_path or to the
    already opened log_fd (the caller keeps and closes it; model logs are opened
    without following links, see trust.py), or a pipe when capture is set, whose read
    end is returned; own session and process group, only fds 0-2 inherited, default
    signal dispositions. With no_io_uring, the seccomp rule of checkpointable models
    (see seccomp.py) is installed in the child just before exec. Raises OSError."""
    preexec = io_uring_blocker() if no_io_uring else None
    devnull = os.open(os.devnull, os.O_RDONLY)
    out_fd = read_fd = None
    try:
        if capture:
            read_fd, out_fd = os.pipe()
            os.set_blocking(read_fd, False)
        elif log_fd is not None:
            out_fd = os.dup(log_fd)
        elif log_path:
            out_fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        else:
            out_fd = os.open(os.devnull, os.O_WRONLY)
        popen = subprocess.Popen(argv, stdin=devnull, stdout=out_fd, stderr=out_fd, env=env,
                                 cwd=cwd, close_fds=True, restore_signals=True,
                                 start_new_session=new_session, preexec_fn=preexec)
    except BaseException:
        if read_fd is not None:
            os.close(read_fd)
        raise
    finally:
        os.close(devnull)
        if out_fd is not None:
            os.close(out_fd)
    return Child(popen.pid, list(argv), process_start_time(popen.pid) or 0.0, popen), read_fd


def process_start_time(pid: int) -> float | None:
    try:
        return psutil.Process(pid).create_time()
    except (psutil.NoSuchProcess, psutil.AccessDenied):
        return None


def _stat_fields(pid: int | str) -> list[bytes] | None:
    """state, ppid, pgid, ... of /proc/PID/stat (after the command name)."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            stat = f.read()
    except OSError:
        return None
    return stat[stat.rfind(b")") + 2:].split()


def is_alive(pid: int) -> bool:
    """True for a running process; False for gone or zombie (kill -0 lies about zombies)."""
    rest = _stat_fields(pid)
    return bool(rest) and rest[0] not in (b"Z", b"X")


def group_members(pgid: int) -> list[int]:
    """Live (non-zombie) processes whose process group is pgid."""
    members = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        rest = _stat_fields(name)
        if rest and len(rest) > 2 and int(rest[2]) == pgid and rest[0] not in (b"Z", b"X"):
            members.append(int(name))
    return members


def strays(pid: int | None, pgid: int | None, marker: bytes, owned: Callable[[int], bool]) \
        -> set[int]:
    """What a model started that its process group no longer holds: descendants of its
    main process in other groups (a helper that called setsid), and orphans the kernel
    reparented to llmuxd, the subreaper (a double fork), whose environment carries the
    model's marker, with their own descendants. Each of these is in llmuxd's tree, so
    llmuxd started it; `owned`: PIDs llmuxd tracks itself (models, tools), never strays."""
    roots, found = [], set()
    if pid:
        roots.append(pid)
    me = os.getpid()
    for name in os.listdir("/proc"):
        if not name.isdigit() or owned(int(name)):
            continue
        rest = _stat_fields(int(name))
        if not rest or len(rest) < 3 or rest[0] in (b"Z", b"X") or int(rest[1]) != me:
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as f:
                env = f.read()
        except OSError:
            continue
        if marker in env.split(b"\0"):
            found.add(int(name))
            roots.append(int(name))
    for root in roots:
        try:
            for child in psutil.Process(root).children(recursive=True):
                rest = _stat_fields(child.pid)
                if rest and len(rest) > 2 and int(rest[2]) != pgid and not owned(child.pid):
                    found.add(child.pid)
        except psutil.Error:
            continue
    return found


def signal_strays(find: Callable[[], set[int]], sig: int) -> int:
    """Signal what find() returns, through pidfds taken before a second find(): a PID
    that exited and was reused between the scan and the signal is never hit."""
    pidfds = {}
    for pid in find():
        try:
            pidfds[pid] = os.pidfd_open(pid)
        except OSError:
            continue
    sent = 0
    try:
        confirmed = find() if pidfds else set()
        for pid, fd in pidfds.items():
            if pid in confirmed:
                try:
                    signal.pidfd_send_signal(fd, sig)
                    sent += 1
                except OSError:
                    pass
    finally:
        for fd in pidfds.values():
            os.close(fd)
    return sent


def kill_group(pgid: int, sig: int) -> bool:
    """Signal a whole process group; False when no process of it is left."""
    try:
        os.killpg(pgid, sig)
        return True
    except ProcessLookupError:
        return False
    except PermissionError:
        log.warning("no permission to signal process group %d", pgid)
        return True


def port_holder(host: str, port: int) -> str | None:
    """None if nothing listens on (host, port); else a description of who does.

    vLLM binds with SO_REUSEPORT, so a stale server on the same port would
    silently share traffic with the new one; we refuse to start instead.
    """
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    s = socket.socket(family, socket.SOCK_STREAM)
    try:
        # SO_REUSEADDR lets TIME_WAIT leftovers pass but still fails on a listener.
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((host, port))
        return None
    except OSError as exc:
        if exc.errno != errno.EADDRINUSE:
            return f"cannot bind ({exc.strerror})"
    finally:
        s.close()
    try:
        for conn in psutil.net_connections(kind="tcp"):
            if conn.status == psutil.CONN_LISTEN and conn.laddr and conn.laddr.port == port:
                if conn.pid:
                    try:
                        name = psutil.Process(conn.pid).name()
                    except psutil.Error:
                        name = "?"
                    return f"pid {conn.pid} ({name})"
    except (psutil.AccessDenied, OSError):
        pass
    return "another process (not visible)"


class Reaper:
    """The one owner of wait(): routes exit statuses to whoever registered the PID."""

    def __init__(self) -> None:
        self._owners: dict[int, Callable[[int], None]] = {}
        self.orphans_reaped = 0

    def register(self, pid: int, on_exit: Callable[[int], None]) -> None:
        self._owners[pid] = on_exit

    def unregister(self, pid: int) -> None:
        self._owners.pop(pid, None)

    def owns(self, pid: int) -> bool:
        return pid in self._owners

    def reap(self) -> int:
        """waitpid(-1, WNOHANG) until empty; returns how many were reaped."""
        count = 0
        while True:
            try:
                pid, status = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                break
            except InterruptedError:
                continue
            if pid == 0:
                break
            count += 1
            owner = self._owners.pop(pid, None)
            if owner is None:
                # As PID 1 these come by the hundred: no formatting unless asked for.
                self.orphans_reaped += 1
                if log.isEnabledFor(logging.DEBUG):
                    log.debug("reaped orphan %d: %s", pid, describe_exit(status))
                continue
            try:
                owner(status)
            except Exception:
                log.exception("exit handler of pid %d failed", pid)
        return count


def mark_reaped(child: Child, status: int | None) -> None:
    """Tell subprocess the child is gone, so it never waits for it itself."""
    child.status = status
    if child.popen is not None and status is not None:
        child.popen.returncode = os.waitstatus_to_exitcode(status)
