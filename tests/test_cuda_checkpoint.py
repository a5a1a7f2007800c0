"""Tests for llmuxd/cuda_checkpoint.py, the fake cuda-checkpoint, and the private CRIU.

* The fake (tests/fakes/fake_cuda_checkpoint.py): its state machine, errors,
  failure and delay injection, and calls.log.
* llmuxd.cuda_checkpoint: argument parsing; behaviour without libcuda (one line,
  exit 1, no traceback); and its ctypes calls against a small fake libcuda.so.1
  compiled here with the C compiler, so the CPU-only machine exercises them too.
* CRIU (marked ``criu``, skipped without /opt/llmux-criu/bin/criu or $LLMUX_CRIU):
  ``criu check`` through the wrapper, and a dump/restore of an HTTP server with a
  child process using the flags llmuxd uses.
"""

from __future__ import annotations

import ctypes
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmuxd import cuda_checkpoint as cc

REPO = Path(__file__).resolve().parents[1]
FAKE = REPO / "tests" / "fakes" / "fake_cuda_checkpoint.py"


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items()
           if k not in ("LLMUX_FAKE_CUDA_FAIL", "LLMUX_FAKE_CUDA_DELAY", "LLMUX_LIBCUDA")}
    env["PYTHONPATH"] = str(REPO) + os.pathsep + env.get("PYTHONPATH", "")
    env.update(extra)
    return env


# ---------------------------------------------------------------------------------------
# The fake
# ---------------------------------------------------------------------------------------
@pytest.fixture
def cuda_dir(tmp_path: Path) -> Path:
    d = tmp_path / "fakecuda"
    d.mkdir()
    return d


def fake(cuda_dir: Path, *args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [str(FAKE), *args], capture_output=True, text=True, timeout=30,
        env=_env(LLMUX_SIM_FAKE_CUDA_DIR=str(cuda_dir), **env),
    )


def state_of(cuda_dir: Path, pid: int) -> str:
    return (cuda_dir / str(pid)).read_text().strip()


def calls(cuda_dir: Path) -> list[tuple[float, str, int]]:
    out = []
    for line in (cuda_dir / "calls.log").read_text().splitlines():
        t, action, pid = line.split()
        out.append((float(t), action, int(pid)))
    return out


def test_fake_is_executable():
    assert os.access(FAKE, os.X_OK)
    assert FAKE.read_text().startswith("#!/usr/bin/env python3\n")


def test_fake_get_state(cuda_dir: Path):
    for state in ("running", "locked", "checkpointed", "failed"):
        (cuda_dir / "42").write_text(state)
        r = fake(cuda_dir, "--get-state", "--pid", "42")
        assert r.returncode == 0, r.stderr
        assert r.stdout == f"{state}\n"
        assert r.stderr == ""


def test_fake_get_state_without_cuda(cuda_dir: Path):
    r = fake(cuda_dir, "--get-state", "--pid", "42")
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == "CUDA_ERROR_NOT_FOUND: process has no CUDA state\n"


def test_fake_actions_full_cycle(cuda_dir: Path):
    (cuda_dir / "7").write_text("running\n")
    expected = {"lock": "locked", "checkpoint": "checkpointed",
                "restore": "locked", "unlock": "running"}
    for action, after in expected.items():
        r = fake(cuda_dir, "--action", action, "--pid", "7")
        assert r.returncode == 0, r.stderr
        assert r.stdout == "" and r.stderr == ""
        assert state_of(cuda_dir, 7) == after
    assert [c[1:] for c in calls(cuda_dir)] == [(a, 7) for a in expected]


def test_fake_short_options_and_timeout(cuda_dir: Path):
    (cuda_dir / "7").write_text("running")
    r = fake(cuda_dir, "--action", "lock", "-p", "7", "-t", "5000")
    assert r.returncode == 0, r.stderr
    assert state_of(cuda_dir, 7) == "locked"


def test_fake_toggle_both_ways(cuda_dir: Path):
    (cuda_dir / "9").write_text("running")
    assert fake(cuda_dir, "--toggle", "--pid", "9").returncode == 0
    assert state_of(cuda_dir, 9) == "checkpointed"
    assert fake(cuda_dir, "--toggle", "--pid", "9").returncode == 0
    assert state_of(cuda_dir, 9) == "running"
    assert [c[1] for c in calls(cuda_dir)] == ["toggle", "toggle"]


