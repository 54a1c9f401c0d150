"""`metrics` (Prometheus) and `check` (Nagios/Icinga-style): see sendsystem/monitoring.py."""

from __future__ import annotations

import dataclasses
import signal
import threading
from pathlib import Path
from types import FrameType
from typing import Any

import click

from ..config import validate_check
from ..errors import ConfigError, DatabaseUnavailable, SendSystemError
from . import Context, cli, pass_ctx, path_arg


def _host_port(text: str) -> tuple[str, int]:
    host, sep, port = text.rpartition(":")
    if not sep or not port.isdigit():
        raise click.BadParameter("give HOST:PORT, e.g. 127.0.0.1:9469", param_hint="--serve")
    return host.strip("[]") or "0.0.0.0", int(port)


@cli.command()
@click.option("--textfile", type=path_arg(dir_okay=False), metavar="PATH",
              help="Write the metrics to PATH atomically (for node_exporter's textfile "
                   "collector; PATH should end in .prom) instead of printing them.")
@click.option("--serve", metavar="HOST:PORT",
              help="Serve /metrics over HTTP until stopped; every scrape reads the database.")
@pass_ctx
def metrics(ctx: Context, textfile: Path | None, serve: str | None) -> None:
    """Prometheus metrics of the whole cluster, read from the database."""
    from prometheus_client import generate_latest, start_http_server, write_to_textfile

    from ..monitoring import registry

    if textfile is not None and serve is not None:
        raise click.UsageError("use --textfile or --serve, not both")
    # A scrape must answer within Prometheus' scrape timeout: do not wait long for
    # the database (the scrape then says sendsystem_up 0).
    reg = registry(ctx.db(retry_for=2.0), ctx.config)
    if textfile is not None:
        # A temporary file in the same directory, then rename(2): node_exporter
        # never reads half a file.
        write_to_textfile(str(textfile), reg)
        return
    if serve is None:
        click.echo(generate_latest(reg).decode("utf-8"), nl=False)
        return
    host, port = _host_port(serve)
    server, thread = start_http_server(port, addr=host, registry=reg)
    stop = threading.Event()

    def _stop(signum: int, frame: FrameType | None) -> None:
        stop.set()
    signal.signal(signal.SIGTERM, _stop)
    signal.signal(signal.SIGINT, _stop)
    click.echo(f"serving metrics on http://{host}:{server.server_port}/metrics", err=True)
    stop.wait()
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


@cli.command()
@click.option("--stall-minutes", type=float, help="[check] stall_minutes.")
@click.option("--deferred-minutes", type=float, help="[check] deferred_minutes.")
@click.option("--bounce-warn", type=float, help="[check] bounce_warn (percent).")
@click.option("--bounce-crit", type=float, help="[check] bounce_crit (percent).")
@click.option("--complaint-warn", type=float, help="[check] complaint_warn (percent).")
@click.option("--complaint-crit", type=float, help="[check] complaint_crit (percent).")
@click.option("--min-delivered", type=int, help="[check] min_delivered.")
@click.pass_context
def check(click_ctx: click.Context, /, **overrides: float | int | None) -> None:
    """Health check for Nagios/Icinga: one line, exit 0 OK, 1 WARNING, 2 CRITICAL, 3 UNKNOWN."""
    from ..monitoring import critical, evaluate, gather, unknown

    ctx: Context = click_ctx.obj
    try:
        config = ctx.config
        given: dict[str, Any] = {k: v for k, v in overrides.items() if v is not None}
        thresholds = dataclasses.replace(config.check, **given)
        validate_check(thresholds, "check:")
    except ConfigError as exc:
        result = unknown(str(exc))
    else:
        try:
            facts = gather(ctx.db(retry_for=3.0), config.balancer.heartbeat_timeout)
        except DatabaseUnavailable as exc:
            # Not UNKNOWN: the plugin worked; the service it watches cannot run
            # without its database (check_mysql says CRITICAL alike).
            result = critical(f"database unreachable: {exc}")
        except SendSystemError as exc:  # a schema that does not match, ...
            result = unknown(str(exc))
        else:
            result = evaluate(facts, thresholds)
    click.echo(result.line)
    click_ctx.exit(result.status)
