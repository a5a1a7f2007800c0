"""The EngineCore half of llmux-sim (see llmuxd/sim/server.py for the API server half).

Real vLLM splits `vllm serve` into an API server process and an EngineCore child
that holds the model and, with tensor parallelism 1, the CUDA context.  llmuxd
has to cope with exactly that split: the pid it spawned is not the pid that
holds the GPU, a SIGKILL of the API server leaves the engine running, and sleep
or wake state lives in the engine.  This module is that child.  It holds the
simulated model state and answers one newline-delimited JSON request at a time
on a socketpair inherited from the API server.

It is started as `python -m llmuxd.sim engine --fd N --config JSON`; the
subcommand is internal.  EngineClient and start_engine, at the end, are the API
server's side; metrics_text renders the engine's stats as vLLM's /metrics.

With --tensor-parallel-size N > 1 the engine holds no GPU state itself: like
vLLM's MultiprocExecutor it spawns N Worker_TP<i> processes (llmuxd/sim/worker.py),
one per rank and GPU, in the same process group, and forwards every operation to
all of them (Workers, below).  They form an NCCL group (simulated without
torch), which /collective_rpc suspend_nccl / resume_nccl tear down and rebuild.
Plain sockets, pipes and threads only, so that CRIU can checkpoint and restore it.
"""

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import zlib

# vLLM's EngineCore outlives a killed API server (vllm #55510 and friends); we
# imitate that, but bounded, so a forgotten simulator does not linger forever.
ORPHAN_EXIT_DELAY_S = 30.0

VOCAB = ("the", "model", "says", "hello", "to", "a", "small", "green", "swap",
         "of", "sleepy", "weights", "on", "one", "bright", "GPU")
ALL_TAGS = ("weights", "kv_cache")
ENGINE_STOP_TIMEOUT_S = 5.0  # vLLM joins EngineCore for 5 s, then kill_process_tree


def log(msg):
    print(f"(EngineCore_DP0 pid={os.getpid()}) {msg}", flush=True)


# --- fake CUDA: a file per process that a cuda-checkpoint stand-in rewrites --

def fake_cuda_path(directory):
    return os.path.join(directory, str(os.getpid())) if directory else None


def write_fake_cuda(path, content="running"):
    if path:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        with open(path, "w") as f:
            f.write(content)


def read_fake_cuda(path):
    if not path:
        return None
    try:
        with open(path) as f:
            return f.read().strip()
    except FileNotFoundError:
        return "missing"


def remove_fake_cuda(path):
    if path:
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass


# --- metrics: what vLLM's stats loggers publish about the engine -----------

def metrics_text(model, state, running):
    """Prometheus text for /metrics; `state` is the engine's last snapshot."""
    labels = 'model_name="%s",engine="0"' % model.replace("\\", "\\\\").replace('"', '\\"')
    level = state["level"] if state["sleeping"] else 0
    lines = []

    def metric(name, kind, help_, samples):
        lines.extend([f"# HELP {name} {help_}", f"# TYPE {name} {kind}"])
        lines.extend(f"{name}{lbl} {float(v)}" for lbl, v in samples)

    metric("vllm:num_requests_running", "gauge", "Number of requests in model execution batches.",
           [("{%s}" % labels, running)])
    metric("vllm:num_requests_waiting", "gauge", "Number of requests waiting to be processed.",
           [("{%s}" % labels, 0)])
    metric("vllm:engine_sleep_state", "gauge", "Engine sleep state; awake = 0 means engine is "
           "sleeping; weights_offloaded = 1 means sleep level 1; discard_all = 1 means sleep level 2.",
           [('{%s,sleep_state="%s"}' % (labels, name), on) for name, on in (
               ("awake", not state["sleeping"]), ("weights_offloaded", level == 1),
               ("discard_all", level == 2))])
    metric("llmux_sim_completions_total", "counter", "Completions served by the simulated engine.",
           [("", state["completions"])])
    return "\n".join(lines) + "\n"


# --- real CUDA: N MiB of GPU memory standing in for the weights -------------

