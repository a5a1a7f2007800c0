"""The EngineCore's side of tensor parallelism: its Worker_TP<i> children.

With --tensor-parallel-size N > 1 the engine holds no GPU state itself: like
vLLM's MultiprocExecutor it spawns N worker processes (llmuxd/sim/worker.py,
their side), one per rank and GPU, in the same process group, and forwards every
operation to all of them.  They form an NCCL group (simulated without torch),
whose generations Workers numbers and whose FileStore it places (store_dir).
Apart from engine.py because this is the executor, not the engine's state
machine: the engine asks it for broadcasts and NCCL generations and never
touches a worker's socket or process itself.  worker.py imports NCCL_ENV from here.
"""

import json
import os
import socket
import subprocess
import sys
import threading
import time

from llmuxd.sim.cuda import fake_cuda_path, remove_fake_cuda

WORKER_STOP_TIMEOUT_S = 4.0  # vLLM's MultiprocExecutor: SIGTERM, 4 s, then SIGKILL
# NVLink multicast must stay off: on shared hosts it can take the GPUs down.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
stopping = threading.Event()  # set by the engine's SIGTERM/SIGINT handler


class WorkerDied(Exception):
    pass


class WorkerStartError(Exception):
    pass


def store_dir():
    """Where the FileStore of each NCCL generation lives: /dev/shm if usable."""
    shm = "/dev/shm"
    if os.path.isdir(shm) and os.access(shm, os.W_OK | os.X_OK):
        return shm
    import tempfile
    return tempfile.gettempdir()


class Workers:
    """The N worker processes of a TP engine, one socketpair each (newline-
    delimited JSON, one request at a time, sent to every rank before any reply
    is read, so collectives can rendezvous) and one death pipe for all: its
    write end lives only here, so the workers see EOF as soon as we are gone.
    Workers stay in our process group (no setsid), as vLLM's do."""

    def __init__(self, cfg, n):
        self.n = n
        self.cuda_file = fake_cuda_path(cfg.get("fake_cuda_dir"))  # the engine's, for fatal()
        self.procs, self.socks, self.rfiles, self.pids = [], [], [], []
        self.generation = -1  # the NCCL group's generation; its FileStore path follows it
        self.store = None
        death_r, self.death_w = os.pipe()  # both non-inheritable; death_r goes by pass_fds
        env = dict(os.environ, **NCCL_ENV)
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        try:
            for rank in range(n):
                ours, theirs = socket.socketpair()
                wcfg = {"rank": rank, "world_size": n, "cuda_mb": cfg.get("cuda_mb") or 0,
                        "fake_cuda_dir": cfg.get("fake_cuda_dir"), "engine_pid": os.getpid()}
                try:
                    proc = subprocess.Popen(
                        [sys.executable, "-m", "llmuxd.sim.worker", "--fd", str(theirs.fileno()),
                         "--death-fd", str(death_r), "--config", json.dumps(wcfg)],
                        pass_fds=(theirs.fileno(), death_r), env=env)
                finally:
                    theirs.close()
                self.procs.append(proc)
                self.pids.append(proc.pid)
                self.socks.append(ours)
                self.rfiles.append(ours.makefile("rb"))
            os.close(death_r)
            death_r = None
            errors = []
            for rank in range(n):  # each rank loads "its shard" in parallel; collect them all
                try:
                    msg = self._read(rank)
                except WorkerDied:
                    msg = {"ready": False, "error": f"exited with {self.procs[rank].wait()}"}
                if not msg.get("ready"):
                    errors.append(f"Worker_TP{rank}: {msg.get('error')}")
            if errors:
                raise WorkerStartError("; ".join(errors))
            try:
                self.nccl_up()
            except RuntimeError as e:
                raise WorkerStartError(str(e)) from None
        except BaseException:
            if death_r is not None:
                os.close(death_r)
            self.stop()
            raise
        threading.Thread(target=self._monitor, name="worker-monitor", daemon=True).start()

    # plumbing

    def _read(self, rank):
        try:
            line = self.rfiles[rank].readline()
        except OSError:
            line = b""
        if not line:
            raise WorkerDied(f"Worker_TP{rank} (pid {self.pids[rank]}) died")
        return json.loads(line)

    def broadcast(self, op, **kw):
        """Send `op` to every rank, then collect the replies, in rank order."""
        data = json.dumps(dict(kw, op=op)).encode() + b"\n"
        for rank, sock in enumerate(self.socks):
            try:
                sock.sendall(data)
            except OSError:
                raise WorkerDied(f"Worker_TP{rank} (pid {self.pids[rank]}) died") from None
        replies = [self._read(rank) for rank in range(self.n)]
        failed = [f"Worker_TP{rank}: {r.get('error')}" for rank, r in enumerate(replies)
                  if not r.get("ok") and op != "check"]
        if failed:
            raise RuntimeError(f"{op} failed on {'; '.join(failed)}")
        if op != "check":
            for r in replies:
                r.pop("ok", None)
        return replies

    def preflight(self, nccl):
        """None if every rank can do CUDA work (and collectives, with nccl=True),
        else the first refusal as an engine reply (503)."""
        for reply in self.broadcast("check", nccl=nccl):
            if not reply["ok"]:
                return {"ok": False, "status": 503, "error": reply["error"]}
        return None

    def _monitor(self):
        # vLLM's executor watches its workers' sentinels: one dies, the engine dies.
        while True:
            for rank, proc in enumerate(self.procs):
                if proc.poll() is not None:
                    time.sleep(0.3)  # a group-wide SIGTERM reaches us too: let it win
                    if not stopping.is_set():
                        fatal(f"Worker_TP{rank} (pid {proc.pid}) died unexpectedly "
                              f"(exit {proc.returncode}); shutting down the executor", self,
                              self.cuda_file)
                    return
            if stopping.wait(0.1):
                return

    # NCCL generations

    def nccl_up(self):
        self.generation += 1
        self.store = os.path.join(store_dir(), f"llmux-sim-{os.getpid()}-gen{self.generation}")
        self._unlink_store()  # FileStore needs a fresh, empty file per group
        return self.broadcast("nccl_up", path=self.store, generation=self.generation)

    def nccl_down(self):
        replies = self.broadcast("nccl_down")
        self._unlink_store()
        return replies

    def _unlink_store(self):
        if self.store:
            try:
                os.unlink(self.store)
            except FileNotFoundError:
                pass

    def stop(self):
        """SIGTERM every worker, SIGKILL what is left after 4 s, reap them all."""
        stopping.set()
        for proc in self.procs:
            proc.terminate()
        deadline = time.monotonic() + WORKER_STOP_TIMEOUT_S
        for proc in self.procs:
            try:
                proc.wait(max(0.0, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
        for f in self.rfiles + self.socks:
            f.close()
        if self.death_w is not None:
            os.close(self.death_w)
            self.death_w = None
        self._unlink_store()


def fatal(msg, workers, cuda_file):
    """The engine dies as vLLM's does when its executor fails: the API server
    then sees EOF, answers 500, and its watchdog ends it."""
    print(f"ERROR (EngineCore_DP0 pid={os.getpid()}) {msg}", file=sys.stderr, flush=True)
    if workers is not None:
        workers.stop()
    remove_fake_cuda(cuda_file)
    os._exit(1)


def summarise_cuda(infos):
    """The top-level "cuda" of a TP engine: totals over its workers."""
    if not infos or not all(infos):
        return None
    return {"mb": sum(i["mb"] for i in infos), "intact": all(i["intact"] for i in infos),
            "device": infos[0]["device"], "resident": all(i["resident"] for i in infos),
            "ranks": len(infos)}