@pytest.mark.parametrize("state", ["locked", "failed"])
def test_fake_toggle_refuses_other_states(cuda_dir: Path, state: str):
    (cuda_dir / "9").write_text(state)
    r = fake(cuda_dir, "--toggle", "--pid", "9")
    assert r.returncode == 1
    assert r.stderr.startswith("CUDA_ERROR_ILLEGAL_STATE:")
    assert state in r.stderr
    assert len(r.stderr.splitlines()) == 1
    assert state_of(cuda_dir, 9) == state


@pytest.mark.parametrize("action,state", [
    ("lock", "locked"), ("lock", "checkpointed"),
    ("checkpoint", "running"), ("checkpoint", "checkpointed"),
    ("restore", "running"), ("restore", "locked"),
    ("unlock", "running"), ("unlock", "checkpointed"),
    ("lock", "failed"),
])
def test_fake_wrong_state_transitions(cuda_dir: Path, action: str, state: str):
    (cuda_dir / "5").write_text(state)
    r = fake(cuda_dir, "--action", action, "--pid", "5")
    assert r.returncode == 1
    assert len(r.stderr.splitlines()) == 1
    assert r.stderr.startswith("CUDA_ERROR_ILLEGAL_STATE:")
    assert f"cannot {action} pid 5" in r.stderr and state in r.stderr
    assert state_of(cuda_dir, 5) == state


@pytest.mark.parametrize("action", ["lock", "checkpoint", "restore", "unlock"])
def test_fake_actions_without_cuda(cuda_dir: Path, action: str):
    r = fake(cuda_dir, "--action", action, "--pid", "5")
    assert r.returncode == 1
    assert r.stderr == "CUDA_ERROR_NOT_FOUND: process has no CUDA state\n"
    assert not (cuda_dir / "5").exists()


def test_fake_failure_injection(cuda_dir: Path):
    (cuda_dir / "3").write_text("running")
    r = fake(cuda_dir, "--action", "lock", "--pid", "3", LLMUX_FAKE_CUDA_FAIL="lock")
    assert r.returncode == 1
    assert "injected failure of lock" in r.stderr and len(r.stderr.splitlines()) == 1
    assert state_of(cuda_dir, 3) == "running"
    # other actions are unaffected
    r = fake(cuda_dir, "--action", "lock", "--pid", "3", LLMUX_FAKE_CUDA_FAIL="unlock")
    assert r.returncode == 0, r.stderr
    assert state_of(cuda_dir, 3) == "locked"


def test_fake_failure_half_way_through_toggle(cuda_dir: Path):
    (cuda_dir / "3").write_text("running")
    r = fake(cuda_dir, "--toggle", "--pid", "3", LLMUX_FAKE_CUDA_FAIL="checkpoint")
    assert r.returncode == 1
    assert "injected failure of checkpoint" in r.stderr
    assert state_of(cuda_dir, 3) == "locked"  # the lock step went through

    (cuda_dir / "4").write_text("checkpointed")
    r = fake(cuda_dir, "--toggle", "--pid", "4", LLMUX_FAKE_CUDA_FAIL="unlock")
    assert r.returncode == 1
    assert state_of(cuda_dir, 4) == "locked"

    (cuda_dir / "6").write_text("running")
    r = fake(cuda_dir, "--toggle", "--pid", "6", LLMUX_FAKE_CUDA_FAIL="toggle")
    assert r.returncode == 1
    assert state_of(cuda_dir, 6) == "running"


def test_fake_failure_of_get_state(cuda_dir: Path):
    (cuda_dir / "3").write_text("running")
    r = fake(cuda_dir, "--get-state", "--pid", "3", LLMUX_FAKE_CUDA_FAIL="lock,get-state")
    assert r.returncode == 1 and r.stdout == ""
    assert "injected failure of get-state" in r.stderr


