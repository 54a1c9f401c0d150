"""What ops and admins look at: status and statistics, the kept counts behind them;
and the demo."""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import click

from .. import keptcounts
from .. import stats as stats_mod
from ..config import parse_relays
from ..errors import KeptCountsMismatch, SendSystemError
from . import Context, cli, pass_ctx, path_arg


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--watch", is_flag=True, help="Refresh in place until Ctrl-C.")
@click.option("--interval", type=click.FloatRange(min=0.2), default=2.0, show_default=True,
              metavar="SECONDS", help="With --watch: seconds between refreshes.")
@pass_ctx
def status(ctx: Context, as_json: bool, watch: bool, interval: float) -> None:
    """Workers, rates, backlog and the newsletters in progress."""
    from ..reports.text import format_status

    database = ctx.db()
    timeout = ctx.config.balancer.heartbeat_timeout
    if not watch:
        facts = stats_mod.status(database, timeout, ctx.config.sending.relays)
        if as_json:
            click.echo(json.dumps(facts, indent=2))
        else:
            click.echo(format_status(facts))
        return
    tty = sys.stdout.isatty()
    try:
        while True:
            facts = stats_mod.status(database, timeout, ctx.config.sending.relays)
            if as_json:
                text = json.dumps(facts)
            else:
                width = shutil.get_terminal_size((100, 24)).columns
                text = format_status(facts, width=width, color=tty)
            if tty:
                # Home + clear: repaint in place rather than scroll.
                click.echo("\033[H\033[2J" + text, nl=True)
            else:
                click.echo(text + "\n")
            time.sleep(interval)
    except KeyboardInterrupt:
        pass  # Ctrl-C is how --watch ends: exit 0


@cli.command()
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@pass_ctx
def relays(ctx: Context, as_json: bool) -> None:
    """Each relay: group, health (ok / slowed / set aside and why), current rate,
    quota used today, last error (as the live send workers see them)."""
    facts = stats_mod.relays(ctx.db(), ctx.config.sending.relays,
                             ctx.config.balancer.heartbeat_timeout)
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    from ..reports.text import format_relays

    width = shutil.get_terminal_size((120, 24)).columns
    click.echo("\n".join(format_relays(facts, width)))

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
        from ..reports.html import render_html
        html_file.write_text(render_html(facts), encoding="utf-8")
    if as_json:
        click.echo(json.dumps(facts, indent=2))
    else:
        from ..reports.text import format_stats
        click.echo(format_stats(facts))
        if html_file is not None:
            click.echo(f"HTML report written to {html_file}")


@cli.group()
def counts() -> None:
    """The kept per-newsletter counts that status, stats and metrics read."""


@counts.command("verify")
@click.argument("newsletter_id", type=int, required=False)
@click.option("--repair", is_flag=True, help="Recount each newsletter that differs from its "
              "message rows (locks its rows while it counts; see the README for Galera).")
@pass_ctx
def counts_verify(ctx: Context, newsletter_id: int | None, repair: bool) -> None:
    """Compare the kept counts with COUNT(*) over the message rows (of NEWSLETTER_ID, or
    of all: one scan of them). Exit 0 when they agree, else 1, naming each difference."""
    database = ctx.db()
    if newsletter_id is not None:
        from ..admin import get_newsletter
        get_newsletter(database, newsletter_id)  # an unknown id is a user error
    found = keptcounts.verify(database, newsletter_id)
    for difference in found:
        click.echo(str(difference))
    if not found:
        click.echo("kept counts agree with the message rows"
                   + (f" of newsletter {newsletter_id}" if newsletter_id is not None else ""))
        return
    ids = sorted({d.newsletter_id for d in found})
    if not repair:
        raise KeptCountsMismatch(
            f"kept counts differ from the message rows of newsletter(s) "
            f"{', '.join(map(str, ids))}. Recount them with `sendsystem counts verify "
            f"--repair` (best with the roles stopped or the newsletter finished).")
    for nid in ids:
        rows = keptcounts.repair(database, nid)
        click.echo(f"newsletter {nid}: kept counts rebuilt from {rows} message rows")
    left = [d for nid in ids for d in keptcounts.verify(database, nid)]
    for difference in left:
        click.echo(str(difference))
    if left:
        raise KeptCountsMismatch(
            "kept counts still differ after the repair: something wrote the newsletter "
            "meanwhile through another Galera node. Run the repair again with the roles "
            "stopped.")


@cli.command()
@click.option("--recipients", type=click.IntRange(min=1), default=20_000, show_default=True,
              help="How many fake subscribers to mail.")
@click.option("--relay", metavar="HOST:PORT",
              help="Deliver to this SMTP relay instead of the built-in counting sink.")
@click.option("--keep", is_flag=True, help="Keep the demo database afterwards.")
@click.option("--work-dir", type=path_arg(file_okay=False),
              help="Where config.ini, logs and report.html go (default: a new temp dir).")
@pass_ctx
def demo(ctx: Context, recipients: int, relay: str | None, keep: bool,
         work_dir: Path | None) -> None:
    """The whole pipeline on this machine: a list, a newsletter, a cluster, a sink."""
    from ..demo import DemoInterrupted, DemoOptions, run_demo

    relays = parse_relays(relay, "--relay") if relay else None
    if relays is not None and len(relays) != 1:
        raise click.BadParameter("give one HOST:PORT", param_hint="--relay")
    options = DemoOptions(recipients=recipients, relay=relays[0] if relays else None,
                          keep=keep, work_dir=work_dir)
    try:
        result = run_demo(ctx.config, options)
    except KeyboardInterrupt:
        raise DemoInterrupted("demo interrupted; the cluster was stopped.") from None
    if not result.ok:
        # An error (not click's Exit, which run() does not turn into a status).
        raise SendSystemError(f"demo failed: {result.delivered} delivered, "
                              f"{result.duplicates} duplicates, {result.missing} missing; "
                              f"see the logs beside {result.report}.")