class GpuWeights:
    """A uint8 tensor filled with i % 251, so corruption after a CUDA checkpoint,
    an offload or a discard is detectable by recomputing the pattern on the GPU.
    `index` is the visible GPU it lives on (a TP worker's rank; 0 for the engine)."""

    CHUNK = 16 << 20  # elements per pattern chunk: bounds the int64 temporaries

    def __init__(self, torch, mb, index=0):
        self.torch, self.mb, self.n = torch, mb, mb << 20
        self.dev = torch.device("cuda", index)
        self.device = torch.cuda.get_device_name(index)
        self.gpu = torch.empty(self.n, dtype=torch.uint8, device=self.dev)
        self.cpu = None
        self.fill()

    def _pattern(self, a, b):
        t = self.torch
        return (t.arange(a, b, dtype=t.int64, device=self.dev) % 251).to(t.uint8)

    def _chunks(self):
        return ((a, min(a + self.CHUNK, self.n)) for a in range(0, self.n, self.CHUNK))

    def fill(self):
        if self.gpu is not None:
            for a, b in self._chunks():
                self.gpu[a:b].copy_(self._pattern(a, b))
            self.torch.cuda.synchronize(self.dev)

    def intact(self):
        if self.gpu is None:
            return False
        return all(self.torch.equal(self.gpu[a:b], self._pattern(a, b)) for a, b in self._chunks())

    def offload(self):  # level 1: weights to host RAM, GPU memory released
        self.cpu, self.gpu = self.gpu.cpu(), None
        self.torch.cuda.empty_cache()

    def discard(self):  # level 2: weights dropped
        self.cpu = self.gpu = None
        self.torch.cuda.empty_cache()

    def restore(self):  # wake: copy back, or fresh zeros until reload_weights
        if self.cpu is not None:
            self.gpu, self.cpu = self.cpu.to(self.dev), None
        elif self.gpu is None:
            self.gpu = self.torch.zeros(self.n, dtype=self.torch.uint8, device=self.dev)

    def info(self):
        return {"mb": self.mb, "intact": self.intact(), "device": self.device,
                "resident": self.gpu is not None}


def load_gpu(mb):
    try:
        import torch
    except ImportError:
        torch = None
    if torch is None or not torch.cuda.is_available():
        print(f"WARNING: --cuda-mb {mb} ignored: torch with CUDA is not available",
              file=sys.stderr, flush=True)
        return None
    gpu = GpuWeights(torch, mb)
    log(f"Allocated {mb} MiB on {gpu.device}")
    return gpu


# --- tensor parallelism: the engine's side of its Worker_TP<i> children -----

WORKER_STOP_TIMEOUT_S = 4.0  # vLLM's MultiprocExecutor: SIGTERM, 4 s, then SIGKILL
# NVLink multicast must stay off: on shared hosts it can take the GPUs down.
NCCL_ENV = {"NCCL_NVLS_ENABLE": "0", "TORCH_SYMM_MEM_DISABLE_MULTICAST": "1",
            "NVSHMEM_DISABLE_NVLS": "1"}
_stopping = threading.Event()  # set by the engine's SIGTERM/SIGINT handler


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
                    if not _stopping.is_set():
                        fatal(f"Worker_TP{rank} (pid {proc.pid}) died unexpectedly "
                              f"(exit {proc.returncode}); shutting down the executor", self)
                    return
            if _stopping.wait(0.1):
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
        _stopping.set()
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


def fatal(msg, workers=None, cuda_file=None):
    """The engine dies as vLLM's does when its executor fails: the API server
    then sees EOF, answers 500, and its watchdog ends it."""
    print(f"ERROR (EngineCore_DP0 pid={os.getpid()}) {msg}", file=sys.stderr, flush=True)
    if workers is not None:
        workers.stop()
    remove_fake_cuda(cuda_file or fake_cuda_path(_fake_cuda_dir))
    os._exit(1)


_fake_cuda_dir = None  # the engine's, for fatal() from the monitor thread


# --- the engine --------------------------------------------------------------

def make_tokens(prompt, n, weights_ok):
    if not weights_ok:  # what vLLM serves after a level-2 wake without reload_weights
        return ["!"] * n
    return [" " + VOCAB[zlib.crc32(f"{prompt}\0{i}".encode()) % len(VOCAB)] for i in range(n)]


