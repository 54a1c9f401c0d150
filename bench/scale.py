"""Lists of ten million: import, export, enqueue and reports, each step timed and weighed.

    .venv/bin/python bench/scale.py                              # 10,000,000 subscribers
    .venv/bin/python bench/scale.py --subscribers 1000000 --send-seconds 20
    .venv/bin/python bench/scale.py --subscribers 200000 --keep  # keep the database

Every product step is a real `python -m sendsystem` subprocess against a
throw-away database (bench/common.py), timed from start to exit, with the
peak RSS of that process (its rusage from wait4, so only that process):

1. writes a CSV of N subscribers (the demo's fake Danes, five merge fields;
   streamed to disk, not timed against a target);
2. `list import` (target: 10,000,000 in <= 5 min, peak RSS < 150 MB);
3. `list export` to a file, checked to hold N rows;
4. `enqueue` (target: 10,000,000 message rows in <= 90 s);
5. `stats NEWSLETTER --json` and `status --json` before the send: the
   in-process time of the report functions (median of 5; target <= 50 ms at
   any size) and the command's wall time (Python start-up included);
6. the same while both balancers, 2 sort and 2 send workers send to Postfix's
   smtp-sink for --send-seconds (skipped with --send-seconds 0);
7. the database's bytes per subscriber and per message row
   (information_schema data + index after ANALYZE TABLE).

The server's settings are printed with the figures: a 10,000,000 list with
its messages is several GB, so innodb_buffer_pool_size decides much of it.
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

from common import bench_database, raw_connect, server_line, table_bytes
from smtp_bench import free_port, smtp_sink

from sendsystem import stats
from sendsystem.config import Config, load_config
from sendsystem.db import Database
from sendsystem.demo import (
    LIST_NAME,
    TEMPLATE_NAME,
    Cluster,
    RoleSpec,
    cluster_settings,
    wait_registered,
    write_config,
)
from sendsystem.demo.newsletter import sample_newsletter
from sendsystem.demo.subscribers import MERGE_FIELDS, fake_subscribers


def write_csv(path: Path, n: int) -> float:
    """The subscribers CSV, streamed to disk; its size in MB."""
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=("email", *MERGE_FIELDS))
        writer.writeheader()
        for row in fake_subscribers(n):
            writer.writerow(row)
    return path.stat().st_size / 1e6


def run_step(config_path: Path, *args: str, stdout: Path | None = None
             ) -> tuple[float, float, str]:
    """Run `sendsystem ARGS` to its end: (seconds, peak RSS MB of that process, stdout)."""
    out = stdout.open("wb") if stdout else subprocess.PIPE
    t0 = time.monotonic()
    proc = subprocess.Popen([sys.executable, "-m", "sendsystem", "--config", str(config_path),
                             *args], stdout=out, stderr=subprocess.PIPE)
    text = b""
    if stdout is None:
        assert proc.stdout is not None
        text = proc.stdout.read()
    assert proc.stderr is not None
    err = proc.stderr.read()
    _pid, status, usage = os.wait4(proc.pid, 0)
    seconds = time.monotonic() - t0
    if stdout:
        out.close()  # type: ignore[union-attr]
    code = os.waitstatus_to_exitcode(status)
    if code != 0:
        raise SystemExit(f"sendsystem {' '.join(args)} exited {code}:\n"
                         f"{err.decode(errors='replace')[-2000:]}")
    return seconds, usage.ru_maxrss / 1024, text.decode()


def timed(fn: Callable[[], Any], runs: int = 5) -> float:
    """Median milliseconds of ``fn``."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def report_times(db: Database, config: Config, config_path: Path, nid: int, label: str) -> None:
    ms_stats = timed(lambda: stats.newsletter_stats(db, nid))
    ms_status = timed(lambda: stats.status(db, config.balancer.heartbeat_timeout,
                                           config.sending.relays))
    wall, _rss, out = run_step(config_path, "stats", str(nid), "--json")
    c = json.loads(out)["counts"]
    print(f"  {label}: stats {ms_stats:.1f} ms, status {ms_status:.1f} ms in-process "
          f"(median of 5); `stats --json` command {wall * 1000:.0f} ms wall; "
          f"sent so far {c['sent']:,}", flush=True)


