"""`llmuxctl doctor`: what this host can do for levels 3 and 4, and why not.

A plan like the others (it runs criu and the cuda-checkpoint helper as
children, never loading libcuda itself), but read-only: it does not take the
job slot, so it answers during a swap.
"""

from __future__ import annotations

from .actions import Io, IoFailed, RunTool, tool_message
from .mechanisms.cuda_suspend import cuda_tool

TOOL_DEADLINE = 30.0


def doctor_plan(view):
    ck = view.catalog.daemon.checkpoint
    facts = yield Io("host_facts")
    if isinstance(facts, IoFailed):
        facts = {"error": facts.reason}
    version = yield RunTool((ck.criu_path, "--version"), TOOL_DEADLINE)
    facts["criu"] = {"path": ck.criu_path,
                     "version": tool_message(version.output) if version.ok else None,
                     "error": None if version.ok else tool_message(version.output)}
    if version.ok:
        check = yield RunTool((ck.criu_path, "check"), TOOL_DEADLINE)
        facts["criu"]["check"] = "ok" if check.ok else tool_message(check.output)
    # A process without CUDA state answers "not found" when the API itself works.
    probe = yield RunTool(cuda_tool(view) + ("--get-state", "--pid", str(facts.get("pid", 1))),
                          TOOL_DEADLINE)
    answer = tool_message(probe.output)
    api = probe.ok or answer.startswith("CUDA_ERROR_NOT_FOUND") or \
        answer.startswith("CUDA_ERROR_NOT_INITIALIZED")
    facts["cuda_checkpoint"] = {"tool": " ".join(cuda_tool(view)), "api": api,
                                "answer": answer or "ok"}
    level3 = "available" if api else f"unavailable ({answer or 'no answer'})"
    criu_ok = version.ok and facts["criu"].get("check") == "ok"
    if not criu_ok:
        level4 = "unavailable (criu: " + (facts["criu"].get("check") or facts["criu"]["error"] or "?") + ")"
    elif facts.get("plugin") and (facts.get("driver_major") or 0) >= 580:
        level4 = "plugin mode (CRIU's CUDA plugin, -L)"
    else:
        level4 = "suspend mode (CUDA suspended by llmuxd before the dump)"
    facts["levels"] = {"3": level3, "4": level4}
    return facts
