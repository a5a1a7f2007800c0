"""Level 4: CRIU checkpoint of the whole process tree to disk, and restore.

Dump: refuse at once if `criu check` fails (nothing has changed yet); drain
(done by the swap engine); the weights axis (vLLM sleep, so the image holds no
KV cache; `checkpoint_sleep`); suspend CUDA first unless CRIU's CUDA plugin does
it (plugin mode: plugin present and driver 580+, pass -L and put a
cuda-checkpoint on criu's PATH); check the disk can hold the images; dump into
a fresh temporary directory, and only when CRIU succeeded stash this dump's
/dev/shm/link_remap files (they collide between trees) and rename the images
into place with a manifest: a partial or failed dump never counts as a
checkpoint. CRIU kills the tree; every process of it must be reaped before a
restore (a zombie keeps its PID busy).

Restore: the dumped PIDs must be free; the stashed link_remap files go back;
`criu restore --restore-detached` runs as our child and the restored tree
becomes ours (we are its subreaper); the stored identity is refreshed (same
PID, new start time); CUDA is resumed in suspend mode; the KV cache (and for
checkpoint_sleep 2 the weights) is woken; health check; active. A failed
restore kills only a tree it can prove CRIU made, keeps the images aside for
diagnosis and cold-starts the model, and says so (Degraded).
"""

from __future__ import annotations


from .. import states as S
from ..actions import (Degraded, Http, Io, Pause, Phase, Refused, RunTool, StepFailed,
                       Transition, WaitGone, tool_message)
from ..launch import checkpoint_sleep
from ..steps import expect_ok, io, is_sleeping, spec_of, start, stop, timeout_of, wait_healthy
from .cuda_suspend import nccl, resume, suspend
from .vllm_sleep import enter_sleep, reload_weights

# Flags the seed settled on (see research/llmux-anchor.md 1.8). --network-lock
# nftables: the iptables default needs an iptables binary that is often absent.
COMMON = ("--shell-job", "--ext-unix-sk", "--tcp-established", "--enable-external-masters")
DISK_MARGIN = 1.1
DISK_SLACK = 64 * 1024 * 1024
REAP_TIMEOUT = 30.0
PID_WAIT_POLLS = 50
PREFLIGHT_TIMEOUT = 30.0


def criu_preflight(view, name: str):
    """Refuse level 4 before anything changes when criu cannot work here (the reason
    `llmuxctl doctor` gives): `criu check`, once per criu path that passed."""
    path = view.catalog.daemon.checkpoint.criu_path
    if (yield from io("criu_known_good", path)):
        return
    result = yield RunTool((path, "check"), PREFLIGHT_TIMEOUT, name)
    if not result.ok:
        why = tool_message(result.output) or _rc(result)
        raise Refused(f"{name}: level 4 is unavailable: criu check failed: {why} "
                      "(see `llmuxctl doctor`); nothing changed")
    yield from io("remember_criu_good", path)


def plugin_env(view):
    """CRIU's CUDA plugin runs `cuda-checkpoint` from PATH: put ours first."""
    return (("PATH", (yield from io("plugin_tool_path"))),)


def drop_kv_cache(view, name: str, level: int):
    """The weights axis: most of a vLLM's GPU memory is KV cache, which a restore need
    not bring back. Level 1: sleep (weights to host RAM, KV cache freed), then wake the
    weights alone, so they go through the CUDA checkpoint (fast, device to host) rather
    than pinned host buffers (slow to restore). Level 2: weights and KV cache dropped."""
    yield Phase(f"vllm-sleep-{level}", name)
    yield from enter_sleep(view, name, level)
    if level == 1:
        expect_ok((yield Http(name, "POST", "/wake_up?tags=weights",
                              timeout=view.catalog.daemon.wake_timeout)),
                  f"{name}: POST /wake_up?tags=weights")


