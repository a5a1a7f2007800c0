"""The catalog as llmuxd uses it: frozen settings records, one per table of the TOML.

catalog.py parses and validates the files into these; everything else in llmuxd reads
only these (never TOML), so a field's meaning is written once, here, beside it.
"""
from __future__ import annotations

from dataclasses import dataclass, field


class CatalogError(Exception):
    """The catalog is invalid; ``problems`` holds every ``FILE:LINE: message``."""

    def __init__(self, problems: list[str]):
        self.problems = list(problems)
        super().__init__("\n".join(self.problems))


@dataclass(frozen=True)
class CheckpointSettings:
    criu_path: str = "criu"
    cuda_checkpoint: str = "auto"
    cuda_plugin_dir: str = "/usr/lib/criu"
    images_dir: str = ""
    ghost_limit: int = 1048576
    criu_timeout: float = 1800.0           # deadline of one criu dump or restore
    cuda_timeout: float = 600.0            # deadline of one cuda-checkpoint call
    network_lock: str = "nftables"         # criu --network-lock: iptables is often absent


@dataclass(frozen=True)
class AccessSettings:
    """Who may change state through the socket, besides root, llmuxd's own user and
    members of socket_group. Entries are names or numeric ids (as strings or ints)."""
    users: tuple[str, ...] = ()
    groups: tuple[str, ...] = ()


@dataclass(frozen=True)
class FrontSettings:
    """[daemon.front]: the OpenAI-compatible endpoint (llmuxd/front/). No listen, no front."""
    listen: str = ""                       # "HOST:PORT" as written; "" = no front
    api_keys: tuple[str, ...] = ()         # bearer tokens; empty = no authentication
    queue_timeout: float = 600.0           # how long a request may wait for its model
    min_active: float = 0.0                # on-demand swaps away only after this long active
    max_queue: int = 1024                  # waiting requests (all models); more get 429
    host: str = ""                         # listen, split (IPv6 without brackets)
    port: int = 0


@dataclass(frozen=True)
class DaemonSettings:
    socket: str = "/run/llmux/llmux.sock"
    socket_mode: int = 0o660
    state_dir: str = "/var/lib/llmux"
    log_dir: str = ""
    vllm_command: tuple[str, ...] = ("vllm",)
    default_model: str | None = None
    drain_timeout: float = 30.0
    stop_timeout: float = 30.0
    startup_timeout: float = 1800.0
    sleep_timeout: float = 120.0
    wake_timeout: float = 120.0
    health_interval: float = 10.0
    health_failures: int = 3
    restart_limit: int = 5
    restart_window: float = 600.0
    restart_backoff: float = 1.0
    shutdown: str = "stop"                 # on TERM: "stop" every model, "checkpoint" the active
                                           # one first (level 4), or "keep" them running to adopt
    socket_group: str | None = None        # group (name or number) that owns the socket and may steer
    max_clients: int = 512                 # concurrent control connections; more are refused
    client_timeout: float = 60.0           # an idle connection is closed after this; a request
                                           # line must be complete within min(10 s, this)
    # Budget per GPU in bytes: the catalog's, else the GPU's total (gpu_memory.py), None
    # when neither is known (then every model is exclusive, as in v1).
    gpu_memory: int | None = None
    gpu_memory_declared: bool = False
    metrics_listen: str = ""               # "HOST:PORT" on loopback for GET /metrics; "" = none
    checkpoint: CheckpointSettings = CheckpointSettings()
    access: AccessSettings = AccessSettings()
    front: FrontSettings = FrontSettings()


@dataclass(frozen=True)
class ModelSpec:
    name: str
    model: str
    port: int
    sleep_level: int = 1
    args: tuple[str, ...] = ()
    env: tuple[tuple[str, str], ...] = ()
    cwd: str | None = None
    startup_timeout: float | None = None
    drain_timeout: float | None = None
    stop_timeout: float | None = None
    keep_images: bool = False
    aliases: tuple[str, ...] = ()          # other names the front routes to this model
    # Level 4 (and shutdown = "checkpoint"): vLLM sleep before the dump, so the image
    # holds no KV cache. 1: sleep 1, then wake the weights (KV cache dropped, weights
    # kept through the CUDA checkpoint); 2: sleep 2 (both dropped, reloaded from disk
    # on wake); 0: dump the whole GPU footprint.
    checkpoint_sleep: int = 1
    gpu_memory: int | None = None          # bytes held while active; None = exclusive (v1)
    # GPU indexes (nvidia-smi's, PCI order) given to the server as CUDA_VISIBLE_DEVICES;
    # None = every GPU (it shares each GPU's budget with every other model).
    gpus: tuple[int, ...] | None = None
    source: str = ""

    def env_dict(self) -> dict[str, str]:
        return dict(self.env)


OVERRIDABLE = ("startup_timeout", "drain_timeout", "stop_timeout")


@dataclass(frozen=True)
class Catalog:
    path: str
    files: tuple[str, ...]
    daemon: DaemonSettings
    models: dict[str, ModelSpec] = field(default_factory=dict)

    def effective(self, spec: ModelSpec, key: str) -> float:
        """The model's override of a daemon timeout, else the daemon's value."""
        if key not in OVERRIDABLE:
            raise KeyError(f"{key!r} is not a per-model timeout (one of {', '.join(OVERRIDABLE)})")
        value = getattr(spec, key)
        return getattr(self.daemon, key) if value is None else value
