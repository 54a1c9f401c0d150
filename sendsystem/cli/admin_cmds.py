"""Admin commands: schema, lists, templates, newsletters, workers, blocklist."""

from __future__ import annotations

import io
import json
import os
import shutil
import sys
from pathlib import Path
from typing import Any

import click

from .. import admin, liststats
from ..db import Database
from ..errors import ImportRowsError, UserError
from ..listcsv import STATUSES
from ..states import worker_alive, worker_dead
from . import Context, cli, pass_ctx, path_arg


def interactive() -> bool:
    """Progress bars only on a terminal; cron mail stays quiet."""
    return sys.stderr.isatty()


@cli.group()
def db() -> None:
    """The database schema."""


@db.command("init")
@pass_ctx
def db_init(ctx: Context) -> None:
    """Create or upgrade the schema from the package's sql/migrations (idempotent)."""
    before, after = ctx.db().init_schema()
    name = ctx.config.database.name
    if before == after:
        click.echo(f"Database {name!r} is up to date (schema version {after}).")
    elif before == 0:
        click.echo(f"Created database {name!r} (schema version {after}).")
    else:
        click.echo(f"Upgraded database {name!r} from schema version {before} to {after}.")


@cli.group("list")
def list_group() -> None:
    """Mailing lists and their subscribers."""


@list_group.command("create")
@click.argument("name")
@click.option("--from", "from_header", required=True, help='"Name <address@example.com>"')
@pass_ctx
def list_create(ctx: Context, name: str, from_header: str) -> None:
    """Create a list."""
    list_id = admin.create_list(ctx.db(), name, from_header)
    click.echo(f"Created list {name!r} (id {list_id}).")


class ProgressBars:
    """One click progress bar per phase, on stderr: ``progress(phase, done, total)``."""

    def __init__(self) -> None:
        self._bar: Any = None
        self._phase: str | None = None
        self._pos = 0

    def __call__(self, phase: str, done: int, total: int) -> None:
        if phase == self._phase and self._bar is None:
            return  # this phase's bar was closed already
        if phase != self._phase:
            self.close()
            self._phase = phase
            self._bar = click.progressbar(length=max(total, 1), label=phase, file=sys.stderr)
            self._bar.__enter__()
            self._pos = 0
        self._bar.length = max(total, 1)
        if done > self._pos:
            self._bar.update(done - self._pos)
            self._pos = done
        if done >= total:
            self.close()  # the phase is over: what is said next gets its own line

    def close(self) -> None:
        if self._bar is not None:
            self._bar.__exit__(None, None, None)
            self._bar = None


@list_group.command("import")
@click.argument("name")
@click.argument("file", type=path_arg(dir_okay=False))
@click.option("--skip-invalid", is_flag=True,
              help="Import the good rows and report the bad ones (default: import nothing "
                   "if any row is bad).")
@pass_ctx
def list_import(ctx: Context, name: str, file: Path, skip_invalid: bool) -> None:
    """Import subscribers from a CSV file with a header row: email, any merge fields,
    and optionally status, left_at, left_reason (the layout `list export` writes).

    Every bad line is named on stderr. The file is read as a stream, any size; up to
    5 times its size is needed for a while in TMPDIR (default /var/tmp). An existing
    subscriber gets the new merge fields and never goes back to active."""
    database = ctx.db()
    bars = ProgressBars() if interactive() else None
    named = 0

    def problem(line: int, reason: str) -> None:
        nonlocal named
        if bars is not None:
            bars.close()
        if not named:
            click.echo(f"{file}: bad lines:", err=True)
        named += 1
        click.echo(f"  line {line}: {reason}", err=True)

    try:
        result = admin.import_csv(database, name, file, skip_invalid=skip_invalid,
                                  progress=bars, on_problem=problem)
    except ImportRowsError as exc:
        # Every line is above already; the error says what it means.
        raise UserError(exc.summary) from None
    finally:
        if bars is not None:
            bars.close()
    same = f" ({result.unchanged} unchanged)" if result.unchanged else ""
    click.echo(f"Imported {result.imported} of {result.total} rows into {name!r}{same}.")
    if result.bad_count:
        click.echo(f"Skipped {result.bad_count} invalid rows (named above).", err=True)


@list_group.command("export")
@click.argument("name")
@click.argument("file", required=False, type=path_arg(dir_okay=False))
@click.option("--status", type=click.Choice(STATUSES),
              help="Only the subscribers with this status.")
