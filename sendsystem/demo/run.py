"""`sendsystem demo` itself: set up, run the cluster, follow progress, summarise, clean up.

The work directory (config.ini, logs/, report.html) is kept so the report can
be opened; the database is dropped at the end unless ``--keep``.
"""

from __future__ import annotations

import contextlib
import logging
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from .. import admin, stats
from ..config import Config, DatabaseConfig, Relay, load_config
from ..db import Database
from ..errors import SendSystemError, UserError
from ..states import FINAL_MESSAGE_STATES, NewsletterState
from .cluster import Cluster, default_roles, wait_registered
from .database import create_demo_database, demo_database_name, drop_demo_database
from .newsletter import LIST_NAME, TEMPLATE_NAME, sample_newsletter
from .progress import Progress
from .settings import cluster_settings, write_config
from .sink import CountingSink
from .subscribers import write_subscribers_csv
from .summary import DemoResult, summarize


class DemoInterrupted(SendSystemError):
    """Ctrl-C: the cluster was stopped cleanly; exit like a shell does after SIGINT."""

    exit_code = 130


@dataclass(frozen=True)
class DemoOptions:
    recipients: int = 20_000
    relay: Relay | None = None
    keep: bool = False
    work_dir: Path | None = None
    timeout: float | None = None   # default: generous, from the recipient count


def run_demo(config: Config, options: DemoOptions, out: TextIO = sys.stdout) -> DemoResult:
    """Run the demo end to end; print progress and the summary to ``out``."""
    if options.recipients < 1:
        raise UserError("--recipients must be at least 1.")
    db_config = DatabaseConfig(host=config.database.host, port=config.database.port,
                               user=config.database.user, password=config.database.password,
                               name=demo_database_name(config))
    work = options.work_dir or Path(tempfile.mkdtemp(prefix="sendsystem-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    say = _printer(out)
    # The demo prints its own story; routine INFO lines from this process
    # (migrations applied, newsletter released) would only interleave with it.
    for name in ("sendsystem.db", "sendsystem.admin", "sendsystem.demo"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    say(f"SendSystem demo: {options.recipients:,} recipients, database {db_config.name!r} on "
        f"{db_config.host}:{db_config.port}, work directory {work}")
    create_demo_database(db_config)
    sink: CountingSink | None = None
    cluster: Cluster | None = None
    database: Database | None = None
    try:
        if options.relay is None:
            sink = CountingSink().start()
            relay = sink.relay
            say(f"SMTP sink (counts per recipient) on {relay}")
        else:
            relay = options.relay
            say(f"Relaying to {relay} (an external relay: delivery is checked in the database)")
        config_path = write_config(work / "config.ini", cluster_settings(db_config, work,
                                                                         [relay]))
        demo_config = load_config(config_path, env={})
        database = Database(demo_config.database)
        database.init_schema()
        emails = _set_up_newsletter(database, work, options.recipients, say)
        cluster = Cluster(config_path, default_roles(), work / "logs")
        cluster.start()
        wait_registered(database, cluster)
        say("Cluster up: sort-balancer, send-balancer, sort-1, sort-2, send-1, send-2 "
            f"(logs in {work / 'logs'})")
        nid, created = admin.enqueue(database, LIST_NAME, TEMPLATE_NAME,
                                     attachments=(work / "katalog.pdf",))
        started = time.monotonic()
        timeout = options.timeout or max(120.0, options.recipients / 50)
        finished = _follow(database, cluster, nid, created, timeout, out)
        seconds = time.monotonic() - started
        if finished:
            _wait_done(database, nid, 5.0)
        codes = cluster.stop()
        restarts = cluster.restarts
        cluster = None
        facts = stats.newsletter_stats(database, nid)
        report = work / "report.html"
        from ..reports.html import render_html
        report.write_text(render_html(facts), encoding="utf-8")
        result = summarize(say, facts, emails, sink, seconds, finished, report, codes,
                           restarts)
        if options.keep:
            say(f"Kept database {db_config.name!r}; look around with "
                f"`sendsystem --config {config_path} status`.")
        return result
    except KeyboardInterrupt:
        out.write("\nInterrupted: stopping the cluster...\n")
        raise
    finally:
        if cluster is not None:
            cluster.stop()
        if sink is not None:
            sink.stop()
        if database is not None:
            database.close()
        if not options.keep:
            with contextlib.suppress(Exception):
                drop_demo_database(db_config)


def _printer(out: TextIO) -> Callable[[str], None]:
    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()
    return say


def install_sample(database: Database, work: Path, n: int) -> list[str]:
    """The demo's list of ``n`` subscribers and its template, files in ``work``; the emails.

    Shared with bench/pipeline.py and bench/scaleout.py, so the benchmarks
    measure exactly the newsletter the demo sends.
    """
    csv_path = work / "subscribers.csv"
    emails = write_subscribers_csv(csv_path, n)
    admin.create_list(database, LIST_NAME, "Nordlys Nyt <nyhedsbrev@news.example.com>")
    admin.import_csv(database, LIST_NAME, csv_path)
    sample = sample_newsletter()
    (work / "newsletter.html").write_text(sample.html, encoding="utf-8")
    (work / "newsletter.txt").write_text(sample.text, encoding="utf-8")
    (work / sample.attachment_name).write_bytes(sample.attachment)
    admin.add_template(database, TEMPLATE_NAME, sample.subject, work / "newsletter.html",
                       work / "newsletter.txt")
    return emails


def _set_up_newsletter(database: Database, work: Path, n: int,
                       say: Callable[[str], None]) -> list[str]:
    t0 = time.monotonic()
    emails = install_sample(database, work, n)
    say(f"Created list {LIST_NAME!r} with {n:,} subscribers (5 merge fields), template "
        f"{TEMPLATE_NAME!r} and a {len(sample_newsletter().attachment):,}-byte PDF in "
        f"{time.monotonic() - t0:.1f}s")
    return emails


def _wait_done(database: Database, nid: int, seconds: float) -> None:
    """Give the send balancer a few ticks to mark the newsletter done (for the report)."""
    deadline = time.monotonic() + seconds
    while admin.get_newsletter(database, nid)["state"] != NewsletterState.DONE and \
            time.monotonic() < deadline:
        time.sleep(0.2)


def _follow(database: Database, cluster: Cluster, nid: int, total: int, timeout: float,
            out: TextIO) -> bool:
    """Show progress until every message is final; False on timeout or a dead role."""
    progress = Progress(sys.stderr if out is sys.stdout else out, total)
    deadline = time.monotonic() + timeout
    try:
        while True:
            c = stats.counts(database, nid)
            progress.update(c)
            cluster.sample_memory()
            if sum(c[s] for s in FINAL_MESSAGE_STATES) >= total:
                progress.update(c, force=True)
                return True
            dead = cluster.revive(max_restarts=50)
            if dead:
                role, code = dead[0]
                progress.finish()
                out.write(f"{role.command} {role.name} keeps exiting (status {code}); "
                          f"giving up:\n{cluster.tail(role)}\n")
                return False
            if time.monotonic() > deadline:
                progress.finish()
                out.write(f"Timed out after {timeout:.0f}s; see {cluster.log_dir}\n")
                return False
            time.sleep(0.25)
    finally:
        progress.finish()
