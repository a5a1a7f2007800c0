"""The swap engine as tables of events: every operation a plan yields, the result
fed back, and the states of all models afterwards."""

from __future__ import annotations

import json
import signal

import pytest

from llmuxd import states as S
from llmuxd.actions import (CheckExited, CheckPort, Degraded, Http, HttpError, HttpResult, Pause, SignalGroup,
                            Spawn, WaitGone)
from llmuxd.steps import parse_queue_depth
from llmuxd.swap import recover_plan, shutdown_plan, sleep_plan, stop_plan, swap_plan

from .plans import FakeView, T, catalog, model, run_table

OK = HttpResult(200, b"")
IDLE = HttpResult(200, b'vllm:num_requests_running{model_name="m",engine="0"} 0.0\n'
                       b'vllm:num_requests_waiting{model_name="m",engine="0"} 0.0\n')
BUSY = HttpResult(200, b'vllm:num_requests_running{model_name="m",engine="0"} 2.0\n'
                       b'vllm:num_requests_waiting{model_name="m",engine="0"} 1.0\n')
ASLEEP = HttpResult(200, json.dumps({"is_sleeping": True}).encode())
AWAKE = HttpResult(200, json.dumps({"is_sleeping": False}).encode())
REFUSED = HttpError("GET /health: connection failed: Connection refused")
CAT = catalog(model("a", 8001, 1), model("b", 8002, 2), model("c", 8003, 5),
              drain_timeout=0.25, stop_timeout=5.0)


def metrics(m):
    return Http(m, "GET", "/metrics", timeout=5.0)


def health(m, timeout=5.0):
    return Http(m, "GET", "/health", timeout=timeout)


def is_sleeping(m):
    return Http(m, "GET", "/is_sleeping", timeout=5.0)


def cold_start(m, port_holder=None):
    return [(CheckPort(m), port_holder), (T(m, S.STARTING), None), (Spawn(m), None),
            (CheckExited(m), None), (Http, OK), (T(m, S.ACTIVE), None)]


def drain_idle(m):
    return [(T(m, S.DRAINING), None), (CheckExited(m), None), (metrics(m), IDLE)]


def sleep_ok(m, level):
    return [(T(m, S.GOING_TO_SLEEP), None),
            (Http(m, "POST", f"/sleep?level={level}", timeout=120.0), OK),
            (CheckExited(m), None), (is_sleeping(m), ASLEEP), (T(m, S.SLEEPING), None)]


def stop_clean(m, error=None, final=S.STOPPED):
    return [(T(m, S.STOPPING), None), (SignalGroup(m, signal.SIGTERM), None),
            (WaitGone(m, 5.0), True), (T(m, final, error), None)]


def test_cold_start_of_first_model():
    view = FakeView(CAT, {})
    outcome, message, phases = run_table(view, swap_plan(view, "a"), cold_start("a"))
    assert (outcome, message) == ("ok", "a is active")
    assert view.states() == {"a": "active", "b": "stopped", "c": "stopped"}
    assert phases == [("start", "a"), ("health", "a")]


def test_level1_swap_sleeps_then_wakes_in_order():
    view = FakeView(CAT, {"a": S.ACTIVE, "b": S.SLEEPING}, {"b": 2})
    table = drain_idle("a") + sleep_ok("a", 1) + [
        (T("b", S.WAKING), None),
        (Http("b", "POST", "/wake_up", timeout=120.0), OK),
        # level 2: reload the weights, then reset the prefix cache, in this order
        (Http("b", "POST", "/collective_rpc", timeout=120.0,
              body=b'{"method": "reload_weights"}'), OK),
        (Http("b", "POST", "/reset_prefix_cache", timeout=120.0), OK),
        (is_sleeping("b"), AWAKE),
        (CheckExited("b"), None), (Http, OK),
        (T("b", S.ACTIVE), None)]
    outcome, _, phases = run_table(view, swap_plan(view, "b"), table)
    assert outcome == "ok"
    assert view.states() == {"a": "sleeping", "b": "active", "c": "stopped"}
    assert view.runtimes["a"].asleep_level == 1
    assert [p for p, _ in phases] == ["drain", "sleep", "wake", "health"]


