"""systemd notifications (sd_notify) through sdnotify; silent without NOTIFY_SOCKET.

The socket variable is removed from our environment once read, so no child
(vLLM, criu) can ever speak for llmuxd.
"""

from __future__ import annotations

import os
import time

import sdnotify


class Notifier:
    def __init__(self) -> None:
        self.enabled = bool(os.environ.get("NOTIFY_SOCKET"))
        self._n = sdnotify.SystemdNotifier() if self.enabled else None
        os.environ.pop("NOTIFY_SOCKET", None)
        usec = os.environ.pop("WATCHDOG_USEC", None)
        os.environ.pop("WATCHDOG_PID", None)
        self.watchdog_interval = int(usec) / 2e6 if usec and usec.isdigit() else None

    def send(self, *lines: str) -> None:
        if self._n is not None:
            self._n.notify("\n".join(lines))  # sdnotify swallows send errors

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.monotonic_ns() // 1000}")

    def stopping(self, status: str = "stopping models") -> None:
        self.send("STOPPING=1", f"STATUS={status}")

    def status(self, text: str) -> None:
        self.send(f"STATUS={text}")

    def extend_timeout(self, seconds: float) -> None:
        self.send(f"EXTEND_TIMEOUT_USEC={int(seconds * 1e6)}")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")
