"""How a model's server is started, exactly as the contract says. Pure.

argv = vllm_command + ["serve", model, "--port", port] + ["--host", "127.0.0.1"]
(unless args name --host: vLLM's sleep and RPC endpoints are unauthenticated)
+ ["--enable-sleep-mode"] (levels 1 and 2) + args.
"""

from __future__ import annotations

import hashlib
import json
import os

LOOPBACK = "127.0.0.1"


def host_from_args(args) -> str | None:
    for i, arg in enumerate(args):
        if arg == "--host" and i + 1 < len(args):
            return args[i + 1]
        if arg.startswith("--host="):
            return arg.split("=", 1)[1]
    return None


def model_argv(daemon, spec) -> list[str]:
    argv = list(daemon.vllm_command) + ["serve", spec.model, "--port", str(spec.port)]
    if host_from_args(spec.args) is None:
        argv += ["--host", LOOPBACK]
    if spec.sleep_level in (1, 2) and "--enable-sleep-mode" not in spec.args:
        argv.append("--enable-sleep-mode")
    return argv + list(spec.args)


def model_env(spec, base: dict[str, str]) -> dict[str, str]:
    """The child's environment on top of the (already scrubbed) daemon environment."""
    env = dict(base)
    env["VLLM_SERVER_DEV_MODE"] = "1"  # the sleep endpoints exist only in dev mode
    if spec.sleep_level == 4:
        # io_uring and libuv state cannot be checkpointed by CRIU.
        env["UV_USE_IO_URING"] = "0"
        env["USE_LIBUV"] = "0"
    env.update(spec.env_dict())
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


def tp_size(args) -> int:
    """--tensor-parallel-size N, -tp N, and their = forms (the last one wins, as argparse)."""
    size = 1
    for i, arg in enumerate(args):
        value = None
        if arg in ("--tensor-parallel-size", "-tp") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(("--tensor-parallel-size=", "-tp=")):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                size = int(value)
            except ValueError:
                pass
    return size


TP_FLAGS = ("--enforce-eager", "--disable-custom-all-reduce")


def catalog_warnings(catalog) -> list[str]:
    """Advice that does not make the catalog invalid (printed by --check, logged at load)."""
    warnings = []
    for spec in catalog.models.values():
        tp = tp_size(spec.args)
        if tp > 1 and spec.sleep_level in (3, 4):
            missing = [f for f in TP_FLAGS if f not in spec.args]
            if missing:
                warnings.append(f"{spec.source}: warning: models.{spec.name}: tensor-parallel size "
                                f"{tp} at level {spec.sleep_level} needs {' and '.join(missing)} "
                                "(CUDA graphs and custom all-reduce buffers cannot be suspended)")
    return warnings
