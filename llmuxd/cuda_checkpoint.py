"""A built-in replacement for NVIDIA's ``cuda-checkpoint`` utility.

``cuda-checkpoint`` suspends and resumes the CUDA state of another process: lock
(block new CUDA calls and let submitted work finish), checkpoint (copy device
memory to host memory and release the GPU), restore (re-acquire the GPU and copy
memory back) and unlock.  Since driver 570 the CUDA driver exposes exactly these
operations as ``cuCheckpointProcess*`` functions in ``libcuda.so.1``, so this module
calls them through ctypes instead of depending on NVIDIA's binary, which is not
packaged anywhere and had to be downloaded unpinned.

Why a separate program rather than a library call: llmuxd runs this module as a
child process (``llmux-cuda-checkpoint`` or ``python -m llmuxd.cuda_checkpoint``)
so that the daemon itself never loads libcuda.  A process that has loaded the
driver holds GPU resources and state of its own, and would itself become
something to checkpoint; a child that exits after each call cannot.  It also
gives every call a process boundary the daemon can time out and kill.

The checkpoint functions work without ``cuInit`` in the calling process
(measured on driver 580), and so do ``cuGetErrorName``/``cuGetErrorString``;
this module never calls ``cuInit``.

The command line follows NVIDIA's ``cuda-checkpoint``::

    --get-state --pid PID        print running | locked | checkpointed | failed
    --toggle --pid PID           running -> lock + checkpoint; checkpointed -> restore + unlock
    --action lock|checkpoint|restore|unlock --pid PID [--timeout MS]
    --get-restore-tid --pid PID  print the process's CUDA restore thread id
    --help

``--timeout`` (milliseconds) applies to the lock action, including the lock step of
``--toggle``.  On success the exit status is 0.  Every error is one line on
stderr and exit status 1; a CUDA error line starts with the error's name and a
colon (for instance ``CUDA_ERROR_NOT_FOUND: ...`` for a process that has no CUDA
state) so that callers can tell "nothing to suspend" apart from success.  The environment variable
``LLMUX_LIBCUDA`` names another driver library to load (tests use it).
"""

from __future__ import annotations

import argparse
import ctypes
import os
import sys
from typing import NoReturn, Sequence

PROG = "llmux-cuda-checkpoint"
DEFAULT_LIBCUDA = "libcuda.so.1"

#: CUprocessState values (cuda.h)
STATES = {0: "running", 1: "locked", 2: "checkpointed", 3: "failed"}

ACTIONS = ("lock", "checkpoint", "restore", "unlock")


class CUcheckpointLockArgs(ctypes.Structure):
    """``CUcheckpointLockArgs`` from cuda.h."""

    _fields_ = [
        ("timeoutMs", ctypes.c_uint),
        ("reserved0", ctypes.c_uint),
        ("reserved1", ctypes.c_uint64 * 7),
    ]


class CudaCheckpointError(Exception):
    """An error to report as one line; ``cuda_error`` is the CUDA error name, if any."""

    def __init__(self, message: str, cuda_error: str | None = None):
        super().__init__(message)
        self.cuda_error = cuda_error


