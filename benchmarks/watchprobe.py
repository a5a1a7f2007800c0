"""`python3 -m benchmarks.watchprobe CATALOG`: a bare watchfiles watcher, llmuxd's settings.

The baseline of the `reload` row: it watches the catalog's directory exactly as
llmuxd/watch.py does (not recursive, only the catalog file, the same debounce and
step), and prints time.monotonic() (CLOCK_MONOTONIC, comparable across
processes) on stdout each time watchfiles reports a change. "ready" comes first.
"""

import os
import sys
import time

import watchfiles

from llmuxd.watch import DEBOUNCE_MS, STEP_MS


def main() -> None:
    path = os.path.abspath(sys.argv[1])
    print("ready", flush=True)
    for _ in watchfiles.watch(os.path.dirname(path), watch_filter=lambda c, p: os.path.abspath(p) == path,
                              debounce=DEBOUNCE_MS, step=STEP_MS, recursive=False,
                              raise_interrupt=False):
        print(f"{time.monotonic():.6f}", flush=True)


if __name__ == "__main__":
    main()
