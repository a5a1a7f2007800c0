"""Level 5: stop the process group; waking is a cold start."""

from __future__ import annotations

from .. import states as S
from ..steps import start, stop


class StopMechanism:
    level = 5
    asleep_state = S.STOPPED

    def sleep(self, view, name):
        yield from stop(view, name)

    def wake(self, view, name):
        yield from start(view, name)
