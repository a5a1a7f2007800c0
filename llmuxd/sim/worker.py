"""A tensor-parallel worker of llmux-sim, like vLLM's `VLLM::Worker_TP<i>`.

With --tensor-parallel-size N the EngineCore (llmuxd/sim/tp.py) spawns N of
these, one per rank, in its own process group (no setsid).  Rank i:

- holds its shard of the "weights": --cuda-mb MiB on visible GPU i when torch
  with CUDA is there (sim_cuda.GpuWeights), which sleep levels 1 and 2 move
  to host RAM or drop, as the engine does at TP=1;
- is a member of an NCCL process group of all ranks, made from a FileStore
  (`file://` init; no TCPStore socket survives a generation) with NVLink
  multicast off; without torch and CUDA the group is simulated: a flag;
- writes DIR/<its pid> = "running" with a fake CUDA dir, and refuses work while
  a cuda-checkpoint stand-in has rewritten it;
- exits at once when the engine is gone: EOF on its death pipe (whose write end
  only the engine holds) or on its request socket.

It answers one newline-delimited JSON request at a time on a socketpair from
the engine.  The engine sends a request to every rank before it reads a reply,
and asks every rank first whether it can do the work ("check"), so a collective
never starts on some ranks only.  Plain sockets, pipes and threads only (CRIU).

Started as `python -m llmuxd.sim.worker --fd N --death-fd M --config JSON`.
"""

import argparse
import json
import os
import signal
import socket
import sys
import threading
from datetime import timedelta

from llmuxd.sim import cuda as sim_cuda, tp as sim_tp

NCCL_TIMEOUT_S = 120  # a rank that never joins must not hang the others forever


def log(rank, msg, err=False):
    stream = sys.stderr if err else sys.stdout
    stream.write(f"(Worker_TP{rank} pid={os.getpid()}) {msg}\n")  # one write: ranks share the file
    stream.flush()


class StartError(Exception):
    pass


class Worker:
    def __init__(self, cfg, cuda_file):
        self.rank, self.world = cfg["rank"], cfg["world_size"]
        self.cuda_file = cuda_file
        self.nccl = "down"
        self.generation = None
        self.torch = self.dist = self.dev = self.gpu = None
        self.real = False  # a real NCCL group on real GPUs
        if cfg.get("cuda_mb"):
            self.load_gpu(cfg["cuda_mb"])

    def load_gpu(self, mb):
        for key, value in sim_tp.NCCL_ENV.items():  # before torch loads NCCL
            os.environ[key] = value
        try:
            import torch
        except ImportError:
            torch = None
        if torch is None or not torch.cuda.is_available():
            log(self.rank, f"WARNING: --cuda-mb {mb} ignored: torch with CUDA is not available",
                err=True)
            return
        count = torch.cuda.device_count()
        if count < self.world:
            raise StartError(
                f"--tensor-parallel-size {self.world} needs {self.world} GPUs (rank i uses visible "
                f"GPU i), but only {count} visible (CUDA_VISIBLE_DEVICES="
                f"{os.environ.get('CUDA_VISIBLE_DEVICES', '<unset>')})")
        import torch.distributed as dist
        if not (dist.is_available() and dist.is_nccl_available()):
            raise StartError("torch.distributed with NCCL is not available")
        torch.cuda.set_device(self.rank)
        self.torch, self.dist, self.dev, self.real = torch, dist, torch.device("cuda", self.rank), True
        self.gpu = sim_cuda.GpuWeights(torch, mb, self.rank)
        log(self.rank, f"Allocated {mb} MiB on GPU {self.rank} ({self.gpu.device})")

    def handle(self, req):
        op = getattr(self, "op_" + str(req.get("op")), None)
        if op is None:
            return {"ok": False, "error": f"unknown worker op {req.get('op')!r}"}
        reply = op(req) or {}
        reply.setdefault("ok", True)
        return reply

    def _sync(self):
        if self.real:
            self.torch.cuda.synchronize(self.dev)

    def _all_reduce(self, value):
        t = self.torch.full((1,), value, dtype=self.torch.int64, device=self.dev)
        self.dist.all_reduce(t)
        return int(t.item())

    def op_state(self, req):
        return {"rank": self.rank, "pid": os.getpid(), "nccl": self.nccl,
                "cuda": self.gpu.info() if self.gpu else None,
                "fake_cuda": sim_cuda.read_fake_cuda(self.cuda_file)}

    def op_check(self, req):
        cuda = sim_cuda.read_fake_cuda(self.cuda_file)
        if cuda not in (None, "running"):
            return {"ok": False, "error": f"CUDA state is {cuda} (Worker_TP{self.rank})"}
        if req.get("nccl") and self.nccl != "up":
            return {"ok": False, "error": "NCCL group is down"}
        return None

    def op_nccl_up(self, req):
        if self.nccl == "up":
            return {"rank": self.rank, "nccl": "up", "changed": False}
        if self.real:
            kw = dict(backend="nccl", init_method="file://" + req["path"], rank=self.rank,
                      world_size=self.world, timeout=timedelta(seconds=NCCL_TIMEOUT_S))
            try:  # torch >= 2.3: bound to our GPU, communicator built eagerly
                self.dist.init_process_group(**kw, device_id=self.dev)
            except TypeError:
                self.dist.init_process_group(**kw)
            if self._all_reduce(1) != self.world:  # the communicator works
                raise RuntimeError("NCCL warm-up all_reduce gave a wrong sum")
            self._sync()
        self.nccl, self.generation = "up", req.get("generation")
        log(self.rank, f"NCCL group up (generation {self.generation}, "
                       f"{'real' if self.real else 'simulated'}, store {req['path']})")
        return {"rank": self.rank, "nccl": "up", "changed": True}

    def op_nccl_down(self, req):
        if self.nccl == "down":
            return {"rank": self.rank, "nccl": "down", "changed": False}
        if self.real:
            self._sync()
            self.dist.destroy_process_group()  # ncclCommDestroy: IPC buffers unmapped
            self._sync()
            self.torch.cuda.empty_cache()      # and what the caching allocator kept for it
        self.nccl = "down"
        log(self.rank, f"NCCL group down (generation {self.generation})")
        return {"rank": self.rank, "nccl": "down", "changed": True}

    def op_allreduce(self, req):
        contribution = self.rank + 1
        if self.real:
            value = self._all_reduce(contribution)
            return {"real": True, "value": value, "contribution": contribution}
        return {"real": False, "value": None, "contribution": contribution}

    def op_generate(self, req):
        if self.real:  # a forward pass all-reduces; a broken group shows up here
            self._all_reduce(0)
        return None

    def op_sleep(self, req):
        if not self.gpu:
            return {"freed_mb": 0}
        self.gpu.offload() if req.get("level") == 1 else self.gpu.discard()
        return {"freed_mb": self.gpu.mb}

    def op_wake(self, req):
        if self.gpu:
            self.gpu.restore()

    def op_reload(self, req):
        if self.gpu:
            self.gpu.fill()


