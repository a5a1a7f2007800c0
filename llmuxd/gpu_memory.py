"""GPU memory sizes: parsing catalog sizes, the GPU's total, and measured use per process tree.

Everything that touches NVML or nvidia-smi lives here so that the rest of llmux
(placement, swap plans) only sees integers of bytes and stays testable on a
machine without a GPU: the readers are plain functions that tests replace.
"""

from __future__ import annotations

import functools
import re
import shutil
import subprocess
from typing import Any, Callable, Iterable

__all__ = ["parse_size", "format_size", "gpu_total", "utilization_of", "nvml_process_memory",
           "tree_memory", "tp_size"]

_UNITS = {"": 1, "b": 1,
          "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
          "kib": 2**10, "mib": 2**20, "gib": 2**30, "tib": 2**40,
          # "80G" is what people type after nvidia-smi's "81559MiB": read binary, as vLLM does
          "k": 2**10, "m": 2**20, "g": 2**30, "t": 2**40}
_SIZE_RE = re.compile(r"\s*(\d+(?:\.\d+)?)\s*([A-Za-z]*)\s*")
SIZE_HELP = 'a number of bytes, or a string like "20GiB", "80GB", "512MiB"'


def parse_size(value: Any, where: str = "") -> int:
    """Bytes (> 0) from an integer or a unit string; ValueError("where: message") otherwise."""
    prefix = f"{where}: " if where else ""
    if isinstance(value, int) and not isinstance(value, bool):
        if value <= 0:
            raise ValueError(f"{prefix}a size must be positive, got {value}")
        return value
    if isinstance(value, str):
        m = _SIZE_RE.fullmatch(value)
        if m and m.group(2).lower() in _UNITS:
            size = int(float(m.group(1)) * _UNITS[m.group(2).lower()])
            if size > 0:
                return size
    raise ValueError(f"{prefix}expected {SIZE_HELP}, got {value!r}")


def format_size(size: int | None) -> str:
    """Human text for status tables: GiB with one decimal, MiB below 1 GiB."""
    if size is None:
        return "-"
    if abs(size) >= 2**30:
        return f"{size / 2**30:.1f}GiB"
    return f"{size / 2**20:.0f}MiB"


def _nvml_total() -> int | None:
    try:
        import pynvml  # nvidia-ml-py
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
        try:
            totals = [int(pynvml.nvmlDeviceGetMemoryInfo(
                pynvml.nvmlDeviceGetHandleByIndex(i)).total)
                for i in range(pynvml.nvmlDeviceGetCount())]
            return min(totals) if totals else None  # one budget per GPU: the smallest's
        finally:
            pynvml.nvmlShutdown()
    except Exception:  # no driver, no device: the same as no GPU
        return None


def _smi_total() -> int | None:
    smi = shutil.which("nvidia-smi")
    if smi is None:
        return None
    try:
        out = subprocess.run([smi, "--query-gpu=memory.total", "--format=csv,noheader,nounits"],
                             capture_output=True, text=True, timeout=10, check=True).stdout
        return int(out.splitlines()[0].strip()) * 2**20  # MiB
    except (OSError, subprocess.SubprocessError, ValueError, IndexError):
        return None


@functools.lru_cache(maxsize=1)
def gpu_total() -> int | None:
    """The total memory of the smallest GPU (NVML; nvidia-smi's first one otherwise) in
    bytes, None when no GPU can be seen. Cached: the
    catalog is loaded on every edit and nvidia-smi takes tens of milliseconds."""
    return _nvml_total() or _smi_total()


def utilization_of(args: Iterable[str]) -> float | None:
    """The model's --gpu-memory-utilization (vLLM's default is 0.9), None when unparsable."""
    args = list(args)
    for i, arg in enumerate(args):
        text = None
        if arg == "--gpu-memory-utilization" and i + 1 < len(args):
            text = args[i + 1]
        elif arg.startswith("--gpu-memory-utilization="):
            text = arg.split("=", 1)[1]
        if text is not None:
            try:
                return float(text)
            except ValueError:
                return None
    return 0.9


def tp_size(args) -> int:
    """--tensor-parallel-size N, -tp N, and their = forms (the last one wins, as argparse)."""
    size = 1
    for i, arg in enumerate(args):
        value = None
        if arg in ("--tensor-parallel-size", "-tp") and i + 1 < len(args):
            value = args[i + 1]
        elif arg.startswith(("--tensor-parallel-size=", "-tp=")):
            value = arg.split("=", 1)[1]
        if value is not None:
            try:
                size = int(value)
            except ValueError:
                pass
    return size


