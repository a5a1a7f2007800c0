"""`llmuxctl`: steer llmuxd from the command line.

Exit codes (the contract): 0 success · 1 refused or failed (one-line reason on
stderr) · 2 usage error · 3 the daemon cannot be reached.
"""

from __future__ import annotations

import json
import shutil
import sys

import click

from llmuxd.protocol import DEFAULT_SOCKET

from . import render
from .client import Unreachable, request

EXIT_FAILED, EXIT_UNREACHABLE = 1, 3


def call(ctx: click.Context, obj: dict, timeout: float | None = 30.0, on_event=None) -> dict:
    path = ctx.obj["socket"]
    try:
        for reply in request(path, obj, timeout=timeout):
            if "ok" in reply:
                if not reply["ok"]:
                    click.echo(f"llmuxctl: {reply.get('error', 'failed')}", err=True)
                    ctx.exit(EXIT_FAILED)
                if reply.get("warning"):
                    click.echo(f"llmuxctl: warning: {reply['warning']}", err=True)
                return reply
            if reply.get("event") == "warning":  # a degraded result: never silent
                click.echo(f"llmuxctl: warning: {reply.get('text')}", err=True)
            elif on_event is not None:
                on_event(reply)
    except KeyboardInterrupt:
        if obj.get("cmd") not in ("swap", "sleep", "stop", "restart"):
            raise
        # The daemon does not cancel a job when its client goes: say so, not "Aborted!".
        what = f"{obj['cmd']} {obj.get('model') or ''}".strip()
        logs = f" or `llmuxctl logs {obj['model']} -f`" if obj.get("model") else ""
        click.echo(f"\nllmuxctl: interrupted; the {what} goes on in llmuxd (follow it with "
                   f"`llmuxctl status`{logs})", err=True)
        ctx.exit(130)
    except Unreachable as exc:
        click.echo(f"llmuxctl: {exc}\n(is llmuxd running? pass --socket PATH or set LLMUX_SOCKET)",
                   err=True)
        ctx.exit(EXIT_UNREACHABLE)
    raise AssertionError("unreachable")


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.option("--socket", "socket_path", envvar="LLMUX_SOCKET", default=DEFAULT_SOCKET,
              show_default=True, help="llmuxd's control socket; also $LLMUX_SOCKET.")
@click.pass_context
def main(ctx: click.Context, socket_path: str) -> None:
    """Control llmuxd: which vLLM model holds the GPU."""
    ctx.ensure_object(dict)
    ctx.obj["socket"] = socket_path


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def status(ctx: click.Context, as_json: bool) -> None:
    """Show every model's state."""
    reply = call(ctx, {"cmd": "status"})
    reply.pop("ok", None)
    if as_json:
        click.echo(json.dumps(reply, indent=2))
    else:
        width = shutil.get_terminal_size((80, 24)).columns  # $COLUMNS, the tty, else 80
        click.echo(render.status_table(reply, colour=sys.stdout.isatty(), width=width))


@main.command()
@click.argument("model")
@click.option("--force", is_flag=True, help="Sleep the active model even if requests are in flight.")
@click.option("--quiet", "-q", is_flag=True, help="No progress lines.")
@click.pass_context
def swap(ctx: click.Context, model: str, force: bool, quiet: bool) -> None:
    """Make MODEL the active model; returns when it is active or the swap failed."""
    last: dict = {}

    def show(event: dict) -> None:
        if quiet or event.get("event") not in ("progress", "waiting"):
            return
        if event["event"] == "waiting":
            click.echo(render.progress(event))
            return
        click.echo(render.progress(event, last.get("phase")))
        last["phase"] = event
    reply = call(ctx, {"cmd": "swap", "model": model, "force": force}, timeout=None, on_event=show)
    click.echo(f"{reply.get('message', model + ' is active')} ({reply.get('elapsed', 0):.2f}s)")


@main.command()
@click.argument("model")
@click.option("--level", type=click.IntRange(1, 5), help="Sleep level (default: the model's own).")
@click.option("--force", is_flag=True, help="Even if requests are in flight.")
@click.pass_context
def sleep(ctx: click.Context, model: str, level: int | None, force: bool) -> None:
    """Put MODEL to sleep."""
    reply = call(ctx, {"cmd": "sleep", "model": model, "level": level, "force": force}, timeout=None)
    click.echo(reply.get("message", "done"))


@main.command()
@click.argument("model")
@click.pass_context
def stop(ctx: click.Context, model: str) -> None:
    """Stop MODEL (its whole process group)."""
    reply = call(ctx, {"cmd": "stop", "model": model}, timeout=None)
    click.echo(reply.get("message", "done"))


@main.command()
@click.argument("model", required=False)
@click.option("--force", is_flag=True, help="Even if requests are in flight.")
@click.pass_context
def restart(ctx: click.Context, model: str | None, force: bool) -> None:
    """Restart MODEL (default: the active one) so a changed definition applies."""
    reply = call(ctx, {"cmd": "restart", "model": model, "force": force}, timeout=None)
    click.echo(reply.get("message", "done"))


@main.command()
@click.pass_context
def reload(ctx: click.Context) -> None:
    """Re-read the catalog now."""
    reply = call(ctx, {"cmd": "reload"})
    click.echo(reply.get("message", "reloaded"))


@main.command()
@click.pass_context
def shutdown(ctx: click.Context) -> None:
    """Stop llmuxd, as SIGTERM would (its `shutdown` setting says what happens to models)."""
    reply = call(ctx, {"cmd": "shutdown"})
    click.echo(reply.get("message", "shutting down"))


@main.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.pass_context
def doctor(ctx: click.Context, as_json: bool) -> None:
    """What this host supports for levels 3 and 4 (CUDA suspend, CRIU), and why not."""
    facts = call(ctx, {"cmd": "doctor"}, timeout=120).get("doctor", {})
    click.echo(json.dumps(facts, indent=2) if as_json else render.doctor(facts))


@main.command()
@click.argument("model")
@click.option("-f", "--follow", is_flag=True, help="Keep printing new lines.")
@click.option("-n", "--lines", default=50, show_default=True, type=click.IntRange(0, 10000))
@click.pass_context
def logs(ctx: click.Context, model: str, follow: bool, lines: int) -> None:
    """Print MODEL's log."""
    def show(event: dict) -> None:
        click.echo(event.get("text", ""), nl=False)
    try:
        reply = call(ctx, {"cmd": "logs", "model": model, "lines": lines, "follow": follow},
                     timeout=None if follow else 30.0, on_event=show)
    except KeyboardInterrupt:
        return
    click.echo(reply.get("text", ""), nl=False)


if __name__ == "__main__":
    main()
