"""Tests of llmuxd.catalog: loading, validation messages with exact lines, drop-ins."""
from __future__ import annotations

import os
import textwrap
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from llmuxd.catalog import (Catalog, CatalogError, DaemonSettings, ModelSpec, load_catalog,
                            locate_keys, parse_duration, validate_only)

ETC = Path(__file__).resolve().parent.parent / "etc"

MINIMAL = """\
[daemon]
socket = "run/llmux.sock"
state_dir = "state"

[models.qwen]
model = "Qwen/Qwen3-0.6B"
port = 8001
"""


def write(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(textwrap.dedent(text))
    return path


def problems_of(tmp_path: Path, text: str, name: str = "llmux.toml") -> list[str]:
    path = write(tmp_path / name, text)
    problems = validate_only(str(path))
    with pytest.raises(CatalogError) as info:
        load_catalog(str(path))
    assert info.value.problems == problems
    assert str(info.value) == "\n".join(problems)
    return problems


def only_problem(tmp_path: Path, text: str) -> str:
    problems = problems_of(tmp_path, text)
    assert len(problems) == 1, problems
    return problems[0]


# ---------------------------------------------------------------- samples and defaults

@pytest.mark.parametrize("name", ["llmux.toml", "llmux.demo.toml"])
def test_sample_catalogs_are_valid(name):
    path = ETC / name
    assert validate_only(str(path)) == []
    catalog = load_catalog(str(path))
    assert len(catalog.models) == 3
    assert sorted(m.sleep_level for m in catalog.models.values())[0] == 1
    assert {m.sleep_level for m in catalog.models.values()} >= {1, 2, 5}
    assert catalog.files == (str(path),)


def test_real_sample_keeps_defaults():
    catalog = load_catalog(str(ETC / "llmux.toml"))
    d = catalog.daemon
    defaults = DaemonSettings()
    for key in ("socket", "socket_mode", "state_dir", "vllm_command", "drain_timeout",
                "stop_timeout", "startup_timeout", "sleep_timeout", "wake_timeout",
                "health_interval", "health_failures", "restart_limit", "restart_window",
                "restart_backoff"):
        assert getattr(d, key) == getattr(defaults, key), key
    assert d.log_dir == "/var/lib/llmux/logs"
    assert d.checkpoint.images_dir == "/var/lib/llmux/checkpoints"
    assert catalog.models["qwen3-0.6b"].model == "Qwen/Qwen3-0.6B"


def test_demo_sample_uses_simulator():
    catalog = load_catalog(str(ETC / "llmux.demo.toml"))
    assert catalog.daemon.vllm_command == ("llmux-sim",)
    assert catalog.daemon.socket == "/tmp/llmux-demo/llmux.sock"
    assert [m.port for m in catalog.models.values()] == [18001, 18002, 18003]
    assert [m.sleep_level for m in catalog.models.values()] == [1, 2, 5]


def test_minimal_catalog_and_path_resolution(tmp_path):
    path = write(tmp_path / "llmux.toml", MINIMAL + 'cwd = "work"\nenv = { A_B = "1" }\n')
    catalog = load_catalog(str(path))
    assert isinstance(catalog, Catalog)
    assert catalog.path == str(path)
    assert catalog.daemon.socket == str(tmp_path / "run/llmux.sock")
    assert catalog.daemon.state_dir == str(tmp_path / "state")
    assert catalog.daemon.log_dir == str(tmp_path / "state/logs")
    assert catalog.daemon.checkpoint.images_dir == str(tmp_path / "state/checkpoints")
    spec = catalog.models["qwen"]
    assert spec == ModelSpec(name="qwen", model="Qwen/Qwen3-0.6B", port=8001,
                             env=(("A_B", "1"),), cwd=str(tmp_path / "work"),
                             source=f"{path}:5")
    assert spec.env_dict() == {"A_B": "1"}


def test_empty_file_and_empty_models_are_allowed(tmp_path):
    catalog = load_catalog(str(write(tmp_path / "a.toml", "")))
    assert catalog.models == {}
    assert catalog.daemon.state_dir == "/var/lib/llmux"
    assert load_catalog(str(write(tmp_path / "b.toml", "[models]\n"))).models == {}


def test_effective_timeouts(tmp_path):
    path = write(tmp_path / "llmux.toml", """\
        [daemon]
        drain_timeout = "1m"
        stop_timeout = 7
        [models.a]
        model = "m"
        port = 1
        stop_timeout = "500ms"
        """)
    catalog = load_catalog(str(path))
    spec = catalog.models["a"]
    assert catalog.effective(spec, "drain_timeout") == 60.0
    assert catalog.effective(spec, "stop_timeout") == 0.5
    assert catalog.effective(spec, "startup_timeout") == 1800.0
    with pytest.raises(KeyError):
        catalog.effective(spec, "port")


def test_all_value_types(tmp_path):
    path = write(tmp_path / "llmux.toml", """\
        [daemon]
        socket_mode = 0o600
        vllm_command = "/opt/venv/bin/python -m 'vllm.entrypoints.cli.main'"
        default_model = "a"
        health_interval = 0.5
        health_failures = 1
        restart_limit = 0
        [daemon.checkpoint]
        cuda_checkpoint = "/usr/bin/cuda-checkpoint"
        images_dir = "/big/images"
        ghost_limit = 0
        [models.a]
        model = "m"
        port = 65535
        sleep_level = 4
        keep_images = true
        args = []
        """)
    catalog = load_catalog(str(path))
    d = catalog.daemon
    assert d.socket_mode == 0o600
    assert d.vllm_command == ("/opt/venv/bin/python", "-m", "vllm.entrypoints.cli.main")
    assert d.default_model == "a"
    assert (d.health_interval, d.health_failures, d.restart_limit) == (0.5, 1, 0)
    assert d.checkpoint.images_dir == "/big/images"
    assert d.checkpoint.ghost_limit == 0
    assert catalog.models["a"].keep_images is True


@pytest.mark.parametrize("text,mode", [('"0660"', 0o660), ('"600"', 0o600), ('"0o640"', 0o640),
                                       ("0o777", 0o777), ("0", 0)])
def test_socket_mode_values(tmp_path, text, mode):
    path = write(tmp_path / "llmux.toml", f"[daemon]\nsocket_mode = {text}\n")
    assert load_catalog(str(path)).daemon.socket_mode == mode


# ---------------------------------------------------------------- durations

@pytest.mark.parametrize("value,seconds", [
    (0, 0.0), (30, 30.0), (2.5, 2.5), ("30s", 30.0), ("5m", 300.0), ("1h", 3600.0),
    ("500ms", 0.5), ("1m30s", 90.0), ("2.5s", 2.5), ("1h30m", 5400.0), (" 10s ", 10.0),
    ("1h2m3s4ms", 3723.004), ("0s", 0.0),
])
def test_parse_duration_good(value, seconds):
    assert parse_duration(value, "x") == pytest.approx(seconds)


@pytest.mark.parametrize("value", [
    True, False, -1, -0.5, float("inf"), float("nan"), "", "30", "s", "5 m", "1d", "-5s",
    "30s5m", "1.s", ".5s", "5mm", "1h1h", None, [30], {"s": 1}, "30sec",
])
def test_parse_duration_bad(value):
    with pytest.raises(ValueError) as info:
        parse_duration(value, "daemon.stop_timeout")
    assert str(info.value).startswith("daemon.stop_timeout: ")


def test_duration_error_in_file(tmp_path):
    msg = only_problem(tmp_path, '[daemon]\n\ndrain_timeout = "10 minutes"\n')
    assert msg.startswith(f"{tmp_path / 'llmux.toml'}:3: daemon.drain_timeout: invalid duration")


# ---------------------------------------------------------------- rule by rule, exact lines

def test_unknown_key_on_line_7_with_suggestion(tmp_path):
    msg = only_problem(tmp_path, MINIMAL.replace('port = 8001', 'port = 8001\nprot = 8002'))
    assert msg == f"{tmp_path / 'llmux.toml'}:8: models.qwen.prot: unknown key (did you mean 'port'?)"
    text = "[daemon]\n# a\n# b\n\n\n\nstop_timout = 3\n"
    assert only_problem(tmp_path, text) == (
        f"{tmp_path / 'llmux.toml'}:7: daemon.stop_timout: unknown key (did you mean 'stop_timeout'?)")


@pytest.mark.parametrize("text,expected", [
    ('demon = {}\n', "1: demon: unknown key (did you mean 'daemon'?)"),
    ('[daemon.checkpoint]\ncriu = "x"\n',
     "2: daemon.checkpoint.criu: unknown key (did you mean 'criu_path'?)"),
    ('[daemon]\nzzzz = 1\n', "2: daemon.zzzz: unknown key"),
    ('[models.q]\nmodel = "m"\nport = "8001"\n',
     "3: models.q.port: expected an integer, got string"),
    ('[models.q]\nmodel = "m"\nport = true\n',
     "3: models.q.port: expected an integer, got boolean"),
    ('[models.q]\nmodel = "m"\nport = 0\n', "3: models.q.port: must be between 1 and 65535, got 0"),
    ('[models.q]\nmodel = "m"\nport = 70000\n',
     "3: models.q.port: must be between 1 and 65535, got 70000"),
    ('[models.q]\nmodel = "m"\nport = 1\nsleep_level = 6\n',
     "4: models.q.sleep_level: must be between 1 and 5, got 6"),
    ('[models.q]\nmodel = ""\nport = 1\n', "2: models.q.model: must not be empty"),
    ('[models.q]\nport = 1\n', "1: models.q: missing required key 'model'"),
    ('[models.q]\nmodel = "m"\nport = 1\nargs = "--x"\n',
     "4: models.q.args: expected an array of strings, got string"),
    ('[models.q]\nmodel = "m"\nport = 1\nargs = ["--x", 1]\n',
     "4: models.q.args[1]: expected a string, got integer"),
    ('[models.q]\nmodel = "m"\nport = 1\n\n[models.q.env]\nA = 1\n',
     "6: models.q.env.A: expected a string, got integer"),
    ('[models.q]\nmodel = "m"\nport = 1\nenv = { "1A" = "x" }\n',
     "4: models.q.env: '1A' is not a valid environment variable name"),
    ('[models.q]\nmodel = "m"\nport = 1\nkeep_images = 1\n',
     "4: models.q.keep_images: expected a boolean (true or false), got integer"),
    ('[models."bad name"]\nmodel = "m"\nport = 1\n', "1: models.\"bad name\": invalid model name"),
    ('[models.q]\nmodel = "m"\nport = 1\ncwd = ""\n', "4: models.q.cwd: must not be empty"),
    ('[models.q]\nmodel = "m"\nport = 1\nstop_timeout = -3\n',
     "4: models.q.stop_timeout: duration must be a finite number >= 0, got -3"),
    ('models = 3\n', "1: models: expected a table, got integer"),
    ('[models]\nq = "x"\n', "2: models.q: expected a table, got string"),
    ('[daemon]\nsocket_mode = "0999"\n', '2: daemon.socket_mode: expected octal digits like "0660"'),
    ('[daemon]\nsocket_mode = 0o1777\n', "2: daemon.socket_mode: must be between 0 and 0o777"),
    ('[daemon]\nsocket_mode = 420\n', "2: daemon.socket_mode: write the mode in octal"),
    ('[daemon]\nsocket = ""\n', "2: daemon.socket: must not be empty"),
    ('[daemon]\nvllm_command = []\n', "2: daemon.vllm_command: must name a program"),
    ('[daemon]\nvllm_command = "vllm \'oops"\n', "2: daemon.vllm_command: cannot split command"),
    ('[daemon]\nhealth_interval = 0\n', "2: daemon.health_interval: must be greater than 0"),
    ('[daemon]\nhealth_failures = 0\n', "2: daemon.health_failures: must be >= 1, got 0"),
    ('[daemon]\nrestart_limit = -1\n', "2: daemon.restart_limit: must be >= 0, got -1"),
    ('[daemon]\nrestart_window = 1979-05-27\n',
     "2: daemon.restart_window: expected a duration"),
    ('[daemon.checkpoint]\nghost_limit = 1.5\n',
     "2: daemon.checkpoint.ghost_limit: expected an integer, got float"),
    ('[daemon]\ncheckpoint = 1\n', "2: daemon.checkpoint: expected a table, got integer"),
    ('[daemon]\ndefault_model = "nope"\n',
     "2: daemon.default_model: no model named 'nope' is defined"),
    ('daemon.stop_timeout = "x"\n', "1: daemon.stop_timeout: invalid duration"),
    ('[models.llama-3.1-8b]\nmodel = "m"\nport = 1\n',
     '1: models.llama-3.1-8b: unknown key (quote names with dots: [models."llama-3.1-8b"])'),
])
def test_rule_messages(tmp_path, text, expected):
    msgs = problems_of(tmp_path, text)
    prefix = f"{tmp_path / 'llmux.toml'}:"
    assert any(m.startswith(prefix + expected) for m in msgs), msgs


def test_wrong_type_message_exact(tmp_path):
    msg = only_problem(tmp_path, MINIMAL.replace("port = 8001", 'port = "8001"'))
    assert msg == f"{tmp_path / 'llmux.toml'}:7: models.qwen.port: expected an integer, got string"


def test_duplicate_ports(tmp_path):
    msg = only_problem(tmp_path, MINIMAL + '\n[models.other]\nmodel = "x"\nport = 8001\n')
    f = tmp_path / "llmux.toml"
    assert msg == (f"{f}:11: models.other.port: duplicate port 8001 "
                   f"(already used by model 'qwen' at {f}:7)")


def test_all_problems_reported_at_once(tmp_path):
    text = """\
        bogus = 1
        [daemon]
        stop_timeout = "forever"
        health_failures = 0
        default_model = "missing"
        [models.a]
        model = 1
        port = 99999
        [models.b]
        model = "m"
        port = 5
        extra = true
        """
    msgs = problems_of(tmp_path, text)
    lines = [int(m.split(":")[1]) for m in msgs]
    assert sorted(lines) == [1, 3, 4, 5, 7, 8, 12], msgs


# ---------------------------------------------------------------- drop-ins

def test_dropins_add_models_in_name_order(tmp_path):
    main = write(tmp_path / "llmux.toml", MINIMAL)
    write(tmp_path / "models.d/20-b.toml", '[models.b]\nmodel = "b"\nport = 8003\n')
    write(tmp_path / "models.d/10-a.toml", '[models.a]\nmodel = "a"\nport = 8002\n')
    write(tmp_path / "models.d/notes.txt", "not toml")
    write(tmp_path / "models.d/.hidden.toml", "garbage = [")
    catalog = load_catalog(str(main))
    assert list(catalog.models) == ["qwen", "a", "b"]
    assert catalog.files == (str(main), str(tmp_path / "models.d/10-a.toml"),
                             str(tmp_path / "models.d/20-b.toml"))
    assert catalog.models["b"].source == f"{tmp_path / 'models.d/20-b.toml'}:1"


def test_default_model_may_name_a_dropin_model(tmp_path):
    main = write(tmp_path / "llmux.toml", '[daemon]\ndefault_model = "a"\n')
    write(tmp_path / "models.d/a.toml", '[models.a]\nmodel = "a"\nport = 8002\n')
    assert load_catalog(str(main)).daemon.default_model == "a"


def test_duplicate_model_across_files(tmp_path):
    main = write(tmp_path / "llmux.toml", MINIMAL)
    drop = write(tmp_path / "models.d/x.toml", '# extra\n\n[models.qwen]\nmodel = "b"\nport = 9\n')
    assert validate_only(str(main)) == [
        f"{drop}:3: duplicate model 'qwen' (first defined at {main}:5)"]


def test_duplicate_port_across_files(tmp_path):
    main = write(tmp_path / "llmux.toml", MINIMAL)
    drop = write(tmp_path / "models.d/x.toml", '[models.b]\nmodel = "b"\nport = 8001\n')
    assert validate_only(str(main)) == [
        f"{drop}:3: models.b.port: duplicate port 8001 (already used by model 'qwen' at {main}:7)"]


def test_dropin_may_only_define_models(tmp_path):
    main = write(tmp_path / "llmux.toml", MINIMAL)
    drop = write(tmp_path / "models.d/x.toml", '[daemon]\nsocket = "/x"\n[models.b]\nmodel = "b"\n'
                                               'port = 8009\nbad = 1\n')
    assert validate_only(str(main)) == [
        f"{drop}:1: daemon: a drop-in may only define [models.NAME] tables",
        f"{drop}:6: models.b.bad: unknown key",
    ]


def test_broken_dropin_is_reported_with_main_problems(tmp_path):
    main = write(tmp_path / "llmux.toml", "oops = 1\n" + MINIMAL)
    drop = write(tmp_path / "models.d/x.toml", "[models.b\n")
    msgs = validate_only(str(main))
    assert msgs[0] == f"{main}:1: oops: unknown key"
    assert msgs[1].startswith(f"{drop}:1: invalid TOML: ")


# ---------------------------------------------------------------- unreadable / invalid files

def test_syntax_error(tmp_path):
    msg = only_problem(tmp_path, '[daemon]\nsocket = "/x"\nstop_timeout = \n')
    assert msg.startswith(f"{tmp_path / 'llmux.toml'}:3: invalid TOML: ")
    assert "line 3" not in msg


def test_duplicate_key_in_one_file_is_a_toml_error(tmp_path):
    msg = only_problem(tmp_path, MINIMAL + "port = 8002\n")
    assert msg.startswith(f"{tmp_path / 'llmux.toml'}:8: invalid TOML: ")


def test_redefined_table_is_a_toml_error(tmp_path):
    msg = only_problem(tmp_path, MINIMAL + "[daemon]\n")
    assert msg.startswith(f"{tmp_path / 'llmux.toml'}:8: invalid TOML: ")


def test_missing_file(tmp_path):
    path = tmp_path / "nope.toml"
    [problem] = validate_only(str(path))  # no ":0:", and a hint where a catalog comes from
    assert problem.startswith(f"{path}: no such file (pass --config PATH or set $LLMUX_CONFIG")
    with pytest.raises(CatalogError):
        load_catalog(str(path))


def test_directory_and_bad_utf8(tmp_path):
    assert validate_only(str(tmp_path))[0].startswith(f"{tmp_path}:0: cannot read: ")
    path = tmp_path / "bin.toml"
    path.write_bytes(b"a = 1\nb = '\xff'\n")
    assert validate_only(str(path)) == [f"{path}:2: cannot read: not valid UTF-8 (invalid start byte)"]


@pytest.mark.skipif(os.geteuid() == 0, reason="root can read anything")
def test_unreadable_file(tmp_path):
    path = write(tmp_path / "llmux.toml", MINIMAL)
    path.chmod(0)
    assert validate_only(str(path)) == [f"{path}:0: cannot read: Permission denied"]


# ---------------------------------------------------------------- locator

def test_locator_paths_and_lines():
    text = textwrap.dedent('''\
        top = 1
        [a."b.c"]
        x.y = 2
        'lit' = """
        fake = 1
        """
        arr = [
          "k = v",
          { z = 1 },
        ]
        [[t]]
        q = 'x' # [not.a.table]
        after = 3
        ''')
    lines = locate_keys(text)
    assert lines[("top",)] == 1
    assert lines[("a", "b.c")] == 2
    assert lines[("a", "b.c", "x")] == 3 and lines[("a", "b.c", "x", "y")] == 3
    assert lines[("a", "b.c", "lit")] == 4
    assert ("a", "b.c", "fake") not in lines and ("fake",) not in lines
    assert lines[("a", "b.c", "arr")] == 7
    assert ("t",) in lines and lines[("t", "q")] == 12 and lines[("t", "after")] == 13


# ---------------------------------------------------------------- never a traceback

_FRAGMENTS = st.sampled_from([
    "[daemon]\n", "[models.a]\n", "[models.b]\n", "[daemon.checkpoint]\n", "[[models]]\n",
    'model = "m"\n', "port = 1\n", "port = 1\n", "sleep_level = 9\n", 'socket_mode = "0660"\n',
    "socket_mode = 438\n", "args = [1, 2]\n", "env = {A = 1}\n", 'stop_timeout = "5m"\n',
    "default_model = 'a'\n", "models = 1\n", "x = 1979-05-27T07:32:00Z\n", '"""\n', "[\n",
    "a.b.c = {}\n", "vllm_command = ''\n", "health_interval = -1\n", "= 1\n", "\x00", "é",
])


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(st.one_of(st.binary(max_size=300), st.text(max_size=300),
                 st.lists(_FRAGMENTS, max_size=15).map("".join)))
def test_garbage_never_raises_anything_but_catalog_error(tmp_path, data):
    path = tmp_path / "fuzz.toml"
    if isinstance(data, str):
        data = data.encode("utf-8", "surrogatepass")
    path.write_bytes(data)
    try:
        load_catalog(str(path))
    except CatalogError as e:
        assert e.problems and all(p.startswith(f"{path}:") for p in e.problems)
    assert isinstance(validate_only(str(path)), list)


@settings(max_examples=300, deadline=None)
@given(st.one_of(st.text(max_size=200), st.lists(_FRAGMENTS, max_size=15).map("".join)))
def test_locator_never_fails(text):
    repeats: list[int] = []
    lines = locate_keys(text, repeats)
    count = text.count("\n") + 1
    assert all(1 <= n <= count for n in list(lines.values()) + repeats)


def test_sample_catalog_documents_every_key():
    """etc/llmux.toml is the reference: every setting the loader knows appears in it."""
    import dataclasses
    from pathlib import Path

    from llmuxd.catalog import (AccessSettings, CheckpointSettings, DaemonSettings, FrontSettings,
                                ModelSpec)
    text = (Path(__file__).parent.parent / "etc" / "llmux.toml").read_text()
    for cls in (DaemonSettings, CheckpointSettings, AccessSettings, FrontSettings, ModelSpec):
        for f in dataclasses.fields(cls):
            if f.name in ("checkpoint", "access", "front", "name", "source") or \
                    cls is FrontSettings and f.name in ("host", "port") or \
                    f.name == "gpu_memory_declared":  # split from listen; derived
                continue
            assert f"{f.name} " in text or f"{f.name}=" in text, f"{cls.__name__}.{f.name}"


# ---------------------------------------------------------------- [daemon.front] and aliases

def test_front_keys_and_defaults(tmp_path):
    path = write(tmp_path / "llmux.toml", MINIMAL)
    assert load_catalog(str(path)).daemon.front.listen == ""  # no table: no front
    path = write(tmp_path / "llmux.toml", MINIMAL.replace("[models.qwen]", """\
[daemon.front]
listen = "[::1]:8100"
api_keys = ["k1", "k2"]
queue_timeout = "2m"
min_active = 5

[models.qwen]
aliases = ["gpt-4o", "Qwen/Qwen3"]"""))
    catalog = load_catalog(str(path))
    front = catalog.daemon.front
    assert (front.host, front.port, front.api_keys) == ("::1", 8100, ("k1", "k2"))
    assert (front.queue_timeout, front.min_active, front.max_queue) == (120.0, 5.0, 1024)
    assert catalog.models["qwen"].aliases == ("gpt-4o", "Qwen/Qwen3")


@pytest.mark.parametrize("line, message", [
    ('listen = "8000"', 'line 6: daemon.front.listen: expected "HOST:PORT"'),
    ('listen = "127.0.0.1:70000"', "line 6: daemon.front.listen: port must be between 1 and 65535"),
    ('listen = "127.0.0.1:8001"', "line 6: daemon.front.listen: port 8001 is also the port of "
                                  "model 'qwen'"),
    ('api_keys = ["a key"]', "line 6: daemon.front.api_keys[0]: an API key must be"),
    ('api_keys = "k"', "line 6: daemon.front.api_keys: expected an array of strings"),
    ('queue_timeout = "soon"', "line 6: daemon.front.queue_timeout: invalid duration"),
    ('min_active = -1', "line 6: daemon.front.min_active: duration must be"),
    ('max_queue = 0', "line 6: daemon.front.max_queue: must be between 1"),
    ("listn = 1", "line 6: daemon.front.listn: unknown key (did you mean 'listen'?)"),
])
def test_front_problems_name_file_and_line(tmp_path, line, message):
    text = MINIMAL.replace("[models.qwen]", f"[daemon.front]\n{line}\n\n[models.qwen]")
    problem = only_problem(tmp_path, text)
    file_line, rest = message.split(": ", 1)
    assert problem.startswith(f"{tmp_path / 'llmux.toml'}:{file_line.split()[1]}: {rest}"), problem


def test_aliases_must_be_unique_and_not_model_names(tmp_path):
    text = MINIMAL + """
aliases = ["shared", "other"]

[models.other]
model = "x"
port = 8002
aliases = ["shared"]
"""
    problems = problems_of(tmp_path, text)
    f = tmp_path / "llmux.toml"
    assert f"{f}:14: models.other.aliases: 'shared' is already an alias of model 'qwen' " \
           f"(at {f}:9)" in problems
    assert f"{f}:9: models.qwen.aliases: 'other' is the name of model 'other'" in problems
    assert len(problems) == 2