def test_fake_delay(cuda_dir: Path):
    (cuda_dir / "3").write_text("running")
    t0 = time.monotonic()
    r = fake(cuda_dir, "--action", "lock", "--pid", "3", LLMUX_FAKE_CUDA_DELAY="0.5")
    elapsed = time.monotonic() - t0
    assert r.returncode == 0, r.stderr
    assert elapsed >= 0.5
    assert state_of(cuda_dir, 3) == "locked"
    # the call is logged when it starts, before the delay
    (t_logged, action, pid), = calls(cuda_dir)
    assert (action, pid) == ("lock", 3)
    assert t0 <= t_logged <= t0 + elapsed - 0.5 + 0.05


def test_fake_delay_can_be_killed_by_a_deadline(cuda_dir: Path):
    (cuda_dir / "3").write_text("running")
    with pytest.raises(subprocess.TimeoutExpired):
        subprocess.run([str(FAKE), "--toggle", "--pid", "3"], capture_output=True, timeout=0.5,
                       env=_env(LLMUX_SIM_FAKE_CUDA_DIR=str(cuda_dir), LLMUX_FAKE_CUDA_DELAY="30"))
    assert state_of(cuda_dir, 3) == "running"


def test_fake_parallel_calls_overlap(cuda_dir: Path):
    pids = [11, 12, 13]
    for pid in pids:
        (cuda_dir / str(pid)).write_text("running")
    delay = 1.0
    env = _env(LLMUX_SIM_FAKE_CUDA_DIR=str(cuda_dir), LLMUX_FAKE_CUDA_DELAY=str(delay))
    t0 = time.monotonic()
    procs = [subprocess.Popen([str(FAKE), "--toggle", "--pid", str(pid)], env=env)
             for pid in pids]
    assert [p.wait(timeout=30) for p in procs] == [0, 0, 0]
    elapsed = time.monotonic() - t0
    assert elapsed < delay * len(pids)  # they ran at the same time
    log = calls(cuda_dir)
    assert sorted(c[2] for c in log) == pids
    starts = [c[0] for c in log]
    assert max(starts) - min(starts) < delay  # all started before the first one finished
    assert starts == sorted(starts)
    for pid in pids:
        assert state_of(cuda_dir, pid) == "checkpointed"


def test_fake_get_restore_tid(cuda_dir: Path):
    (cuda_dir / "8").write_text("checkpointed")
    r = fake(cuda_dir, "--get-restore-tid", "--pid", "8")
    assert r.returncode == 0 and r.stdout == "8\n"


def test_fake_usage_errors(cuda_dir: Path):
    for args in ([], ["--get-state"], ["--pid", "3"], ["--action", "freeze", "--pid", "3"],
                 ["--get-state", "--toggle", "--pid", "3"], ["--get-state", "--pid", "x"],
                 ["--get-state", "--pid", "0"]):
        r = fake(cuda_dir, *args)
        assert r.returncode == 1, args
        assert len(r.stderr.splitlines()) == 1, (args, r.stderr)
    assert not (cuda_dir / "calls.log").exists()


def test_fake_needs_its_directory(tmp_path: Path):
    env = _env()
    env.pop("LLMUX_SIM_FAKE_CUDA_DIR", None)
    r = subprocess.run([str(FAKE), "--get-state", "--pid", "3"], capture_output=True,
                       text=True, env=env, timeout=30)
    assert r.returncode == 1 and "LLMUX_SIM_FAKE_CUDA_DIR" in r.stderr
    r = fake(tmp_path / "missing", "--get-state", "--pid", "3")
    assert r.returncode == 1 and "not a directory" in r.stderr


def test_fake_help(cuda_dir: Path):
    r = fake(cuda_dir, "--help")
    assert r.returncode == 0
    for opt in ("--get-state", "--toggle", "--action", "--pid", "--timeout"):
        assert opt in r.stdout


def test_fake_leaves_only_state_files(cuda_dir: Path):
    (cuda_dir / "3").write_text("running")
    assert fake(cuda_dir, "--toggle", "--pid", "3").returncode == 0
    assert sorted(p.name for p in cuda_dir.iterdir()) == ["3", "calls.log"]


