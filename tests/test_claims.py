"""Per-GPU claims: which GPUs (and CRIU) a job touches, which swaps may run at once,
the front's FIFO per GPU, and swap_plan leaving other GPUs alone. Pure tables."""
from __future__ import annotations

import pytest

from llmuxd import launch
from llmuxd.actions import CheckPort
from llmuxd import states as S
from llmuxd.claims import CRIU, conflicts, gpus_of, model_claim, size_of, swap_claim, universe
from llmuxd.front.demand import choose_swaps
from llmuxd.swap import swap_plan

from .plans import FakeView, catalog, model, run_table
from .test_swap import cold_start, drain_idle, sleep_ok

G = 2**30


def box(*specs, budget=80):
    """(name, GiB or None, gpus or None, level)"""
    return catalog(*[model(n, 8001 + i, level, gpu_memory=None if s is None else s * G,
                           gpus=None if g is None else tuple(g))
                     for i, (n, s, g, level) in enumerate(specs)],
                   gpu_memory=budget * G, drain_timeout=0.25, stop_timeout=5.0)


def view(cat, active=(), **states):
    v = FakeView(cat, {**{n: S.ACTIVE for n in active}, **states})
    for i, n in enumerate(active):
        v.runtimes[n].since = i + 1
    return v


CAT = box(("a", 40, [0], 1), ("b", 40, [1], 1), ("t", 50, [0, 1], 1), ("v", 20, None, 1),
          ("k", 40, [2], 4), ("m", 40, [3], 4), ("x", None, [2], 1))


def test_universe_and_gpus_of():
    v = view(CAT)
    assert universe(v) == {0, 1, 2, 3}
    assert gpus_of(v, "t") == {0, 1} and gpus_of(v, "v") == {0, 1, 2, 3}  # no list: all
    assert universe(view(box(("a", 1, None, 1)))) == {0}                   # v1: one GPU


# (active, target, claim) on CAT
@pytest.mark.parametrize("active, target, claim", [
    ((), "a", {0}),
    (("b",), "a", {0}),                  # b is on GPU 1 and stays: not claimed
    (("a", "b"), "t", {0, 1}),           # t needs room on both: a and b go
    (("t",), "a", {0, 1}),               # evicting the TP model t touches GPU 1 too
    (("a",), "v", {0, 1, 2, 3}),         # no list: every GPU
    (("b",), "v", {0, 1, 2, 3}),
    ((), "k", {2, CRIU}),                # level 4: the CRIU slot
    (("k",), "x", {2, CRIU}),            # x evicts k, a level-4 dump
    (("m",), "a", {0}),                  # m (level 4) stays on GPU 3: no CRIU for this swap
])
def test_swap_claim(active, target, claim):
    assert swap_claim(view(CAT, active), target) == frozenset(claim)


def test_checkpointed_target_claims_criu_and_conflicts():
    v = view(CAT, (), m=S.CHECKPOINTED)
    assert model_claim(v, "m") == {3, CRIU}
    assert swap_claim(v, "m") == {3, CRIU}
    assert conflicts(swap_claim(v, "m"), swap_claim(v, "k"))      # two CRIU jobs: serialized
    assert not conflicts(swap_claim(v, "m"), swap_claim(v, "a"))  # CRIU beside level 1: at once
    assert not conflicts(swap_claim(v, "a"), swap_claim(v, "b"))
    assert conflicts(None, frozenset({0})) and conflicts(frozenset(), None)  # EVERYTHING


def test_tp_size_measured_per_gpu_or_split_evenly():
    v = view(CAT, ("t",))
    assert size_of(v, "t") == 50 * G                         # declared, per GPU
    v.runtimes["t"].extra["gpu_measured"] = 110 * G          # no per-device figure: split over 2
    assert size_of(v, "t") == 55 * G
    v.runtimes["t"].extra["gpu_measured_by_gpu"] = {"0": 51 * G, "1": 58 * G}
    assert size_of(v, "t") == 58 * G


def test_model_env_has_the_gpus_in_pci_order():
    spec = CAT.models["t"]
    env = launch.model_env(spec, {"CUDA_VISIBLE_DEVICES": "7", "PATH": "/bin"})
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1" and env["CUDA_DEVICE_ORDER"] == "PCI_BUS_ID"
    v1 = launch.model_env(CAT.models["v"], {"CUDA_VISIBLE_DEVICES": "7"})
    assert v1["CUDA_VISIBLE_DEVICES"] == "7" and "CUDA_DEVICE_ORDER" not in v1  # untouched


