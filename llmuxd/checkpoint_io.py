"""Filesystem and /proc operations of levels 3 and 4, named so plans can ask for them.

A plan yields `Io("name", args)`; the runner calls OPERATIONS[name](daemon, *args)
on the loop thread. Each is short (no waiting on other processes) and raises
OSError/ValueError on failure, which the plan receives as IoFailed. Images live
in `<images_dir>/<model>`; a dump is written to `<model>.partial-<time>` and
renamed into place only once CRIU succeeded, with a manifest beside the images.
The link_remap files a dump leaves in /dev/shm are link_remap.py's; images that
go take their stash with them (delete_images, set_aside).
"""

from __future__ import annotations

import glob
import json
import logging
import os
import re
import shlex
import signal
import sys
import time

import psutil

from . import link_remap, procs, seccomp, trust

log = logging.getLogger(__name__)
MANIFEST = "manifest.json"


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
    # A restore runs what the images say as root: the folder must be ours alone.
    trust.check_dir(base, "images_dir")
    for old in glob.glob(os.path.join(base, f"{name}.partial-*")):
        delete_images(d, old)
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
    trust.check_dir(os.path.dirname(path.rstrip("/")), "images_dir")
    trust.check_dir(path, "checkpoint images")
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
    """Images can be many GB: rename them out of the way at once, delete in the background.
    Their stashed link_remap files go with them."""
    if not path or not os.path.exists(path):
        return
    _drop_stash_of(path)
    if ".partial-" in os.path.basename(path):
        link_remap.clear_partial_link_remaps(path)
    trash = f"{path}.deleting-{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    os.rename(path, trash)
    d.run_in_background(["rm", "-rf", "--", trash])


def set_aside(d, path: str | None) -> str:
    """Keep failed images for diagnosis, out of the way of the next dump."""
    if not path or not os.path.exists(path):
        raise ValueError("no images to keep")
    aside = f"{path}.failed-{time.strftime('%Y%m%d-%H%M%S')}"
    _drop_stash_of(path)  # kept images are for reading, not restoring: free the tmpfs
    os.rename(path, aside)
    return aside


def _drop_stash_of(images: str) -> None:
    """The stash that the manifest of these images names (none: nothing to do)."""
    try:
        with open(os.path.join(images, MANIFEST)) as f:
            stash = json.load(f).get("link_remap_stash")
    except (OSError, ValueError, AttributeError):
        return
    if stash:
        link_remap.drop_stash(stash)


# -- restore ------------------------------------------------------------------------

def criu_known_good(d, path: str) -> bool:
    return path in d.criu_ok


def remember_criu_good(d, path: str) -> None:
    """Only success is remembered: a broken criu, once fixed, works at the next try."""
    d.criu_ok.add(path)


def wall_clock(d) -> float:
    """time.time(), for comparing with process start times (plans keep no clock)."""
    return time.time()


def kill_own_restore(d, name: str, images: str, root: int, since: float) -> list[int]:
    """A restore that went wrong after CRIU made the tree: SIGKILL that tree, and only
    if we can prove CRIU made it: CRIU's pidfile names it, it is our child (we are
    the subreaper of --restore-detached), and it started after the restore began.
    A stranger that took the dumped PID is never touched."""
    try:
        with open(os.path.join(images, "restore.pid")) as f:
            named = int(f.read().strip())
        proc = psutil.Process(root)
        made_by_restore = (named == root and proc.ppid() == os.getpid()
                           and proc.create_time() >= since - 1.0 and os.getpgid(root) == root)
    except (OSError, ValueError, psutil.Error):
        return []
    if not made_by_restore:
        log.warning("%s: pid %d is not the restored tree; not killed", name, root)
        return []
    members = procs.group_members(root)
    procs.kill_group(root, signal.SIGKILL)
    return members


def plugin_tool_path(d) -> str:
    """PATH for criu in plugin mode: first a folder holding `cuda-checkpoint`, for CRIU's
    CUDA plugin, which runs it by that name from PATH: our helper (`auto`) or the
    configured binary."""
    tool = d.catalog.daemon.checkpoint.cuda_checkpoint
    folder = os.path.join(d.catalog.daemon.state_dir, "bin")
    os.makedirs(folder, mode=0o700, exist_ok=True)
    if tool == "auto":
        pythonpath = os.environ.get("PYTHONPATH")
        lines = ["#!/bin/sh", "# written by llmuxd: CRIU's CUDA plugin runs cuda-checkpoint from PATH"]
        if pythonpath:
            lines.append(f"export PYTHONPATH={shlex.quote(pythonpath)}")
        lines.append(f"exec {shlex.quote(sys.executable)} -m llmuxd.cuda_checkpoint \"$@\"")
    else:
        lines = ["#!/bin/sh", f"exec {shlex.quote(tool)} \"$@\""]
    path = os.path.join(folder, "cuda-checkpoint")
    with open(path + ".tmp", "w") as f:
        f.write("\n".join(lines) + "\n")
    os.chmod(path + ".tmp", 0o755)
    os.rename(path + ".tmp", path)
    return f"{folder}:{os.environ.get('PATH', '/usr/sbin:/usr/bin:/sbin:/bin')}"


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
            "io_uring_disabled": seccomp.io_uring_disabled(),
            "seccomp_io_uring": seccomp.supported(),
            "images_free_bytes": free_space(d, ck.images_dir)}


OPERATIONS = {f.__name__: f for f in (
    process_tree, expected_image_size, free_space, checkpoint_mode, prepare_images,
    commit_images, read_manifest, busy_pids, adopt_restored, criu_errors, delete_images,
    set_aside, host_facts, cuda_possible, wall_clock, kill_own_restore, plugin_tool_path,
    criu_known_good, remember_criu_good)}