def test_level5_active_is_stopped_and_gone_before_target_starts():
    view = FakeView(CAT, {"c": S.ACTIVE})
    table = [(CheckPort("a"), None)] + drain_idle("c") + stop_clean("c") + cold_start("a")
    outcome, _, _ = run_table(view, swap_plan(view, "a"), table)
    assert outcome == "ok"
    assert view.states() == {"a": "active", "b": "stopped", "c": "stopped"}


def test_failed_sleep_escalates_to_stop_and_swap_goes_on():
    view = FakeView(CAT, {"a": S.ACTIVE})
    table = [(CheckPort("c"), None)] + drain_idle("a") + [
        (T("a", S.GOING_TO_SLEEP), None),
        (Http("a", "POST", "/sleep?level=1", timeout=120.0), HttpResult(500, b"boom")),
        (Degraded("a", "a could not reach sleep level 1 (a: POST /sleep?level=1 failed: HTTP 500: "
                       "boom); it was stopped instead"), None),
    ] + stop_clean("a", error="sleep (level 1) failed") + cold_start("c")
    outcome, _, _ = run_table(view, swap_plan(view, "c"), table)
    assert outcome == "ok"
    assert view.states() == {"a": "stopped", "b": "stopped", "c": "active"}
    assert "HTTP 500: boom" in view.runtimes["a"].last_error


def test_sleep_that_answers_200_but_stays_awake_escalates():
    view = FakeView(CAT, {"a": S.ACTIVE})
    table = [(CheckPort("c"), None)] + drain_idle("a") + [
        (T("a", S.GOING_TO_SLEEP), None), (Http, OK), (CheckExited("a"), None),
        (is_sleeping("a"), AWAKE), (Degraded, None)] + stop_clean("a", error="still awake") \
        + cold_start("c")
    assert run_table(view, swap_plan(view, "c"), table)[0] == "ok"


def test_stop_escalates_to_sigkill_after_stop_timeout():
    view = FakeView(CAT, {"c": S.ACTIVE})
    table = [(T("c", S.STOPPING), None), (SignalGroup("c", signal.SIGTERM), None),
             (WaitGone("c", 5.0), False), (SignalGroup("c", signal.SIGKILL), None),
             (WaitGone("c", 10.0), True), (T("c", S.STOPPED), None)]
    assert run_table(view, stop_plan(view, "c"), table)[0] == "ok"
    assert view.states()["c"] == "stopped"


def test_drain_timeout_changes_nothing_unless_forced():
    view = FakeView(CAT, {"a": S.ACTIVE, "b": S.SLEEPING}, {"b": 2})
    busy = [(CheckExited("a"), None), (metrics("a"), BUSY), (Pause(0.1), None)] * 3 + [
        (CheckExited("a"), None), (metrics("a"), BUSY)]
    table = [(T("a", S.DRAINING), None)] + busy + [(T("a", S.ACTIVE), None)]
    outcome, message, _ = run_table(view, swap_plan(view, "b"), table)
    assert outcome == "failed"
    assert "3 request(s) still in flight" in message and "--force" in message
    assert view.states() == {"a": "active", "b": "sleeping", "c": "stopped"}

    forced = [(T("a", S.DRAINING), None)] + busy + sleep_ok("a", 1)[:-1] + [
        (T("a", S.SLEEPING), None), (T("b", S.WAKING), None), (Http, OK), (Http, OK), (Http, OK),
        (is_sleeping("b"), AWAKE), (CheckExited("b"), None), (Http, OK), (T("b", S.ACTIVE), None)]
    outcome, _, phases = run_table(view, swap_plan(view, "b", force=True), forced)
    assert outcome == "ok" and ("drain-forced", "a") in phases


