"""Sleep levels as pluggable mechanisms: each knows how to put a model to sleep
and how to wake it. The swap engine picks one by level and knows nothing else.

A mechanism is an object with:
  level: int, asleep_state: str,
  sleep(view, name) -> Plan   (ends with Transition(name, asleep_state) or raises StepFailed)
  wake(view, name)  -> Plan   (ends with Transition(name, ACTIVE) or raises StepFailed)
"""

from __future__ import annotations

from .criu import CriuCheckpoint
from .cuda_suspend import CudaSuspend
from .stop import StopMechanism
from .vllm_sleep import VllmSleep

MECHANISMS: dict[int, object] = {
    1: VllmSleep(1),
    2: VllmSleep(2),
    3: CudaSuspend(),
    4: CriuCheckpoint(),
    5: StopMechanism(),
}


def register(mechanism) -> None:
    MECHANISMS[mechanism.level] = mechanism


def mechanism_for(level: int):
    try:
        return MECHANISMS[level]
    except KeyError:
        raise LookupError(f"sleep level {level} is not available in this build") from None
