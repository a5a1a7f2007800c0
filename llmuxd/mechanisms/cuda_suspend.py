"""Level 3: CUDA suspend through the driver's checkpoint API, process by process.

Every process of the model's tree that answers `--get-state` holds a CUDA
context (vLLM renames its processes, so never match by command line; the API
server holds a context too). Suspend = lock then checkpoint, each step for all
CUDA processes in parallel; GPU memory moves to host RAM and the processes stay.
Wake = restore then unlock, then a health check. The helper is a binary with
NVIDIA's cuda-checkpoint CLI: ours (`auto`), NVIDIA's, or a test stand-in.
"""

from __future__ import annotations

import json
import sys

from .. import states as S
from ..actions import Http, Phase, Refused, RunTools, StepFailed, Transition
from ..launch import tp_size
from ..steps import expect_ok, io, timeout_of, wait_healthy

LOCK_TIMEOUT_MS = 30_000  # how long the driver may wait for in-flight CUDA work at lock


def cuda_tool(view) -> tuple[str, ...]:
    path = view.catalog.daemon.checkpoint.cuda_checkpoint
    if path == "auto":  # our ctypes helper, run as a child: the daemon never loads libcuda
        return (sys.executable, "-m", "llmuxd.cuda_checkpoint")
    return (path,)


def tool_timeout(view) -> float:
    return view.catalog.daemon.checkpoint.cuda_timeout


def nccl(view, name: str, method: str, best_effort: bool = False):
    """Tensor-parallel models: NCCL's IPC memory cannot be suspended, so vLLM's
    communicators are torn down before (suspend_nccl) and rebuilt after (resume_nccl)."""
    if tp_size(view.catalog.models[name].args) <= 1:
        return
    yield Phase(method, name)
    body = json.dumps({"method": method}).encode()
    result = yield Http(name, "POST", "/collective_rpc", timeout=view.catalog.daemon.wake_timeout,
                        body=body)
    if rpc_absent(result, method):
        # Stock vLLM (0.26) has no such RPC: its NCCL runs without P2P, SHM and NVLS
        # buffers (the model's env, see `--check`), which the CUDA checkpoint can take.
        yield Phase(f"{method}-absent", name)
        return
    if not best_effort:
        expect_ok(result, f"{name}: {method}")


def rpc_absent(result, method: str) -> bool:
    """The worker has no such method: vLLM answers 500 naming the AttributeError."""
    body = getattr(result, "body", b"") or b""
    return getattr(result, "status", None) in (400, 404, 500) and \
        b"has no attribute" in body and method.encode() in body


def find_cuda_pids(view, name: str):
    """Every process of the tree whose CUDA state the driver reports -> {pid: state}."""
    tree = yield from io("process_tree", name)
    tool = cuda_tool(view)
    results = yield RunTools(tuple(tool + ("--get-state", "--pid", str(pid)) for pid in tree),
                             tool_timeout(view), name)
    found = {}
    for pid, result in zip(tree, results):
        state = result.output.strip().splitlines()[-1].strip() if result.ok and result.output.strip() \
            else ""
        if state in ("running", "locked", "checkpointed"):
            found[pid] = state
    return found


def cuda_action(view, name: str, pids, action: str):
    """One action for every pid at once; StepFailed naming each failure."""
    tool = cuda_tool(view)
    extra = ("--timeout", str(LOCK_TIMEOUT_MS)) if action == "lock" else ()
    results = yield RunTools(tuple(tool + ("--action", action, "--pid", str(p)) + extra
                                   for p in pids), tool_timeout(view), name)
    failures = [f"pid {p}: {r.output.strip().splitlines()[-1] if r.output.strip() else ''}"
                f"{' (deadline)' if r.rc is None else ''}"
                for p, r in zip(pids, results) if not r.ok]
    if failures:
        raise StepFailed(f"{name}: cuda {action} failed: {'; '.join(failures)}")


def suspend(view, name: str, found: dict | None = None):
    """Lock then checkpoint every CUDA process -> the pids suspended."""
    if found is None:
        found = yield from find_cuda_pids(view, name)
    pids = sorted(found)
    if not pids:
        return []
    try:
        yield from cuda_action(view, name, pids, "lock")
        yield from cuda_action(view, name, pids, "checkpoint")
    except StepFailed:
        yield from resume(view, name, pids, best_effort=True)
        raise
    return pids


def resume(view, name: str, pids, best_effort: bool = False):
    """Restore then unlock; with best_effort, each step only where it applies."""
    if not pids:
        return
    if best_effort:
        found = yield from find_cuda_pids(view, name)
        for action, wanted in (("restore", "checkpointed"), ("unlock", "locked")):
            todo = [p for p in pids if found.get(p) == wanted]
            try:
                yield from cuda_action(view, name, todo, action)
            except StepFailed:
                return
            for p in todo:
                found[p] = "locked" if action == "restore" else "running"
        return
    yield from cuda_action(view, name, pids, "restore")
    yield from cuda_action(view, name, pids, "unlock")


class CudaSuspend:
    level = 3
    asleep_state = S.SUSPENDED

    def sleep(self, view, name):
        found = yield from find_cuda_pids(view, name)
        if not found:  # asked before anything changed: the model serves on
            raise Refused(f"{name}: level 3 is impossible: no process of its tree holds CUDA "
                          "state (nothing to suspend); nothing changed")
        yield Phase("suspend", name)
        yield Transition(name, S.SUSPENDING)
        yield from nccl(view, name, "suspend_nccl")
        try:
            pids = yield from suspend(view, name, found)
        except StepFailed:
            yield from nccl(view, name, "resume_nccl", best_effort=True)
            raise
        yield Transition(name, S.SUSPENDED, fields={"asleep_level": 3, "cuda_pids": pids})

    def wake(self, view, name):
        yield Phase("resume", name)
        yield Transition(name, S.RESUMING)
        pids = view.runtimes[name].extra.get("cuda_pids", [])
        yield from resume(view, name, pids)
        yield from nccl(view, name, "resume_nccl")
        yield Phase("health", name)
        yield from wait_healthy(view, name, timeout_of(view, name, "startup_timeout"))
        yield Transition(name, S.ACTIVE)
