"""Placement: which resident models must sleep so that a target fits the GPU budget.

A pure function of numbers, no I/O and no state, so that every rule is a row of a
table in tests/test_placement.py and swap_plan only asks and obeys:

- a model without a size is exclusive: it evicts every other model and is evicted
  by every other model (v1 behaviour for catalogs that declare no sizes);
- with no budget known (no GPU seen, none declared) every model is exclusive;
- otherwise the least recently used resident models are evicted first, and only as
  many as the target needs to fit; a target larger than the whole budget is refused
  (never evict everything for a swap that cannot succeed).

Sizes are what the model was measured to hold when that is known, else what it
declared (the caller chooses: see `size_of` in swap.py).
"""

from __future__ import annotations

from dataclasses import dataclass

__all__ = ["Resident", "Placement", "place", "free_budget"]


@dataclass(frozen=True)
class Resident:
    name: str
    size: int | None          # bytes; None = exclusive
    last_used: float = 0.0    # monotonic time it was last made active or served


@dataclass(frozen=True)
class Placement:
    evict: tuple[str, ...] = ()   # in the order they must be put to sleep
    refused: str | None = None    # why the target cannot be placed at all


def free_budget(budget: int | None, resident: list[Resident]) -> int | None:
    """What is left of the budget; None when there is no budget or an exclusive model holds it."""
    if budget is None or any(r.size is None for r in resident):
        return None
    return budget - sum(r.size for r in resident)


def _lru(resident: list[Resident]) -> list[Resident]:
    # Ties by name so the order is stable whatever order the caller listed them in.
    return sorted(resident, key=lambda r: (r.last_used, r.name))


def place(budget: int | None, resident: list[Resident], target: str,
          target_size: int | None) -> Placement:
    others = [r for r in resident if r.name != target]
    if len(others) < len(resident):  # already resident: nothing moves
        return Placement()
    if target_size is not None and budget is not None and target_size > budget:
        return Placement(refused=f"{target} needs {target_size} bytes of GPU memory, more than "
                                 f"the whole budget ({budget} bytes)")
    if target_size is None or budget is None:
        return Placement(evict=tuple(r.name for r in _lru(others)))
    # Exclusive residents go whatever the sizes say; then LRU until the target fits.
    evict = [r for r in _lru(others) if r.size is None]
    kept = [r for r in _lru(others) if r.size is not None]
    free = budget - sum(r.size for r in kept)
    while free < target_size and kept:
        victim = kept.pop(0)
        evict.append(victim)
        free += victim.size
    return Placement(evict=tuple(r.name for r in evict))
