"""The llmux-sim process: its command line, what it holds as a real vLLM does (an
io_uring instance, a loky semaphore: host.py), its EngineCore child (client.py), and
the API server's life from bind to shutdown.

Apart from server.py, which is the HTTP surface alone (vLLM's routes and the
simulator's /sim/* knobs): this is the part a supervisor sees from outside, the
process tree, its signals and exit statuses.
"""

import argparse
import json
import os
import sys
import threading
import time

from llmuxd.sim import client as sim_client, cuda as sim_cuda, host as sim_host
from llmuxd.sim import engine as sim_engine  # only for the internal `engine` subcommand
from llmuxd.sim.server import SIM_VERSION, SimServer, crash, log


def parse_args(argv):
    top = argparse.ArgumentParser(prog="llmux-sim", allow_abbrev=False,
                                  description="A vLLM stand-in for testing llmux.")
    sub = top.add_subparsers(dest="cmd", required=True, metavar="serve")
    s = sub.add_parser("serve", allow_abbrev=False, help="like `vllm serve`",
                       description="Like `vllm serve`; other vLLM flags are accepted and ignored.")
    s.add_argument("model_tag", nargs="?")
    s.add_argument("--model")
    s.add_argument("--host", default="0.0.0.0")  # vLLM's default: every interface
    s.add_argument("--port", type=int, default=8000)
    s.add_argument("--served-model-name", nargs="+")
    s.add_argument("--max-model-len", type=int, default=2048)
    for flag in ("--enable-sleep-mode", "--disable-uvicorn-access-log",  # vLLM's
                 "--fail-start", "--fail-sleep", "--fail-wake"):         # simulator's
        s.add_argument(flag, action="store_true")
    for flag in ("--start-delay", "--sleep-delay", "--wake-delay", "--token-delay"):
        s.add_argument(flag, type=float, default=0.0, metavar="SECONDS")
    s.add_argument("--crash-after", type=float, metavar="SECONDS")
    s.add_argument("--fake-cuda-dir", default=os.environ.get("LLMUX_SIM_FAKE_CUDA_DIR") or None)
    s.add_argument("--cuda-mb", type=int, default=0)
    s.add_argument("--tensor-parallel-size", "-tp", type=int, default=1, metavar="N")
    # A real vLLM holds both (host.py); these leave them out.
    s.add_argument("--no-io-uring", action="store_true", help="open no io_uring instance")
    s.add_argument("--no-loky-semaphore", action="store_true",
                   help="create no named semaphore in /dev/shm")
    # Internal (the EngineCore child). No help= at all: argparse lists every subcommand
    # given one, and help=SUPPRESS prints "==SUPPRESS==" there.
    e = sub.add_parser("engine")
    e.add_argument("--fd", type=int, required=True)
    e.add_argument("--config", required=True)
    args, unknown = top.parse_known_args(argv)
    if args.cmd == "serve" and not (args.model or args.model_tag):
        s.error("a MODEL is required")
    if args.cmd == "serve" and args.tensor_parallel_size < 1:
        s.error("--tensor-parallel-size must be at least 1")
    return args, unknown


def serve(args):
    server = SimServer(args)
    ring = None if args.no_io_uring else sim_host.open_io_uring(log)  # noqa: F841 (held open)
    semaphore = None if args.no_loky_semaphore else sim_host.LokySemaphore(log)
    try:
        return _serve(server, args)
    finally:
        if semaphore is not None:
            semaphore.close()


def _serve(server, args):
    cuda_file = sim_cuda.fake_cuda_path(args.fake_cuda_dir)
    sim_cuda.write_fake_cuda(cuda_file)
    log(f"vLLM API server version {SIM_VERSION} (simulated), model {server.model}")
    if server.dev_mode:
        log("SECURITY WARNING: Development endpoints are enabled! This should NOT be used in production!")
    try:
        server.server_bind()  # bound now, listening only once the engine is ready
    except OSError as e:
        print(f"ERROR: cannot bind {args.host}:{args.port}: {e}", file=sys.stderr, flush=True)
        sim_cuda.remove_fake_cuda(cuda_file)
        return 1

    cfg = {key: getattr(args, key) for key in (
        "start_delay", "sleep_delay", "wake_delay", "fail_start", "enable_sleep_mode",
        "fake_cuda_dir", "cuda_mb", "tensor_parallel_size")}
    stop = threading.Event()
    try:
        server.engine = sim_client.start_engine(cfg, lambda *_: stop.set())
    except sim_client.EngineDead as e:
        print(f"RuntimeError: Engine core initialization failed. See root cause above. {e}",
              file=sys.stderr, flush=True)
        sim_cuda.remove_fake_cuda(cuda_file)
        return 1
    except KeyboardInterrupt:
        sim_cuda.remove_fake_cuda(cuda_file)
        raise  # CPython then kills itself with SIGINT, as vLLM does

    server.server_activate()
    threading.Thread(target=server.serve_forever, name="http", daemon=True).start()
    log(f"Starting vLLM API server 0 on http://{args.host}:{server.server_port}")
    if args.crash_after is not None:
        threading.Timer(args.crash_after, crash, ("--crash-after",)).start()

    # vLLM's watchdog: once the engine is dead, the API server exits within
    # VLLM_WATCHDOG_TIME_S (5 s) unless VLLM_KEEP_ALIVE_ON_ENGINE_DEATH=1.
    keep_alive = bool(int(os.environ.get("VLLM_KEEP_ALIVE_ON_ENGINE_DEATH", "0")))
    watchdog_s = float(os.environ.get("LLMUX_SIM_WATCHDOG_S", "5"))
    dead_since, status = None, 0
    while not stop.wait(0.1):
        if dead_since is None and not server.engine.alive():
            dead_since = time.monotonic()
            log("EngineCore died; /health now answers 503")
        if dead_since is not None and not keep_alive and time.monotonic() - dead_since >= watchdog_s:
            log("Engine is dead; shutting down the API server")
            status = 1
            break
    log("Shutting down")
    server.shutdown()
    server.server_close()
    server.engine.stop()
    sim_cuda.remove_fake_cuda(cuda_file)
    log("Application shutdown complete.")
    return status


def main(argv=None):
    args, unknown = parse_args(sys.argv[1:] if argv is None else argv)
    if args.cmd == "engine":
        sys.exit(sim_engine.run_engine(args.fd, json.loads(args.config)))
    if unknown:
        log(f"ignoring vLLM arguments: {' '.join(unknown)}")
    sys.exit(serve(args))


if __name__ == "__main__":
    main()
