"""Filesystem and /proc operations of levels 3 and 4, named so plans can ask for them.

A plan yields `Io("name", args)`; the runner calls OPERATIONS[name](daemon, *args)
on the loop thread. Each is short (no waiting on other processes) and raises
OSError/ValueError on failure, which the plan receives as IoFailed. Images live
in `<images_dir>/<model>`; a dump is written to `<model>.partial-<time>` and
renamed into place only once CRIU succeeded, with a manifest beside the images.
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import time

import psutil

from . import procs

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"
SHM = "/dev/shm"


def _images_dir(d) -> str:
    return d.catalog.daemon.checkpoint.images_dir


def process_tree(d, name: str) -> list[int]:
    """The model's main process and all its descendants, root first."""
    rt = d.runtimes[name]
    if rt.pid is None or not procs.is_alive(rt.pid):
        raise ValueError(f"{name} has no running process")
    root = psutil.Process(rt.pid)
    return [rt.pid] + sorted(p.pid for p in root.children(recursive=True))


def expected_image_size(d, name: str, pids: list[int]) -> int:
    """The last image size of this model, or what its tree holds in memory now."""
    rss = 0
    for pid in pids:
        try:
            rss += psutil.Process(pid).memory_info().rss
        except psutil.Error:
            pass
    last = d.runtimes[name].extra.get("image_bytes") or 0
    return max(rss, last)


def free_space(d, path: str) -> int:
    os.makedirs(path, exist_ok=True)
    st = os.statvfs(path)
    return st.f_bavail * st.f_frsize


def checkpoint_mode(d) -> str:
    """plugin: CRIU's CUDA plugin handles CUDA (needs driver 580+); suspend: we do."""
    ck = d.catalog.daemon.checkpoint
    plugin = os.path.exists(os.path.join(ck.cuda_plugin_dir, "cuda_plugin.so"))
    driver = driver_version()
    if plugin and driver is not None and driver >= 580:
        return "plugin"
    return "suspend"


def cuda_possible(d) -> bool:
    """False when no process here can hold CUDA state (built-in helper, no NVIDIA
    driver): then a level-4 dump need not ask every process about it."""
    if d.catalog.daemon.checkpoint.cuda_checkpoint != "auto":
        return True  # another tool (NVIDIA's, a stand-in) decides for itself
    return os.path.exists("/dev/nvidiactl") or os.path.exists("/proc/driver/nvidia")


def driver_version() -> int | None:
    try:
        with open("/sys/module/nvidia/version") as f:
            return int(f.read().split(".")[0])
    except (OSError, ValueError):
        pass
    try:
        with open("/proc/driver/nvidia/version") as f:
            m = re.search(r"Kernel Module\s+(\d+)\.", f.read())
            return int(m.group(1)) if m else None
    except OSError:
        return None


def prepare_images(d, name: str) -> str:
    """A fresh, empty directory for a dump; earlier partial dumps of this model go."""
    base = _images_dir(d)
    os.makedirs(base, mode=0o700, exist_ok=True)
    for old in glob.glob(os.path.join(base, f"{name}.partial-*")):
        delete_images(d, old)
    # Stale link_remap files that our own earlier dumps of this model left in
    # /dev/shm (never anybody else's: only those our manifest names).
    current = os.path.join(base, name)
    if os.path.exists(os.path.join(current, MANIFEST)):
        forget_link_remaps(d, read_manifest(d, current).get("link_remap", []))
    path = os.path.join(base, f"{name}.partial-{time.strftime('%Y%m%d-%H%M%S')}")
    os.mkdir(path, 0o700)
    return path


