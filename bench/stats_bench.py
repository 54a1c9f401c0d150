"""What `stats`, `status` and the metrics cost for one large newsletter, idle and during a send.

    .venv/bin/python bench/stats_bench.py                        # 1,000,000 messages
    .venv/bin/python bench/stats_bench.py --messages 10000000 --rate 278
    .venv/bin/python bench/stats_bench.py --keep                 # keep the database

Set-up, all set-based SQL (no product code, so the same script measures a tree
without kept counts too): one running newsletter of N message rows made from
MariaDB's SEQUENCE engine, in the states of a send well under way (88 % sent,
5 % merged, 2 % queued, 2 % failed of which half quote the address in the
reply, 1 % each deferred, skipped and bounced), two sort workers, --workers
send workers, finished_at spread over N / --rate seconds. Then, when the tree
has kept counts (sendsystem.keptcounts), `keptcounts.repair` counts them:
rows inserted behind the release's back need it, and its time is what the
schema 13 backfill costs per N rows.

Measured: the in-process time of stats.newsletter_stats (what `stats --json`
prints), stats.status and one metrics scrape (median and max of --runs), and
the wall time of the `sendsystem stats ID --json` command (Python start-up
included). First idle, then while a writer thread turns merged rows into sent
ones in 500-row statements shaped like the send worker's outcome write (with
the triggers, if the tree has them), as fast as it can.
"""

from __future__ import annotations

import argparse
import importlib.util
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from common import bench_database, raw_connect, rss_line, server_line
from prometheus_client import generate_latest

from sendsystem import monitoring, stats
from sendsystem.config import Config
from sendsystem.db import Database

CHUNK = 1_000_000  # rows per INSERT ... SELECT
OUTCOME_ROWS = 500  # rows per simulated outcome write

# seq MOD 100 -> state: 0-87 sent, 88-92 merged, 93-94 queued, 95-96 failed,
# 97 deferred, 98 skipped, 99 bounced.
FILL = """
INSERT INTO messages (newsletter_id, subscriber_id, state, sort_worker_id, send_worker_id,
                      attempts, deferrals, merged_at, finished_at, reply_code, reply, detail)
SELECT %(nid)s, seq, s.state,
       IF(s.state = 'queued', NULL, %(sort1)s + seq MOD 2),
       IF(s.state IN ('sent', 'failed', 'bounced', 'deferred', 'skipped'),
          %(send1)s + seq MOD %(workers)s, NULL),
       IF(s.state IN ('sent', 'failed', 'bounced', 'deferred'), 1, 0),
       IF(s.state = 'deferred' OR seq MOD 97 = 0, 1 + seq MOD 3, 0),
       IF(s.state = 'queued', NULL,
          TIMESTAMPADD(MICROSECOND, seq * 1000000 DIV %(sort_rate)s, %(t0)s)),
       IF(s.state IN ('sent', 'failed', 'bounced', 'skipped'),
          TIMESTAMPADD(MICROSECOND, 5000000 + seq * 1000000 DIV %(rate)s, %(t0)s), NULL),
       CASE s.state WHEN 'sent' THEN 250 WHEN 'bounced' THEN 250 WHEN 'deferred' THEN 421
                    WHEN 'failed' THEN IF(seq MOD 2, 550, 554) END,
       CASE s.state WHEN 'sent' THEN CONCAT('250 2.0.0 Ok: queued as ', HEX(seq))
                    WHEN 'bounced' THEN CONCAT('250 2.0.0 Ok: queued as ', HEX(seq))
                    WHEN 'deferred' THEN '421 4.7.0 Try again later'
                    WHEN 'failed' THEN IF(seq MOD 2,
                        CONCAT('550 5.1.1 <user', seq, '@example.com>: User unknown'),
                        '554 5.7.1 Rejected by policy') END,
       IF(s.state = 'skipped', 'blocked', NULL)
FROM seq_%(lo)s_to_%(hi)s
JOIN (SELECT CASE WHEN seq < 88 THEN 'sent' WHEN seq < 93 THEN 'merged'
                  WHEN seq < 95 THEN 'queued' WHEN seq < 97 THEN 'failed'
                  WHEN seq = 97 THEN 'deferred' WHEN seq = 98 THEN 'skipped'
                  ELSE 'bounced' END AS state, seq AS k
      FROM seq_0_to_99) AS s ON s.k = seq MOD 100
"""