@click.option("--for-spreadsheet", is_flag=True,
              help="Make the file safe to open in a spreadsheet: a cell that begins with "
                   "= + - @ gets a ' in front (so it is no longer an exact copy), and a "
                   "UTF-8 byte-order mark.")
@pass_ctx
def list_export(ctx: Context, name: str, file: Path | None, status: str | None,
                for_spreadsheet: bool) -> None:
    """Write a list as CSV to FILE (or stdout): email, the merge fields, status,
    left_at (UTC), left_reason. `list import` reads it back.

    FILE is created with mode 0600 (it is personal data) and appears only when
    complete. Needs about the file's size in TMPDIR (default /var/tmp)."""
    database = ctx.db()
    admin.get_list(database, name)
    to_terminal = file is None and sys.stdout.isatty()
    bars = ProgressBars() if interactive() and not to_terminal else None
    try:
        if file is None:
            out = io.TextIOWrapper(sys.stdout.buffer, encoding="utf-8", newline="")
            try:
                n = admin.export_csv(database, name, out, status=status,
                                     for_spreadsheet=for_spreadsheet, progress=bars)
                out.flush()
            finally:
                out.detach()
        else:
            n = _export_to_file(database, name, file, status, for_spreadsheet, bars)
    finally:
        if bars is not None:
            bars.close()
    where = f" to {file}" if file is not None else ""
    click.echo(f"Exported {n} subscribers of {name!r}{where}.", err=True)


