"""llmuxd's own Prometheus metrics: what it counts, and the text exposition format 0.0.4.

Gauges (states, sizes, queues) are read from the daemon's records at scrape time:
the loop thread owns them and a scrape is one pass of that loop, so there is
nothing to copy or lock. What cannot be read back later (how long each swap and
each phase took, how jobs ended) is counted here as jobs end.

The format is written by hand: it is a dozen lines of text rules (escaping, one
sample per line, cumulative buckets), and prometheus_client would bring a locked
metric object per series and a process-wide default registry for numbers we
compute from state anyway; its `generate_latest` over a custom collector is the
only part that would fit the loop, and it is what `render` below does.
"""

from __future__ import annotations

import math
import platform

from . import __version__
from . import states as S

CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
# A swap on llmux-sim takes tens of ms, a cold vLLM start minutes: both ends covered.
BUCKETS = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0,
           1800.0, math.inf)
ALL_STATES = tuple(S.TRANSITIONS)


class Histogram:
    """Cumulative buckets, sum and count per label tuple."""

    def __init__(self) -> None:
        self.series: dict[tuple, list] = {}   # labels -> [bucket counts, sum, count]

    def observe(self, labels: tuple, value: float) -> None:
        entry = self.series.setdefault(labels, [[0] * len(BUCKETS), 0.0, 0])
        for i, bound in enumerate(BUCKETS):
            if value <= bound:
                entry[0][i] += 1
        entry[1] += value
        entry[2] += 1


class Stats:
    """What the daemon tells us as it happens (jobs ending, crashes, degraded results)."""

    def __init__(self) -> None:
        self.jobs: dict[tuple[str, str], int] = {}      # (kind, result) -> count
        self.swaps = Histogram()                         # (model, result)
        self.phases = Histogram()                        # (kind, phase)
        self.crashes: dict[str, int] = {}
        self.degraded: dict[str, int] = {}

    def job_done(self, kind: str, model: str | None, ok: bool, elapsed: float,
                 phases: list, warnings: list) -> None:
        result = "failed" if not ok else "degraded" if warnings else "ok"
        self.jobs[(kind, result)] = self.jobs.get((kind, result), 0) + 1
        if kind == "swap" and model is not None:
            self.swaps.observe((model, result), elapsed)
        # A phase lasts until the next one begins; the last one until the job ended.
        for i, (started, phase, _model) in enumerate(phases):
            ended = phases[i + 1][0] if i + 1 < len(phases) else elapsed
            self.phases.observe((kind, phase), max(0.0, ended - started))

    def crash(self, model: str) -> None:
        self.crashes[model] = self.crashes.get(model, 0) + 1

    def degrade(self, model: str) -> None:
        self.degraded[model] = self.degraded.get(model, 0) + 1


# -- the text format -----------------------------------------------------------------
def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def _labels(names: tuple, values: tuple) -> str:
    if not names:
        return ""
    return "{" + ",".join(f'{n}="{_escape(str(v))}"' for n, v in zip(names, values)) + "}"


def _number(value: float) -> str:
    if value == math.inf:
        return "+Inf"
    if isinstance(value, bool):
        return str(int(value))
    if isinstance(value, int) or float(value).is_integer() and abs(value) < 2 ** 53:
        return str(int(value))
    return repr(float(value))


