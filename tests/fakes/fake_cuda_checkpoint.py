#!/usr/bin/env python3
"""A stand-in for ``cuda-checkpoint`` / ``llmux-cuda-checkpoint`` for CPU-only tests.

Same command line as the real tool::

    --get-state --pid PID
    --toggle --pid PID [--timeout MS]
    --action lock|checkpoint|restore|unlock --pid PID [--timeout MS]
    --get-restore-tid --pid PID

Protocol shared with the simulator ``llmux-sim``:

* ``LLMUX_SIM_FAKE_CUDA_DIR`` names a directory.  A process "has CUDA" iff the
  file ``DIR/<pid>`` exists; its content is its state: ``running``, ``locked``,
  ``checkpointed`` (or ``failed``).
* Transitions: lock running->locked, checkpoint locked->checkpointed,
  restore checkpointed->locked, unlock locked->running; toggle is lock+checkpoint
  from running and restore+unlock from checkpointed, as NVIDIA's tool does.
* Every invocation appends ``<time.monotonic()> <action> <pid>`` to
  ``DIR/calls.log`` when it starts (before any delay), so tests can check
  ordering and parallelism.  Actions are ``get-state``, ``toggle``, ``lock``,
  ``checkpoint``, ``restore``, ``unlock``, ``get-restore-tid``.
* ``LLMUX_FAKE_CUDA_FAIL=<action>[,<action>...]`` makes those actions fail
  (exit 1).  A step of ``--toggle`` fails too when named, so
  ``LLMUX_FAKE_CUDA_FAIL=checkpoint`` leaves a toggled process locked, like a
  real failure half way.
* ``LLMUX_FAKE_CUDA_DELAY=<seconds>`` sleeps before acting (to test deadlines).

Errors are one line on stderr, starting with a CUDA error name, and exit 1.
Only the standard library is used, so the script runs from any checkout.
"""

from __future__ import annotations

import argparse
import fcntl
import os
import sys
import time

STATES = ("running", "locked", "checkpointed", "failed")
ACTIONS = ("lock", "checkpoint", "restore", "unlock")
# action -> (state it needs, state it leaves)
TRANSITIONS = {
    "lock": ("running", "locked"),
    "checkpoint": ("locked", "checkpointed"),
    "restore": ("checkpointed", "locked"),
    "unlock": ("locked", "running"),
}


class FakeError(Exception):
    pass


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        self.exit(1, f"{self.prog}: error: {message} (see --help)\n")


def _pid(text):
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid pid {text!r}") from None
    if value <= 0:
        raise argparse.ArgumentTypeError(f"invalid pid {text!r}")
    return value


def _timeout(text):
    try:
        value = int(text, 10)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r} (milliseconds)") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"invalid timeout {text!r} (milliseconds)")
    return value


def build_parser():
    parser = _Parser(prog="fake-cuda-checkpoint",
                     description="Fake CUDA checkpoint utility (state kept in "
                                 "$LLMUX_SIM_FAKE_CUDA_DIR/<pid>).")
    ops = parser.add_mutually_exclusive_group(required=True)
    ops.add_argument("--get-state", action="store_true")
    ops.add_argument("--action", choices=ACTIONS, metavar="{lock,checkpoint,restore,unlock}")
    ops.add_argument("--toggle", action="store_true")
    ops.add_argument("--get-restore-tid", action="store_true")
    parser.add_argument("--pid", "-p", type=_pid, required=True, metavar="PID")
    parser.add_argument("--timeout", "-t", type=_timeout, metavar="MS")
    return parser


