"""`python3 -m benchmarks.nowatch ARGS...`: llmuxd with its catalog watcher disabled.

Diagnosis only (the `reaping` row's explanation): runs `llmuxd ARGS...` as
`python -m llmuxd` does, but with CatalogWatcher.start replaced by a no-op, so
that the cost of the watcher thread and its inotify instance can be told apart.
"""

import runpy
import sys

import llmuxd.watch


def main() -> None:
    llmuxd.watch.CatalogWatcher.start = lambda self: None
    sys.argv = ["llmuxd", *sys.argv[1:]]
    runpy.run_module("llmuxd", run_name="__main__", alter_sys=True)


if __name__ == "__main__":
    main()
