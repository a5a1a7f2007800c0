"""Placement: which resident models must sleep so that a target fits the GPU budget.

A pure function of numbers, no I/O and no state, so that every rule is a row of a
table in tests/test_placement.py and swap_plan only asks and obeys:

- the budget is per GPU; a model holds its size on each of its GPUs (a TP model
  declares what one rank holds); a model without a GPU list sits on every GPU of
  the universe the caller passes (v1: one GPU, so one shared budget);
- a model without a size is exclusive on its GPUs: it evicts every model that
  shares one of them, and is evicted by every model that does (v1 behaviour for
  catalogs that declare no sizes);
- with no budget known (no GPU seen, none declared) every model is exclusive;
- otherwise only models that share a GPU with the target are candidates, the least
  recently used first, and only while the target does not fit on one of its GPUs
  (a candidate that sits only on GPUs with room stays); a target larger than the
  whole budget is refused (never evict everything for a swap that cannot succeed).

Sizes are what the model was measured to hold when that is known, else what it
declared (the caller chooses: see `size_of` in claims.py).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Resident", "Placement", "place", "free_budget", "free_per_gpu", "ONE_GPU"]

ONE_GPU = frozenset({0})  # the universe of a catalog that names no GPU (v1)


@dataclass(frozen=True)
class Resident:
    name: str
    size: int | None          # bytes on each of its GPUs; None = exclusive
    last_used: float = 0.0    # wall time it was last made active or used (Runtime.used_at)
    gpus: frozenset | None = None  # None = every GPU of the universe


@dataclass(frozen=True)
class Placement:
    evict: tuple[str, ...] = ()   # in the order they must be put to sleep
    refused: str | None = None    # why the target cannot be placed at all


def _on(gpus: frozenset | None, universe: frozenset) -> frozenset:
    return universe if gpus is None else gpus


def free_per_gpu(budget: int | None, resident: list[Resident],
                 universe: frozenset = ONE_GPU) -> dict[int, int | None]:
    """GPU -> what is left of its budget; None where there is no budget or an exclusive
    model holds that GPU."""
    every = universe.union(*(r.gpus for r in resident if r.gpus is not None))
    free: dict[int, int | None] = {}
    for gpu in sorted(every):
        here = [r for r in resident if gpu in _on(r.gpus, universe)]
        free[gpu] = None if budget is None or any(r.size is None for r in here) else \
            budget - sum(r.size for r in here)
    return free


def free_budget(budget: int | None, resident: list[Resident],
                universe: frozenset = ONE_GPU) -> int | None:
    """What is left on the fullest GPU; None when there is no budget or an exclusive
    model holds a GPU (status shows each GPU apart)."""
    free = free_per_gpu(budget, resident, universe).values()
    return None if not free or None in free else min(free)


def lru(resident: list[Resident]) -> list[Resident]:
    # Ties by name so the order is stable whatever order the caller listed them in.
    return sorted(resident, key=lambda r: (r.last_used, r.name))


def place(budget: int | None, resident: list[Resident], target: str,
          target_size: int | None, target_gpus: frozenset | None = None,
          universe: frozenset = ONE_GPU) -> Placement:
    if any(r.name == target for r in resident):  # already resident: nothing moves
        return Placement()
    if target_size is not None and budget is not None and target_size > budget:
        return Placement(refused=f"{target} needs {target_size} bytes of GPU memory, more than "
                                 f"the whole budget ({budget} bytes)")
    mine = _on(target_gpus, universe)
    sharing = [r for r in lru(resident) if _on(r.gpus, universe) & mine]
    if target_size is None or budget is None:
        return Placement(evict=tuple(r.name for r in sharing))
    # Exclusive residents go whatever the sizes say; then LRU among those on a GPU
    # where the target does not fit yet, until it fits on every one of its GPUs.
    evict = [r for r in sharing if r.size is None]
    kept = [r for r in sharing if r.size is not None]
    while True:
        used = {g: sum(r.size for r in kept if g in _on(r.gpus, universe)) for g in mine}
        short = {g for g, u in used.items() if u + target_size > budget}
        victim = next((r for r in kept if _on(r.gpus, universe) & short), None)
        if victim is None:
            break
        kept.remove(victim)
        evict.append(victim)
    return Placement(evict=tuple(r.name for r in evict))
