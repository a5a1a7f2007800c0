"""The model catalog: load and strictly validate llmux's TOML configuration.

This module owns the catalog format: the main file (``[daemon]``,
``[daemon.checkpoint]``, ``[models.NAME]``) plus drop-ins ``models.d/*.toml``
beside it, read in name order, which may only add ``[models.NAME]`` tables.
Every problem found is reported, each as ``FILE:LINE: message``, in one
:class:`CatalogError`; bad input never escapes as another exception.

It is pure: the only I/O is reading those files (and listing ``models.d``).
The records it produces are in settings.py, its value converters in catalog_values.py,
the key-to-line scanner in toml_lines.py.
"""
from __future__ import annotations

import copy
import difflib
import os
import re
import stat
from functools import partial
from typing import Any, Callable

import tomlkit
from tomlkit.exceptions import ParseError

from . import catalog_values as cv
from . import gpu_memory
from .catalog_values import parse_duration
from .gpu_memory import parse_size
# The settings records are defined in settings.py; importers of catalog find them here too.
from .settings import (AccessSettings, Catalog, CatalogError,  # noqa: F401
                       CheckpointSettings, DaemonSettings, FrontSettings, ModelSpec)
from .toml_lines import BARE_KEY, locate_keys


# ---------------------------------------------------------------- keys

_ACCESS_KEYS = {"users": cv.principals, "groups": cv.principals}
_FRONT_KEYS: dict[str, Callable[[Any, str], Any]] = {
    "listen": cv.listen, "api_keys": cv.api_keys, "queue_timeout": lambda v, w: parse_duration(v, w),
    "min_active": lambda v, w: parse_duration(v, w),
    "max_queue": lambda v, w: cv.integer(v, w, lo=1, hi=1_000_000)}
# Converters per key (catalog_values.py); each takes (value, where) and returns the
# converted value or raises ValueError("where: message").
_Conv = Callable[[Any, str], Any]
_maybe_empty: _Conv = partial(cv.string, nonempty=False)
_duration: _Conv = parse_duration
_CHECKPOINT_KEYS: dict[str, _Conv] = {
    "criu_path": cv.string, "cuda_checkpoint": cv.string, "cuda_plugin_dir": cv.string,
    "images_dir": _maybe_empty, "ghost_limit": cv.integer, "criu_timeout": _duration,
    "cuda_timeout": _duration,
    "network_lock": lambda v, where: cv.choice(v, where, ("nftables", "iptables", "skip"))}
_DAEMON_KEYS: dict[str, _Conv | None] = {
    "socket": cv.string, "socket_mode": cv.mode, "state_dir": cv.string, "log_dir": _maybe_empty,
    "vllm_command": cv.command, "default_model": cv.string, "drain_timeout": _duration,
    "stop_timeout": _duration, "startup_timeout": _duration, "sleep_timeout": _duration,
    "wake_timeout": _duration, "health_interval": cv.positive,
    "health_failures": partial(cv.integer, lo=1), "restart_limit": cv.integer,
    "restart_window": _duration, "restart_backoff": _duration, "checkpoint": None,
    "access": None, "front": None, "socket_group": lambda v, where: cv.principal(v, where),
    "max_clients": partial(cv.integer, lo=1, hi=100_000), "client_timeout": cv.positive,
    "shutdown": lambda v, where: cv.choice(v, where, ("stop", "checkpoint", "keep")),
    "gpu_memory": parse_size, "metrics_listen": cv.metrics_listen,
}
_MODEL_KEYS: dict[str, _Conv] = {
    "model": cv.string, "port": partial(cv.integer, lo=1, hi=65535),
    "sleep_level": partial(cv.integer, lo=1, hi=5), "args": cv.string_list, "env": cv.env,
    "cwd": cv.string, "startup_timeout": _duration, "drain_timeout": _duration,
    "stop_timeout": _duration, "aliases": cv.aliases,
    "keep_images": lambda v, where: cv.expect(v, where, (bool,), "a boolean (true or false)"),
    "checkpoint_sleep": partial(cv.integer, lo=0, hi=2), "gpu_memory": parse_size, "gpus": cv.gpus}
