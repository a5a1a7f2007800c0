"""What a simulated vLLM process holds of CUDA, shared by all three of llmux-sim's
processes (API server, EngineCore, TP workers).

Two kinds of state, apart from the processes that hold them because each of the
three creates, checks and removes its own:
- fake CUDA: DIR/<pid> = "running", a file a cuda-checkpoint stand-in rewrites
  ("checkpointed", ...), so that without a GPU a process still refuses work while
  its CUDA state is not there;
- real CUDA: GpuWeights, N MiB of GPU memory standing in for the weights, with a
  pattern that tells whether a checkpoint, an offload or a discard kept them.
"""

import os


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

