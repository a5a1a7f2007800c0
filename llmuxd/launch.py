"""How a model's server is started, exactly as the contract says. Pure.

argv = vllm_command + ["serve", model, "--port", port] + ["--host", "127.0.0.1"]
(unless args name --host: vLLM's sleep and RPC endpoints are unauthenticated)
+ ["--enable-sleep-mode"] (levels 1 and 2)
+ ["--served-model-name", name, *aliases] (unless args set it: the name a client of
the front sends is then the name vLLM answers to) + args.
"""

from __future__ import annotations

import hashlib
import json
import os

from . import seccomp
from . import gpu_memory
from .gpu_memory import tp_size  # noqa: F401  (re-exported: levels 3-4 ask launch)

LOOPBACK = "127.0.0.1"


def host_from_args(args) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--host" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return None


def served_names(args) -> list[str] | None:
    """The names of --served-model-name in args (nargs="+", as vLLM), or None."""
    for i, arg in enumerate(args):
        if arg.startswith("--served-model-name="):
            return [arg.split("=", 1)[1]]
        if arg == "--served-model-name":
            names = []
            for value in args[i + 1:]:
                if value.startswith("-"):
                    break
                names.append(value)
            return names
    return None


def model_argv(daemon, spec) -> list[str]:
    argv = list(daemon.vllm_command) + ["serve", spec.model, "--port", str(spec.port)]
    if host_from_args(spec.args) is None:
        argv += ["--host", LOOPBACK]
    wants_sleep = spec.sleep_level in (1, 2) or (spec.sleep_level == 4 and spec.checkpoint_sleep)
    if wants_sleep and "--enable-sleep-mode" not in spec.args:
        argv.append("--enable-sleep-mode")
    if served_names(spec.args) is None:
        argv += ["--served-model-name", spec.name, *spec.aliases]
    return argv + list(spec.args)


def checkpoint_sleep(daemon, spec) -> int:
    """The vLLM sleep level to enter before a CRIU dump of this model (0: none):
    only a server started with sleep mode can drop its KV cache on request."""
    if not spec.checkpoint_sleep or "--enable-sleep-mode" not in model_argv(daemon, spec):
        return 0
    return spec.checkpoint_sleep


def checkpointable(daemon, spec) -> bool:
    """May this model's tree be dumped by CRIU? Level 4, or any model when
    `shutdown = "checkpoint"` (the active one is dumped at shutdown)."""
    return spec.sleep_level == 4 or daemon.shutdown == "checkpoint"


def model_env(spec, base: dict[str, str], checkpoint: bool | None = None) -> dict[str, str]:
    """The child's environment on top of the (already scrubbed) daemon environment."""
    env = dict(base)
    env["VLLM_SERVER_DEV_MODE"] = "1"  # the sleep endpoints exist only in dev mode
    if spec.sleep_level == 4 if checkpoint is None else checkpoint:
        # io_uring and libuv state cannot be checkpointed by CRIU.
        env["UV_USE_IO_URING"] = "0"
        env["USE_LIBUV"] = "0"
    env.update(spec.env_dict())
    if spec.gpus:
        # The catalog's indexes are nvidia-smi's (NVML, PCI bus order); CUDA's default
        # order is "fastest first", so without PCI_BUS_ID index 0 could be another card
        # than the one placement and the measurement count on. The catalog refuses an
        # `env` that sets either, so this never overrides the operator silently.
        env["CUDA_VISIBLE_DEVICES"] = ",".join(map(str, spec.gpus))
        env["CUDA_DEVICE_ORDER"] = "PCI_BUS_ID"
    # Set last, so that no `env` entry hides it: a helper that daemonizes (double fork,
    # setsid) leaves the process group, and this marker is how llmuxd, its subreaper,
    # knows whose it is when it stops the model (procs.strays).
    env[MARKER] = spec.name
    return env


MARKER = "LLMUX_MODEL"


def marker(name: str) -> bytes:
    return f"{MARKER}={name}".encode()


def connect_host(spec) -> str:
    """Where llmuxd reaches the server: its --host, with wildcards meaning loopback."""
    host = host_from_args(spec.args) or LOOPBACK
    if host in ("0.0.0.0", "", "::", "[::]"):
        return LOOPBACK
    return host.strip("[]")


def log_path(daemon, name: str) -> str:
    return os.path.join(daemon.log_dir, f"{name}.log")