def _export_to_file(database: Database, name: str, file: Path, status: str | None,
                    for_spreadsheet: bool, bars: ProgressBars | None) -> int:
    """Export through a temporary name next to FILE (mode 0600), renamed when complete."""
    partial = file.with_name(f".{file.name}.{os.getpid()}.partial")
    try:
        fd = os.open(partial, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    except OSError as exc:
        raise UserError(f"{file}: cannot write there ({exc.strerror or exc}).") from None
    try:
        with open(fd, "w", encoding="utf-8", newline="") as out:
            n = admin.export_csv(database, name, out, status=status,
                                 for_spreadsheet=for_spreadsheet, progress=bars)
        os.replace(partial, file)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
    return n


@list_group.command("show")
@pass_ctx
def list_show(ctx: Context) -> None:
    """Show the lists with their subscriber counts and relay group."""
    database = ctx.db()
    track = {r["name"]: r["track"] for r in database.fetchall("list_track_all")}
    for row in database.fetchall("list_all"):
        click.echo(f"{row['id']:>4}  {row['name']:<24} {row['active']:>9} active "
                   f"{row['total']:>9} total  relays: {row['relay_group'] or 'default':<12} "
                   f"track: {track.get(row['name']) or 'none':<13}"
                   f"{row['from_name']} <{row['from_address']}>")


@list_group.command("set")
@click.argument("name")
@click.option("--relays", "group", metavar="GROUP",
              help="Relay group the list's mail leaves through ('default': the relays "
                   "without a group).")
@click.option("--track", metavar="KINDS",
              help="Track opens, clicks, both (opens,clicks) or none in the list's "
                   "newsletters from now on ([tracking] enabled must be on too).")
@pass_ctx
def list_set(ctx: Context, name: str, group: str | None, track: str | None) -> None:
    """Change a list's settings: its relay group, what it tracks."""
    if group is None and track is None:
        raise click.UsageError("give --relays GROUP and/or --track KINDS")
    database = ctx.db()
    if group is not None:
        known = {r.group for r in ctx.config.sending.relays}
        admin.set_list_relays(database, name, group, known)
        click.echo(f"List {name!r} now sends through relay group {group!r}.")
    if track is not None:
        value = admin.set_list_track(database, name, track)
        note = "" if ctx.config.tracking.enabled or not value else \
            " (not yet in effect: [tracking] enabled is off in this server's config)"
        click.echo(f"List {name!r} now tracks {value.replace(',', ' and ') or 'nothing'}{note}.")


@list_group.command("stats")
@click.argument("name")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
@click.option("--html", "html_file", type=path_arg(dir_okay=False),
              help="Also write a self-contained HTML report to this file.")
@click.option("--weeks", type=click.IntRange(min=1, max=520), default=liststats.DEFAULT_WEEKS,
              show_default=True, help="Weeks of history to show (weeks start Monday, UTC).")
@click.option("--newsletters", type=click.IntRange(min=0), default=liststats.DEFAULT_NEWSLETTERS,
              show_default=True, help="The most recent newsletters to show (0: none).")
@click.option("--verify", is_flag=True,
              help="Also count the subscribers table by status and say if the history "
                   "disagrees (reads every subscriber's index entry: slower on big lists).")
@click.option("--rebuild", is_flag=True,
              help="Count the whole history anew instead of using the kept weekly counts.")
@pass_ctx
def list_stats(ctx: Context, name: str, as_json: bool, html_file: Path | None, weeks: int,
               newsletters: int, verify: bool, rebuild: bool) -> None:
    """Subscribers over time by status, joins and leaves per week and why they left,
    and each newsletter's delivered, bounce, complaint and unsubscribe rates with
    the trend."""
    facts = liststats.list_stats(ctx.db(), name, weeks=weeks, newsletters=newsletters,
                                 verify=verify, rebuild=rebuild)
    if html_file is not None:
        from ..reports.list_html import render_list_html
        html_file.write_text(render_list_html(facts), encoding="utf-8")
    if as_json:
        click.echo(json.dumps(facts, indent=2))
        return
    from ..reports.list_text import format_list_stats

    width = shutil.get_terminal_size((100, 24)).columns
    click.echo(format_list_stats(facts, width=width), nl=False)
    if html_file is not None:
        click.echo(f"HTML report written to {html_file}")


@cli.group()
def template() -> None:
    """Newsletter templates."""


@template.command("add")
@click.argument("name")
@click.option("--subject", required=True, help="The subject (a template too).")
@click.option("--html", "html_file", required=True, type=path_arg(dir_okay=False))
@click.option("--text", "text_file", type=path_arg(dir_okay=False))
@pass_ctx
def template_add(ctx: Context, name: str, subject: str, html_file: Path,
                 text_file: Path | None) -> None:
    """Add a template (or replace one of the same name); it must compile."""
    tid = admin.add_template(ctx.db(), name, subject, html_file, text_file)
    click.echo(f"Template {name!r} saved (id {tid}).")


@cli.command()
@click.option("--list", "list_name", required=True)
@click.option("--template", "template_name", required=True)
@click.option("--at", help='Send time "YYYY-MM-DD HH:MM" (local time of this machine).')
@click.option("--attach", "attachments", multiple=True, type=path_arg(dir_okay=False))
@click.option("--track/--no-track", default=None,
              help="Track opens and clicks in this newsletter, or not (default: what the "
                   "list tracks; [tracking] enabled must be on too).")
@pass_ctx
def enqueue(ctx: Context, list_name: str, template_name: str, at: str | None,
            attachments: tuple[Path, ...], track: bool | None) -> None:
    """Create a newsletter for a list."""
    database = ctx.db(retry_for=30.0)
    if interactive() and not at:
        lst = admin.get_list(database, list_name)
        span = database.fetchone("list_subscriber_id_range", {"list_id": lst["id"]}) or {}
        length = int(span["hi"]) - int(span["lo"]) + 1 if span.get("lo") is not None else 0
        with click.progressbar(length=max(length, 1), label="Creating messages",
                               file=sys.stderr) as bar:
            nid, created = admin.enqueue(database, list_name, template_name, at=at,
                                         attachments=attachments, progress=bar.update,
                                         track=track)
    else:
        nid, created = admin.enqueue(database, list_name, template_name, at=at,
                                     attachments=attachments, track=track)
    if created or not at:
        click.echo(f"Newsletter {nid} queued: {created} messages.")
    else:
        click.echo(f"Newsletter {nid} scheduled for {at} (local time).")


@cli.group()
def newsletter() -> None:
    """Pause, resume or cancel a newsletter."""


@newsletter.command("pause")
@click.argument("newsletter_id", type=int)
@pass_ctx
def newsletter_pause(ctx: Context, newsletter_id: int) -> None:
    """Stop new assignment; batches in flight finish."""
    admin.pause(ctx.db(), newsletter_id)
    click.echo(f"Newsletter {newsletter_id} paused.")


@newsletter.command("resume")
@click.argument("newsletter_id", type=int)
@pass_ctx
def newsletter_resume(ctx: Context, newsletter_id: int) -> None:
    admin.resume(ctx.db(), newsletter_id)
    click.echo(f"Newsletter {newsletter_id} resumed.")


@newsletter.command("retry-failed")
@click.argument("newsletter_id", type=int)
@click.option("--reply", metavar="PATTERN",
              help="Only failures whose reply matches: text it contains, or a shell "
                   "wildcard over the whole reply ('535*').")
@pass_ctx
def newsletter_retry_failed(ctx: Context, newsletter_id: int, reply: str | None) -> None:
    """Send the failed messages again (never to bounced, unsubscribed, complained or
    blocked recipients), e.g. after a relay was misconfigured."""
    n = admin.retry_failed(ctx.db(), newsletter_id, reply)
    click.echo(f"Newsletter {newsletter_id}: {n} failed messages queued again.")


@newsletter.command("cancel")
@click.argument("newsletter_id", type=int)
@pass_ctx
def newsletter_cancel(ctx: Context, newsletter_id: int) -> None:
    n = admin.cancel(ctx.db(), newsletter_id)
    click.echo(f"Newsletter {newsletter_id} cancelled ({n} messages will not be sent).")


@cli.group(invoke_without_command=True)
@click.pass_context
def workers(click_ctx: click.Context) -> None:
    """List, disable or enable workers."""
    if click_ctx.invoked_subcommand is None:
        click_ctx.invoke(workers_list)


@workers.command("list")
@pass_ctx
def workers_list(ctx: Context) -> None:
    rows = ctx.db().fetchall("workers_all")
    timeout = ctx.config.balancer.heartbeat_timeout
    click.echo(f"{'ID':>4}  {'ROLE':<14}{'HOST':<18}{'NAME':<16}{'ENABLED':<8}{'STATE':<10}"
               f"{'RATE':>8}{'BACKLOG':>9}{'HEARTBEAT':>11}")
    for w in rows:
        age = w["heartbeat_age"]
        dead = worker_dead(w["state"], worker_alive(w["state"], age, timeout))
        rate = f"{w['rate']:.1f}" if w["rate"] is not None else "-"
        hb = f"{float(age):.1f}s" if age is not None else "-"
        click.echo(f"{w['id']:>4}  {w['role']:<14}{w['host'][:17]:<18}{w['name'][:15]:<16}"
                   f"{'yes' if w['enabled'] else 'no':<8}{'DEAD' if dead else w['state']:<10}"
                   f"{rate:>8}{w['backlog']:>9}{hb:>11}")


@workers.command("disable")
@click.argument("worker")
@pass_ctx
def workers_disable(ctx: Context, worker: str) -> None:
    """Disable a worker (id or name): it stops within one heartbeat and stays stopped."""
    w = admin.set_worker_enabled(ctx.db(), worker, False)
    click.echo(f"Worker {w['id']} ({w['role']} {w['name']} on {w['host']}) disabled.")


@workers.command("enable")
@click.argument("worker")
@pass_ctx
def workers_enable(ctx: Context, worker: str) -> None:
    """Enable a worker again; cron starts it within a minute."""
    w = admin.set_worker_enabled(ctx.db(), worker, True)
    click.echo(f"Worker {w['id']} ({w['role']} {w['name']} on {w['host']}) enabled.")


@cli.group()
def block() -> None:
    """The blocklist: addresses and @domains that are never mailed."""


@block.command("add")
@click.argument("patterns", nargs=-1, required=True)
@click.option("--reason")
@pass_ctx
def block_add(ctx: Context, patterns: tuple[str, ...], reason: str | None) -> None:
    database = ctx.db()
    for p in patterns:
        added = admin.block_add(database, p, reason)
        click.echo(f"{'Blocked' if added else 'Already blocked'}: {admin.block_pattern(p)}")


@block.command("remove")
@click.argument("patterns", nargs=-1, required=True)
@pass_ctx
def block_remove(ctx: Context, patterns: tuple[str, ...]) -> None:
    database = ctx.db()
    for p in patterns:
        removed = admin.block_remove(database, p)
        click.echo(f"{'Unblocked' if removed else 'Was not blocked'}: {admin.block_pattern(p)}")


@block.command("list")
@pass_ctx
def block_list(ctx: Context) -> None:
    for row in ctx.db().fetchall("block_list"):
        click.echo(f"{row['pattern']}\t{row['reason'] or ''}")