def _append_call(root, action, pid):
    line = f"{time.monotonic():.6f} {action} {pid}\n".encode()
    fd = os.open(os.path.join(root, "calls.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
    try:
        os.write(fd, line)  # one write on an O_APPEND fd: lines never interleave
    finally:
        os.close(fd)


def _failing():
    return {a.strip() for a in os.environ.get("LLMUX_FAKE_CUDA_FAIL", "").split(",") if a.strip()}


class Store:
    """The state files, with read-modify-write serialised by a lock on the directory."""

    def __init__(self, root):
        self.root = root
        self._dirfd = None

    def __enter__(self):
        self._dirfd = os.open(self.root, os.O_RDONLY | os.O_DIRECTORY)
        fcntl.flock(self._dirfd, fcntl.LOCK_EX)
        return self

    def __exit__(self, *exc):
        os.close(self._dirfd)  # releases the lock

    def path(self, pid):
        return os.path.join(self.root, str(pid))

    def read(self, pid):
        try:
            with open(self.path(pid)) as f:
                return f.read().strip()
        except FileNotFoundError:
            raise FakeError("CUDA_ERROR_NOT_FOUND: process has no CUDA state") from None

    def write(self, pid, state):
        tmp = os.path.join(self.root, f".{pid}.tmp.{os.getpid()}")
        with open(tmp, "w") as f:
            f.write(state + "\n")
        os.replace(tmp, self.path(pid))  # readers never see a half-written file


def _step(store, pid, action, failing):
    need, leave = TRANSITIONS[action]
    state = store.read(pid)
    if action in failing:
        raise FakeError(f"CUDA_ERROR_UNKNOWN: injected failure of {action} on pid {pid} "
                        "(LLMUX_FAKE_CUDA_FAIL)")
    if state != need:
        raise FakeError(f"CUDA_ERROR_ILLEGAL_STATE: cannot {action} pid {pid}: "
                        f"its CUDA state is {state}, {action} needs {need}")
    store.write(pid, leave)


def run(args, root):
    if args.get_state:
        action = "get-state"
    elif args.get_restore_tid:
        action = "get-restore-tid"
    elif args.toggle:
        action = "toggle"
    else:
        action = args.action
    _append_call(root, action, args.pid)

    delay = os.environ.get("LLMUX_FAKE_CUDA_DELAY")
    if delay:
        try:
            seconds = float(delay)
        except ValueError:
            raise FakeError(f"invalid LLMUX_FAKE_CUDA_DELAY {delay!r}") from None
        time.sleep(max(0.0, seconds))

    failing = _failing()
    with Store(root) as store:
        if action in ("get-state", "get-restore-tid"):
            state = store.read(args.pid)
            if action in failing:
                raise FakeError(f"CUDA_ERROR_UNKNOWN: injected failure of {action} on pid "
                                f"{args.pid} (LLMUX_FAKE_CUDA_FAIL)")
            print(state if action == "get-state" else args.pid)
        elif action == "toggle":
            state = store.read(args.pid)
            if "toggle" in failing:
                raise FakeError(f"CUDA_ERROR_UNKNOWN: injected failure of toggle on pid "
                                f"{args.pid} (LLMUX_FAKE_CUDA_FAIL)")
            if state == "running":
                steps = ("lock", "checkpoint")
            elif state == "checkpointed":
                steps = ("restore", "unlock")
            else:
                raise FakeError(f"CUDA_ERROR_ILLEGAL_STATE: cannot toggle pid {args.pid}: "
                                f"its CUDA state is {state} (toggle needs running or "
                                "checkpointed)")
            for step in steps:
                _step(store, args.pid, step, failing)
        else:
            _step(store, args.pid, action, failing)
    return 0


def main(argv=None):
    args = build_parser().parse_args(argv)
    root = os.environ.get("LLMUX_SIM_FAKE_CUDA_DIR")
    if not root:
        print("fake-cuda-checkpoint: LLMUX_SIM_FAKE_CUDA_DIR is not set", file=sys.stderr)
        return 1
    if not os.path.isdir(root):
        print(f"fake-cuda-checkpoint: LLMUX_SIM_FAKE_CUDA_DIR {root!r} is not a directory",
              file=sys.stderr)
        return 1
    try:
        return run(args, root)
    except FakeError as exc:
        print(exc, file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