def has_kept_counts() -> bool:
    return importlib.util.find_spec("sendsystem.keptcounts") is not None


def build(config: Config, db: Database, n: int, workers: int, rate: float) -> int:
    """The newsletter and its rows; its id."""
    name = config.database.name
    conn = raw_connect(name)
    try:
        with conn.cursor() as cur:
            cur.execute("INSERT INTO lists (name, from_name, from_address) "
                        "VALUES ('big', 'Big', 'big@example.com')")
            cur.execute("INSERT INTO templates (name, subject, html) VALUES ('t', 's', 'h')")
            cur.execute("INSERT INTO newsletters (list_id, template_id, subject, html, state, "
                        "total, released_at) VALUES (LAST_INSERT_ID(), LAST_INSERT_ID(), "
                        "'A large newsletter', 'h', 'running', %s, "
                        "TIMESTAMPADD(SECOND, -%s, NOW(6)))", (n, int(n / rate) + 60))
            nid = int(cur.lastrowid)
            for i in range(2):
                cur.execute("INSERT INTO workers (host, role, name, state, heartbeat_at) "
                            "VALUES ('bench', 'sort', %s, 'running', NOW(6))", (f"sort{i}",))
            sort1 = int(cur.lastrowid) - 1
            for i in range(workers):
                cur.execute("INSERT INTO workers (host, role, name, state, heartbeat_at) "
                            "VALUES ('bench', 'send', %s, 'running', NOW(6))", (f"send{i}",))
            send1 = int(cur.lastrowid) - workers + 1
            cur.execute("SELECT TIMESTAMPADD(SECOND, -%s, NOW(6))", (int(n / rate) + 30,))
            t0 = cur.fetchone()[0]  # type: ignore[index]
            for lo in range(1, n + 1, CHUNK):
                hi = min(lo + CHUNK - 1, n)
                cur.execute(FILL, {"nid": nid, "lo": lo, "hi": hi, "sort1": sort1,
                                   "send1": send1, "workers": workers, "t0": t0,
                                   "rate": int(rate), "sort_rate": int(rate * 1.2)})
                print(f"  {hi:,} rows", flush=True)
    finally:
        conn.close()
    return nid


