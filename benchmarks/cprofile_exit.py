"""`python3 -m benchmarks.cprofile_exit FILE ARGS...`: llmuxd under cProfile, os._exit included.

`python -m cProfile -o FILE -m llmuxd` writes FILE only when the interpreter exits
normally. llmuxd as PID 1 ends with os._exit() (it skips the interpreter's
teardown), so for that scenario this wrapper runs `llmuxd ARGS...` the way
`python -m llmuxd` does, with a profiler that also dumps FILE just before any
os._exit. Everything else in the suite uses the cProfile command line itself.
"""

import cProfile
import os
import runpy
import sys


def main() -> None:
    out = sys.argv[1]
    sys.argv = ["llmuxd", *sys.argv[2:]]
    prof = cProfile.Profile()
    real_exit = os._exit

    def dump() -> None:
        prof.disable()
        prof.dump_stats(out)

    def exit_after_dump(code: int) -> None:
        dump()
        real_exit(code)

    os._exit = exit_after_dump
    prof.enable()
    try:
        runpy.run_module("llmuxd", run_name="__main__", alter_sys=True)
    finally:
        dump()


if __name__ == "__main__":
    main()
