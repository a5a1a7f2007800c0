"""Catalog sizes: [daemon] gpu_memory, per-model gpu_memory, --check refusals and warnings."""
from __future__ import annotations

import textwrap

import pytest

from llmuxd import gpu_memory
from llmuxd.catalog import load_catalog, validate_only
from llmuxd.launch import size_warnings

BASE = """\
[daemon]
socket = "run/llmux.sock"
state_dir = "state"
{daemon}
[models.a]
model = "m/a"
port = 8001
{a}
[models.b]
model = "m/b"
port = 8002
"""


def catalog(tmp_path, daemon="", a=""):
    path = tmp_path / "llmux.toml"
    path.write_text(BASE.format(daemon=daemon, a=a))
    return str(path)


@pytest.mark.parametrize("value,size", [
    (1024, 1024), ("20GiB", 20 * 2**30), ("20GB", 20 * 10**9), ("512MiB", 512 * 2**20),
    ("80G", 80 * 2**30), ("1.5GiB", int(1.5 * 2**30)), (" 7 gib ", 7 * 2**30)])
def test_parse_size_good(value, size):
    assert gpu_memory.parse_size(value) == size


@pytest.mark.parametrize("value", [0, -1, True, "", "GiB", "20 parsecs", 1.5, "-2GiB", [1]])
def test_parse_size_bad(value):
    with pytest.raises(ValueError, match="x: "):
        gpu_memory.parse_size(value, "x")


def test_sizes_load(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_memory, "gpu_total", lambda: None)
    cat = load_catalog(catalog(tmp_path, 'gpu_memory = "80GiB"', 'gpu_memory = "20GiB"'))
    assert cat.daemon.gpu_memory == 80 * 2**30 and cat.daemon.gpu_memory_declared
    assert cat.models["a"].gpu_memory == 20 * 2**30
    assert cat.models["b"].gpu_memory is None  # absent: exclusive


def test_budget_defaults_to_gpu_total(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_memory, "gpu_total", lambda: 141 * 10**9)
    cat = load_catalog(catalog(tmp_path))
    assert cat.daemon.gpu_memory == 141 * 10**9 and not cat.daemon.gpu_memory_declared
    monkeypatch.setattr(gpu_memory, "gpu_total", lambda: None)
    assert load_catalog(catalog(tmp_path)).daemon.gpu_memory is None


def test_bad_sizes_have_file_and_line(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_memory, "gpu_total", lambda: None)
    path = catalog(tmp_path, 'gpu_memory = "lots"', 'gpu_memory = -3')
    problems = validate_only(path)
    assert problems == [
        f"{path}:4: daemon.gpu_memory: expected {gpu_memory.SIZE_HELP}, got 'lots'",
        f"{path}:8: models.a.gpu_memory: a size must be positive, got -3"]


def test_check_refuses_model_larger_than_budget(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_memory, "gpu_total", lambda: None)
    path = catalog(tmp_path, 'gpu_memory = "40GiB"', 'gpu_memory = "41GiB"')
    assert validate_only(path) == [
        f"{path}:8: models.a.gpu_memory: 41.0GiB is larger than the budget "
        "(daemon.gpu_memory: 40.0GiB)"]
    monkeypatch.setattr(gpu_memory, "gpu_total", lambda: 24 * 2**30)
    path = catalog(tmp_path, "", 'gpu_memory = "30GiB"')
    assert "the GPU's total memory: 24.0GiB" in validate_only(path)[0]


def test_no_budget_known_means_no_refusal(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_memory, "gpu_total", lambda: None)
    assert validate_only(catalog(tmp_path, "", 'gpu_memory = "900GiB"')) == []


