"""`sendsystem subscriber ...`: one person across lists (sendsystem/admin.py)."""

from __future__ import annotations

import click

from .. import admin
from . import Context, cli, pass_ctx


@cli.group()
def subscriber() -> None:
    """One subscriber: unsubscribe them from a list."""


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