# ---------------------------------------------------------------- the front's choice

CLAIMS = {"a": {0}, "b": {1}, "c": {0}, "d": {2}, "t": {0, 1}}


@pytest.mark.parametrize("waiting, running, since, min_active, starts, wait", [
    (["a", "b"], [], {}, 0, ["a", "b"], None),            # disjoint: both at once
    (["a", "c"], [], {}, 0, ["a"], None),                 # same GPU: the oldest only
    (["a", "b"], [{0}], {}, 0, ["b"], None),              # a's GPU is busy: b goes meanwhile
    (["t", "b"], [], {}, 0, ["t"], None),                 # b may not overtake t on GPU 1
    (["c", "d"], [{0}], {}, 0, ["d"], None),
    (["a", "b"], [None], {}, 0, [], None),                # adoption/shutdown: nothing
    (["c", "b"], [], {"e": 9}, 5, ["b"], 4),              # c would evict e (too young): b goes
])
def test_choose_swaps(waiting, running, since, min_active, starts, wait):
    states = {n: S.SLEEPING for n in CLAIMS} | {"e": S.ACTIVE}
    evicts = lambda target: ["e"] if target == "c" else []
    got = choose_swaps(waiting, states, since, 10, min_active, evicts,
                       lambda m: frozenset(CLAIMS[m]), [r if r is None else frozenset(r)
                                                       for r in running])
    assert got == (starts, wait)


# ---------------------------------------------------------------- the plan

def test_swap_on_gpu_1_leaves_gpu_0_alone():
    """a (GPU 0) is LRU, but only b shares GPU 1 with c; and a crashed holder on GPU 0
    is not the swap's to stop (another job may own it)."""
    cat = box(("a", 60, [0], 1), ("b", 60, [1], 1), ("c", 40, [1], 1), ("r", 10, [0], 1))
    v = view(cat, ("a", "b"), r=S.RESTARTING)
    table = [(CheckPort("c"), None)] + drain_idle("b") + sleep_ok("b", 1) + cold_start("c")
    outcome, message, _ = run_table(v, swap_plan(v, "c"), table)
    assert (outcome, message) == ("ok", "c is active")
    assert v.states() == {"a": "active", "b": "sleeping", "c": "active", "r": "restarting"}


def test_check_warns_about_a_gpu_nvml_does_not_see():
    cat = box(("a", 10, [0], 1), ("t", 10, [2, 5], 1), ("v", 10, None, 1))
    warnings = launch.gpu_index_warnings(cat, count=4)
    assert len(warnings) == 1 and "models.t.gpus: GPU 5 not found: NVML sees 4 GPU(s) (0-3)" \
        in warnings[0]
    assert launch.gpu_index_warnings(cat, count=8) == []
    assert "NVML sees no GPU" in launch.gpu_index_warnings(cat, count=0)[0]


class InUseView(FakeView):
    """A view whose running processes keep the definition they were started with."""

    def __init__(self, cat, states, in_use):
        super().__init__(cat, states)
        self.in_use = in_use

    def spec_in_use(self, name):
        return self.in_use.get(name) or self.catalog.models[name]


def test_a_model_moved_by_a_reload_claims_the_gpus_it_will_start_on():
    """Review: `restart a` after a reload moved a from GPU 0 to GPU 1 claimed GPU 0 only
    and started a on GPU 1 while a swap there ran."""
    old = box(("a", 40, [0], 1), ("b", 40, [1], 1))
    new = box(("a", 40, [1], 1), ("b", 40, [1], 1))
    v = InUseView(new, {"a": S.ACTIVE}, {"a": old.models["a"]})
    v.runtimes["a"].extra["restart_pending"] = True
    assert gpus_of(v, "a") == {0}                       # where its process runs now
    assert model_claim(v, "a") == {0, 1}                # and where its restart puts it
    v.runtimes["a"].state = S.SLEEPING
    assert swap_claim(v, "a") == {0, 1}                 # bring_up restarts it: GPU 1 too
