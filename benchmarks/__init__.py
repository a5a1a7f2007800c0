"""llmux benchmark suite: `python3 -m benchmarks [--quick] [--only NAME]`.

Every row compares two things measured side by side in the same run (A and B
alternate, round after round, so machine noise hits both alike) and reports the
median with its spread. The rows, one module each:

  swap      swap_overhead.py   level 1/2 swap round trip vs the same raw HTTP calls;
                               cold-start readiness detection; llmuxctl CLI wall time
  criu      criu_overhead.py   level 4 round trip vs criu dump + restore by hand
  reaping   reaping.py         llmuxd vs tini as PID 1: orphan burst, SIGTERM to exit
  idle      idle.py            CPU, RSS and wakeups of an idle daemon with 3 models
  control   control_plane.py   status latency, 500 clients during a swap vs 1 client
  reload    reload.py          catalog edit to applied vs a bare watchfiles watcher
  scale     scale.py           200-model catalog vs 3 models: start, status, reload
  timeline  timeline.py        phases of a level-2 and a level-4 swap -> timeline.png

harness.py holds the shared machinery (a real llmuxd against llmux-sim in a
temporary directory, statistics, /proc readers); report.py the table, goals,
results.json and the README section; profiling.py the cProfile runs made for
any goal that is missed.
"""
