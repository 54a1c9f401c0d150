"""`sendsystem demo`: the whole pipeline on this machine, as a new user first sees it.

What it does, in order: creates its own database (the configured name unless
that is the default ``sendsystem``, then ``sendsystem_demo``), a list of N fake
Danish subscribers with five merge fields, a ~20 KB newsletter (a ten-article
loop, HTML + text) with a small PDF attachment; starts an SMTP sink in a
thread that counts deliveries per recipient (or uses ``--relay``); writes its
own config.ini in a work directory; runs both balancers, two sort and two
send workers as real subprocesses; shows progress; and ends with a summary
checked against the sink plus the HTML report of ``stats --html``.

Where each piece lives (the pieces are reused by bench/pipeline.py and
bench/scaleout.py, and by the tests' harness, tests/harness/, which import
them from here and extend them; the demo ships to users, so nothing here
imports the tests):

* ``run``          run_demo and its options: the story from set-up to clean-up
* ``database``     the demo's own database, recognised by its COMMENT mark
* ``settings``     the config.ini of a one-machine cluster (write_config, with_overrides)
* ``subscribers``  fake subscribers and their CSV
* ``newsletter``   the sample newsletter (templates) and its PDF attachment
* ``sink``         the counting SMTP sink (per recipient and per Message-ID)
* ``cluster``      the role subprocesses (start or spawn one, revive as cron would, stop)
* ``progress``     the progress line
* ``summary``      the closing summary and DemoResult
"""

from __future__ import annotations

from .cluster import (
    ROLE_COMMANDS,
    Cluster,
    Restart,
    RoleProcess,
    RoleSpec,
    default_roles,
    peak_rss_kb,
    wait_registered,
)
from .database import (
    DB_MARK,
    DEMO_DB_NAME,
    create_demo_database,
    demo_database_name,
    drop_demo_database,
)
from .newsletter import (
    DEMO_SUBJECT,
    LIST_NAME,
    TEMPLATE_NAME,
    SampleNewsletter,
    sample_newsletter,
    sample_pdf,
)
from .progress import Progress
from .run import DemoInterrupted, DemoOptions, install_sample, run_demo
from .settings import cluster_settings, with_overrides, write_config
from .sink import CountingSink, SinkTally
from .subscribers import MERGE_FIELDS, fake_subscribers, write_subscribers_csv
from .summary import DemoResult

__all__ = [
    "DB_MARK",
    "DEMO_DB_NAME",
    "DEMO_SUBJECT",
    "LIST_NAME",
    "MERGE_FIELDS",
    "ROLE_COMMANDS",
    "TEMPLATE_NAME",
    "Cluster",
    "CountingSink",
    "DemoInterrupted",
    "DemoOptions",
    "DemoResult",
    "Progress",
    "Restart",
    "RoleProcess",
    "RoleSpec",
    "SampleNewsletter",
    "SinkTally",
    "cluster_settings",
    "create_demo_database",
    "default_roles",
    "demo_database_name",
    "drop_demo_database",
    "fake_subscribers",
    "install_sample",
    "peak_rss_kb",
    "run_demo",
    "sample_newsletter",
    "sample_pdf",
    "wait_registered",
    "with_overrides",
    "write_config",
    "write_subscribers_csv",
]