# ---------------------------------------------------------------------------------------
# llmuxd.cuda_checkpoint: argument parsing
# ---------------------------------------------------------------------------------------
def test_parse_get_state():
    a = cc.parse_args(["--get-state", "--pid", "123"])
    assert a.get_state and a.pid == 123 and a.action is None and not a.toggle
    assert a.timeout is None


def test_parse_toggle_short_options():
    a = cc.parse_args(["--toggle", "-p", "9", "-t", "2500"])
    assert a.toggle and a.pid == 9 and a.timeout == 2500


@pytest.mark.parametrize("action", ["lock", "checkpoint", "restore", "unlock"])
def test_parse_actions(action: str):
    a = cc.parse_args(["--action", action, "--pid", "1", "--timeout", "100"])
    assert a.action == action and a.pid == 1 and a.timeout == 100


def test_parse_get_restore_tid():
    assert cc.parse_args(["--get-restore-tid", "--pid", "4"]).get_restore_tid


@pytest.mark.parametrize("argv", [
    [],
    ["--pid", "3"],
    ["--get-state"],
    ["--action", "freeze", "--pid", "3"],
    ["--action", "--pid", "3"],
    ["--get-state", "--toggle", "--pid", "3"],
    ["--get-state", "--action", "lock", "--pid", "3"],
    ["--get-state", "--pid", "abc"],
    ["--get-state", "--pid", "-4"],
    ["--get-state", "--pid", "0"],
    ["--action", "lock", "--pid", "3", "--timeout", "soon"],
    ["--action", "lock", "--pid", "3", "--timeout", "-1"],
    ["--get-state", "--pid", "3", "extra"],
])
def test_parse_errors_are_one_line_and_exit_1(argv, capsys):
    with pytest.raises(SystemExit) as e:
        cc.parse_args(argv)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("llmux-cuda-checkpoint: error:")


def test_help_exits_0(capsys):
    with pytest.raises(SystemExit) as e:
        cc.parse_args(["--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    for opt in ("--get-state", "--toggle", "--action", "--get-restore-tid", "--pid", "-p",
                "--timeout", "-t", "lock,checkpoint,restore,unlock"):
        assert opt in out


def test_lock_args_layout():
    # cuda.h: unsigned int timeoutMs; unsigned int reserved0; cuuint64_t reserved1[7];
    assert ctypes.sizeof(cc.CUcheckpointLockArgs) == 64
    assert cc.CUcheckpointLockArgs.timeoutMs.offset == 0
    assert cc.CUcheckpointLockArgs.reserved1.offset == 8


def test_module_never_calls_cuinit():
    assert "cuInit(" not in Path(cc.__file__).read_text().replace("``cuInit``", "")


def test_no_imports_from_other_llmuxd_modules():
    src = Path(cc.__file__).read_text()
    assert "from llmuxd" not in src and "import llmuxd" not in src and "from ." not in src


# ---------------------------------------------------------------------------------------
# llmuxd.cuda_checkpoint without libcuda
# ---------------------------------------------------------------------------------------
def _libcuda_loadable() -> bool:
    try:
        ctypes.CDLL("libcuda.so.1")
    except OSError:
        return False
    return True


def run_module(*args: str, **env: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "llmuxd.cuda_checkpoint", *args],
                          capture_output=True, text=True, timeout=60, env=_env(**env))


def test_missing_libcuda_named_library():
    r = run_module("--get-state", "--pid", str(os.getpid()),
                   LLMUX_LIBCUDA="/nonexistent/libcuda.so.1")
    assert r.returncode == 1
    assert r.stdout == ""
    assert r.stderr == "/nonexistent/libcuda.so.1 not found: no NVIDIA driver\n"


@pytest.mark.parametrize("argv", [
    ["--get-state", "--pid", "1"],
    ["--toggle", "--pid", "1"],
    ["--action", "lock", "--pid", "1", "--timeout", "10"],
    ["--get-restore-tid", "--pid", "1"],
])
def test_without_driver_one_line_exit_1(argv):
    r = run_module(*argv)
    assert r.returncode == 1
    assert "Traceback" not in r.stderr
    assert len(r.stderr.splitlines()) == 1, r.stderr
    if not _libcuda_loadable():  # this machine: no GPU, no driver
        assert r.stderr == "libcuda.so.1 not found: no NVIDIA driver\n"