_MODEL_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")
# The catalog is parsed on the loop's thread (a reload): bound what one parse may cost.
# tomlkit needs ~0.6 ms a model; these limits keep a reload well under a second.
MAX_MODELS = 1000
MAX_FILE_BYTES = 1 << 20
_TABLE = re.compile(rb"^[ \t]*\[", re.M)


# ---------------------------------------------------------------- loading

# path -> (text, tomlkit document, plain values, key lines) of the last good parse.
_PARSED: dict[str, tuple[str, Any, dict, dict]] = {}


class _File:
    """One file being validated: its name, key lines and the shared problem list."""

    def __init__(self, path: str, problems: list[str]):
        self.path, self.problems, self.lines = path, problems, {}

    def where(self, path: tuple[str, ...]) -> str:
        """FILE:LINE of the key path, else of its closest enclosing table, else FILE:0."""
        found = (self.lines[path[:n]] for n in range(len(path), 0, -1) if path[:n] in self.lines)
        return f"{self.path}:{next(found, 0)}"

    def error(self, path: tuple[str, ...], message: str) -> None:
        self.problems.append(f"{self.where(path)}: {message}")

    def read(self, max_tables: int = MAX_MODELS + 2) -> tuple[dict[str, Any], Any] | None:
        """Read and parse the file; (plain dict, tomlkit document) or None after an error.
        Only a regular file is read (a FIFO would block the loop), and only a bounded one."""
        try:
            fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(fd).st_mode):
                    self.problems.append(f"{self.path}:0: not a regular file")
                    return None
                data = f.read(MAX_FILE_BYTES + 1)
        except OSError as e:
            self.problems.append(f"{self.path}:0: cannot read: {e.strerror or e}")
            return None
        if len(data) > MAX_FILE_BYTES:
            self.problems.append(f"{self.path}:0: larger than {MAX_FILE_BYTES} bytes; split the "
                                 "catalog or trim it")
            return None
        tables = len(_TABLE.findall(data))  # counted before the (slow) parse
        if tables > max_tables:
            self.problems.append(f"{self.path}:0: too many models (at most {MAX_MODELS} in the "
                                 "catalog and its drop-ins)")
            return None
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            line = data[:e.start].count(b"\n") + 1
            self.problems.append(f"{self.path}:{line}: cannot read: not valid UTF-8 ({e.reason})")
            return None
        cached = _PARSED.get(self.path)
        if cached is not None and cached[0] == text:
            # An unchanged file (most of a reload): tomlkit is the slow part of a load.
            _, doc, plain, self.lines = cached
            return copy.deepcopy(plain), doc
        try:
            doc = tomlkit.parse(text)
            plain = doc.unwrap()
        except ParseError as e:
            msg = re.sub(r" at line \d+ col \d+$", "", str(e))
            self.problems.append(f"{self.path}:{e.line or 0}: invalid TOML: {msg} (column {e.col})")
            return None
        except Exception as e:  # tomlkit raises other errors too (e.g. duplicate keys)
            repeats: list[int] = []
            locate_keys(text, repeats)
            line = repeats[0] if repeats else 0
            self.problems.append(f"{self.path}:{line}: invalid TOML: {e or type(e).__name__}")
            return None
        self.lines = locate_keys(text)
        _PARSED[self.path] = (text, doc, copy.deepcopy(plain), self.lines)
        return plain, doc

    def section(self, value: Any, path: tuple[str, ...], allowed: dict) -> dict[str, Any]:
        """Check that value is a table with only allowed keys; return it (or {})."""
        if not isinstance(value, dict):
            self.error(path, f"{_dotted(path)}: expected a table, got {cv.type_name(value)}")
            return {}
        for key in value:
            if key not in allowed:
                hint = difflib.get_close_matches(key, list(allowed), n=1)
                tip = f" (did you mean '{hint[0]}'?)" if hint else ""
                if path[:1] == ("models",) and len(path) == 2 and isinstance(value[key], dict):
                    tip = f' (quote names with dots: [models."{path[1]}.{key}"])'
                self.error(path + (key,), f"{_dotted(path + (key,))}: unknown key{tip}")
        return value

    def convert(self, table: dict, path: tuple[str, ...], convs: dict) -> dict[str, Any]:
        """Convert the known keys of table; record a problem for each bad value."""
        out = {}
        for key, value in table.items():
            conv = convs.get(key)
            if conv is not None:
                try:
                    out[key] = conv(value, _dotted(path + (key,)))
                except ValueError as e:
                    sub = (e.key,) if hasattr(e, "key") else ()
                    self.problems.append(f"{self.where(path + (key,) + sub)}: {e}")
        return out


