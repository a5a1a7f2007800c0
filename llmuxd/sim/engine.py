"""The EngineCore half of llmux-sim (see llmuxd/sim/server.py for the API server half).

Real vLLM splits `vllm serve` into an API server process and an EngineCore child
that holds the model and, with tensor parallelism 1, the CUDA context.  llmuxd
has to cope with exactly that split: the pid it spawned is not the pid that
holds the GPU, a SIGKILL of the API server leaves the engine running, and sleep
or wake state lives in the engine.  This module is that child.  It holds the
simulated model state and answers one newline-delimited JSON request at a time
on a socketpair inherited from the API server.

It is started as `python -m llmuxd.sim engine --fd N --config JSON`; the
subcommand is internal.  The API server's side of the socketpair is client.py.

With --tensor-parallel-size N > 1 the engine holds no GPU state itself: like
vLLM's MultiprocExecutor it spawns N Worker_TP<i> processes, one per rank and
GPU, and forwards every operation to all of them (tp.Workers).  They form an
NCCL group (simulated without torch), which /collective_rpc suspend_nccl /
resume_nccl tear down and rebuild (Engine.rpc_nccl).  At TP=1 the engine holds
the GPU itself (cuda.GpuWeights).  Plain sockets, pipes and threads only, so
that CRIU can checkpoint and restore it.
"""

import json
import os
import signal
import socket
import sys
import time
import zlib

from llmuxd.sim import tp
from llmuxd.sim.cuda import GpuWeights, fake_cuda_path, read_fake_cuda, remove_fake_cuda, write_fake_cuda
from llmuxd.sim.tp import WorkerDied, Workers, WorkerStartError, fatal, summarise_cuda

# vLLM's EngineCore outlives a killed API server (vllm #55510 and friends); we
# imitate that, but bounded, so a forgotten simulator does not linger forever.
ORPHAN_EXIT_DELAY_S = 30.0

VOCAB = ("the", "model", "says", "hello", "to", "a", "small", "green", "swap",
         "of", "sleepy", "weights", "on", "one", "bright", "GPU")
ALL_TAGS = ("weights", "kv_cache")


def log(msg):
    print(f"(EngineCore_DP0 pid={os.getpid()}) {msg}", flush=True)


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


# --- the engine --------------------------------------------------------------

def make_tokens(prompt, n, weights_ok):
    if not weights_ok:  # what vLLM serves after a level-2 wake without reload_weights
        return ["!"] * n
    return [" " + VOCAB[zlib.crc32(f"{prompt}\0{i}".encode()) % len(VOCAB)] for i in range(n)]




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
    cuda_file = fake_cuda_path(cfg.get("fake_cuda_dir"))
    write_fake_cuda(cuda_file)

    def on_signal(signum, frame):  # like vLLM's EngineCore: SystemExit, clean exit 0
        tp.stopping.set()
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
