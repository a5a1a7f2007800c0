"""Row group `criu`: a level-4 round trip through llmuxd vs criu dump + restore by hand.

A (llmuxd, catalog [daemon.checkpoint] criu_path = CRIU): `sleep a` (level 4:
drain, checkpoint prelude, criu dump into a fresh directory, reap, commit with a
manifest) then `swap a` (criu restore --restore-detached, adopt, /health),
timed from this process on the control socket.

B (by hand, in this process, which becomes a child subreaper through
prctl(PR_SET_CHILD_SUBREAPER) so the restored tree comes back to it): a second
llmux-sim started the way llmuxd starts level-4 models (own session, stdin
/dev/null, output appended to a log, VLLM_SERVER_DEV_MODE=1, UV_USE_IO_URING=0,
USE_LIBUV=0); mkdir of a fresh image directory; `criu dump --shell-job
--ext-unix-sk --tcp-established --link-remap --ghost-limit 1048576
--enable-external-masters --network-lock nftables --tree PID --images-dir D`;
waitpid on every process of the dumped tree (a zombie keeps its PID, and the
restore would fail with "File exists"); `criu restore --shell-job --ext-unix-sk
--tcp-established --enable-external-masters --restore-detached --network-lock
nftables --images-dir D --pidfile P`; one GET /health; removal of the images.
Both sides log with `--log-file dump.log|restore.log -v4`, as llmuxd does, so
like is compared with like. The daemon's phase events split its time into the
same steps: checkpoint (everything before criu runs), dump, restore, health.
"""

from __future__ import annotations

import ctypes
import os
import shutil
import subprocess
import time
from pathlib import Path

import psutil

from . import profiling
from .harness import CRIU, SIM, Ctx, Daemon, alternate, free_port, http_call
from .report import Goal, Row
from .swap_overhead import phase_durations

NAME = "criu"
DESCRIPTION = (
    "- **criu** (rows 5-7): a level-4 round trip through llmuxd (`sleep` at level 4, then "
    "`swap` back: real CRIU 4.2) versus `criu dump` + reaping + `criu restore` + one /health "
    "of a second llmux-sim run by hand (this process as child subreaper), same flags and "
    "logging; the dump and restore steps are also compared one by one, using the daemon's "
    "phase events.")

DUMP_FLAGS = ["--shell-job", "--ext-unix-sk", "--tcp-established", "--link-remap",
              "--ghost-limit", "1048576", "--enable-external-masters", "--network-lock", "nftables"]
RESTORE_FLAGS = ["--shell-job", "--ext-unix-sk", "--tcp-established", "--enable-external-masters",
                 "--restore-detached", "--network-lock", "nftables"]
PR_SET_CHILD_SUBREAPER = 36


def set_subreaper(on: bool) -> None:
    libc = ctypes.CDLL(None, use_errno=True)
    if libc.prctl(PR_SET_CHILD_SUBREAPER, 1 if on else 0, 0, 0, 0) != 0:
        raise OSError(ctypes.get_errno(), "prctl(PR_SET_CHILD_SUBREAPER)")