def test_failed_start_stops_target_and_rolls_back_to_previous():
    view = FakeView(CAT, {"a": S.ACTIVE})
    table = [(CheckPort("c"), None)] + drain_idle("a") + sleep_ok("a", 1) + [
        (CheckPort("c"), None), (T("c", S.STARTING), None), (Spawn("c"), None),
        (CheckExited("c"), "exited with status 1"),
    ] + stop_clean("c", final=S.FAILED) + [
        (T("a", S.WAKING), None), (Http("a", "POST", "/wake_up", timeout=120.0), OK),
        (is_sleeping("a"), AWAKE), (CheckExited("a"), None), (Http, OK), (T("a", S.ACTIVE), None)]
    outcome, message, phases = run_table(view, swap_plan(view, "c"), table)
    assert outcome == "failed"
    assert message.startswith("c exited with status 1 before it became healthy")
    assert message.endswith("a is active again")
    assert view.states() == {"a": "active", "b": "stopped", "c": "failed"}
    assert ("rollback", "a") in phases


def test_failed_wake_stops_target_and_reports_the_original_error():
    view = FakeView(CAT, {"a": S.ACTIVE, "b": S.SLEEPING}, {"b": 2})
    table = drain_idle("a") + sleep_ok("a", 1) + [
        (T("b", S.WAKING), None),
        (Http("b", "POST", "/wake_up", timeout=120.0), HttpResult(500, b"CUDA out of memory")),
    ] + stop_clean("b", final=S.FAILED) + [
        (T("a", S.WAKING), None), (Http, OK), (is_sleeping("a"), AWAKE), (CheckExited("a"), None),
        (Http, OK), (T("a", S.ACTIVE), None)]
    outcome, message, _ = run_table(view, swap_plan(view, "b"), table)
    assert outcome == "failed"
    assert "b: POST /wake_up failed: HTTP 500: CUDA out of memory" in message
    assert view.states() == {"a": "active", "b": "failed", "c": "stopped"}


def test_port_in_use_refuses_to_spawn_and_names_the_holder():
    view = FakeView(CAT, {})
    table = [(CheckPort("a"), "pid 4242 (python3)"), (T("a", S.FAILED, "port 8001"), None)]
    outcome, message, _ = run_table(view, swap_plan(view, "a"), table)
    assert outcome == "failed"
    assert "port 8001 is already in use by pid 4242 (python3)" in message
    assert view.states()["a"] == "failed"


def test_start_times_out_at_startup_deadline():
    cat = catalog(model("a", 8001, 1, startup_timeout=1.0), stop_timeout=5.0)
    view = FakeView(cat, {})
    polls = []
    for i in range(20):
        polls += [(CheckExited("a"), None), (Http, REFUSED), (Pause(0.05), None)]
    # 1.0 s of 0.05 s polls: the 21st health call is the last.
    table = [(CheckPort("a"), None), (T("a", S.STARTING), None), (Spawn("a"), None)] + polls + [
        (CheckExited("a"), None), (Http, REFUSED)] + stop_clean("a", final=S.FAILED)
    outcome, message, _ = run_table(view, swap_plan(view, "a"), table)
    assert outcome == "failed" and "not healthy after 1s" in message


def test_sleep_command_at_another_level_and_stop_of_sleeping_model():
    view = FakeView(CAT, {"a": S.ACTIVE})
    table = drain_idle("a") + sleep_ok("a", 2)
    assert run_table(view, sleep_plan(view, "a", level=2), table)[0] == "ok"
    assert view.runtimes["a"].asleep_level == 2
    assert run_table(view, stop_plan(view, "a"), stop_clean("a"))[0] == "ok"
    assert view.states()["a"] == "stopped"


def test_recover_kills_leftovers_then_cold_starts():
    view = FakeView(CAT, {"a": S.RESTARTING})
    table = [(T("a", S.STOPPING), None), (SignalGroup("a", signal.SIGKILL), None),
             (WaitGone("a", 10.0), True), (T("a", S.STOPPED), None)] + cold_start("a")
    assert run_table(view, recover_plan(view, "a"), table)[0] == "ok"
    assert view.states()["a"] == "active"


