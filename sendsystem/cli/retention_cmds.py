"""`sendsystem purge`: retention of old finished newsletters (sendsystem/retention.py)."""

from __future__ import annotations

import click

from .. import retention
from . import Context, cli, pass_ctx


@cli.command()
@click.option("--older-than", "older_than", required=True, metavar="DURATION",
              help="Purge newsletters that finished longer ago than this: 90d, 12h, 30m, 2w.")
@click.option("--dry-run", is_flag=True, help="Say what would go; change nothing.")
@click.option("--chunk-size", type=click.IntRange(min=1), default=5000, show_default=True,
              help="Rows per DELETE (one short transaction each).")
@click.option("--pause", type=click.FloatRange(min=0), default=0.1, show_default=True,
              metavar="SECONDS", help="Sleep at least this long between chunks.")
@click.option("--sleep-coef", type=click.FloatRange(min=0), default=4.0, show_default=True,
              metavar="K", help="And K times as long as the last chunk took, so the purge "
              "uses at most 1/(1+K) of the database's time and senders keep their pace.")
@pass_ctx
def purge(ctx: Context, older_than: str, dry_run: bool, chunk_size: int, pause: float,
          sleep_coef: float) -> None:
    """Delete message and old bounce rows of finished newsletters, keeping their stats."""
    options = retention.Options(older_than=retention.parse_duration(older_than),
                                dry_run=dry_run, chunk=chunk_size, pause=pause,
                                sleep_coef=sleep_coef)
    done = retention.purge(ctx.db(), options)  # the Context closes the connection
    verb = "would purge" if dry_run else "purged"
    for p in done:
        click.echo(f"{verb} newsletter {p.newsletter_id} ({p.state}, finished "
                   f"{p.finished_at:%Y-%m-%d %H:%M}): {p.messages} messages, "
                   f"{p.bounces} bounce rows")
    messages = sum(p.messages for p in done)
    bounces = sum(p.bounces for p in done)
    click.echo(f"{verb} {len(done)} newsletter(s): {messages} messages, {bounces} bounce rows"
               + ("; nothing was changed (dry run)" if dry_run else ""))