def test_main_returns_1_without_driver(capsys, monkeypatch):
    monkeypatch.setenv("LLMUX_LIBCUDA", "/nonexistent/libcuda.so.1")
    assert cc.main(["--toggle", "--pid", "5"]) == 1
    assert capsys.readouterr().err == "/nonexistent/libcuda.so.1 not found: no NVIDIA driver\n"


def test_console_script_entry_point_declared():
    text = (REPO / "pyproject.toml").read_text()
    assert 'llmux-cuda-checkpoint = "llmuxd.cuda_checkpoint:main"' in text


# ---------------------------------------------------------------------------------------
# llmuxd.cuda_checkpoint against a fake libcuda.so.1 (compiled here)
# ---------------------------------------------------------------------------------------
FAKE_LIBCUDA_C = r"""
#include <stdio.h>
#include <stdlib.h>
typedef struct { unsigned int timeoutMs; unsigned int reserved0;
                 unsigned long long reserved1[7]; } LockArgs;
static int readst(void) { FILE *f = fopen(getenv("FAKE_LIBCUDA_STATE"), "r"); int s = -1;
    if (f) { if (fscanf(f, "%d", &s) != 1) s = -1; fclose(f); } return s; }
static void writest(int s) { FILE *f = fopen(getenv("FAKE_LIBCUDA_STATE"), "w");
    fprintf(f, "%d\n", s); fclose(f); }
static void logcall(const char *what, int pid, long extra) {
    FILE *f = fopen(getenv("FAKE_LIBCUDA_LOG"), "a");
    fprintf(f, "%s %d %ld\n", what, pid, extra); fclose(f); }
static int known(int pid) { const char *p = getenv("FAKE_LIBCUDA_PID");
    return p && atoi(p) == pid; }
static int trans(const char *name, int pid, int from, int to, long extra) {
    logcall(name, pid, extra);
    if (!known(pid)) return 500;               /* CUDA_ERROR_NOT_FOUND */
    if (readst() != from) return 401;          /* CUDA_ERROR_ILLEGAL_STATE */
    writest(to); return 0; }
int cuInit(unsigned int flags) { logcall("cuInit", 0, flags); return 0; }
int cuGetErrorName(int e, const char **s) {
    switch (e) { case 0: *s = "CUDA_SUCCESS"; return 0;
                 case 401: *s = "CUDA_ERROR_ILLEGAL_STATE"; return 0;
                 case 500: *s = "CUDA_ERROR_NOT_FOUND"; return 0; }
    *s = 0; return 1; }
int cuGetErrorString(int e, const char **s) {
    switch (e) { case 401: *s = "the operation is not permitted in the current state"; return 0;
                 case 500: *s = "named symbol not found"; return 0; }
    *s = 0; return 1; }
#ifndef OLD_DRIVER
int cuCheckpointProcessGetState(int pid, int *state) {
    logcall("getstate", pid, 0);
    if (getenv("FAKE_LIBCUDA_ERR")) return atoi(getenv("FAKE_LIBCUDA_ERR"));
    if (!known(pid)) return 500;
    *state = readst(); return 0; }
int cuCheckpointProcessLock(int pid, LockArgs *a) {
    return trans("lock", pid, 0, 1, a ? (long)a->timeoutMs : -1); }
int cuCheckpointProcessCheckpoint(int pid, void *a) {
    return trans("checkpoint", pid, 1, 2, a ? 1 : 0); }
int cuCheckpointProcessRestore(int pid, void *a) {
    return trans("restore", pid, 2, 1, a ? 1 : 0); }
int cuCheckpointProcessUnlock(int pid, void *a) {
    return trans("unlock", pid, 1, 0, a ? 1 : 0); }
int cuCheckpointProcessGetRestoreThreadId(int pid, int *tid) {
    logcall("gettid", pid, 0);
    if (!known(pid)) return 500;
    *tid = pid + 1; return 0; }
#endif
"""