def _dotted(path: tuple[str, ...]) -> str:
    return ".".join(p if BARE_KEY.fullmatch(p) else f'"{p}"' for p in path)


def _resolve(base: str, path: str) -> str:
    return os.path.normpath(os.path.join(base, path))


def _daemon(f: _File, plain: dict, doc: Any, base: str) -> DaemonSettings:
    table = f.section(plain.get("daemon", {}), ("daemon",), _DAEMON_KEYS)
    values = f.convert(table, ("daemon",), _DAEMON_KEYS)
    raw_mode = table.get("socket_mode")
    if isinstance(raw_mode, int) and not isinstance(raw_mode, bool) and raw_mode:
        try:
            text = doc["daemon"]["socket_mode"].as_string().strip()
        except Exception:
            text = "0o"
        if not text.startswith("0o"):
            values.pop("socket_mode", None)
            f.error(("daemon", "socket_mode"), f'daemon.socket_mode: write the mode in octal '
                    f'("0660" or 0o660), got {text}')
    for key in ("socket", "state_dir", "log_dir"):
        if values.get(key):
            values[key] = _resolve(base, values[key])
    state_dir = values.get("state_dir", DaemonSettings.state_dir)
    values["log_dir"] = values.get("log_dir") or os.path.join(state_dir, "logs")
    ck_table = f.section(table.get("checkpoint", {}), ("daemon", "checkpoint"), _CHECKPOINT_KEYS)
    ck = f.convert(ck_table, ("daemon", "checkpoint"), _CHECKPOINT_KEYS)
    ck["images_dir"] = (_resolve(base, ck["images_dir"]) if ck.get("images_dir")
                        else os.path.join(state_dir, "checkpoints"))
    values["checkpoint"] = CheckpointSettings(**ck)
    access_table = f.section(table.get("access", {}), ("daemon", "access"), _ACCESS_KEYS)
    values["access"] = AccessSettings(**f.convert(access_table, ("daemon", "access"), _ACCESS_KEYS))
    front_table = f.section(table.get("front", {}), ("daemon", "front"), _FRONT_KEYS)
    front = f.convert(front_table, ("daemon", "front"), _FRONT_KEYS)
    if front.get("listen"):
        front["host"], front["port"] = cv.split_listen(front["listen"])
    values["front"] = FrontSettings(**front)
    if "gpu_memory" in values:
        values["gpu_memory_declared"] = True
    elif "gpu_memory" not in table:  # not written at all (a bad value is already an error)
        values["gpu_memory"] = gpu_memory.gpu_total()
    return DaemonSettings(**values)


def _check_sizes(daemon: DaemonSettings, models: dict[str, ModelSpec], problems: list[str],
                 lines: dict[str, str]) -> None:
    """A model that can never fit the budget would make every swap to it fail."""
    budget = daemon.gpu_memory
    if budget is None:
        return
    origin = "daemon.gpu_memory" if daemon.gpu_memory_declared else "the GPU's total memory"
    for spec in models.values():
        if spec.gpu_memory is not None and spec.gpu_memory > budget:
            problems.append(f"{lines.get(spec.name, spec.source)}: models.{spec.name}.gpu_memory: "
                            f"{gpu_memory.format_size(spec.gpu_memory)} is larger than the budget "
                            f"({origin}: {gpu_memory.format_size(budget)})")


