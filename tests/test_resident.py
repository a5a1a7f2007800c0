"""swap_plan with sizes: a resident set, LRU evictions in order before the target wakes,
refusals, and rollback of every evicted model. Tables as in test_swap.py."""
from __future__ import annotations

from llmuxd import states as S
from llmuxd.swap import resident_set, size_of, swap_plan

from .plans import FakeView, T, catalog, model, run_table
from llmuxd.actions import CheckExited, CheckPort, Http, HttpResult

from .test_swap import AWAKE, OK, cold_start, drain_idle, is_sleeping, sleep_ok, stop_clean

G = 2**30


def sized(*sizes, budget=80):
    specs = [model(n, 8001 + i, 1, gpu_memory=None if s is None else s * G)
             for i, (n, s) in enumerate(sizes)]
    return catalog(*specs, gpu_memory=budget * G, drain_timeout=0.25, stop_timeout=5.0)


def view_of(cat, states, since):
    view = FakeView(cat, states)
    for n, t in since.items():
        view.runtimes[n].since = t
    return view


def test_fits_beside_the_active_models_nobody_sleeps():
    view = view_of(sized(("a", 30), ("b", 30), ("c", 20)), {"a": S.ACTIVE, "b": S.ACTIVE},
                   {"a": 1, "b": 2})
    outcome, message, _ = run_table(view, swap_plan(view, "c"), cold_start("c"))
    assert (outcome, message) == ("ok", "c is active")
    assert view.states() == {"a": "active", "b": "active", "c": "active"}


def test_least_recently_used_sleeps_first_and_before_the_target_starts():
    view = view_of(sized(("a", 30), ("b", 30), ("c", 30)), {"a": S.ACTIVE, "b": S.ACTIVE},
                   {"a": 5, "b": 1})
    table = [(CheckPort("c"), None)] + drain_idle("b") + sleep_ok("b", 1) + cold_start("c")
    outcome, _, _ = run_table(view, swap_plan(view, "c"), table)
    assert outcome == "ok"
    assert view.states() == {"a": "active", "b": "sleeping", "c": "active"}


def test_two_evicted_in_lru_order():
    view = view_of(sized(("a", 30), ("b", 20), ("c", 25), ("d", 50)),
                   {"a": S.ACTIVE, "b": S.ACTIVE, "c": S.ACTIVE}, {"a": 5, "b": 1, "c": 3})
    table = [(CheckPort("d"), None)] + drain_idle("b") + sleep_ok("b", 1) + drain_idle("c") + sleep_ok("c", 1) \
        + cold_start("d")
    assert run_table(view, swap_plan(view, "d"), table)[0] == "ok"
    assert view.states() == {"a": "active", "b": "sleeping", "c": "sleeping", "d": "active"}


def test_exclusive_target_evicts_every_resident():
    view = view_of(sized(("a", 30), ("b", 20), ("x", None)), {"a": S.ACTIVE, "b": S.ACTIVE},
                   {"a": 2, "b": 1})
    table = [(CheckPort("x"), None)] + drain_idle("b") + sleep_ok("b", 1) + drain_idle("a") + sleep_ok("a", 1) \
        + cold_start("x")
    assert run_table(view, swap_plan(view, "x"), table)[0] == "ok"


def test_larger_than_budget_is_refused_and_nothing_changes():
    view = view_of(sized(("a", 30), ("big", 90)), {"a": S.ACTIVE}, {"a": 1})
    outcome, message, _ = run_table(view, swap_plan(view, "big"), [])
    assert outcome == "failed" and "budget" in message
    assert view.states() == {"a": "active", "big": "stopped"}


def test_failed_wake_brings_every_evicted_model_back_most_recent_first():
    view = view_of(sized(("a", 40), ("b", 40), ("c", 80)),
                   {"a": S.ACTIVE, "b": S.ACTIVE, "c": S.SLEEPING}, {"a": 1, "b": 2})
    view.runtimes["c"].asleep_level = 1
    wake_ok = lambda m: [(T(m, S.WAKING), None), (Http, OK), (is_sleeping(m), AWAKE),
                         (CheckExited(m), None), (Http, OK), (T(m, S.ACTIVE), None)]
    table = drain_idle("a") + sleep_ok("a", 1) + drain_idle("b") + sleep_ok("b", 1) + [
        (T("c", S.WAKING), None),
        (Http("c", "POST", "/wake_up", timeout=120.0), HttpResult(500, b"CUDA out of memory")),
    ] + stop_clean("c", final=S.FAILED) + wake_ok("b") + wake_ok("a")
    outcome, message, phases = run_table(view, swap_plan(view, "c"), table)
    assert outcome == "failed" and message.endswith("b, a are active again")
    assert [m for p, m in phases if p == "rollback"] == ["b", "a"]
    assert view.states() == {"a": "active", "b": "active", "c": "failed"}


def test_measured_size_counts_when_larger():
    cat = sized(("a", 30), ("b", 30))
    view = view_of(cat, {"a": S.ACTIVE}, {"a": 1})
    assert size_of(view, "a") == 30 * G
    view.runtimes["a"].extra["gpu_measured"] = 55 * G
    assert size_of(view, "a") == 55 * G and resident_set(view)[0].size == 55 * G
    # 55 + 30 > 80: b now evicts a, which the declaration alone would not
    table = [(CheckPort("b"), None)] + drain_idle("a") + sleep_ok("a", 1) + cold_start("b")
    assert run_table(view, swap_plan(view, "b"), table)[0] == "ok"


def test_adoption_keeps_the_recorded_resident_set():
    from llmuxd.actions import Io
    from llmuxd.adopt import adopt_plan
    from .test_swap import health
    view = view_of(sized(("a", 30), ("b", 30), ("c", 30)),
                   {n: S.ADOPTING for n in "abc"}, {})
    stored = {"active": "b", "resident": ["a", "b"],
              "models": {n: {"state": S.ACTIVE, "pid": 1} for n in "abc"}}
    found = lambda m: [(Io("identify", (m, stored["models"][m])), "match"),
                       (Io("adopt_pid", (m, stored["models"][m])), None),
                       (health(m), OK), (is_sleeping(m), AWAKE)]
    table = found("a") + found("b") + found("c") + [(T("a", S.ACTIVE), None),
                                                     (T("b", S.ACTIVE), None)] \
        + stop_clean("c", error="found awake beside")
    outcome, value, _ = run_table(view, adopt_plan(view, stored), table)
    assert outcome == "ok"
    assert view.states() == {"a": "active", "b": "active", "c": "stopped"}