def test_utilization_warning(tmp_path, monkeypatch):
    monkeypatch.setattr(gpu_memory, "gpu_total", lambda: None)
    total = 100 * 2**30
    agree = load_catalog(catalog(tmp_path, "", 'gpu_memory = "30GiB"\n'
                                 'args = ["--gpu-memory-utilization", "0.3"]'))
    assert size_warnings(agree, total) == []
    default = load_catalog(catalog(tmp_path, "", 'gpu_memory = "30GiB"'))  # vLLM's 0.9
    [warning] = size_warnings(default, total)
    assert "models.a: --gpu-memory-utilization 0.9" in warning and "0.30" in warning
    eq = load_catalog(catalog(tmp_path, "", 'gpu_memory = "50GiB"\n'
                              'args = ["--gpu-memory-utilization=0.3"]'))
    assert len(size_warnings(eq, total)) == 1
    assert size_warnings(default, None) == []  # GPU total unknown: nothing to compare


def test_tree_memory_sums_the_tree():
    reader = lambda: {10: 5, 11: 7, 99: 1000}
    assert gpu_memory.tree_memory([10, 11, 12], reader) == 12
    assert gpu_memory.tree_memory([10], lambda: None) is None


def test_record_measured_stores_and_warns_when_over():
    from llmuxd.states import Runtime
    rt = Runtime("a")
    reader = lambda: {0: {10: 12 * 2**30, 11: 10 * 2**30}}  # NVML: device -> pid -> bytes
    warning = gpu_memory.record_measured(rt, 20 * 2**30, [10, 11], reader)
    assert rt.extra["gpu_measured"] == 22 * 2**30
    assert "a holds 22.0GiB" in warning and "more than its gpu_memory (20.0GiB)" in warning
    assert gpu_memory.record_measured(rt, 30 * 2**30, [10, 11], reader) is None
    # a CPU-only machine: no figure at all, and an old one is not kept
    assert gpu_memory.record_measured(rt, 30 * 2**30, [10], lambda: None) is None
    assert "gpu_measured" not in rt.extra


def test_record_measured_per_gpu_of_a_tp_model():
    """Two ranks on GPUs 2 and 3 (and a stranger on 3): per GPU, the declared size is per GPU."""
    from llmuxd.states import Runtime
    rt = Runtime("tp")
    reader = lambda: {0: {}, 1: {99: 5 * 2**30}, 2: {20: 18 * 2**30}, 3: {21: 21 * 2**30, 99: 1}}
    warning = gpu_memory.record_measured(rt, 20 * 2**30, [19, 20, 21], reader)
    assert rt.extra["gpu_measured"] == 39 * 2**30
    assert rt.extra["gpu_measured_by_gpu"] == {"2": 18 * 2**30, "3": 21 * 2**30}
    assert "holds 21.0GiB of GPU memory on GPU 3, more than its gpu_memory (20.0GiB)" in warning
    assert gpu_memory.record_measured(rt, 22 * 2**30, [20, 21], reader) is None  # fits per GPU


def test_gpu_count_and_the_summed_reader_from_one_fake_nvml(monkeypatch):
    import sys
    import types
    procs = {0: [(10, 3), (11, 4)], 1: [(10, 5)]}
    fake = types.SimpleNamespace(
        nvmlInit=lambda: None, nvmlShutdown=lambda: None,
        nvmlDeviceGetCount=lambda: 2, nvmlDeviceGetHandleByIndex=lambda i: i,
        nvmlDeviceGetMemoryInfo=lambda h: types.SimpleNamespace(total=[80, 40][h]),
        nvmlDeviceGetComputeRunningProcesses=lambda h: [
            types.SimpleNamespace(pid=p, usedGpuMemory=m) for p, m in procs[h]])
    monkeypatch.setitem(sys.modules, "pynvml", fake)
    assert gpu_memory.nvml_device_memory() == {0: {10: 3, 11: 4}, 1: {10: 5}}
    assert gpu_memory.nvml_process_memory() == {10: 8, 11: 4}
    assert gpu_memory.gpu_count() == 2
    assert gpu_memory._nvml_total() == 40  # the budget per GPU: the smallest card's
    monkeypatch.setitem(sys.modules, "pynvml", None)  # no nvidia-ml-py: nothing known
    assert gpu_memory.nvml_device_memory() is None and gpu_memory.gpu_count() is None