def restore_kv_cache(view, name: str, level: int):
    """After restore and CUDA resume: what drop_kv_cache took away comes back. vLLM
    serves garbage or crashes unless every tag is awake (vllm-api.md, bugs 5 and 6)."""
    yield Phase("vllm-wake", name)
    timeout = view.catalog.daemon.wake_timeout
    if level == 2:
        expect_ok((yield Http(name, "POST", "/wake_up?tags=weights", timeout=timeout)),
                  f"{name}: POST /wake_up?tags=weights")
        yield from reload_weights(view, name)
    expect_ok((yield Http(name, "POST", "/wake_up?tags=kv_cache", timeout=timeout)),
              f"{name}: POST /wake_up?tags=kv_cache")
    expect_ok((yield Http(name, "POST", "/reset_prefix_cache", timeout=timeout)),
              f"{name}: POST /reset_prefix_cache")
    if (yield from is_sleeping(view, name)):
        raise StepFailed(f"{name}: still asleep after waking its KV cache")


def dump_argv(ck, pid: int, images: str, plugin: bool) -> tuple[str, ...]:
    argv = (ck.criu_path, "dump", *COMMON, "--link-remap", "--ghost-limit", str(ck.ghost_limit),
            "--network-lock", ck.network_lock, "--tree", str(pid), "--images-dir", images,
            "--log-file", "dump.log", "-v4")
    return argv + (("-L", ck.cuda_plugin_dir) if plugin else ())


def restore_argv(ck, images: str, plugin: bool) -> tuple[str, ...]:
    argv = (ck.criu_path, "restore", *COMMON, "--restore-detached", "--network-lock",
            ck.network_lock, "--images-dir", images, "--log-file", "restore.log", "-v4",
            "--pidfile", "restore.pid")
    return argv + (("-L", ck.cuda_plugin_dir) if plugin else ())