class Driver:
    """The checkpoint entry points of the CUDA driver library, loaded without cuInit."""

    _FUNCS = (
        "cuCheckpointProcessGetState",
        "cuCheckpointProcessLock",
        "cuCheckpointProcessCheckpoint",
        "cuCheckpointProcessRestore",
        "cuCheckpointProcessUnlock",
    )

    def __init__(self, libname: str | None = None):
        libname = libname or os.environ.get("LLMUX_LIBCUDA") or DEFAULT_LIBCUDA
        try:
            self._lib = ctypes.CDLL(libname)
        except OSError:
            raise CudaCheckpointError(f"{libname} not found: no NVIDIA driver") from None
        lib = self._lib
        for name in self._FUNCS:
            if not hasattr(lib, name):
                raise CudaCheckpointError(
                    f"{libname} has no {name}: the NVIDIA driver is too old for "
                    "CUDA checkpointing (driver 570 or newer is needed)"
                )
        lib.cuCheckpointProcessGetState.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
        lib.cuCheckpointProcessLock.argtypes = [ctypes.c_int, ctypes.POINTER(CUcheckpointLockArgs)]
        for name in ("cuCheckpointProcessCheckpoint", "cuCheckpointProcessRestore",
                     "cuCheckpointProcessUnlock"):
            getattr(lib, name).argtypes = [ctypes.c_int, ctypes.c_void_p]
        for name in self._FUNCS:
            getattr(lib, name).restype = ctypes.c_int
        # Optional entry points: present in the drivers that have the API above,
        # but their absence must not stop the main operations.
        self._get_restore_tid = getattr(lib, "cuCheckpointProcessGetRestoreThreadId", None)
        if self._get_restore_tid is not None:
            self._get_restore_tid.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_int)]
            self._get_restore_tid.restype = ctypes.c_int
        self._err_name = getattr(lib, "cuGetErrorName", None)
        self._err_string = getattr(lib, "cuGetErrorString", None)
        for fn in (self._err_name, self._err_string):
            if fn is not None:
                fn.argtypes = [ctypes.c_int, ctypes.POINTER(ctypes.c_char_p)]
                fn.restype = ctypes.c_int

    # -- errors ------------------------------------------------------------------
    def error_name(self, code: int) -> str:
        return self._describe(self._err_name, code) or f"CUDA error {code}"

    def error_string(self, code: int) -> str | None:
        return self._describe(self._err_string, code)

    @staticmethod
    def _describe(fn, code: int) -> str | None:
        if fn is None:
            return None
        out = ctypes.c_char_p()
        if fn(code, ctypes.byref(out)) != 0 or not out.value:
            return None
        return out.value.decode(errors="replace")

    def _check(self, rc: int, call: str, pid: int) -> None:
        if rc == 0:
            return
        name = self.error_name(rc)
        text = self.error_string(rc)
        detail = f": {text}" if text else ""
        raise CudaCheckpointError(f"{name}: {call} (pid {pid}) failed{detail}", cuda_error=name)

    # -- operations --------------------------------------------------------------
    def get_state(self, pid: int) -> str:
        state = ctypes.c_int(-1)
        self._check(self._lib.cuCheckpointProcessGetState(pid, ctypes.byref(state)),
                    "cuCheckpointProcessGetState", pid)
        return STATES.get(state.value, f"unknown({state.value})")

    def lock(self, pid: int, timeout_ms: int | None = None) -> None:
        args = None
        if timeout_ms is not None:
            args = ctypes.byref(CUcheckpointLockArgs(timeoutMs=timeout_ms))
        self._check(self._lib.cuCheckpointProcessLock(pid, args), "cuCheckpointProcessLock", pid)

    def checkpoint(self, pid: int) -> None:
        self._check(self._lib.cuCheckpointProcessCheckpoint(pid, None),
                    "cuCheckpointProcessCheckpoint", pid)

    def restore(self, pid: int) -> None:
        self._check(self._lib.cuCheckpointProcessRestore(pid, None),
                    "cuCheckpointProcessRestore", pid)

    def unlock(self, pid: int) -> None:
        self._check(self._lib.cuCheckpointProcessUnlock(pid, None),
                    "cuCheckpointProcessUnlock", pid)

    def get_restore_tid(self, pid: int) -> int:
        if self._get_restore_tid is None:
            raise CudaCheckpointError(
                "cuCheckpointProcessGetRestoreThreadId is not in this driver")
        tid = ctypes.c_int(-1)
        self._check(self._get_restore_tid(pid, ctypes.byref(tid)),
                    "cuCheckpointProcessGetRestoreThreadId", pid)
        return tid.value

    def action(self, action: str, pid: int, timeout_ms: int | None = None) -> None:
        if action == "lock":
            self.lock(pid, timeout_ms)
        elif action == "checkpoint":
            self.checkpoint(pid)
        elif action == "restore":
            self.restore(pid)
        elif action == "unlock":
            self.unlock(pid)
        else:  # pragma: no cover - argparse restricts the choices
            raise CudaCheckpointError(f"unknown action {action!r}")

    def toggle(self, pid: int, timeout_ms: int | None = None) -> str:
        """Running -> checkpointed, or checkpointed -> running; returns the new state."""
        state = self.get_state(pid)
        if state == "running":
            self.lock(pid, timeout_ms)
            self.checkpoint(pid)
            return "checkpointed"
        if state == "checkpointed":
            self.restore(pid)
            self.unlock(pid)
            return "running"
        raise CudaCheckpointError(
            f"cannot toggle pid {pid}: its CUDA state is {state} "
            "(toggle needs running or checkpointed; use --action)")


# -- command line ----------------------------------------------------------------------
class _Parser(argparse.ArgumentParser):
    """argparse, but a usage error is one line on stderr and exit status 1."""

    def error(self, message: str) -> NoReturn:
        self.exit(1, f"{self.prog}: error: {message} (see --help)\n")


def _pid(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid pid {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid pid {text!r}")
    return value


def _timeout(text: str) -> int:
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r} (milliseconds)") from None
    if not 0 <= value <= 0xFFFFFFFF:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r} (milliseconds)")
    return value


def build_parser(prog: str = PROG) -> argparse.ArgumentParser:
    parser = _Parser(
        prog=prog,
        description="CUDA checkpoint and restore utility (the CUDA driver's "
                    "cuCheckpointProcess* API; a stand-in for NVIDIA's cuda-checkpoint).",
    )
    ops = parser.add_mutually_exclusive_group(required=True)
    ops.add_argument("--get-state", action="store_true",
                     help="print the CUDA checkpoint state of the process: "
                          "running, locked, checkpointed or failed")
    ops.add_argument("--action", choices=ACTIONS, metavar="{lock,checkpoint,restore,unlock}",
                     help="perform one step on the process; lock waits up to --timeout ms")
    ops.add_argument("--toggle", action="store_true",
                     help="toggle the process between running and checkpointed "
                          "(lock+checkpoint, or restore+unlock)")
    ops.add_argument("--get-restore-tid", action="store_true",
                     help="print the CUDA restore thread id of the process")
    parser.add_argument("--pid", "-p", type=_pid, required=True, metavar="PID",
                        help="the process to operate on")
    parser.add_argument("--timeout", "-t", type=_timeout, metavar="MS",
                        help="timeout in milliseconds for the lock action")
    return parser


def parse_args(argv: Sequence[str] | None = None) -> argparse.Namespace:
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace, driver: Driver | None = None) -> int:
    drv = driver if driver is not None else Driver()
    if args.get_state:
        print(drv.get_state(args.pid))
    elif args.get_restore_tid:
        print(drv.get_restore_tid(args.pid))
    elif args.toggle:
        drv.toggle(args.pid, args.timeout)
    else:
        drv.action(args.action, args.pid, args.timeout)
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args)
    except CudaCheckpointError as exc:
        print(str(exc).replace("\n", " "), file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"{PROG}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