def commit_images(d, name: str, tmp: str, manifest: dict) -> dict:
    size = dir_bytes(tmp)
    manifest = {**manifest, "bytes": size, "time": time.time()}
    with open(os.path.join(tmp, MANIFEST + ".tmp"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    os.rename(os.path.join(tmp, MANIFEST + ".tmp"), os.path.join(tmp, MANIFEST))
    final = os.path.join(_images_dir(d), name)
    delete_images(d, final)  # an older checkpoint of this model (keep_images)
    os.rename(tmp, final)
    return {"path": final, "bytes": size}


def read_manifest(d, path: str | None) -> dict:
    if not path:
        raise ValueError("no checkpoint images recorded")
    try:
        with open(os.path.join(path, MANIFEST)) as f:
            manifest = json.load(f)
    except FileNotFoundError:
        raise ValueError(f"no usable checkpoint in {path} (manifest missing)") from None
    except json.JSONDecodeError as exc:
        raise ValueError(f"corrupt manifest in {path}: {exc}") from None
    if not isinstance(manifest.get("pids"), list) or not manifest.get("root_pid"):
        raise ValueError(f"corrupt manifest in {path}")
    return manifest


def busy_pids(d, pids: list[int]) -> list[str]:
    """Reap what we can; describe the dumped PIDs that are still taken."""
    d.reaper.reap()
    busy = []
    for pid in pids:
        try:
            proc = psutil.Process(pid)
            busy.append(f"{pid} ({proc.name()}, {proc.status()})")
        except psutil.NoSuchProcess:
            continue
    return busy


def adopt_restored(d, name: str, pid: int) -> float:
    """The restored root is our child now (subreaper): track it under its new identity."""
    if not procs.is_alive(pid):
        raise ValueError(f"restored process {pid} is not running")
    return d.adopt_process(name, pid)


def criu_errors(d, path: str, log_name: str) -> str:
    """The first meaningful `Error` lines of a CRIU log, for the operator."""
    lines = []
    try:
        with open(os.path.join(path, log_name), errors="replace") as f:
            for line in f:
                if "Error" in line and "RLIMIT_NOFILE" not in line:
                    lines.append(line.strip())
    except OSError as exc:
        return f"no log ({exc.strerror})"
    return " | ".join(lines[:3]) or "no error in the log"


def delete_images(d, path: str) -> None:
    """Images can be many GB: rename them out of the way at once, delete in the background."""
    if not path or not os.path.exists(path):
        return
    trash = f"{path}.deleting-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.rename(path, trash)
    d.run_in_background(["rm", "-rf", "--", trash])


def set_aside(d, path: str | None) -> str:
    """Keep failed images for diagnosis, out of the way of the next dump."""
    if not path or not os.path.exists(path):
        raise ValueError("no images to keep")
    aside = f"{path}.failed-{time.strftime('%Y%m%d-%H%M%S')}"
    os.rename(path, aside)
    return aside


def link_remaps(d) -> list[str]:
    return sorted(glob.glob(os.path.join(SHM, "link_remap.*")))


def forget_link_remaps(d, paths: list[str]) -> None:
    for path in paths:
        if os.path.dirname(path) == SHM and os.path.basename(path).startswith("link_remap."):
            try:
                os.unlink(path)
            except FileNotFoundError:
                pass


def dir_bytes(path: str) -> int:
    total = 0
    for root, _, files in os.walk(path):
        for f in files:
            try:
                total += os.lstat(os.path.join(root, f)).st_size
            except OSError:
                pass
    return total


def host_facts(d) -> dict:
    """Kernel, privileges, driver and plugin: the static half of `doctor`."""
    caps = 0
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("CapEff:"):
                caps = int(line.split()[1], 16)
    ck = d.catalog.daemon.checkpoint
    driver = None
    try:
        with open("/sys/module/nvidia/version") as f:
            driver = f.read().strip()
    except OSError:
        pass
    return {"kernel": os.uname().release, "euid": os.geteuid(), "pid": os.getpid(),
            "cap_sys_admin": bool(caps & (1 << 21)),
            "cap_checkpoint_restore": bool(caps & (1 << 40)),
            "driver": driver, "driver_major": driver_version(),
            "plugin": os.path.exists(os.path.join(ck.cuda_plugin_dir, "cuda_plugin.so")),
            "plugin_path": os.path.join(ck.cuda_plugin_dir, "cuda_plugin.so"),
            "images_dir": ck.images_dir,
            "images_free_bytes": free_space(d, ck.images_dir)}


OPERATIONS = {f.__name__: f for f in (
    process_tree, expected_image_size, free_space, checkpoint_mode, prepare_images,
    commit_images, read_manifest, busy_pids, adopt_restored, criu_errors, delete_images,
    set_aside, link_remaps, forget_link_remaps, host_facts, cuda_possible)}
