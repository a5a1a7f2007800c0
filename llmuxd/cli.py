"""`llmuxd`: the entry point. Reads the catalog, runs the daemon, maps outcomes to exit codes.

Exit codes: 0 clean stop · 1 bad catalog, or a model had to be killed or failed
to stop · 4 another llmuxd already answers on the socket.
"""

from __future__ import annotations

import logging
import os
import sys

import click

from . import __version__
from .catalog import CatalogError, load_catalog, validate_only
from .launch import catalog_warnings

DEFAULT_CONFIG = "/etc/llmux/llmux.toml"
EXIT_ALREADY_RUNNING = 4


def setup_logging(level: str) -> None:
    # journald stamps each line itself; elsewhere we do.
    fmt = "%(levelname)s %(name)s: %(message)s" if os.environ.get("JOURNAL_STREAM") else \
        "%(asctime)s %(levelname)s %(name)s: %(message)s"
    logging.basicConfig(level=getattr(logging, level.upper()), format=fmt, stream=sys.stderr)


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--config", "config_path", envvar="LLMUX_CONFIG", default=DEFAULT_CONFIG,
              show_default=True, help="Model catalog (TOML); also $LLMUX_CONFIG.")
@click.option("--check", is_flag=True, help="Validate the catalog and its drop-ins, then exit.")
@click.option("--log-level", default="info", show_default=True,
              type=click.Choice(["debug", "info", "warning", "error"], case_sensitive=False))
@click.version_option(__version__, prog_name="llmuxd")
def main(config_path: str, check: bool, log_level: str) -> None:
    """Supervise vLLM models on one GPU box and swap which one is resident."""
    if check:
        problems = validate_only(config_path)
        for problem in problems:
            click.echo(problem, err=True)
        if not problems:
            for warning in catalog_warnings(load_catalog(config_path)):
                click.echo(warning, err=True)
            click.echo(f"{config_path}: ok")
        sys.exit(1 if problems else 0)
    setup_logging(log_level)
    try:
        catalog = load_catalog(config_path)
    except CatalogError as exc:
        click.echo(str(exc), err=True)
        sys.exit(1)
    for warning in catalog_warnings(catalog):
        logging.getLogger("llmuxd").warning("%s", warning)
    from .control import AlreadyRunning
    from .daemon import Daemon
    from .store import AlreadyLocked
    os.chdir("/")  # never hold a mount busy; paths were resolved by the catalog
    try:
        daemon = Daemon(catalog)
    except ValueError as exc:  # an unknown user or group in the catalog
        click.echo(f"llmuxd: {catalog.path}: {exc}", err=True)
        sys.exit(1)
    try:
        code = daemon.run()
    except (AlreadyRunning, AlreadyLocked) as exc:
        click.echo(f"llmuxd: {exc}; refusing to start a second daemon", err=True)
        sys.exit(EXIT_ALREADY_RUNNING)
    except OSError as exc:
        click.echo(f"llmuxd: {exc}", err=True)
        sys.exit(1)
    # Everything is stopped, written and flushed: skip the interpreter's teardown. It
    # takes tens of ms (a container cannot end before its PID 1 does), and a C
    # extension's thread in it (watchfiles' Rust watcher, NVML) can turn a clean exit
    # into SIGSEGV: seen on Python 3.12 with real vLLM, status 0 logged, -11 returned.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    main()