def summarise_cuda(infos):
    """The top-level "cuda" of a TP engine: totals over its workers."""
    if not infos or not all(infos):
        return None
    return {"mb": sum(i["mb"] for i in infos), "intact": all(i["intact"] for i in infos),
            "device": infos[0]["device"], "resident": all(i["resident"] for i in infos),
            "ranks": len(infos)}


class Engine:
    def __init__(self, cfg, cuda_file):
        self.cfg = cfg
        self.cuda_file = cuda_file
        self.completions = 0
        self.sleeping_tags = set()  # like vLLM's executor: asleep until every tag woke
        self.level = 0              # 0 awake, else the level of the current sleep
        self.weights_ok = True
        self.freed_mb = 0
        self.tp = int(cfg.get("tensor_parallel_size") or 1)
        self.gpu = self.workers = None
        if self.tp > 1:  # the executor's workers hold the GPUs; the engine holds none
            log(f"Spawning {self.tp} workers (tensor_parallel_size={self.tp})")
            self.workers = Workers(cfg, self.tp)
        elif cfg.get("cuda_mb"):
            self.gpu = load_gpu(cfg["cuda_mb"])

    def close(self):
        if self.workers:
            self.workers.stop()

    def snapshot(self):
        return {"sleeping": bool(self.sleeping_tags), "level": self.level,
                "weights_ok": self.weights_ok, "completions": self.completions}

    def handle(self, req):
        op = getattr(self, "op_" + str(req.get("op")), None)
        if op is None:
            return {"ok": False, "status": 500, "error": f"unknown engine op {req.get('op')!r}"}
        reply = op(req) or {}
        reply.setdefault("ok", True)
        reply["state"] = self.snapshot()
        return reply

    def op_state(self, req):
        workers = self.workers.broadcast("state") if self.workers else []
        flags = {w["nccl"] for w in workers}
        return {"engine_pid": os.getpid(), "fake_cuda": read_fake_cuda(self.cuda_file),
                "cuda": summarise_cuda([w["cuda"] for w in workers]) if self.workers
                else self.gpu.info() if self.gpu else None,
                "sleep_mode_enabled": self.cfg["enable_sleep_mode"], "freed_mb": self.freed_mb,
                "sleeping_tags": sorted(self.sleeping_tags), "tp": self.tp, "workers": workers,
                "nccl": (flags.pop() if len(flags) == 1 else "mixed") if workers else None,
                "nccl_generation": self.workers.generation if self.workers else None}

    def op_generate(self, req):
        cuda = read_fake_cuda(self.cuda_file)
        if cuda not in (None, "running"):
            return {"ok": False, "status": 503, "error": f"CUDA state is {cuda}"}
        if self.sleeping_tags:
            # Real vLLM may crash with an illegal memory access here; we refuse.
            return {"ok": False, "status": 503, "error": "The model is sleeping"}
        if self.workers:  # every rank takes part in a forward pass (an all-reduce per layer)
            refusal = self.workers.preflight(nccl=True)
            if refusal:
                return refusal
            self.workers.broadcast("generate")
        self.completions += 1
        return {"tokens": make_tokens(req["prompt"], req["max_tokens"], self.weights_ok),
                "completions": self.completions, "engine_pid": os.getpid()}

    def op_allreduce(self, req):
        """/sim/allreduce: each rank contributes rank + 1."""
        expected = self.tp * (self.tp + 1) // 2
        if not self.workers:  # TP=1: no group, the engine is rank 0
            cuda = read_fake_cuda(self.cuda_file)
            if cuda not in (None, "running"):
                return {"ok": False, "status": 503, "error": f"CUDA state is {cuda}"}
            return {"allreduce": {"ok": True, "expected": 1, "values": [1], "real": False}}
        refusal = self.workers.preflight(nccl=True)
        if refusal:
            return refusal
        replies = self.workers.broadcast("allreduce")
        real = all(r["real"] for r in replies)
        if real:
            values = [r["value"] for r in replies]
        else:  # simulated: the sum in Python, over what every rank contributed
            values = [sum(r["contribution"] for r in replies)] * self.tp
        return {"allreduce": {"ok": all(v == expected for v in values), "expected": expected,
                              "values": values, "real": real}}

    def op_sleep(self, req):
        if self.sleeping_tags:
            log("Executor is already sleeping.")
            return None
        t0 = time.monotonic()
        time.sleep(self.cfg["sleep_delay"])
        # vLLM <= 0.16: any level other than 1 acts as level 2 at the worker.
        self.level = 1 if req.get("level") == 1 else 2
        self.freed_mb = 0
        # Without --enable-sleep-mode nothing is tracked by CuMemAllocator, so
        # sleep "succeeds" and frees nothing: the weights stay where they were.
        if self.cfg["enable_sleep_mode"]:
            if self.workers:
                self.freed_mb = sum(r["freed_mb"] for r in self.workers.broadcast("sleep", level=self.level))
            elif self.gpu:
                self.gpu.offload() if self.level == 1 else self.gpu.discard()
                self.freed_mb = self.gpu.mb
        self.sleeping_tags = set(ALL_TAGS)
        log(f"It took {time.monotonic() - t0:.6f} seconds to fall asleep. "
            f"Sleep mode freed {self.freed_mb / 1024:.2f} GiB memory (level {self.level}).")
        return None

    def op_wake_up(self, req):
        tags = req.get("tags") or list(ALL_TAGS)
        if not self.sleeping_tags:
            log("Executor is not sleeping.")
            return None
        for tag in tags:
            if tag not in self.sleeping_tags:
                log(f"Tag {tag} is not in sleeping tags {sorted(self.sleeping_tags)}")
                return None
        time.sleep(self.cfg["wake_delay"])
        if "weights" in tags and self.cfg["enable_sleep_mode"]:
            if self.level == 2:
                self.weights_ok = False  # fresh, uninitialised weights: garbage out
            if self.workers:
                self.workers.broadcast("wake")
            elif self.gpu:
                self.gpu.restore()
        self.sleeping_tags -= set(tags)
        if not self.sleeping_tags:
            self.level = 0
        log(f"Woke up tags {sorted(tags)}; still sleeping: {sorted(self.sleeping_tags)}")
        return None

    def op_collective_rpc(self, req):
        method = req.get("method")
        if self.workers and method in ("suspend_nccl", "resume_nccl"):
            return self.rpc_nccl(method)
        if method != "reload_weights":
            return {"ok": False, "status": 500,
                    "error": f"'Worker' object has no attribute {method!r}"}
        self.weights_ok = True
        if self.workers:
            self.workers.broadcast("reload")
        elif self.gpu:
            self.gpu.fill()
        log("Reloaded weights")
        return {"results": [None] * self.tp}

    def rpc_nccl(self, method):
        """The NCCL suspend/resume of llmux's vLLM patch: tear the communicators
        down before cuda-checkpoint (NCCL's IPC memory cannot be checkpointed),
        build a new group, from a fresh FileStore, after."""
        refusal = self.workers.preflight(nccl=False)
        if refusal:
            return refusal
        states = [w["nccl"] for w in self.workers.broadcast("state")]
        if method == "suspend_nccl":
            results = self.workers.nccl_down()
        elif all(s == "up" for s in states):
            results = [{"rank": r, "nccl": "up", "changed": False} for r in range(self.tp)]
        else:  # every rank must join the same new generation: bring stragglers down first
            if "up" in states:
                self.workers.nccl_down()
            results = self.workers.nccl_up()
        log(f"{method}: NCCL group is {results[0]['nccl']} (generation {self.workers.generation})")
        return {"results": results}

    def op_reset_prefix_cache(self, req):
        return None


