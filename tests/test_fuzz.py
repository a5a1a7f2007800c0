"""Hypothesis throws random bytes, random JSON and random command sequences at the
protocol parser and at a live daemon: it never crashes, never leaves a model in a
state the state machine forbids, and keeps answering."""

from __future__ import annotations

import json
import socket

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmuxd import states as S
from llmuxd.protocol import LineBuffer, ProtocolError, decode_request

from .daemon_fixture import Daemon

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4),
    max_leaves=10)
requests = st.fixed_dictionaries(
    {"cmd": st.sampled_from(["status", "swap", "sleep", "stop", "logs", "ping", "doctor", "bogus"])},
    optional={"model": st.sampled_from(["a", "b", "c", "nope", ""]) | json_values,
              "level": st.integers(-2, 7) | json_values, "force": st.booleans() | json_values,
              "lines": st.integers(-5, 20000) | json_values, "follow": st.just(False)})


@given(st.binary(max_size=300))
def test_parser_never_raises_anything_but_protocol_errors(data):
    buf = LineBuffer(limit=128)
    try:
        lines = buf.feed(data)
    except ProtocolError:
        return
    for line in lines:
        try:
            request = decode_request(line)
        except ProtocolError:
            continue
        assert isinstance(request["cmd"], str)


@pytest.fixture(scope="module")
def live(tmp_path_factory):
    d = Daemon(tmp_path_factory.mktemp("fuzz"), {"a": {"sleep_level": 1}, "b": {"sleep_level": 2},
                                                  "c": {"sleep_level": 5}},
               {"drain_timeout": 0.5, "stop_timeout": 2})
    d.start()
    yield d
    d.cleanup()


def send_raw(d: Daemon, payload: bytes) -> list[dict]:
    s = socket.socket(socket.AF_UNIX)
    s.settimeout(30)
    s.connect(d.socket)
    try:
        s.sendall(payload)
        s.shutdown(socket.SHUT_WR)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    except OSError:
        data = b""
    finally:
        s.close()
    return [json.loads(line) for line in data.splitlines() if line.strip()]


def check_invariants(d: Daemon) -> None:
    status = d.status()
    assert status["ok"]
    states = {n: m["state"] for n, m in status["models"].items()}
    assert set(states.values()) <= set(S.TRANSITIONS), states
    assert list(states.values()).count("active") <= 1, states
    if status["job"] is None:  # at rest, no model is half way
        assert set(states.values()) <= {"stopped", "active", "sleeping", "failed"}, states
    assert d.proc.poll() is None


valid = st.builds(lambda cmd, model, level, force: {"cmd": cmd, "model": model, "level": level,
                                                    "force": force},
                  st.sampled_from(["swap", "swap", "sleep", "stop"]), st.sampled_from("abc"),
                  st.sampled_from([None, 1, 2, 5]), st.booleans())


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.lists(st.binary(max_size=200) | requests | valid | valid, min_size=1, max_size=6))
def test_daemon_survives_random_input_and_command_sequences(live, payloads):
    for payload in payloads:
        if isinstance(payload, bytes):
            replies = send_raw(live, payload)
        else:  # a request: wait for its final reply, so sequences really run
            replies = live.events(payload, timeout=60)
            assert "ok" in replies[-1]
        for reply in replies:
            assert isinstance(reply, dict)
            assert not str(reply.get("error", "")).startswith("internal error"), reply
        check_invariants(live)