def table_mb(name: str, tables: Sequence[str]) -> tuple[float, int]:
    """(data + index bytes of the tables after ANALYZE, rows of the first)."""
    conn = raw_connect(name)
    total = 0
    try:
        with conn.cursor() as cur:
            for table in tables:
                cur.execute(f"ANALYZE TABLE `{table}`")
                cur.fetchall()
            cur.execute(f"SELECT COUNT(*) FROM `{tables[0]}`")
            rows = int(cur.fetchone()[0])
        for table in tables:
            data, index, _estimate = table_bytes(conn, name, table)
            total += data + index
    finally:
        conn.close()
    return total, rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--subscribers", type=int, default=10_000_000)
    ap.add_argument("--send-seconds", type=float, default=30.0,
                    help="how long to send while timing the reports (0: no send)")
    ap.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = ap.parse_args()
    n = args.subscribers
    with tempfile.TemporaryDirectory(prefix="sendsystem-scale-") as tmp, \
            bench_database(keep=args.keep) as (config, db), \
            smtp_sink(free_port()) as relay:
        work = Path(tmp)
        name = config.database.name
        conn = raw_connect()
        print(server_line(conn), flush=True)
        conn.close()
        config_path = write_config(work / "config.ini",
                                   cluster_settings(config.database, work, [relay]))
        full = load_config(config_path, env={})

        t0 = time.monotonic()
        csv_path = work / "subscribers.csv"
        mb = write_csv(csv_path, n)
        print(f"CSV: {n:,} subscribers, {mb:,.0f} MB, written in {time.monotonic() - t0:.1f} s",
              flush=True)

        run_step(config_path, "list", "create", LIST_NAME, "--from",
                 "Nordlys Nyt <nyhedsbrev@news.example.com>")
        secs, rss, _ = run_step(config_path, "list", "import", LIST_NAME, str(csv_path))
        print(f"import: {n:,} rows in {secs:.1f} s = {n / secs:,.0f} rows/s, peak RSS "
              f"{rss:.0f} MB   (targets for 10M: <= 300 s, < 150 MB)", flush=True)

        export_path = work / "export.csv"
        secs, rss, _ = run_step(config_path, "list", "export", LIST_NAME, str(export_path))
        with export_path.open(encoding="utf-8") as fh:
            rows = sum(1 for _ in fh) - 1
        print(f"export: {rows:,} rows ({export_path.stat().st_size / 1e6:,.0f} MB) in "
              f"{secs:.1f} s = {rows / secs:,.0f} rows/s, peak RSS {rss:.0f} MB", flush=True)
        if rows != n:
            raise SystemExit(f"export wrote {rows} rows, the list has {n}")
        export_path.unlink()

        sample = sample_newsletter()
        (work / "newsletter.html").write_text(sample.html, encoding="utf-8")
        (work / "newsletter.txt").write_text(sample.text, encoding="utf-8")
        run_step(config_path, "template", "add", TEMPLATE_NAME, "--subject", sample.subject,
                 "--html", str(work / "newsletter.html"), "--text", str(work / "newsletter.txt"))
        secs, rss, out = run_step(config_path, "enqueue", "--list", LIST_NAME,
                                  "--template", TEMPLATE_NAME)
        nid = int(out.split()[1].rstrip(":"))
        print(f"enqueue: {n:,} message rows in {secs:.1f} s = {n / secs:,.0f} rows/s, peak RSS "
              f"{rss:.0f} MB   (target for 10M: <= 90 s)   [{out.strip()}]", flush=True)

        report_times(db, full, config_path, nid, "before the send")
        if args.send_seconds > 0:
            roles = [RoleSpec("sort-balancer", "b1"), RoleSpec("send-balancer", "b1"),
                     RoleSpec("sort-worker", "sort-1"), RoleSpec("sort-worker", "sort-2"),
                     RoleSpec("send-worker", "send-1"), RoleSpec("send-worker", "send-2")]
            cluster = Cluster(config_path, roles, work / "logs", log_level="WARNING")
            cluster.start()
            try:
                wait_registered(Database(full.database), cluster)
                end = time.monotonic() + args.send_seconds
                while time.monotonic() < end:
                    time.sleep(min(5.0, max(end - time.monotonic(), 0)))
                    report_times(db, full, config_path, nid, "during the send")
            finally:
                cluster.stop()

        subs, nsubs = table_mb(name, ["subscribers"])
        msgs, nmsgs = table_mb(name, ["messages"])
        print(f"database: subscribers {subs / 1e6:,.0f} MB for {nsubs:,} rows = "
              f"{subs / max(nsubs, 1):,.0f} bytes/subscriber; messages {msgs / 1e6:,.0f} MB "
              f"for {nmsgs:,} rows = {msgs / max(nmsgs, 1):,.0f} bytes/message "
              "(bodies of unsent messages included)")


if __name__ == "__main__":
    main()