def _check_front(where: str, daemon: DaemonSettings, models: dict[str, ModelSpec],
                 aliases: dict[str, tuple[str, str]], problems: list[str],
                 metrics_where: str = "") -> None:
    """The names the front routes by are unique, and its port (and the metrics port)
    is no model's."""
    for alias, (owner, line) in aliases.items():
        if alias in models:
            problems.append(f"{line}: models.{owner}.aliases: {alias!r} is the name of model "
                            f"'{alias}'")
    for spec in models.values():
        if daemon.front.port and spec.port == daemon.front.port:
            problems.append(f"{where}: daemon.front.listen: port {spec.port} is also the port "
                            f"of model '{spec.name}'")
    if not daemon.metrics_listen:
        return
    port = cv.split_listen(daemon.metrics_listen)[1]
    taken = [f"the port of model '{s.name}'" for s in models.values() if s.port == port]
    if port == daemon.front.port:
        taken.append("daemon.front.listen's (the front serves /metrics itself)")
    if taken:
        problems.append(f"{metrics_where}: daemon.metrics_listen: port {port} is also "
                        f"{taken[0]}")


def _models(f: _File, plain: dict, base: str, seen: dict[str, str],
            ports: dict[int, tuple[str, str]], models: dict[str, ModelSpec],
            aliases: dict[str, tuple[str, str]], size_lines: dict[str, str]) -> None:
    table = plain.get("models", {})
    if not isinstance(table, dict):
        f.error(("models",), f"models: expected a table, got {cv.type_name(table)}")
        return
    for name, value in table.items():
        path = ("models", name)
        where = _dotted(path)
        if name in seen:
            f.error(path, f"duplicate model '{name}' (first defined at {seen[name]})")
            continue
        seen[name] = f.where(path)
        if not isinstance(value, dict):
            f.error(path, f"{where}: expected a table, got {cv.type_name(value)}")
            continue
        if not _MODEL_NAME.fullmatch(name):
            f.error(path, f"{where}: invalid model name {name!r} (letters, digits, '.', '_', "
                          "'-'; must start with a letter or digit; at most 64 characters)")
        spec = f.section(value, path, _MODEL_KEYS)
        values = f.convert(spec, path, _MODEL_KEYS)
        missing = [key for key in ("model", "port") if key not in spec]
        for key in missing:
            f.error(path, f"{where}: missing required key '{key}'")
        port = values.get("port")
        if port in ports:
            f.error(path + ("port",), f"{where}.port: duplicate port {port} (already used by "
                                      f"model '{ports[port][0]}' at {ports[port][1]})")
        elif port is not None:
            ports[port] = (name, f.where(path + ("port",)))
        if missing or len(values) != len(spec) or not _MODEL_NAME.fullmatch(name):
            continue  # problems already recorded
        if values.get("cwd"):
            values["cwd"] = _resolve(base, values["cwd"])
        for alias in values.get("aliases", ()):
            line = f.where(path + ("aliases",))
            if alias in aliases and aliases[alias][0] != name:
                f.error(path + ("aliases",), f"{where}.aliases: {alias!r} is already an alias of "
                        f"model '{aliases[alias][0]}' (at {aliases[alias][1]})")
            aliases.setdefault(alias, (name, line))
        if "gpu_memory" in values:
            size_lines[name] = f.where(path + ("gpu_memory",))
        if "gpus" in values and not _check_gpus(f, path, values):
            continue
        models[name] = ModelSpec(name=name, source=f.where(path), **values)


