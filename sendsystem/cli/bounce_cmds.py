"""Bounce intake and the unsubscribe service on the command line.

``bounce receive`` is written for an MTA pipe: exit 0 when the message was
recorded or understood as not a bounce, 75 (EX_TEMPFAIL) for anything that
may work later (database down, but also a broken config or an unexpected
error: the MTA keeps the message and retries, an admin sees the log), and 1
only for input that can never be processed (empty, or over the size limit).
"""

from __future__ import annotations

import logging
import sys
from pathlib import Path

import click

from ..bounce import intake
from ..bounce.maildir import deliver_to_maildir, scan_maildir
from ..errors import SendSystemError, TemporaryError, UserError
from ..unsubscribe.app import serve
from ..unsubscribe.service import unsubscribe_wsgi_app
from . import Context, cli, pass_ctx, path_arg

log = logging.getLogger(__name__)


@cli.group()
def bounce() -> None:
    """Bounces, complaints, auto-replies and mailto unsubscribes."""


@bounce.command("receive")
@click.option("--recipient", envvar="ORIGINAL_RECIPIENT", metavar="ADDR",
              help="Envelope recipient (Postfix pipe: ${original_recipient}); "
                   "default $ORIGINAL_RECIPIENT, which Postfix sets for alias pipes.")
@click.option("--db-wait", type=float, default=5.0, show_default=True, metavar="SECONDS",
              help="How long to wait for an unreachable database before exit 75.")
@click.option("--keep-unknown", type=path_arg(file_okay=False), metavar="MAILDIR",
              help="Also deliver mail that needs a human (unverified, not a bounce) "
                   "into this Maildir.")
@pass_ctx
def receive(ctx: Context, recipient: str | None, db_wait: float,
            keep_unknown: Path | None) -> None:
    """Process one message from stdin (for an MTA pipe)."""
    raw = sys.stdin.buffer.read(intake.MAX_INPUT + 1)
    if not raw.strip():
        raise UserError("bounce receive: stdin was empty; expected one message.")
    if len(raw) > intake.MAX_INPUT:
        raise UserError(f"bounce receive: message larger than {intake.MAX_INPUT} bytes; refused.")
    try:
        database = ctx.db(retry_for=db_wait)
        try:
            outcome = intake.process(database, ctx.config, raw, recipient or None)
        finally:
            database.close()
        if keep_unknown is not None and outcome.needs_human:
            deliver_to_maildir(keep_unknown, raw)
    except TemporaryError:
        raise
    except SendSystemError as exc:
        # Fixable by an admin (config, schema): keep the mail queued meanwhile.
        raise TemporaryError(f"{exc} (the MTA keeps the message and retries)") from None
    except Exception as exc:
        log.exception("bounce receive failed")
        raise TemporaryError(f"unexpected error: {exc!r} (the MTA keeps the message and "
                             "retries)") from None
    click.echo(outcome.describe())


@bounce.command("scan")
@click.argument("maildir", type=path_arg(file_okay=False, exists=True))
@click.option("--db-wait", type=float, default=30.0, show_default=True, metavar="SECONDS",
              help="How long to wait for an unreachable database before stopping (exit 75).")
@pass_ctx
def scan(ctx: Context, maildir: Path, db_wait: float) -> None:
    """Process MAILDIR/new and /cur; move mail to the .processed or .unknown folder."""
    database = ctx.db(retry_for=db_wait)
    try:
        result = scan_maildir(database, ctx.config, maildir)
    finally:
        database.close()
    if result.busy:
        click.echo(f"Another bounce scan of {maildir} is running; nothing to do.")
        return
    click.echo(f"{result.processed} processed, {result.unknown} moved to unknown, "
               f"{len(result.failed)} left after errors.")
    if result.stopped:
        raise TemporaryError(f"scan stopped, the rest stays in {maildir}: {result.stopped}")
    if result.failed:
        raise SendSystemError(f"{len(result.failed)} messages could not be processed and were "
                              "left in place (see the log): " + ", ".join(result.failed[:5]))


@cli.command("unsubscribe-server")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option("--port", type=int, default=8025, show_default=True)
@pass_ctx
def unsubscribe_server(ctx: Context, host: str, port: int) -> None:
    """Run the one-click unsubscribe web app (development; production: a WSGI server)."""
    app = unsubscribe_wsgi_app(ctx.config)
    click.echo(f"Unsubscribe app on http://{host}:{port}/ (Ctrl-C stops).", err=True)
    serve(app, host, port)