def _compile_fake_libcuda(tmp_path: Path, old: bool = False) -> Path:
    compiler = shutil.which("cc") or shutil.which("gcc")
    if compiler is None:
        pytest.skip("no C compiler to build the fake libcuda.so.1")
    src = tmp_path / "fake_libcuda.c"
    src.write_text(FAKE_LIBCUDA_C)
    lib = tmp_path / ("old" if old else "new") / "libcuda.so.1"
    lib.parent.mkdir()
    cmd = [compiler, "-shared", "-fPIC", "-O1", "-o", str(lib), str(src)]
    if old:
        cmd.insert(1, "-DOLD_DRIVER")
    subprocess.run(cmd, check=True, capture_output=True, timeout=120)
    return lib


@pytest.fixture
def fake_libcuda(tmp_path: Path):
    lib = _compile_fake_libcuda(tmp_path)
    state = tmp_path / "state"
    log = tmp_path / "calls"
    state.write_text("0\n")
    log.write_text("")
    env = {"LLMUX_LIBCUDA": str(lib), "FAKE_LIBCUDA_STATE": str(state),
           "FAKE_LIBCUDA_LOG": str(log), "FAKE_LIBCUDA_PID": "4242"}
    return env, state, log


def _state(state: Path) -> int:
    return int(state.read_text())


def test_real_get_state_values(fake_libcuda):
    env, state, _ = fake_libcuda
    for value, name in cc.STATES.items():
        state.write_text(f"{value}\n")
        r = run_module("--get-state", "--pid", "4242", **env)
        assert (r.returncode, r.stdout, r.stderr) == (0, f"{name}\n", "")


def test_real_toggle_round_trip_without_cuinit(fake_libcuda):
    env, state, log = fake_libcuda
    r = run_module("--toggle", "--pid", "4242", **env)
    assert (r.returncode, r.stdout, r.stderr) == (0, "", "")
    assert _state(state) == 2
    r = run_module("--toggle", "--pid", "4242", **env)
    assert (r.returncode, r.stderr) == (0, "")
    assert _state(state) == 0
    assert log.read_text().splitlines() == [
        "getstate 4242 0", "lock 4242 -1", "checkpoint 4242 0",
        "getstate 4242 0", "restore 4242 0", "unlock 4242 0",
    ]  # no cuInit, NULL args


def test_real_actions_and_lock_timeout(fake_libcuda):
    env, state, log = fake_libcuda
    steps = [("lock", 1), ("checkpoint", 2), ("restore", 1), ("unlock", 0)]
    for action, after in steps:
        extra = ["--timeout", "1234"] if action == "lock" else []
        r = run_module("--action", action, "--pid", "4242", *extra, **env)
        assert (r.returncode, r.stderr) == (0, ""), action
        assert _state(state) == after
    assert log.read_text().splitlines()[0] == "lock 4242 1234"  # timeoutMs reached the driver


def test_real_toggle_passes_timeout_to_lock(fake_libcuda):
    env, _, log = fake_libcuda
    assert run_module("--toggle", "-p", "4242", "-t", "77", **env).returncode == 0
    assert "lock 4242 77" in log.read_text().splitlines()


def test_real_no_cuda_state_is_an_error(fake_libcuda):
    env, _, _ = fake_libcuda
    r = run_module("--get-state", "--pid", "999", **env)
    assert r.returncode == 1 and r.stdout == ""
    assert r.stderr == ("CUDA_ERROR_NOT_FOUND: cuCheckpointProcessGetState (pid 999) failed: "
                        "named symbol not found\n")
    r = run_module("--toggle", "--pid", "999", **env)
    assert r.returncode == 1 and r.stderr.startswith("CUDA_ERROR_NOT_FOUND:")


def test_real_wrong_state(fake_libcuda):
    env, state, _ = fake_libcuda
    r = run_module("--action", "checkpoint", "--pid", "4242", **env)
    assert r.returncode == 1
    assert r.stderr.startswith("CUDA_ERROR_ILLEGAL_STATE: cuCheckpointProcessCheckpoint (pid 4242)")
    assert len(r.stderr.splitlines()) == 1
    state.write_text("1\n")
    r = run_module("--toggle", "--pid", "4242", **env)
    assert r.returncode == 1
    assert "its CUDA state is locked" in r.stderr and len(r.stderr.splitlines()) == 1