def nvml_device_memory() -> dict[int, dict[int, int]] | None:
    """NVML device index -> pid -> bytes of GPU memory used there; None when NVML is
    unavailable. NVML numbers devices by PCI bus id, which is what a model's `gpus`
    mean (its server gets CUDA_DEVICE_ORDER=PCI_BUS_ID, so CUDA agrees)."""
    try:
        import pynvml
    except ImportError:
        return None
    try:
        pynvml.nvmlInit()
    except Exception:
        return None
    try:
        used: dict[int, dict[int, int]] = {}
        for i in range(pynvml.nvmlDeviceGetCount()):
            handle = pynvml.nvmlDeviceGetHandleByIndex(i)
            here = used.setdefault(i, {})
            for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
                if proc.usedGpuMemory:
                    here[proc.pid] = here.get(proc.pid, 0) + int(proc.usedGpuMemory)
        return used
    except Exception:
        return None
    finally:
        try:
            pynvml.nvmlShutdown()
        except Exception:
            pass


def gpu_count(reader: Callable[[], dict | None] = nvml_device_memory) -> int | None:
    """How many GPUs NVML sees; None without NVML (then nothing can be checked)."""
    devices = reader()
    return None if devices is None else len(devices)


def nvml_process_memory() -> dict[int, int] | None:
    """pid -> bytes of GPU memory used, over every GPU; None when NVML is unavailable."""
    devices = nvml_device_memory()
    if devices is None:
        return None
    used: dict[int, int] = {}
    for per_pid in devices.values():
        for pid, size in per_pid.items():
            used[pid] = used.get(pid, 0) + size
    return used


def tree_memory(pids: Iterable[int],
                reader: Callable[[], dict[int, int] | None] = nvml_process_memory) -> int | None:
    """GPU bytes held by the given process tree (the server and its workers), summed;
    None when the reader cannot tell (no GPU, no NVML)."""
    used = reader()
    if used is None:
        return None
    return sum(used.get(pid, 0) for pid in set(pids))


def tree_memory_by_gpu(pids: Iterable[int],
                       reader: Callable[[], dict[int, dict[int, int]] | None]
                       = nvml_device_memory) -> dict[int, int] | None:
    """GPU index -> bytes the process tree holds there (GPUs it holds nothing on are
    left out); None when the reader cannot tell."""
    devices = reader()
    if devices is None:
        return None
    pids = set(pids)
    held = {gpu: sum(size for pid, size in per_pid.items() if pid in pids)
            for gpu, per_pid in devices.items()}
    return {gpu: size for gpu, size in held.items() if size}


def record_measured(rt, declared: int | None, pids: Iterable[int],
                    reader: Callable[[], dict[int, dict[int, int]] | None]
                    = nvml_device_memory) -> str | None:
    """After `rt` became active: store what its tree really holds in rt.extra, in all
    (`gpu_measured`) and per GPU (`gpu_measured_by_gpu`, keys are GPU indexes as text
    so that status JSON reads the same), and return a warning when it holds more than
    it declared on some GPU (`gpu_memory` is per GPU). Placement counts the measured
    figure (claims.size_of). Nothing is stored when the reader cannot tell (a CPU-only
    machine, or no NVML), so status simply lacks the figures."""
    by_gpu = tree_memory_by_gpu(pids, reader)
    if not by_gpu:
        rt.extra.pop("gpu_measured", None)
        rt.extra.pop("gpu_measured_by_gpu", None)
        return None
    rt.extra["gpu_measured"] = sum(by_gpu.values())
    rt.extra["gpu_measured_by_gpu"] = {str(gpu): size for gpu, size in sorted(by_gpu.items())}
    gpu, most = max(by_gpu.items(), key=lambda item: (item[1], -item[0]))
    if declared is not None and most > declared:
        where = f" on GPU {gpu}" if len(by_gpu) > 1 else ""
        return (f"{rt.name} holds {format_size(most)} of GPU memory{where}, more than its "
                f"gpu_memory ({format_size(declared)}); placement counts {format_size(most)} "
                "from now on: raise gpu_memory or lower --gpu-memory-utilization")
    return None