def _check_gpus(f: _File, path: tuple[str, ...], values: dict) -> bool:
    """A GPU list is what the server sees: llmux sets CUDA_VISIBLE_DEVICES (and
    CUDA_DEVICE_ORDER=PCI_BUS_ID, so that the indexes are NVML's) from it, so `env`
    may not say otherwise, and tensor parallelism needs a GPU per rank."""
    where = _dotted(path)
    gpus, env = values["gpus"], dict(values.get("env", ()))
    ok = True
    if "CUDA_VISIBLE_DEVICES" in env:
        f.error(path + ("env",), f"{where}.env: CUDA_VISIBLE_DEVICES conflicts with "
                                 f"{where}.gpus (llmux sets it from gpus; keep one of them)")
        ok = False
    if env.get("CUDA_DEVICE_ORDER", "PCI_BUS_ID") != "PCI_BUS_ID":
        f.error(path + ("env",), f"{where}.env: CUDA_DEVICE_ORDER must be PCI_BUS_ID with "
                                 f"{where}.gpus (the indexes are nvidia-smi's)")
        ok = False
    tp = gpu_memory.tp_size(values.get("args", ()))
    if tp > len(gpus):
        f.error(path + ("gpus",), f"{where}.gpus: tensor-parallel size {tp} needs {tp} GPUs, "
                                  f"but gpus lists {len(gpus)}")
        ok = False
    return ok


def _load(path: str) -> tuple[Catalog | None, list[str]]:
    main = os.path.abspath(path)
    base = os.path.dirname(main)
    problems: list[str] = []
    if not os.path.lexists(main):  # no line to point at: say where else it could be
        return None, [f"{main}: no such file (pass --config PATH or set $LLMUX_CONFIG; "
                      "etc/llmux.toml in the source tree shows every key)"]
    files = [main]
    dropin_dir = os.path.join(base, "models.d")
    if os.path.isdir(dropin_dir):
        try:
            names = sorted(n for n in os.listdir(dropin_dir)
                           if n.endswith(".toml") and not n.startswith("."))
            files += [os.path.join(dropin_dir, n) for n in names]
        except OSError as e:
            problems.append(f"{dropin_dir}:0: cannot read: {e.strerror or e}")
    seen: dict[str, str] = {}
    ports: dict[int, tuple[str, str]] = {}
    models: dict[str, ModelSpec] = {}
    aliases: dict[str, tuple[str, str]] = {}  # alias -> (model, FILE:LINE)
    size_lines: dict[str, str] = {}  # model -> FILE:LINE of its gpu_memory
    daemon = DaemonSettings()
    main_file = None
    if len(files) > MAX_MODELS + 1:
        problems.append(f"{dropin_dir}:0: too many drop-ins ({len(files) - 1}; at most "
                        f"{MAX_MODELS})")
        files = files[:1]
    for name in files:
        f = _File(name, problems)
        # The main file may hold [daemon] tables as well as models.
        parsed = f.read(MAX_MODELS - len(seen) + (8 if name == main else 0))
        if parsed is None:
            continue
        plain, doc = parsed
        if name == main:
            main_file = f
            f.section(plain, (), {"daemon": None, "models": None})
            daemon = _daemon(f, plain, doc, base)
        else:
            for key in plain:
                if key != "models":
                    f.error((key,), f"{_dotted((key,))}: a drop-in may only define "
                                    "[models.NAME] tables")
        _models(f, plain, base, seen, ports, models, aliases, size_lines)
    if len(seen) > MAX_MODELS:
        problems.append(f"{main}:0: too many models ({len(seen)}; at most {MAX_MODELS})")
    if daemon.default_model is not None and daemon.default_model not in seen:
        where = main_file.where(("daemon", "default_model")) if main_file else f"{main}:0"
        problems.append(f"{where}: daemon.default_model: no model named "
                        f"'{daemon.default_model}' is defined")
    _check_front(main_file.where(("daemon", "front", "listen")) if main_file else f"{main}:0",
                 daemon, models, aliases, problems,
                 main_file.where(("daemon", "metrics_listen")) if main_file else f"{main}:0")
    _check_sizes(daemon, models, problems, size_lines)
    if problems:
        return None, problems
    return Catalog(path=main, files=tuple(files), daemon=daemon, models=models), []


def load_catalog(path: str) -> Catalog:
    """Load and validate the catalog at path; CatalogError lists every problem."""
    catalog, problems = _load(path)
    if catalog is None:
        raise CatalogError(problems)
    return catalog


def validate_only(path: str) -> list[str]:
    """Every problem of the catalog at path, [] when it is valid."""
    return _load(path)[1]