class RawCriu:
    """An llmux-sim checkpointed and restored by hand, one round at a time."""

    def __init__(self, ctx: Ctx, workdir: Path) -> None:
        self.ctx, self.workdir = ctx, workdir
        self.port = free_port()
        set_subreaper(True)
        argv = SIM + ["serve", "org/raw", "--port", str(self.port), "--host", "127.0.0.1"]
        env = ctx.env(VLLM_SERVER_DEV_MODE="1", UV_USE_IO_URING="0", USE_LIBUV="0")
        devnull = os.open(os.devnull, os.O_RDONLY)
        log = os.open(workdir / "raw-sim.log", os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o640)
        try:  # posix_spawn, not Popen: nobody but us may ever wait for these PIDs
            self.root = os.posix_spawn(argv[0], argv, env, setsid=True, file_actions=[
                (os.POSIX_SPAWN_DUP2, devnull, 0), (os.POSIX_SPAWN_DUP2, log, 1),
                (os.POSIX_SPAWN_DUP2, log, 2)])
        finally:
            os.close(devnull)
            os.close(log)
        self.wait_healthy(30)
        self.n = 0

    def wait_healthy(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while True:
            try:
                if http_call(self.port, "GET", "/health", timeout=2)[0] == 200:
                    return
            except OSError:
                pass
            if time.monotonic() > deadline:
                raise RuntimeError("raw llmux-sim not healthy")
            time.sleep(0.001)

    def tree(self) -> list[int]:
        return [self.root] + sorted(p.pid for p in psutil.Process(self.root).children(recursive=True))

    @staticmethod
    def reap(pids: list[int], timeout: float = 30.0) -> None:
        """waitpid each PID; a grandchild becomes ours only once its parent is gone."""
        deadline = time.monotonic() + timeout
        for pid in pids:
            while True:
                try:
                    os.waitpid(pid, 0)
                    break
                except ChildProcessError:
                    if not os.path.exists(f"/proc/{pid}"):
                        break
                    if time.monotonic() > deadline:
                        raise RuntimeError(f"pid {pid} was never reaped") from None
                    time.sleep(0.0005)

    def criu(self, verb: str, flags: list[str], images: Path) -> None:
        proc = subprocess.run([CRIU, verb, *flags, "--images-dir", str(images),
                               "--log-file", f"{verb}.log", "-v4"], capture_output=True, text=True)
        if proc.returncode:
            log = (images / f"{verb}.log").read_text(errors="replace").splitlines()
            errors = [line for line in log if "Error" in line][-3:]
            raise RuntimeError(f"criu {verb} failed ({proc.returncode}): {errors}")

    def round(self) -> dict[str, float]:
        self.n += 1
        images = self.workdir / f"raw-images-{self.n}"
        t0 = time.perf_counter()
        tree = self.tree()
        images.mkdir(mode=0o700)
        self.criu("dump", DUMP_FLAGS + ["--tree", str(self.root)], images)
        t1 = time.perf_counter()
        self.reap(tree)
        t2 = time.perf_counter()
        self.criu("restore", RESTORE_FLAGS + ["--pidfile", str(images / "restore.pid")], images)
        t3 = time.perf_counter()
        self.wait_healthy(10)
        t4 = time.perf_counter()
        shutil.rmtree(images)
        t5 = time.perf_counter()
        return {"total": t5 - t0, "dump": t1 - t0, "reap": t2 - t1, "restore": t3 - t2,
                "health": t4 - t3, "cleanup": t5 - t4}

    def close(self) -> None:
        try:
            pids = self.tree()
        except psutil.Error:
            pids = [self.root]
        try:
            os.killpg(self.root, 9)
        except OSError:
            pass
        try:
            self.reap(pids, timeout=10)
        finally:
            set_subreaper(False)


def daemon_round(d: Daemon) -> dict[str, float]:
    t0 = time.perf_counter()
    slept = d.must({"cmd": "sleep", "model": "a"})
    t1 = time.perf_counter()
    woke = d.must({"cmd": "swap", "model": "a"})
    t2 = time.perf_counter()
    out = {"total": t2 - t0, "sleep_call": t1 - t0, "swap_call": t2 - t1}
    out.update(phase_durations(slept))
    out.update(phase_durations(woke))
    return out


def start_daemon(ctx: Ctx, profile=None, cuda_checkpoint: str | None = None) -> Daemon:
    checkpoint = {"criu_path": CRIU}
    if cuda_checkpoint:
        checkpoint["cuda_checkpoint"] = cuda_checkpoint
    d = Daemon(ctx, ctx.workdir("criu"), {"a": {"sleep_level": 4}}, {"checkpoint": checkpoint},
               profile=profile).start()
    d.must({"cmd": "swap", "model": "a"})
    return d


def mean(rounds: list[dict], key: str) -> float:
    return sum(r.get(key, 0.0) for r in rounds) / len(rounds) * 1000


def run(ctx: Ctx) -> list[Row]:
    if os.geteuid() != 0:
        raise RuntimeError("needs root (CRIU)")
    if not os.access(CRIU, os.X_OK):  # a clean checkout: install it as CI does
        ctx.say(f"{CRIU} is missing: packaging/install-criu.sh")
        script = os.path.join(os.path.dirname(__file__), "..", "packaging", "install-criu.sh")
        subprocess.run(["bash", script, os.path.dirname(os.path.dirname(CRIU))], check=True,
                       capture_output=True)
    workdir = ctx.workdir("criu-raw")
    with start_daemon(ctx) as d:
        raw = RawCriu(ctx, workdir)
        try:
            daemon_round(d), raw.round()  # warm-up: page cache, criu's own start-up
            n = ctx.n(10, 3)
            ctx.say(f"{n} level-4 round trips each side")
            a, b = alternate(n, lambda: daemon_round(d), raw.round)
        finally:
            raw.close()
    ms = lambda rounds, key: [r.get(key, 0.0) * 1000 for r in rounds]  # noqa: E731
    over = mean(a, "total") - mean(b, "total")
    notes = [f"llmuxd phases (ms, mean): drain {mean(a, 'drain'):.1f}, checkpoint "
             f"{mean(a, 'checkpoint'):.1f} (before criu runs), dump {mean(a, 'dump'):.1f}, "
             f"restore {mean(a, 'restore'):.1f}, health {mean(a, 'health'):.1f}; raw steps: dump "
             f"{mean(b, 'dump'):.1f}, reap {mean(b, 'reap'):.1f}, restore {mean(b, 'restore'):.1f}, "
             f"health {mean(b, 'health'):.1f}, image removal {mean(b, 'cleanup'):.1f}",
             f"llmuxd adds {over:.0f} ms per round trip; the checkpoint phase alone is "
             f"{mean(a, 'checkpoint'):.0f} ms"]
    extra = {"daemon_rounds": a, "raw_rounds": b}
    return [
        Row("criu.total", "Level 4 round trip (checkpoint + restore)", "ms", "llmuxd",
            ms(a, "total"), "raw criu", ms(b, "total"),
            goal=Goal("llmux within 5% of raw", "ratio", 1.05), notes=notes, extra=extra),
        Row("criu.dump", "Level 4 dump step: llmuxd dump phase vs criu dump + reap (info)", "ms",
            "llmuxd", ms(a, "dump"), "raw", [x + y for x, y in zip(ms(b, "dump"), ms(b, "reap"))],
            notes=["the dump phase also covers waiting for the tree to be gone and writing the "
                   "manifest"]),
        Row("criu.restore", "Level 4 restore step: llmuxd restore phase vs criu restore (info)",
            "ms", "llmuxd", ms(a, "restore"), "raw", ms(b, "restore"),
            notes=["the restore phase also covers the PID check and adopting the restored root"]),
    ]


def profile(ctx: Ctx, row: Row) -> None:
    path = ctx.root / f"profile-{row.key}.pstats"
    d = start_daemon(ctx, profile=path)
    try:
        for _ in range(3):
            daemon_round(d)
    finally:
        d.stop()
        d.kill()
    row.profile = profiling.top_cumulative(path)
    a = row.extra.get("daemon_rounds") or []
    b = row.extra.get("raw_rounds") or []
    if not (a and b):
        row.explain = "Profile (per round trip): " + profiling.describe(path, per=3, what="round trip")
        return
    over = mean(a, "total") - mean(b, "total")
    steps = sorted(((mean(a, "checkpoint"), "checkpoint phase (before criu runs)"),
                    (mean(a, "dump") - mean(b, "dump") - mean(b, "reap"), "dump phase beyond criu dump+reap"),
                    (mean(a, "restore") - mean(b, "restore"), "restore phase beyond criu restore"),
                    (mean(a, "drain") + mean(a, "health") - mean(b, "health"), "drain + health")),
                   reverse=True)
    why = ""
    if mean(a, "checkpoint") > 20:
        # A slow prelude is the CUDA probe of suspend mode (a helper process per PID of the
        # tree); check by making the probe free: a helper that answers at once.
        with start_daemon(ctx, cuda_checkpoint="/bin/false") as d:
            daemon_round(d)
            cheap = [daemon_round(d) for _ in range(3)]
        why = (f" The checkpoint phase is the CUDA probe of suspend mode (`python -m "
               f"llmuxd.cuda_checkpoint --get-state` per process of the tree, a Python start-up "
               f"each): with cuda_checkpoint = \"/bin/false\" it takes {mean(cheap, 'checkpoint'):.1f} "
               f"ms instead of {mean(a, 'checkpoint'):.0f} ms.")
    row.explain = (f"llmuxd adds {over:.0f} ms per round trip: "
                   + ", ".join(f"{what} {ms:+.0f} ms" for ms, what in steps) + "." + why
                   + " Profile (per round trip): "
                   + profiling.describe(path, per=3, what="round trip"))