class CriuCheckpoint:
    level = 4
    asleep_state = S.CHECKPOINTED

    def sleep(self, view, name):
        ck = view.catalog.daemon.checkpoint
        rt = view.runtimes[name]
        yield from criu_preflight(view, name)
        yield Phase("checkpoint", name)
        yield Transition(name, S.CHECKPOINTING)
        mode = yield from io("checkpoint_mode")
        tree = yield from io("process_tree", name)
        root = tree[0]
        pre = checkpoint_sleep(view.catalog.daemon, spec_of(view, name))
        if pre:  # before the disk check: the KV cache leaves the tree's memory
            yield from drop_kv_cache(view, name, pre)
        need = yield from io("expected_image_size", name, tree)
        free = yield from io("free_space", ck.images_dir)
        if free < need * DISK_MARGIN + DISK_SLACK:
            raise StepFailed(f"{name}: not enough disk for a checkpoint in {ck.images_dir}: "
                             f"need about {need * DISK_MARGIN / 2**20:.0f} MiB, "
                             f"{free / 2**20:.0f} MiB free")
        cuda_pids = []
        yield from nccl(view, name, "suspend_nccl")
        if mode == "suspend" and (yield from io("cuda_possible")):
            try:
                cuda_pids = yield from suspend(view, name)
            except StepFailed:
                yield from nccl(view, name, "resume_nccl", best_effort=True)
                raise
        tmp = yield from io("prepare_images", name)
        yield Phase("dump", name)
        before = yield from io("link_remaps")
        env = (yield from plugin_env(view)) if mode == "plugin" else ()
        result = yield RunTool(dump_argv(ck, root, tmp, mode == "plugin"), ck.criu_timeout, name,
                               env)
        if not result.ok:
            errors = yield from io("criu_errors", tmp, "dump.log")
            yield Io("delete_images", (tmp,))
            if cuda_pids:
                yield from resume(view, name, cuda_pids, best_effort=True)
            yield from nccl(view, name, "resume_nccl", best_effort=True)
            if "Can't link remap" in errors:  # someone's link_remap.N holds the name CRIU needs
                stale = yield from io("link_remaps")
                errors += (f" (a link_remap file CRIU needs is taken: {', '.join(stale)}; not "
                           "llmux's: remove it if no other CRIU image needs it)")
            raise StepFailed(f"{name}: criu dump failed ({_rc(result)}): {errors}")
        # CRIU killed the tree: wait until every process of it is reaped.
        if not (yield WaitGone(name, REAP_TIMEOUT)):
            raise StepFailed(f"{name}: processes still alive after criu dump")
        stash = yield from io("stash_link_remaps", name, before, tmp)
        manifest = {"model": name, "argv_hash": rt.extra.get("argv_hash"), "level": 4,
                    "mode": mode, "root_pid": root, "pids": tree, "cuda_pids": cuda_pids,
                    "checkpoint_sleep": pre, "link_remap_stash": stash}
        final = yield from io("commit_images", name, tmp, manifest)
        yield Transition(name, S.CHECKPOINTED, fields={
            "asleep_level": 4, "images": final["path"], "image_bytes": final["bytes"],
            "criu_mode": mode, "checkpoint_pid": root, "cuda_pids": cuda_pids,
            "checkpoint_sleep": pre})

    def wake(self, view, name):
        ck = view.catalog.daemon.checkpoint
        rt = view.runtimes[name]
        images = rt.extra.get("images")
        yield Phase("restore", name)
        yield Transition(name, S.RESTORING)
        manifest = since = None
        try:
            manifest = yield from io("read_manifest", images)
            for _ in range(PID_WAIT_POLLS):  # the dumped tree's zombies may be reaped late
                busy = yield from io("busy_pids", manifest["pids"])
                if not busy:
                    break
                yield Pause(0.1)
            else:
                raise StepFailed(f"{name}: cannot restore, PID(s) taken: {', '.join(busy)}")
            plugin = manifest["mode"] == "plugin"
            env = (yield from plugin_env(view)) if plugin else ()
            yield from io("unstash_link_remaps", manifest.get("link_remap_stash"))
            since = yield from io("wall_clock")
            result = yield RunTool(restore_argv(ck, images, plugin), ck.criu_timeout, name, env)
            yield Io("clear_link_remaps", (manifest.get("link_remap_stash"), False))
            if not result.ok:
                errors = yield from io("criu_errors", images, "restore.log")
                raise StepFailed(f"{name}: criu restore failed ({_rc(result)}): {errors}")
            yield from io("adopt_restored", name, manifest["root_pid"])
            if manifest["mode"] == "suspend" and manifest["cuda_pids"]:
                yield Phase("resume", name)
                yield from resume(view, name, manifest["cuda_pids"])
            yield from nccl(view, name, "resume_nccl")
            if manifest.get("checkpoint_sleep"):
                yield from restore_kv_cache(view, name, manifest["checkpoint_sleep"])
            yield Phase("health", name)
            yield from wait_healthy(view, name, timeout_of(view, name, "startup_timeout"))
        except StepFailed as exc:
            if since is not None:  # CRIU may have made the tree: only that tree goes
                yield Io("kill_own_restore", (name, images, manifest["root_pid"], since))
                for _ in range(PID_WAIT_POLLS):
                    if not (yield Io("busy_pids", ([manifest["root_pid"]],))):
                        break
                    yield Pause(0.1)
            aside = yield Io("set_aside", (images,))
            where = aside if isinstance(aside, str) else images
            error = f"{exc} (images kept in {where}); cold start instead"
            yield Degraded(name, f"{name} could not be restored from its checkpoint ({exc}); "
                                 "cold start instead: its state is lost")
            yield from stop(view, name, error=error, hurry=True)
            yield from start(view, name)
            return
        yield Transition(name, S.ACTIVE, fields={"images": None})
        if not view.catalog.models[name].keep_images:
            yield Io("delete_images", (images,))
            yield Io("forget_link_remaps", (manifest.get("link_remap", []),))  # 0.1 manifests

    def discard(self, view, name):
        """stop of a checkpointed model: its images go, it is stopped."""
        images = view.runtimes[name].extra.get("images")
        if images:
            yield Io("delete_images", (images,))
        yield Transition(name, S.STOPPED, fields={"images": None})


def _rc(result) -> str:
    return "deadline reached" if result.rc is None else f"exit {result.rc}"