def test_real_unknown_error_code(fake_libcuda):
    env, _, _ = fake_libcuda
    r = run_module("--get-state", "--pid", "4242", FAKE_LIBCUDA_ERR="999", **env)
    assert r.returncode == 1
    assert r.stderr == "CUDA error 999: cuCheckpointProcessGetState (pid 4242) failed\n"


def test_real_get_restore_tid(fake_libcuda):
    env, _, _ = fake_libcuda
    r = run_module("--get-restore-tid", "--pid", "4242", **env)
    assert (r.returncode, r.stdout) == (0, "4243\n")


def test_real_driver_too_old(tmp_path: Path):
    lib = _compile_fake_libcuda(tmp_path, old=True)
    r = run_module("--get-state", "--pid", "1", LLMUX_LIBCUDA=str(lib))
    assert r.returncode == 1
    assert "has no cuCheckpointProcessGetState" in r.stderr
    assert len(r.stderr.splitlines()) == 1


def test_driver_class_in_process(fake_libcuda, monkeypatch):
    env, state, _ = fake_libcuda
    for k, v in env.items():
        monkeypatch.setenv(k, v)
    drv = cc.Driver()
    assert drv.get_state(4242) == "running"
    assert drv.toggle(4242, timeout_ms=5) == "checkpointed"
    assert drv.get_state(4242) == "checkpointed"
    assert drv.toggle(4242) == "running"
    with pytest.raises(cc.CudaCheckpointError) as e:
        drv.unlock(4242)
    assert e.value.cuda_error == "CUDA_ERROR_ILLEGAL_STATE"
    assert drv.error_name(500) == "CUDA_ERROR_NOT_FOUND"
    assert drv.error_name(12345) == "CUDA error 12345"


# ---------------------------------------------------------------------------------------
# CRIU (the private prefix that packaging/install-criu.sh makes)
# ---------------------------------------------------------------------------------------
def _criu() -> str | None:
    path = os.environ.get("LLMUX_CRIU") or "/opt/llmux-criu/bin/criu"
    return path if os.access(path, os.X_OK) else None


needs_criu = pytest.mark.skipif(
    _criu() is None or os.geteuid() != 0,
    reason="needs root and CRIU at /opt/llmux-criu/bin/criu or $LLMUX_CRIU "
           "(packaging/install-criu.sh installs it)")


