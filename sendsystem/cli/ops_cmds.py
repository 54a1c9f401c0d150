"""What ops and admins look at: status and statistics."""

from __future__ import annotations

import json
from pathlib import Path

import click

from .. import stats as stats_mod
from . import Context, cli, pass_ctx, path_arg


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def status(ctx: Context, as_json: bool) -> None:
    """Workers, rates, backlog and the newsletters in progress."""
    facts = stats_mod.status(ctx.db(), ctx.config.balancer.heartbeat_timeout)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
    else:
        from ..tables import format_status
        click.echo(format_status(facts))


@cli.command()
@click.argument("newsletter_id", type=int)
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--html", "html_file", type=path_arg(dir_okay=False),
              help="Also write a self-contained HTML report to this file.")
@pass_ctx
def stats(ctx: Context, newsletter_id: int, as_json: bool, html_file: Path | None) -> None:
    """One newsletter: counts, timeline, workers, replies, bounces."""
    facts = stats_mod.newsletter_stats(ctx.db(), newsletter_id)
    if html_file is not None:
        from ..report import render_html
        html_file.write_text(render_html(facts), encoding="utf-8")
    if as_json:
        click.echo(json.dumps(facts, indent=2))
    else:
        from ..tables import format_stats
        click.echo(format_stats(facts))
        if html_file is not None:
            click.echo(f"HTML report written to {html_file}")