def open_log(daemon, name: str, flags: int) -> int:
    """The model's log file, never through a link (root appends to it, and anyone may
    read it back with `llmuxctl logs`). Raises trust.Untrusted or OSError."""
    from .trust import open_in
    return open_in(daemon.log_dir, f"{name}.log", flags, "log_dir")


def argv_hash(argv, env: dict[str, str]) -> str:
    """Identifies what a process was started with (checkpoint manifests, reload diffs)."""
    blob = json.dumps([list(argv), sorted(env.items())]).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


TP_FLAGS = ("--enforce-eager", "--disable-custom-all-reduce")
# Stock vLLM has no suspend_nccl/resume_nccl RPC: NCCL must then keep no P2P, SHM or
# NVLS (multicast) buffers, which a CUDA checkpoint cannot move.
TP_NCCL_ENV = (("NCCL_P2P_DISABLE", "1"), ("NCCL_SHM_DISABLE", "1"), ("NCCL_NVLS_ENABLE", "0"))


def catalog_warnings(catalog) -> list[str]:
    """Advice that does not make the catalog invalid (printed by --check, logged at load)."""
    warnings = []
    machine = os.uname().machine
    for spec in catalog.models.values():
        if checkpointable(catalog.daemon, spec) and not seccomp.supported(machine):
            warnings.append(f"{spec.source}: warning: models.{spec.name}: no io_uring syscall table "
                            f"for {machine}: it starts without the seccomp rule, and a level-4 dump "
                            "fails if it opens an io_uring instance (sysctl "
                            "kernel.io_uring_disabled=2 does the same host-wide)")
        tp = tp_size(spec.args)
        if tp > 1 and spec.sleep_level in (3, 4):
            missing = [f for f in TP_FLAGS if f not in spec.args]
            if missing:
                warnings.append(f"{spec.source}: warning: models.{spec.name}: tensor-parallel size "
                                f"{tp} at level {spec.sleep_level} needs {' and '.join(missing)} "
                                "(CUDA graphs and custom all-reduce buffers cannot be suspended)")
            env = spec.env_dict()
            unset = [f"{k}={v}" for k, v in TP_NCCL_ENV if env.get(k) != v]
            if unset:
                warnings.append(f"{spec.source}: warning: models.{spec.name}: tensor-parallel size "
                                f"{tp} at level {spec.sleep_level} on a vLLM without the "
                                f"suspend_nccl RPC needs env {' '.join(unset)} (NCCL's P2P, SHM "
                                "and NVLS buffers cannot be checkpointed)")
    warnings += size_warnings(catalog)
    warnings += gpu_index_warnings(catalog)
    return warnings


def gpu_index_warnings(catalog, count: int | None = None) -> list[str]:
    """A GPU index this machine does not have (NVML's count; nothing to say without
    NVML): a warning, not an error, so that a catalog can be written for another box."""
    count = count if count is not None else gpu_memory.gpu_count()
    if count is None:
        return []
    warnings = []
    for spec in catalog.models.values():
        missing = [g for g in spec.gpus or () if g >= count]
        if missing:
            warnings.append(f"{spec.source}: warning: models.{spec.name}.gpus: GPU "
                            f"{', '.join(map(str, missing))} not found: NVML sees {count} GPU(s) "
                            f"(0-{count - 1})" if count else
                            f"{spec.source}: warning: models.{spec.name}.gpus: NVML sees no GPU")
    return warnings


def size_warnings(catalog, total: int | None = None) -> list[str]:
    """A model whose --gpu-memory-utilization (a fraction of the whole GPU, vLLM's own
    limit) disagrees with its declared gpu_memory: placement trusts the declaration,
    vLLM the fraction, so one of them is wrong. Only when the GPU's total is known."""
    total = total if total is not None else gpu_memory.gpu_total()
    if not total:
        return []
    warnings = []
    for spec in catalog.models.values():
        util = gpu_memory.utilization_of(spec.args)
        if spec.gpu_memory is None or util is None:
            continue
        claims = int(util * total)
        if abs(claims - spec.gpu_memory) > 0.05 * total:
            warnings.append(
                f"{spec.source}: warning: models.{spec.name}: --gpu-memory-utilization {util:g} "
                f"lets vLLM take {gpu_memory.format_size(claims)} of this GPU's "
                f"{gpu_memory.format_size(total)}, but gpu_memory says "
                f"{gpu_memory.format_size(spec.gpu_memory)}; pass --gpu-memory-utilization "
                f"{spec.gpu_memory / total:.2f}")
    return warnings
