"""What llmuxd may believe of the file system: only what root or its own user controls.

llmuxd runs as root and acts on what it reads (it signals the process groups its
state file names, appends to log files, hands log text to read-only clients). A
directory that someone else owns or may write lets them plant a state file, a
symbolic link or a FIFO, so every directory llmuxd uses is checked here, and
every file in one is opened relative to the checked directory's fd, without
following links (ssh's StrictModes, done with *at() calls so that nothing can be
swapped between the check and the use).
"""

from __future__ import annotations

import errno
import fcntl
import os
import stat


class Untrusted(PermissionError):
    """A path llmuxd refuses to use; the message says what to fix."""


def trusted_owner(uid: int) -> bool:
    return uid in (0, os.geteuid())


def _writable_by_others(st: os.stat_result) -> bool:
    """World-writable, or group-writable by a group other than root's or ours."""
    if st.st_mode & stat.S_IWOTH:
        return True
    return bool(st.st_mode & stat.S_IWGRP) and st.st_gid not in (0, os.getegid())


def check_dir_stat(path: str, st: os.stat_result, what: str) -> None:
    if not stat.S_ISDIR(st.st_mode):
        raise Untrusted(f"refusing to use {what} {path}: not a directory")
    if not trusted_owner(st.st_uid):
        raise Untrusted(f"refusing to use {what} {path}: owned by uid {st.st_uid}, not by root "
                        "or llmuxd's user (anyone who owns it can plant files llmuxd acts on)")
    if _writable_by_others(st):
        kind = "world-writable" if st.st_mode & stat.S_IWOTH else "group-writable"
        raise Untrusted(f"refusing to use {what} {path}: the directory is {kind} (use a "
                        f"directory of its own, mode 0755 or 0750, owned by root)")


def check_dir(path: str, what: str) -> None:
    """path and every directory above it: none may be replaceable by someone else.
    An ancestor may be world-writable only with the sticky bit (/tmp): then nobody
    but its owner can rename or remove what is inside."""
    path = os.path.abspath(path)
    check_dir_stat(path, os.stat(path), what)
    parent = os.path.dirname(path)
    while True:
        st = os.stat(parent)
        if not trusted_owner(st.st_uid) or \
                (_writable_by_others(st) and not st.st_mode & stat.S_ISVTX):
            raise Untrusted(f"refusing to use {what} {path}: {parent} above it is owned or "
                            "writable by another user")
        if parent == "/":
            return
        parent = os.path.dirname(parent)


def ensure_dir(path: str, what: str, mode: int = 0o755) -> None:
    os.makedirs(path, mode=mode, exist_ok=True)
    check_dir(path, what)


def open_dir(path: str, what: str) -> int:
    """An fd of the checked directory (checked again through the fd itself)."""
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        check_dir_stat(path, os.fstat(fd), what)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_file(dir_fd: int, name: str, flags: int, where: str, mode: int = 0o640) -> int:
    """Open name in a checked directory: no link followed, no FIFO or device, and only a
    file root or llmuxd's user owns. O_NONBLOCK: opening a FIFO never blocks the loop."""
    try:
        fd = os.open(name, flags | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK, mode,
                     dir_fd=dir_fd)
    except OSError as exc:
        if exc.errno == errno.ELOOP:
            raise Untrusted(f"refusing to open {where}: it is a symbolic link") from None
        raise
    try:
        st = os.fstat(fd)
        if not stat.S_ISREG(st.st_mode):
            raise Untrusted(f"refusing to open {where}: not a regular file")
        if not trusted_owner(st.st_uid):
            raise Untrusted(f"refusing to open {where}: owned by uid {st.st_uid}, not by root "
                            "or llmuxd's user")
        if st.st_nlink > 1:
            raise Untrusted(f"refusing to open {where}: it has other hard links")
        # Back to blocking: a regular file never blocks, and callers expect plain I/O.
        fcntl.fcntl(fd, fcntl.F_SETFL, fcntl.fcntl(fd, fcntl.F_GETFL) & ~os.O_NONBLOCK)
    except BaseException:
        os.close(fd)
        raise
    return fd


def open_in(directory: str, name: str, flags: int, what: str, mode: int = 0o640) -> int:
    """open_file() of directory/name, the directory checked through its own fd."""
    dir_fd = open_dir(directory, what)
    try:
        return open_file(dir_fd, name, flags, os.path.join(directory, name), mode)
    finally:
        os.close(dir_fd)
