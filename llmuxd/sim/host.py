"""Host state that a real vLLM 0.26 server holds and CRIU must cope with.

Measured on the GPU machine (../shared/measured.md, 2026-12-01), and absent
from the simulator until then, so level 4 passed here and failed there:
- an io_uring instance in the API server (uvloop's bundled libuv opens one
  whatever UV_USE_IO_URING says); CRIU cannot dump it. Like libuv, we fall back
  to epoll when io_uring_setup fails (ENOSYS under llmux's seccomp rule).
- a named POSIX semaphore that joblib/loky creates and never unlinks. glibc
  maps it under its deleted temporary name while the inode stays linked, so
  `criu dump --link-remap` makes a /dev/shm/link_remap.N hard link for it,
  which collides between the dumps of two trees.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets

IO_URING_SETUP = 425  # the same on every architecture since Linux 5.1


def open_io_uring(log) -> int | None:
    """io_uring_setup(8, params) -> the ring's fd, kept open for the process's life."""
    libc = ctypes.CDLL(None, use_errno=True)
    params = ctypes.create_string_buffer(120)  # struct io_uring_params, zeroed
    fd = libc.syscall(IO_URING_SETUP, 8, params)
    if fd < 0:
        err = ctypes.get_errno()
        log(f"io_uring unavailable ({errno.errorcode.get(err, err)}): using epoll")
        return None
    log(f"io_uring instance on fd {fd}")
    return fd


class LokySemaphore:
    """`/dev/shm/sem.loky-PID-XXXX`, as loky makes it. Unlike loky we unlink it at a
    clean shutdown, so test runs do not fill /dev/shm (a killed sim leaves it, as vLLM)."""

    def __init__(self, log) -> None:
        import _multiprocessing
        self.name = f"/loky-{os.getpid()}-{secrets.token_hex(4)}"
        self.lock = _multiprocessing.SemLock(1, 1, 1, self.name, False)
        log(f"named semaphore /dev/shm/sem.{self.name[1:]}")

    def close(self) -> None:
        try:
            os.unlink(f"/dev/shm/sem.{self.name[1:]}")
        except OSError:
            pass