def run_engine(fd, cfg):
    """Entry point of the EngineCore process; returns the exit status."""
    global _fake_cuda_dir
    _fake_cuda_dir = cfg.get("fake_cuda_dir")
    cuda_file = fake_cuda_path(cfg.get("fake_cuda_dir"))
    write_fake_cuda(cuda_file)

    def on_signal(signum, frame):  # like vLLM's EngineCore: SystemExit, clean exit 0
        _stopping.set()
        raise SystemExit(0)

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    try:
        return _serve(socket.socket(fileno=fd), cfg, cuda_file)
    finally:
        remove_fake_cuda(cuda_file)  # clean exits only; a SIGKILL leaves it behind


def _serve(sock, cfg, cuda_file):
    rfile = sock.makefile("rb")
    time.sleep(cfg["start_delay"])  # "loading the model"
    if cfg["fail_start"]:
        print("ERROR: EngineCore failed to start: simulated failure (--fail-start)",
              file=sys.stderr, flush=True)
        return 1
    try:
        engine = Engine(cfg, cuda_file)
    except (WorkerStartError, WorkerDied) as e:
        print(f"ERROR: EngineCore failed to start: {e}", file=sys.stderr, flush=True)
        return 1
    try:  # whatever ends us (EOF, SIGTERM's SystemExit), the workers are stopped first
        try:
            sock.sendall(json.dumps({"ready": True, "engine_pid": os.getpid()}).encode() + b"\n")
            log("Engine ready")
            while True:
                line = rfile.readline()
                if not line:
                    break
                try:
                    reply = engine.handle(json.loads(line))
                except WorkerDied as e:
                    fatal(f"{e}; shutting down the executor", engine.workers, cuda_file)
                except Exception as e:  # a bad request must not kill the engine
                    reply = {"ok": False, "status": 500, "error": f"{type(e).__name__}: {e}"}
                sock.sendall(json.dumps(reply).encode() + b"\n")
        except OSError:
            pass  # the API server vanished mid-write: same as EOF
        log(f"Lost the API server; exiting in {ORPHAN_EXIT_DELAY_S:.0f} s")
        time.sleep(ORPHAN_EXIT_DELAY_S)
        return 0
    finally:
        engine.close()