def main(argv=None):
    ap = argparse.ArgumentParser(prog="llmux-sim-worker")
    ap.add_argument("--fd", type=int, required=True)
    ap.add_argument("--death-fd", type=int, required=True)
    ap.add_argument("--config", required=True)
    args = ap.parse_args(argv)
    cfg = json.loads(args.config)
    rank = cfg["rank"]
    cuda_file = sim_cuda.fake_cuda_path(cfg.get("fake_cuda_dir"))

    def bye(status, why=None):
        # os._exit: no interpreter teardown, which could hang in NCCL's destructors.
        if why:
            log(rank, why)
        sim_cuda.remove_fake_cuda(cuda_file)
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(status)

    signal.signal(signal.SIGTERM, lambda *_: bye(0))
    signal.signal(signal.SIGINT, lambda *_: bye(0))
    sim_cuda.write_fake_cuda(cuda_file)

    def watch_death():  # vLLM's death pipe: EOF means the engine is gone
        while True:
            try:
                if not os.read(args.death_fd, 1):
                    break
            except InterruptedError:
                continue
            except OSError:
                break
        bye(0, "EngineCore is gone; exiting")

    threading.Thread(target=watch_death, name="death-pipe", daemon=True).start()
    sock = socket.socket(fileno=args.fd)
    rfile = sock.makefile("rb")

    def send(obj):
        try:
            sock.sendall(json.dumps(obj).encode() + b"\n")
        except OSError:
            bye(0, "EngineCore is gone; exiting")

    try:
        worker = Worker(cfg, cuda_file)
    except Exception as e:
        msg = str(e) if isinstance(e, StartError) else f"{type(e).__name__}: {e}"
        log(rank, f"ERROR: {msg}", err=True)
        send({"ready": False, "error": msg})
        bye(1)
    send({"ready": True, "rank": rank, "pid": os.getpid()})
    while True:
        try:
            line = rfile.readline()
        except OSError:
            line = b""
        if not line:
            bye(0, "EngineCore is gone; exiting")
        try:
            reply = worker.handle(json.loads(line))
        except Exception as e:
            log(rank, f"ERROR: {type(e).__name__}: {e}", err=True)
            reply = {"ok": False, "error": f"{type(e).__name__}: {e}"}
        send(reply)


if __name__ == "__main__":
    main()