def test_shutdown_stops_every_model_with_a_process():
    view = FakeView(CAT, {"a": S.ACTIVE, "b": S.SLEEPING})
    table = stop_clean("a") + [(T("b", S.STOPPING), None), (SignalGroup("b", signal.SIGTERM), None),
                               (WaitGone("b", 5.0), True), (T("b", S.STOPPED), None)]
    assert run_table(view, shutdown_plan(view), table)[0] == "ok"
    assert set(view.states().values()) == {"stopped"}


@pytest.mark.parametrize("text,depth", [
    ("", None),
    ('vllm:num_requests_running{model_name="x",engine="0"} 3.0\n', 3),
    ('# HELP vllm:num_requests_running x\nvllm:num_requests_running{a="b"} 1\n'
     'vllm:num_requests_waiting{a="b"} 2\nvllm:num_requests_waiting_by_reason{r="x"} 9\n', 3),
    ('vllm:num_requests_running{engine="0"} 1\nvllm:num_requests_running{engine="1"} 1\n', 2),
    ("vllm:num_requests_running garbage\n", None),
])
def test_queue_depth_from_metrics(text, depth):
    assert parse_queue_depth(text) == depth


def test_transition_table_refuses_illegal_edges_and_keeps_state():
    rt = S.Runtime("a", state=S.SLEEPING)
    with pytest.raises(S.IllegalTransition):
        S.advance(rt, S.ACTIVE)
    assert rt.state == S.SLEEPING
    for state, nexts in S.TRANSITIONS.items():
        assert nexts <= set(S.TRANSITIONS), state


def test_active_model_that_dies_while_draining_is_cleaned_up_and_the_swap_goes_on():
    view = FakeView(CAT, {"a": S.ACTIVE})
    table = [(CheckPort("c"), None), (T("a", S.DRAINING), None),
             (CheckExited("a"), "killed by SIGKILL"),
             (T("a", S.STOPPING), None), (SignalGroup("a", signal.SIGKILL), None),
             (WaitGone("a", 10.0), True), (T("a", S.STOPPED, "exited while draining"), None)
             ] + cold_start("c")
    outcome, _, _ = run_table(view, swap_plan(view, "c"), table)
    assert outcome == "ok"
    assert view.states() == {"a": "stopped", "b": "stopped", "c": "active"}


def test_failed_restart_leaves_no_process_behind():
    from llmuxd.swap import restart_plan
    view = FakeView(CAT, {"a": S.ACTIVE})
    table = drain_idle("a") + stop_clean("a") + [
        (CheckPort("a"), None), (T("a", S.STARTING), None), (Spawn("a"), None),
        (CheckExited("a"), "exited with status 1")] + stop_clean("a", final=S.FAILED)
    outcome, message, _ = run_table(view, restart_plan(view, "a"), table)
    assert outcome == "failed" and view.states()["a"] == "failed"


def test_a_model_left_starting_is_stopped_before_another_starts():
    view = FakeView(CAT, {"a": S.STARTING})
    table = [(T("a", S.STOPPING), None), (SignalGroup("a", signal.SIGKILL), None),
             (WaitGone("a", 10.0), True), (T("a", S.STOPPED), None)] + cold_start("c")
    assert run_table(view, swap_plan(view, "c"), table)[0] == "ok"


def test_port_taken_is_checked_before_the_active_model_is_evicted():
    view = FakeView(CAT, {"a": S.ACTIVE})
    table = [(CheckPort("c"), "pid 4242 (python3)")]
    outcome, message, _ = run_table(view, swap_plan(view, "c"), table)
    assert outcome == "failed" and "already in use by pid 4242" in message
    assert "nothing changed" in message
    assert view.states()["a"] == "active" and view.states()["c"] == "stopped"