def timings(fn: Callable[[], Any], runs: int) -> tuple[float, float]:
    """(median, max) milliseconds of ``fn``."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times), max(times)


def command_ms(config_path: Path, nid: int, runs: int) -> float:
    """Median wall time of `sendsystem stats ID --json` (Python start-up included)."""
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([sys.executable, "-m", "sendsystem", "--config", str(config_path),
                        "stats", str(nid), "--json"], check=True, capture_output=True)
        times.append((time.perf_counter() - t0) * 1000)
    return statistics.median(times)


def measure(label: str, db: Database, config: Config, config_path: Path, nid: int,
            runs: int, command_runs: int) -> None:
    facts = stats.newsletter_stats(db, nid)
    s_med, s_max = timings(lambda: stats.newsletter_stats(db, nid), runs)
    st_med, st_max = timings(lambda: stats.status(db, 3.0), runs)
    reg = monitoring.registry(db, config)
    m_med, m_max = timings(lambda: generate_latest(reg), max(3, runs // 4))
    wall = command_ms(config_path, nid, command_runs)
    c = facts["counts"]
    print(f"{label}: stats {s_med:.1f} ms (max {s_max:.1f}), status {st_med:.1f} ms "
          f"(max {st_max:.1f}), metrics scrape {m_med:.1f} ms (max {m_max:.1f}); "
          f"`stats --json` command {wall:.0f} ms wall; sent {c['sent']:,}, merged "
          f"{c['merged']:,}; {len(facts['timeline'])} timeline points, "
          f"{len(facts['timeline_detail']['rows'])} detail points "
          f"({facts['timeline_detail']['bucket_seconds']} s)", flush=True)


class Sender(threading.Thread):
    """Turns merged rows into sent ones, 500 per statement, like the send worker."""

    def __init__(self, name: str, nid: int, worker: int) -> None:
        super().__init__(daemon=True)
        self.db_name, self.nid, self.worker = name, nid, worker
        self.stop = threading.Event()
        self.rows = 0
        self.seconds = 0.0

    def run(self) -> None:
        conn = raw_connect(self.db_name)
        started = time.perf_counter()
        try:
            with conn.cursor() as cur:
                while not self.stop.is_set():
                    cur.execute("SELECT id FROM messages WHERE newsletter_id = %s AND "
                                "state = 'merged' LIMIT %s", (self.nid, OUTCOME_ROWS))
                    ids = [int(r[0]) for r in cur.fetchall()]
                    if not ids:
                        break
                    rows = " UNION ALL ".join(
                        f"SELECT {i} AS id, 250 AS code, '250 2.0.0 Ok: queued as {i:X}' "
                        "AS reply" for i in ids)
                    cur.execute("BEGIN")
                    cur.execute(
                        f"UPDATE messages m JOIN ({rows}) AS v ON v.id = m.id "
                        "SET m.state = 'sent', m.body = NULL, m.batch_id = NULL, "
                        "m.send_worker_id = %s, m.finished_at = NOW(6), "
                        "m.attempts = m.attempts + 1, m.reply_code = v.code, m.reply = v.reply "
                        "WHERE m.state NOT IN ('sent', 'bounced')", (self.worker,))
                    cur.execute("COMMIT")
                    self.rows += len(ids)
        finally:
            self.seconds = time.perf_counter() - started
            conn.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--messages", type=int, default=1_000_000)
    parser.add_argument("--workers", type=int, default=4, help="send workers (default 4)")
    parser.add_argument("--rate", type=float, default=2000.0,
                        help="messages/s the send ran at: finished_at spans N / rate seconds")
    parser.add_argument("--runs", type=int, default=20)
    parser.add_argument("--command-runs", type=int, default=3,
                        help="times the `stats --json` command is timed (median)")
    parser.add_argument("--idle-only", action="store_true", help="no measurement during a send")
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    args = parser.parse_args()
    kept = has_kept_counts()
    with bench_database(keep=args.keep) as (config, db), \
            tempfile.TemporaryDirectory() as tmp:
        conn = raw_connect()
        print(server_line(conn))
        conn.close()
        print(f"{args.messages:,} messages, {args.workers} send workers, sent over "
              f"{args.messages / args.rate:,.0f} s; kept counts: {'yes' if kept else 'no'}")
        t0 = time.perf_counter()
        nid = build(config, db, args.messages, args.workers, args.rate)
        print(f"set-up: {time.perf_counter() - t0:.1f} s")
        if kept:
            from sendsystem import keptcounts
            t0 = time.perf_counter()
            keptcounts.repair(db, nid)
            print(f"keptcounts.repair (the backfill's recount): "
                  f"{time.perf_counter() - t0:.1f} s")
            sizes = {t: int(db_scalar(config, f"SELECT COUNT(*) FROM {t} WHERE "
                                      "newsletter_id = %s", nid))
                     for t in ("kept_counts", "kept_timeline", "kept_sort_workers",
                               "kept_failures")}
            print(f"kept rows of the newsletter: {sizes}")
        path = Path(tmp) / "config.ini"
        d = config.database
        path.write_text(f"[database]\nhost = {d.host}\nport = {d.port}\nuser = {d.user}\n"
                        f"password = {d.password}\nname = {d.name}\n", encoding="utf-8")
        measure("idle", db, config, path, nid, args.runs, args.command_runs)
        if not args.idle_only:
            sender = Sender(config.database.name, nid,
                            int(db_scalar(config, "SELECT MAX(id) FROM workers")))
            sender.start()
            time.sleep(0.5)
            measure("during a send", db, config, path, nid, args.runs, args.command_runs)
            sender.stop.set()
            sender.join()
            print(f"  the writer turned {sender.rows:,} rows sent in {sender.seconds:.1f} s "
                  f"({sender.rows / max(sender.seconds, 1e-9):,.0f} rows/s)")
        if kept:
            from sendsystem import keptcounts
            differences = keptcounts.verify(db, nid)
            print(f"kept counts == COUNT(*): {not differences} {differences[:3]}")
        print(rss_line())


def db_scalar(config: Config, statement: str, *params: Any) -> Any:
    conn = raw_connect(config.database.name)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params or None)
            row = cur.fetchone()
            return None if row is None else row[0]
    finally:
        conn.close()


if __name__ == "__main__":
    main()
