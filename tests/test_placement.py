"""Table-driven tests of llmuxd.placement.place: who is evicted, in what order, what is refused."""
from __future__ import annotations

import pytest

from llmuxd.placement import Resident, free_budget, place

G = 2**30


def R(name, size_gib, last_used):
    return Resident(name, None if size_gib is None else int(size_gib * G), last_used)


# (budget GiB, resident [(name, size GiB, last_used)], target, target GiB, evicted, refused?)
CASES = [
    # v1: nothing declares a size: whoever is resident goes
    ("v1-one", None, [("a", None, 1)], "b", None, ["a"], False),
    ("v1-none-resident", None, [], "b", None, [], False),
    ("no-budget-sized", None, [("a", 10, 1)], "b", 10, ["a"], False),
    # fits beside the others: nobody is evicted
    ("fits", 80, [("a", 20, 1), ("b", 20, 2)], "c", 30, [], False),
    ("fits-exactly", 80, [("a", 40, 1)], "c", 40, [], False),
    # LRU first, only as many as needed
    ("lru-one", 80, [("a", 30, 5), ("b", 30, 1)], "c", 30, ["b"], False),
    ("lru-two-in-order", 80, [("a", 30, 5), ("b", 20, 1), ("c", 25, 3)], "d", 50,
     ["b", "c"], False),
    ("lru-skips-none-needed", 80, [("a", 10, 1), ("b", 60, 2)], "c", 15, ["a"], False),
    ("lru-all", 80, [("a", 30, 1), ("b", 30, 2)], "c", 80, ["a", "b"], False),
    ("tie-by-name", 80, [("b", 40, 1), ("a", 40, 1)], "c", 40, ["a"], False),
    # exclusive models are evicted by everything and evict everything
    ("exclusive-resident-goes", 80, [("a", None, 9)], "b", 10, ["a"], False),
    ("exclusive-and-sized", 80, [("x", None, 9), ("a", 10, 1)], "b", 10, ["x"], False),
    ("exclusive-target", 80, [("a", 10, 2), ("b", 10, 1)], "x", None, ["b", "a"], False),
    # already resident: nothing moves
    ("already", 80, [("a", 30, 1), ("b", 30, 2)], "a", 30, [], False),
    # larger than the whole budget: refused, nobody evicted
    ("too-big", 80, [("a", 10, 1)], "c", 81, [], True),
]


@pytest.mark.parametrize("budget,resident,target,size,evicted,refused", [c[1:] for c in CASES],
                         ids=[c[0] for c in CASES])
def test_place(budget, resident, target, size, evicted, refused):
    got = place(None if budget is None else budget * G, [R(*r) for r in resident], target,
                None if size is None else size * G)
    assert list(got.evict) == evicted
    assert (got.refused is not None) == refused
    if refused:
        assert target in got.refused and "budget" in got.refused


def test_after_placement_the_target_fits():
    """Whatever the table misses: the kept set plus the target never exceeds the budget."""
    import random
    rng = random.Random(14)
    for _ in range(500):
        budget = rng.randint(1, 100)
        resident = [Resident(f"m{i}", rng.choice([None] + [rng.randint(1, 40)] * 4),
                             rng.random()) for i in range(rng.randint(0, 5))]
        size = rng.choice([None, rng.randint(1, 120)])
        got = place(budget, resident, "t", size)
        if got.refused:
            assert size > budget and not got.evict
            continue
        kept = [r for r in resident if r.name not in got.evict]
        if size is None:
            assert kept == []
        else:
            assert free_budget(budget, kept) is not None and free_budget(budget, kept) >= size
            # minimal: keeping the last evicted sized model back would not fit
            sized = [n for n in got.evict if dict((r.name, r.size) for r in resident)[n]]
            if sized:
                last = next(r for r in resident if r.name == sized[-1])
                assert free_budget(budget, kept + [last]) < size


def test_free_budget():
    assert free_budget(100, [Resident("a", 30), Resident("b", 20)]) == 50
    assert free_budget(100, [Resident("a", None)]) is None
    assert free_budget(None, []) is None
