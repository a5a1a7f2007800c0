"""Which GPUs a model sits on, what placement counts for it, and what a job claims.

A job claims the GPUs it may change (and, when it may run CRIU, the one CRIU slot);
the runner lets jobs with disjoint claims run at once and no two that overlap.
Pure functions of the daemon's view, so that the swap plan, `llmuxctl`, the front
and the tests all ask the same question and get the same answer.

- A model's `gpus` (catalog) are physical indexes as NVML numbers them (the child
  gets CUDA_DEVICE_ORDER=PCI_BUS_ID, so CUDA's numbering agrees). A model without
  them sits on every GPU of the universe: GPU 0 and every GPU any model names, which
  makes it share each budget with everyone (v1: one GPU, one budget, one swap at a
  time).
- CRIU: concurrent dumps and restores collide on /dev/shm/link_remap.N names, and
  checkpoint_io finds a dump's remap files as "new since the dump began", which a
  second concurrent dump would confuse. So every job that may dump or restore
  claims CRIU as well: two such jobs are serialized even on disjoint GPUs, while a
  level-4 swap and a level-1 swap on other GPUs still run at once. A finer lock
  around the dump and restore steps alone would buy little: they are most of a
  level-4 swap's time.
"""

from __future__ import annotations

from . import states as S
from .placement import Placement, Resident, place
from .steps import View, spec_of

__all__ = ["CRIU", "EVERYTHING", "universe", "gpus_of", "size_of", "resident_set",
           "placement_for", "model_claim", "swap_claim", "conflicts"]

CRIU = "criu"
EVERYTHING = None  # the claim of adoption and shutdown: conflicts with any job


def universe(view: View) -> frozenset:
    named = {g for spec in view.catalog.models.values() for g in (spec.gpus or ())}
    return frozenset({0} | named)


def gpus_of(view: View, name: str) -> frozenset:
    """The GPUs `name` holds memory on (its process's definition when one runs)."""
    gpus = spec_of(view, name).gpus
    return frozenset(gpus) if gpus else universe(view)


def _claimed_gpus(view: View, name: str) -> frozenset:
    """gpus_of and, when a reload moved the model meanwhile, the GPUs of the catalog's
    definition too: a job that restarts it (restart, recovery, a swap to a sleeper with
    restart_pending) starts it there."""
    spec = view.catalog.models.get(name)
    later = frozenset(spec.gpus) if spec is not None and spec.gpus else universe(view)
    return gpus_of(view, name) | later


def size_of(view: View, name: str) -> int | None:
    """What placement counts for `name` on each of its GPUs: the measured figure once
    known (a model may hold more than it declared), else its declared gpu_memory;
    None = exclusive. Measured per GPU where NVML told us per device, else the tree's
    total split evenly over its GPUs (tensor parallel ranks hold alike)."""
    spec = spec_of(view, name)
    if spec.gpu_memory is None:
        return None
    extra = view.runtimes[name].extra
    by_gpu = extra.get("gpu_measured_by_gpu")
    if by_gpu:
        measured = max(by_gpu.values())
    elif extra.get("gpu_measured"):
        measured = extra["gpu_measured"] // max(1, len(spec.gpus or ()))
    else:
        measured = 0
    return max(spec.gpu_memory, measured)


def resident_set(view: View, exclude: str | None = None) -> list[Resident]:
    """The active models, with their sizes, GPUs and when each was last made active or
    used (LRU order)."""
    return [Resident(n, size_of(view, n), rt.used_at, gpus_of(view, n))
            for n, rt in view.runtimes.items() if n != exclude and rt.state == S.ACTIVE]


def placement_for(view: View, target: str) -> Placement:
    return place(view.catalog.daemon.gpu_memory, resident_set(view), target,
                 size_of(view, target), gpus_of(view, target), universe(view))


def stray_holders(view: View, target: str) -> list[str]:
    """Awake processes on the target's GPUs that are not active (crashed and waiting to
    restart, or left half way): they hold an unknown amount, so the swap stops them."""
    mine = gpus_of(view, target)
    return [n for n, rt in view.runtimes.items()
            if n != target and rt.state in S.HAS_PROCESS and rt.state not in S.ASLEEP
            and rt.state != S.ACTIVE and gpus_of(view, n) & mine]


def _may_use_criu(view: View, name: str, level: int | None = None) -> bool:
    rt = view.runtimes[name]
    return (level or spec_of(view, name).sleep_level) == 4 or \
        rt.state in (S.CHECKPOINTED, S.CHECKPOINTING, S.RESTORING)


def model_claim(view: View, name: str, level: int | None = None) -> frozenset:
    """sleep, stop, restart and recovery of one model: its GPUs (and CRIU if it may
    be dumped, restored or its images discarded)."""
    claim = set(_claimed_gpus(view, name))
    if _may_use_criu(view, name, level):
        claim.add(CRIU)
    return frozenset(claim)


def swap_claim(view: View, target: str) -> frozenset:
    """The target's GPUs and those of every model the swap may put to sleep, stop, or
    bring back in a rollback: exactly what placement names now."""
    touched = [target, *placement_for(view, target).evict, *stray_holders(view, target)]
    claim = set().union(*(_claimed_gpus(view, n) for n in touched))
    if any(_may_use_criu(view, n) for n in touched):
        claim.add(CRIU)
    return frozenset(claim)


def conflicts(a: frozenset | None, b: frozenset | None) -> bool:
    """Whether two jobs may not run at once (EVERYTHING conflicts with any claim)."""
    return a is None or b is None or bool(a & b)