@pytest.mark.criu
@needs_criu
def test_criu_check():
    criu = _criu()
    v = subprocess.run([criu, "--version"], capture_output=True, text=True, timeout=60)
    assert v.returncode == 0, v.stderr
    assert "Version: 4." in v.stdout
    r = subprocess.run([criu, "check"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "Looks good" in r.stdout + r.stderr


# The scenario runs in a helper process that is a child subreaper, so that it can
# reap every process of the dumped tree before the restore (a zombie left for
# PID 1 keeps its PID in use and the restore fails with "Can't fork ... File exists"),
# and so that the restored tree ends up as its children.
_SERVER = r"""
import http.server, os, subprocess, sys
child = subprocess.Popen([sys.executable, "-c", "import time\nwhile True: time.sleep(1)"])
hits = 0
class H(http.server.BaseHTTPRequestHandler):
    def do_GET(self):
        global hits
        hits += 1
        body = f"{os.getpid()} {child.pid} {hits}".encode()
        self.send_response(200)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)
    def log_message(self, fmt, *args):
        print("request", self.path, flush=True)
srv = http.server.HTTPServer(("127.0.0.1", 0), H)
tmp = sys.argv[1] + ".tmp"
with open(tmp, "w") as f:
    f.write(str(srv.server_address[1]))
os.rename(tmp, sys.argv[1])
print("serving", flush=True)
srv.serve_forever()
"""

_SCENARIO = r"""
import ctypes, json, os, signal, socket, subprocess, sys, time, urllib.request
criu, work, held_mode = sys.argv[1], sys.argv[2], sys.argv[3] == "held"
extra = sys.argv[4:]
assert ctypes.CDLL(None, use_errno=True).prctl(36, 1, 0, 0, 0) == 0  # PR_SET_CHILD_SUBREAPER
images = os.path.join(work, "images"); os.mkdir(images)
portfile = os.path.join(work, "port")
log = os.open(os.path.join(work, "server.log"), os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
server = subprocess.Popen([sys.executable, os.path.join(work, "server.py"), portfile],
                          stdin=subprocess.DEVNULL, stdout=log, stderr=log,
                          start_new_session=True)
os.close(log)
pid = server.pid
result = {"pid": pid, "me": os.getpid()}

def get(path="/"):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=10) as r:
        return r.read().decode().split()

def reap_all():
    while True:
        try:
            os.waitpid(-1, 0)
        except ChildProcessError:
            return

try:
    deadline = time.monotonic() + 30
    while not os.path.exists(portfile):
        assert time.monotonic() < deadline and server.poll() is None, "server did not start"
        time.sleep(0.02)
    port = int(open(portfile).read())
    before = get()
    result["before"] = before
    held = None
    if held_mode:  # an established TCP connection during the dump
        held = socket.create_connection(("127.0.0.1", port))
        time.sleep(0.2)
    t = time.monotonic()
    d = subprocess.run([criu, "dump", "--shell-job", "--ext-unix-sk", "--tcp-established",
                        "--link-remap", "--ghost-limit", "1048576", "--enable-external-masters",
                        *extra, "--tree", str(pid), "--images-dir", images, "-o", "dump.log"],
                       capture_output=True, text=True, timeout=120)
    result["dump_s"] = time.monotonic() - t
    if d.returncode != 0:
        result["error"] = "dump: " + open(os.path.join(images, "dump.log")).read()[-3000:]
        raise SystemExit
    server.wait(timeout=30)
    reap_all()  # the child too: it was reparented to us
    t = time.monotonic()
    r = subprocess.run([criu, "restore", "--shell-job", "--ext-unix-sk", "--tcp-established",
                        "--enable-external-masters", "--restore-detached", *extra,
                        "--images-dir", images, "-o", "restore.log"],
                       capture_output=True, text=True, timeout=120)
    result["restore_s"] = time.monotonic() - t
    if r.returncode != 0:
        result["error"] = "restore: " + open(os.path.join(images, "restore.log")).read()[-3000:]
        raise SystemExit
    result["parent"] = int(open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()[1])
    if held is not None:
        held.sendall(b"GET /held HTTP/1.0\r\n\r\n")
        data = b""
        while True:
            chunk = held.recv(4096)
            if not chunk:
                break
            data += chunk
        result["held"] = data.decode().split("\r\n\r\n", 1)[1].split()
    result["after"] = get()
finally:
    try:
        os.killpg(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    reap_all()
    print(json.dumps(result))
"""


@pytest.mark.criu
@needs_criu
@pytest.mark.parametrize("mode,extra", [
    ("idle", []),
    # With a connection established, --tcp-established must lock the network; the
    # default method runs the iptables binary (absent here), nftables uses the
    # library that criu links.
    ("held", ["--network-lock", "nftables"]),
])
def test_criu_dump_and_restore_http_server(tmp_path: Path, mode: str, extra: list[str]):
    (tmp_path / "server.py").write_text(_SERVER)
    (tmp_path / "scenario.py").write_text(_SCENARIO)
    r = subprocess.run([sys.executable, str(tmp_path / "scenario.py"), _criu(), str(tmp_path),
                        mode, *extra], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout.strip().splitlines()[-1])
    assert "error" not in result, result["error"]
    pid = result["pid"]
    server_pid, child_pid, hits = result["before"]
    assert int(server_pid) == pid and hits == "1"
    assert result["parent"] == result["me"]  # the restored tree is the subreaper's child
    if mode == "held":
        assert result["held"] == [str(pid), child_pid, "2"]
        assert result["after"] == [str(pid), child_pid, "3"]
    else:
        # same PIDs, in-memory state kept
        assert result["after"] == [str(pid), child_pid, "2"]
    log = (tmp_path / "server.log").read_text()
    assert log.count("serving") == 1  # restored, not restarted; the O_APPEND log kept going