# --- the API server's side of the socketpair ---------------------------------

class EngineDead(Exception):
    pass


class EngineClient:
    """The API server's end of the socketpair: one request/response at a time."""

    def __init__(self, cfg):
        ours, theirs = socket.socketpair()
        env = dict(os.environ)
        # The engine re-imports this package; make that work from any cwd.
        pkg_root = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
        env["PYTHONPATH"] = os.pathsep.join(p for p in (pkg_root, env.get("PYTHONPATH")) if p)
        # No setsid/setpgid: like vLLM, the engine stays in our process group.
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "llmuxd.sim", "engine", "--fd", str(theirs.fileno()),
             "--config", json.dumps(cfg)], pass_fds=(theirs.fileno(),), env=env)
        theirs.close()
        self.sock, self.rfile = ours, ours.makefile("rb")
        self.lock = threading.Lock()
        self.dead = False

    def read_reply(self):
        try:
            line = self.rfile.readline()
        except OSError:
            line = b""
        if not line:
            self.dead = True
            raise EngineDead("EngineCore died")
        return json.loads(line)

    def call(self, op, **kw):
        with self.lock:
            if self.dead:
                raise EngineDead("EngineCore died")
            try:
                self.sock.sendall(json.dumps(dict(kw, op=op)).encode() + b"\n")
            except OSError:
                self.dead = True
                raise EngineDead("EngineCore died")
            return self.read_reply()

    def alive(self):
        return not self.dead and self.proc.poll() is None

    def stop(self):
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(ENGINE_STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_engine(cfg, on_signal):
    """Spawn the EngineCore child, wait until it has "loaded the model", then
    hand SIGTERM and SIGINT to on_signal.

    Until then, as vLLM does, both raise KeyboardInterrupt("terminated"); left
    uncaught, CPython then dies by SIGINT.  The engine is stopped first; a
    signal landing mid-spawn is deferred until there is a child to stop.
    Raises EngineDead if the engine exits instead of becoming ready.
    """
    client, interrupted = None, []

    def interrupt(signum, frame):
        interrupted.append(signum)
        if client is not None:
            raise KeyboardInterrupt("terminated")

    signal.signal(signal.SIGTERM, interrupt)
    signal.signal(signal.SIGINT, interrupt)
    try:
        client = EngineClient(cfg)
        if interrupted:
            raise KeyboardInterrupt("terminated")
        try:
            client.read_reply()  # the engine's "ready"
        except EngineDead:
            raise EngineDead(f"Failed core proc(s): {{'EngineCore_DP0': {client.proc.wait()}}}") from None
        signal.signal(signal.SIGTERM, on_signal)
        signal.signal(signal.SIGINT, on_signal)
        return client
    except KeyboardInterrupt:
        if client is not None:
            client.stop()
        raise
