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


# ---------------------------------------------------------------- per GPU
# Budget per GPU; a model holds its size on each of its GPUs; gpus None = every GPU of
# the universe (GPU 0 and every GPU a model names).

def RG(name, size_gib, last_used, gpus):
    return Resident(name, None if size_gib is None else int(size_gib * G), last_used,
                    None if gpus is None else frozenset(gpus))


# (budget GiB, resident [(name, GiB, last_used, gpus)], target, GiB, gpus, evicted, refused?)
GPU_CASES = [
    # disjoint GPUs: nothing to evict, however full the other GPU is
    ("other-gpu-full", 80, [("a", 80, 1, [0])], "b", 80, [1], [], False),
    ("other-gpu-exclusive", 80, [("a", None, 1, [0])], "b", None, [1], [], False),
    ("no-budget-other-gpu", None, [("a", 10, 1, [0])], "b", 10, [1], [], False),
    # only models sharing a GPU are candidates; the LRU among them goes first
    ("lru-on-my-gpu", 80, [("a", 50, 1, [0]), ("b", 50, 2, [1]), ("c", 30, 3, [1])], "d", 40, [1],
     ["b"], False),
    # a TP target on [0, 1]: evict only where it does not fit (b on 1), not the LRU a on 0
    ("tp-target-short-on-one", 80, [("a", 40, 1, [0]), ("b", 60, 2, [1])], "t", 40, [0, 1],
     ["b"], False),
    ("tp-target-short-on-both", 80, [("a", 50, 1, [0]), ("b", 60, 2, [1])], "t", 40, [0, 1],
     ["a", "b"], False),
    # a TP resident spans both: evicting it frees both GPUs at once
    ("tp-resident-frees-both", 80, [("t", 50, 1, [0, 1]), ("a", 20, 2, [0]), ("b", 20, 3, [1])],
     "c", 40, [1], ["t"], False),
    # exclusive on a shared GPU goes first, whatever its age
    ("exclusive-on-shared", 80, [("a", 10, 1, [1]), ("x", None, 9, [1]), ("y", None, 0, [0])],
     "b", 10, [1], ["x"], False),
    # an exclusive TP target evicts exactly what shares its GPUs, LRU order
    ("exclusive-tp-target", 80, [("a", 10, 3, [0]), ("b", 10, 1, [2]), ("c", 10, 2, [1])],
     "x", None, [0, 1], ["c", "a"], False),
    # no list = every GPU: it shares with everyone, and everyone with it
    ("all-gpus-resident", 80, [("v", 50, 1, None), ("a", 20, 2, [1])], "b", 40, [1], ["v"], False),
    ("all-gpus-target", 80, [("a", 50, 1, [0]), ("b", 50, 2, [1]), ("c", 10, 3, [1])], "v", 40,
     None, ["a", "b"], False),
    ("all-gpus-v1", 80, [("a", 30, 1, None), ("b", 30, 2, None)], "c", 30, None, ["a"], False),
    # refused: larger than one GPU's budget, nobody moves
    ("too-big-per-gpu", 80, [("a", 10, 1, [0])], "t", 81, [0, 1], [], True),
]


@pytest.mark.parametrize("budget,resident,target,size,gpus,evicted,refused",
                         [c[1:] for c in GPU_CASES], ids=[c[0] for c in GPU_CASES])
def test_place_per_gpu(budget, resident, target, size, gpus, evicted, refused):
    universe = frozenset({0, 1, 2})
    got = place(None if budget is None else budget * G, [RG(*r) for r in resident], target,
                None if size is None else size * G, None if gpus is None else frozenset(gpus),
                universe)
    assert list(got.evict) == evicted
    assert (got.refused is not None) == refused


def test_after_per_gpu_placement_the_target_fits_everywhere_and_others_are_untouched():
    import random
    from llmuxd.placement import free_per_gpu
    rng = random.Random(1414)
    universe = frozenset(range(4))
    for _ in range(1000):
        budget = rng.randint(20, 100)

        def gpus():
            return rng.choice([None, frozenset(rng.sample(range(4), rng.randint(1, 3)))])
        resident = [Resident(f"m{i}", rng.choice([None, rng.randint(1, 40), rng.randint(1, 40)]),
                             rng.random(), gpus()) for i in range(rng.randint(0, 6))]
        size, mine = rng.choice([None, rng.randint(1, 120)]), gpus()
        got = place(budget, resident, "t", size, mine, universe)
        if got.refused:
            assert size > budget and not got.evict
            continue
        on = universe if mine is None else mine
        for r in resident:  # nobody off the target's GPUs is ever evicted
            if r.name in got.evict:
                assert (universe if r.gpus is None else r.gpus) & on
        kept = [r for r in resident if r.name not in got.evict]
        after = free_per_gpu(budget, kept + [Resident("t", size, 2.0, mine)], universe)
        for gpu in on:
            if size is not None:
                assert after[gpu] is not None and after[gpu] >= 0
            else:
                assert [r for r in kept if gpu in (universe if r.gpus is None else r.gpus)] == []


def test_free_per_gpu():
    from llmuxd.placement import free_per_gpu
    resident = [RG("a", 30, 1, [0]), RG("t", 20, 2, [0, 1]), RG("x", None, 3, [2])]
    assert free_per_gpu(80 * G, resident, frozenset({0, 1, 2, 3})) == \
        {0: 30 * G, 1: 60 * G, 2: None, 3: 80 * G}
    assert free_budget(80 * G, resident[:2], frozenset({0, 1})) == 30 * G  # the fullest GPU
