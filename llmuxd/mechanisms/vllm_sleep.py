"""Levels 1 and 2: vLLM's own sleep mode over HTTP.

Level 1 offloads weights to host RAM; level 2 drops them, so waking must reload
them (`reload_weights`) and reset the prefix cache, in that order, or the model
serves garbage (vLLM #29341). /is_sleeping is the truth after each call: vLLM
answers 200 to /sleep even when nothing was freed.
"""

from __future__ import annotations

import json

from .. import states as S
from ..actions import CheckExited, Http, Phase, StepFailed, Transition
from ..steps import expect_ok, is_sleeping, timeout_of, wait_healthy


def enter_sleep(view, name: str, level: int):
    """POST /sleep?level=N and make sure it took: vLLM may crash while going to sleep and
    still answer 200, and answers 200 even when nothing was freed."""
    timeout = view.catalog.daemon.sleep_timeout
    result = yield Http(name, "POST", f"/sleep?level={level}", timeout=timeout)
    expect_ok(result, f"{name}: POST /sleep?level={level}")
    exited = yield CheckExited(name)
    if exited is not None:
        raise StepFailed(f"{name} {exited} while going to sleep")
    if not (yield from is_sleeping(view, name)):
        raise StepFailed(f"{name}: still awake after POST /sleep")


def reload_weights(view, name: str):
    """After a level-2 wake of the weights: without this the model serves garbage."""
    timeout = view.catalog.daemon.wake_timeout
    body = json.dumps({"method": "reload_weights"}).encode()
    expect_ok((yield Http(name, "POST", "/collective_rpc", timeout=timeout, body=body)),
              f"{name}: reload_weights")


class VllmSleep:
    asleep_state = S.SLEEPING

    def __init__(self, level: int) -> None:
        assert level in (1, 2)
        self.level = level

    def sleep(self, view, name):
        yield Phase("sleep", name)
        yield Transition(name, S.GOING_TO_SLEEP)
        yield from enter_sleep(view, name, self.level)
        yield Transition(name, S.SLEEPING, fields={"asleep_level": self.level})

    def wake(self, view, name):
        yield Phase("wake", name)
        yield Transition(name, S.WAKING)
        timeout = view.catalog.daemon.wake_timeout
        expect_ok((yield Http(name, "POST", "/wake_up", timeout=timeout)), f"{name}: POST /wake_up")
        if self.level == 2:
            yield from reload_weights(view, name)
            expect_ok((yield Http(name, "POST", "/reset_prefix_cache", timeout=timeout)),
                      f"{name}: POST /reset_prefix_cache")
        if (yield from is_sleeping(view, name)):
            raise StepFailed(f"{name}: still asleep after POST /wake_up")
        yield Phase("health", name)
        yield from wait_healthy(view, name, min(timeout, timeout_of(view, name, "startup_timeout")))
        yield Transition(name, S.ACTIVE)
