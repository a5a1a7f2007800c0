"""Tensor-parallel models at levels 3 and 4: NCCL torn down before, rebuilt after,
every CUDA process suspended in parallel; TP size read from the args."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest

from llmuxd import states as S
from llmuxd.actions import CheckExited, Http, HttpResult, Io, RunTools, ToolResult
from llmuxd.launch import catalog_warnings, tp_size
from llmuxd.mechanisms.cuda_suspend import CudaSuspend, cuda_tool

from .plans import FakeView, T, catalog, model, run_table

OK = HttpResult(200, b"")
TP2 = ["--tensor-parallel-size", "2", "--enforce-eager", "--disable-custom-all-reduce"]


@pytest.mark.parametrize("args,size", [
    ([], 1), (["--tensor-parallel-size", "2"], 2), (["-tp", "4"], 4),
    (["--tensor-parallel-size=8"], 8), (["-tp=2"], 2), (["-tp", "x"], 1),
    (["--max-model-len", "2", "-tp", "2", "-tp", "4"], 4),
])
def test_tp_size_from_args(args, size):
    assert tp_size(args) == size


def test_check_warns_when_tp_flags_are_missing(tmp_path):
    cfg = tmp_path / "c.toml"
    cfg.write_text('[models.big]\nmodel = "m"\nport = 9000\nsleep_level = 3\n'
                   'args = ["-tp", "2"]\n[models.ok]\nmodel = "m"\nport = 9001\nsleep_level = 4\n'
                   'args = ["-tp", "2", "--enforce-eager", "--disable-custom-all-reduce"]\n'
                   'env = { NCCL_P2P_DISABLE = "1", NCCL_SHM_DISABLE = "1", NCCL_NVLS_ENABLE = "0" }\n')
    r = subprocess.run([sys.executable, "-m", "llmuxd", "--config", str(cfg), "--check"],
                       capture_output=True, text=True)
    assert r.returncode == 0
    assert f"{cfg}:1: warning: models.big: tensor-parallel size 2 at level 3 needs " \
           "--enforce-eager and --disable-custom-all-reduce" in r.stderr
    assert "models.ok" not in r.stderr


def rpc(m, method):
    return Http(m, "POST", "/collective_rpc", timeout=120.0,
                body=json.dumps({"method": method}).encode())


def tools(view, action, pids, extra=()):
    return RunTools(tuple(cuda_tool(view) + ("--action", action, "--pid", str(p)) + extra
                          for p in pids), 600.0, "t")


def test_level3_tp_order_nccl_down_then_lock_all_then_checkpoint_all_and_back():
    view = FakeView(catalog(model("t", 8001, 3, args=tuple(TP2))), {"t": S.DRAINING})
    pids = [10, 11, 12, 13]  # API server, EngineCore, two workers
    states = [ToolResult(0, "running")] * 4
    lock = tools(view, "lock", pids, ("--timeout", "30000"))
    sleep = [(Io("process_tree", ("t",)), pids),
             (RunTools(tuple(cuda_tool(view) + ("--get-state", "--pid", str(p)) for p in pids),
                       600.0, "t"), states),
             (T("t", S.SUSPENDING), None), (rpc("t", "suspend_nccl"), OK),
             (lock, [ToolResult(0)] * 4), (tools(view, "checkpoint", pids), [ToolResult(0)] * 4),
             (T("t", S.SUSPENDED), None)]
    outcome, _, phases = run_table(view, CudaSuspend().sleep(view, "t"), sleep)
    assert outcome == "ok" and view.runtimes["t"].extra["cuda_pids"] == pids
    wake = [(T("t", S.RESUMING), None), (tools(view, "restore", pids), [ToolResult(0)] * 4),
            (tools(view, "unlock", pids), [ToolResult(0)] * 4), (rpc("t", "resume_nccl"), OK),
            (CheckExited("t"), None), (Http, OK), (T("t", S.ACTIVE), None)]
    assert run_table(view, CudaSuspend().wake(view, "t"), wake)[0] == "ok"


def test_level3_tp_failed_checkpoint_is_undone_and_nccl_rebuilt():
    view = FakeView(catalog(model("t", 8001, 3, args=tuple(TP2))), {"t": S.DRAINING})
    pids = [10, 11]
    get_state = RunTools(tuple(cuda_tool(view) + ("--get-state", "--pid", str(p)) for p in pids),
                         600.0, "t")
    table = [(Io("process_tree", ("t",)), pids), (get_state, [ToolResult(0, "running")] * 2),
             (T("t", S.SUSPENDING), None), (rpc("t", "suspend_nccl"), OK),
             (tools(view, "lock", pids, ("--timeout", "30000")), [ToolResult(0)] * 2),
             (tools(view, "checkpoint", pids), [ToolResult(0), ToolResult(1, "CUDA_ERROR_X: no")]),
             # best effort: find what is where, restore the checkpointed, unlock the locked
             (Io("process_tree", ("t",)), pids),
             (get_state, [ToolResult(0, "checkpointed"), ToolResult(0, "locked")]),
             (tools(view, "restore", [10]), [ToolResult(0)]),
             (tools(view, "unlock", pids), [ToolResult(0)] * 2),
             (rpc("t", "resume_nccl"), OK)]
    outcome, message, _ = run_table(view, CudaSuspend().sleep(view, "t"), table)
    assert outcome == "failed" and "cuda checkpoint failed: pid 11: CUDA_ERROR_X: no" in message


def test_tp1_model_makes_no_nccl_calls():
    view = FakeView(catalog(model("s", 8001, 3)), {"s": S.DRAINING})
    table = [(Io("process_tree", ("s",)), [5]), (RunTools, [ToolResult(0, "running")]),
             (T("s", S.SUSPENDING), None), (RunTools, [ToolResult(0)]),
             (RunTools, [ToolResult(0)]), (T("s", S.SUSPENDED), None)]
    assert run_table(view, CudaSuspend().sleep(view, "s"), table)[0] == "ok"


def test_catalog_warnings_name_the_model_line():
    nccl = (("NCCL_P2P_DISABLE", "1"), ("NCCL_SHM_DISABLE", "1"), ("NCCL_NVLS_ENABLE", "0"))
    cat = catalog(model("x", 1, 4, args=("-tp", "2", "--enforce-eager"), source="/c.toml:7",
                        env=nccl))
    assert catalog_warnings(cat) == [
        "/c.toml:7: warning: models.x: tensor-parallel size 2 at level 4 needs "
        "--disable-custom-all-reduce (CUDA graphs and custom all-reduce buffers cannot be suspended)"]


def test_tp_model_without_nccl_env_is_told_what_stock_vllm_needs():
    cat = catalog(model("x", 1, 3, args=tuple(TP2), source="/c.toml:3",
                        env=(("NCCL_P2P_DISABLE", "1"),)))
    assert catalog_warnings(cat) == [
        "/c.toml:3: warning: models.x: tensor-parallel size 2 at level 3 on a vLLM without the "
        "suspend_nccl RPC needs env NCCL_SHM_DISABLE=1 NCCL_NVLS_ENABLE=0 (NCCL's P2P, SHM and "
        "NVLS buffers cannot be checkpointed)"]


def test_stock_vllm_without_nccl_rpcs_suspends_all_the_same():
    """vLLM 0.26 answers 500 (AttributeError) to suspend_nccl: detected, not fatal."""
    view = FakeView(catalog(model("t", 8001, 3, args=tuple(TP2))), {"t": S.DRAINING})
    pids = [10, 11]
    absent = HttpResult(500, b"{\"error\": \"'Worker' object has no attribute 'suspend_nccl'\"}")
    table = [(Io("process_tree", ("t",)), pids), (RunTools, [ToolResult(0, "running")] * 2),
             (T("t", S.SUSPENDING), None), (rpc("t", "suspend_nccl"), absent),
             (RunTools, [ToolResult(0)] * 2), (RunTools, [ToolResult(0)] * 2),
             (T("t", S.SUSPENDED), None)]
    outcome, _, phases = run_table(view, CudaSuspend().sleep(view, "t"), table)
    assert outcome == "ok" and ("suspend_nccl-absent", "t") in phases
    other = HttpResult(500, b"CUDA error: an illegal memory access")  # a real failure stays one
    table = table[:3] + [(rpc("t", "suspend_nccl"), other)]
    view = FakeView(catalog(model("t", 8001, 3, args=tuple(TP2))), {"t": S.DRAINING})
    assert run_table(view, CudaSuspend().sleep(view, "t"), table)[0] == "failed"