class Text:
    def __init__(self) -> None:
        self.lines: list[str] = []

    def family(self, name: str, kind: str, help_text: str, label_names: tuple = (),
               samples=()) -> None:
        """samples: (label values, value) pairs; a family without samples still says
        what it is, so a dashboard finds the name before the first event."""
        self.lines.append(f"# HELP {name} " + help_text.replace("\\", "\\\\").replace("\n", "\\n"))
        self.lines.append(f"# TYPE {name} {kind}")
        for values, value in samples:
            self.lines.append(f"{name}{_labels(label_names, values)} {_number(value)}")

    def histogram(self, name: str, help_text: str, label_names: tuple, hist: Histogram) -> None:
        self.family(name, "histogram", help_text)
        for values, (buckets, total, count) in sorted(hist.series.items()):
            for bound, n in zip(BUCKETS, buckets):
                le = "+Inf" if bound == math.inf else repr(bound)
                self.lines.append(f"{name}_bucket{_labels(label_names + ('le',), values + (le,))}"
                                  f" {n}")
            self.lines.append(f"{name}_sum{_labels(label_names, values)} {_number(total)}")
            self.lines.append(f"{name}_count{_labels(label_names, values)} {count}")

    def body(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


def render(d) -> bytes:
    """The whole exposition, from the daemon's records and its Stats."""
    t, stats = Text(), d.stats
    names = list(d.runtimes)
    t.family("llmuxd_build_info", "gauge", "llmuxd's version and Python (always 1)",
             ("version", "python"), [((__version__, platform.python_version()), 1)])
    t.family("llmuxd_start_time_seconds", "gauge", "when llmuxd started (Unix time)", (),
             [((), round(d.started_wall, 3))])
    t.family("llmuxd_model_state", "gauge", "1 for the state each model is in, 0 for the others",
             ("model", "state"), [((n, s), int(d.runtimes[n].state == s))
                                  for n in names for s in ALL_STATES])
    t.family("llmuxd_model_state_since_seconds", "gauge",
             "when each model entered its current state (Unix time)", ("model",),
             [((n,), round(d.runtimes[n].since, 3)) for n in names])
    t.family("llmuxd_model_sleep_level", "gauge", "the configured sleep level of each model",
             ("model",), [((n,), d.spec_in_use(n).sleep_level) for n in names])
    t.family("llmuxd_resident_models", "gauge", "models active (resident on the GPU) now", (),
             [((), len(d.resident()))])
    gpu = []
    for n in names:
        measured = d.runtimes[n].extra.get("gpu_measured")
        declared = d.spec_in_use(n).gpu_memory
        if measured:
            gpu.append(((n, "measured"), measured))
        elif declared:
            gpu.append(((n, "declared"), declared))
    t.family("llmuxd_model_gpu_memory_bytes", "gauge",
             "GPU memory per model: measured by NVML while active, else its declared gpu_memory",
             ("model", "source"), gpu)
    budget = d.catalog.daemon.gpu_memory
    t.family("llmuxd_gpu_budget_bytes", "gauge", "the GPU memory budget (daemon.gpu_memory)", (),
             [((), budget)] if budget is not None else [])
    t.family("llmuxd_model_restarts_total", "counter",
             "restarts by supervision (a crash or failed health checks) since llmuxd started",
             ("model",), [((n,), d.runtimes[n].restarts_total) for n in names])
    t.family("llmuxd_model_crashes_total", "counter",
             "unexpected exits and unhealthy verdicts of a running model", ("model",),
             [((n,), stats.crashes.get(n, 0)) for n in names])
    t.family("llmuxd_model_degraded_total", "counter",
             "degraded results: a sleep that became a stop, a restore that became a cold start",
             ("model",), [((n,), stats.degraded.get(n, 0)) for n in names])
    t.family("llmuxd_model_error", "gauge", "1 while the model has a last_error (status shows it)",
             ("model",), [((n,), int(bool(d.runtimes[n].last_error))) for n in names])
    t.family("llmuxd_jobs_total", "counter",
             "jobs ended, by kind (swap, sleep, stop, restart, recover, ...) and result "
             "(ok, degraded, failed)", ("kind", "result"), sorted(stats.jobs.items()))
    running: dict[str, int] = {}
    for job in d.jobs:  # jobs on disjoint GPUs run at once: count them all
        running[job.kind] = running.get(job.kind, 0) + 1
    t.family("llmuxd_job_running", "gauge", "jobs running now, by kind", ("kind",),
             [((k,), n) for k, n in sorted(running.items())])
    t.histogram("llmuxd_swap_duration_seconds", "swaps, by target model and result",
                ("model", "result"), stats.swaps)
    t.histogram("llmuxd_phase_duration_seconds",
                "phases of every job (drain, sleep, start, ...), as the swap replies list them",
                ("kind", "phase"), stats.phases)
    if d.front is not None:
        queued = d.front.demand.queued()
        t.family("llmuxd_front_queue_depth", "gauge", "front requests waiting for their model",
                 ("model",), [((n,), queued.get(n, 0)) for n in names])
        t.family("llmuxd_front_in_flight", "gauge", "front requests being answered by the model",
                 ("model",), [((n,), d.front.in_flight(n)) for n in names])
        t.family("llmuxd_front_requests_total", "counter", "HTTP requests the front received", (),
                 [((), d.front.requests)])
    t.family("llmuxd_catalog_error", "gauge", "1 while the last catalog edit is invalid", (),
             [((), int(bool(d.config_error)))])
    t.family("llmuxd_state_file_error", "gauge", "1 while the state file cannot be written", (),
             [((), int(bool(d.state_error)))])
    return t.body()
