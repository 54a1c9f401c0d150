"""`sendsystem subscriber ...`: one person across lists (sendsystem/forget.py, admin.py)."""

from __future__ import annotations

import click

from .. import admin, forget
from . import Context, cli, pass_ctx


@cli.group()
def subscriber() -> None:
    """One subscriber: unsubscribe them from a list, or forget them everywhere."""


@subscriber.command("unsubscribe")
@click.argument("email")
@click.option("--list", "list_name", required=True, help="The list to take them off.")
@pass_ctx
def subscriber_unsubscribe(ctx: Context, email: str, list_name: str) -> None:
    """Take an address off a list (recorded in the list's history as "admin")."""
    if admin.unsubscribe(ctx.db(), list_name, email):
        click.echo(f"Unsubscribed {email} from {list_name!r}.")
    else:
        click.echo(f"{email} was not active on {list_name!r}; nothing changed.")


@subscriber.command("forget")
@click.argument("email")
@click.option("--dry-run", is_flag=True, help="Say what would be erased; change nothing.")
@click.option("--wait", type=click.FloatRange(min=0), default=forget.DEFAULT_WAIT,
              show_default=True, metavar="SECONDS",
              help="How long to wait for a message of theirs a worker is sending right now.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=forget.DEFAULT_CHUNK,
              show_default=True, help="Rows per statement (one short transaction each).")
@pass_ctx
def subscriber_forget(ctx: Context, email: str, dry_run: bool, wait: float,
                      chunk_size: int) -> None:
    """Erase a person's personal data from every table, for an erasure request.

    Every subscription of the address is ended and anonymised; their messages,
    bounces and history keep only what counts; a salted hash stays in the
    blocklist so no list mails them again (`block remove ADDRESS` lifts it).
    """
    report = forget.forget(ctx.db(), email, dry_run=dry_run, chunk=chunk_size, wait=wait)
    verb = "Would forget" if dry_run else "Forgot"
    click.echo(f"{verb} {report.email}: {report.subscriptions} subscription(s), "
               f"{report.ended} of them active (ended: erasure request), "
               f"{report.cancelled} pending message(s) "
               f"{'to cancel' if dry_run else 'cancelled'}.")
    for table, n in report.rows.items():
        click.echo(f"  {table:<22} {n:>8} row(s) {'to scrub' if dry_run else 'scrubbed'}")
    if dry_run:
        state = "to add" if report.suppressed else "exists already"
        click.echo(f"  {'blocklist':<22} hashed entry {state}")
        click.echo("Nothing was changed (dry run).")
    else:
        click.echo(f"  {'blocklist':<22} hashed entry kept: they will not be mailed again "
                   "(`sendsystem block remove ADDRESS` lifts it)")
