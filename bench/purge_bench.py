"""Does `sendsystem purge` slow a send? A send alone, then the same send while a purge runs.

    .venv/bin/python bench/purge_bench.py                     # 1,000,000 rows, 20,000 sent
    .venv/bin/python bench/purge_bench.py --rows 200000 -n 5000 --chunk 5000 --pause 0.1

On a throw-away database (bench/common.py): a finished newsletter, done 100
days ago, gets ``--rows`` message rows at once with INSERT ... SELECT from
MariaDB's sequence engine. A cluster (both balancers, ``--sort`` sort and
``--send`` send workers; bench/pipeline.py's shape) then sends the demo's
newsletter to ``-n`` recipients against the sink: once unmeasured (start-up
costs), then alone, then a
second newsletter while `sendsystem purge --older-than 90d` (a real
subprocess) deletes the old rows. The send rate is taken from the rows
(first -> last sent, and release -> last sent), as bench/pipeline.py does.

Prints: msgs/s both ways and their ratio, how much of the second send the
purge overlapped, the purge's rows/s and its peak RSS, and the roles' RSS.
The goal (issue 14): the send with a purge running is no more than 10 %
slower. Run by hand only; say in the numbers whether the machine was shared.

Measured 2026-11-30 on an idle 2-core box (MariaDB 10.11, 128 MB buffer pool;
MariaDB, both balancers, 2 sort and 2 send workers and smtp-sink share the
cores), 1,000,000 rows, --sleep-coef 4 (the default), `-n 100000` (the send
overlaps the whole purge): alone 1,218 msgs/s (send stage), while purging
1,181: ratio 0.970, within the goal. The purge took 126.5 s (88 MB peak
RSS). (Earlier that day, before the send-path changes: 895 -> 830, 0.927.) Its
summary now comes from the kept counts; the unpaced scans of the rows it
used to take cost a short send 31 % (0.691 on 2026-11-29, `-n 20000`).
"""

from __future__ import annotations

import argparse
import logging
import os
import resource
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

from common import bench_database, raw_connect, server_line
from pipeline import (
    Tuning,
    enqueue,
    follow,
    open_sink,
    prepare,
    rss_lines,
    stage_times,
    tuning_args,
    tuning_from,
)

from sendsystem import keptcounts, stats
from sendsystem.config import Config, load_config
from sendsystem.db import Database
from sendsystem.demo import Cluster, RoleSpec, wait_registered

log = logging.getLogger(__name__)


def old_newsletter(config: Config, db: Database, work: Path, rows: int) -> tuple[int, float]:
    """A newsletter finished 100 days ago with ``rows`` message rows; (its id, seconds)."""
    nid, _ = enqueue(db, work)  # the demo list's rows: replaced below
    started = time.perf_counter()
    conn = raw_connect(config.database.name)
    try:
        with conn.cursor() as cur:
            cur.execute("DELETE FROM messages WHERE newsletter_id = %s", (nid,))
            cur.execute(
                "INSERT INTO messages (newsletter_id, subscriber_id, state, message_id, "
                "  attempts, merged_at, finished_at, reply_code, detail) "
                "SELECT %s, 10000000 + seq, IF(seq %% 50 = 0, 'failed', 'sent'), "
                "  CONCAT('<', seq, '.old@bench.example>'), 1, "
                "  TIMESTAMPADD(SECOND, seq DIV 1000, TIMESTAMPADD(DAY, -100, NOW(6))), "
                "  TIMESTAMPADD(SECOND, seq DIV 1000 + 1, TIMESTAMPADD(DAY, -100, NOW(6))), "
                "  IF(seq %% 50 = 0, 550, 250), IF(seq %% 50 = 0, 'user unknown', NULL) "
                f"FROM seq_1_to_{int(rows)}", (nid,))
            cur.execute("UPDATE newsletters SET state = 'done', released_at = "
                        "TIMESTAMPADD(DAY, -100, NOW(6)), finished_at = "
                        "TIMESTAMPADD(DAY, -99, NOW(6)), total = %s WHERE id = %s", (rows, nid))
    finally:
        conn.close()
    # Rows inserted behind the release's back: count them (message INSERTs have
    # no trigger), so the summary and the deletes' kept counts are true.
    keptcounts.repair(db, nid)
    return nid, time.perf_counter() - started


def send_rate(name: str, nid: int, n: int) -> tuple[float, float, float]:
    """(send-stage msgs/s, end-to-end msgs/s, send span in seconds) from the rows."""
    t = stage_times(name, nid)
    return n / t["send_span"], n / t["end_to_end"], t["send_span"]


class Purge:
    """`sendsystem purge` as a subprocess; its wall time and peak RSS (wait4's rusage)."""

    def __init__(self, config_path: Path, args: argparse.Namespace) -> None:
        self.argv = [sys.executable, "-m", "sendsystem", "--config", str(config_path),
                     "--log-level", "WARNING", "purge", "--older-than", "90d",
                     "--chunk-size", str(args.chunk), "--pause", str(args.pause)]
        self.started = self.ended = 0.0
        self.rss_mb = 0.0
        self.code: int | None = None
        self.output = ""
        self._thread = threading.Thread(target=self._run, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        with tempfile.TemporaryFile() as out:
            self.started = time.monotonic()
            proc = subprocess.Popen(self.argv, stdout=out, stderr=subprocess.STDOUT)
            _, status, usage = os.wait4(proc.pid, 0)
            self.ended = time.monotonic()
            proc.returncode = os.waitstatus_to_exitcode(status)
            self.code = proc.returncode
            self.rss_mb = usage.ru_maxrss / 1024
            out.seek(0)
            self.output = out.read().decode(errors="replace")

    def join(self) -> None:
        self._thread.join()


def run(args: argparse.Namespace, config: Config, db: Database, work: Path) -> None:
    tuning: Tuning = tuning_from(args)
    name = config.database.name
    with open_sink(args.sink) as (relay, _sink):
        config_path = prepare(config, db, work, relay, tuning, args.recipients)
        old, seconds = old_newsletter(config, db, work, args.rows)
        print(f"old finished newsletter {old}: {args.rows:,} message rows in {seconds:.1f} s "
              "(INSERT ... SELECT)")
        roles = ([RoleSpec("sort-balancer", "b1"), RoleSpec("send-balancer", "b1")]
                 + [RoleSpec("sort-worker", f"sort-{i + 1}") for i in range(args.sort)]
                 + [RoleSpec("send-worker", f"send-{i + 1}") for i in range(args.send)])
        cluster = Cluster(config_path, roles, work / "logs", log_level="WARNING")
        cluster.start()
        purge = Purge(config_path, args)
        try:
            wait_registered(Database(load_config(config_path, env={}).database), cluster)
            if args.warmup:  # the first send pays start-up (imports, zdict, pools): not measured
                warm, total = enqueue(db, work)
                print(f"warm-up send (not measured): newsletter {warm}, {total:,} recipients")
                follow(db, cluster, warm, total, ("sent", "failed", "skipped", "bounced"),
                       args.timeout)
            alone, total = enqueue(db, work)
            print(f"send alone: newsletter {alone}, {total:,} recipients")
            follow(db, cluster, alone, total, ("sent", "failed", "skipped", "bounced"),
                   args.timeout)
            busy, total = enqueue(db, work)
            print(f"send while purging: newsletter {busy}, {total:,} recipients")
            purge.start()
            follow(db, cluster, busy, total, ("sent", "failed", "skipped", "bounced"),
                   args.timeout)
            sent_done = time.monotonic()
            purge.join()
        finally:
            cluster.stop()
        a_send, a_e2e, a_span = send_rate(name, alone, stats.counts(db, alone)["sent"])
        b_send, b_e2e, b_span = send_rate(name, busy, stats.counts(db, busy)["sent"])
        purge_wall = purge.ended - purge.started
        overlap = min(purge.ended, sent_done) - purge.started
        left = int(raw_scalar(name, "SELECT COUNT(*) FROM messages WHERE newsletter_id = %s",
                              old))
        print(f"\nrows={args.rows:,} recipients={args.recipients:,} sort={args.sort} "
              f"send={args.send} sink={args.sink} chunk={args.chunk} pause={args.pause}s")
        print(f"send alone:         {a_send:,.0f} msgs/s send stage ({a_span:.2f} s), "
              f"{a_e2e:,.0f} msgs/s release -> last sent")
        print(f"send while purging: {b_send:,.0f} msgs/s send stage ({b_span:.2f} s), "
              f"{b_e2e:,.0f} msgs/s release -> last sent")
        print(f"ratio (with purge / alone): send stage {b_send / a_send:.3f}, "
              f"release -> last sent {b_e2e / a_e2e:.3f}")
        print(f"purge: exit {purge.code}, {args.rows:,} rows in {purge_wall:.1f} s = "
              f"{args.rows / purge_wall:,.0f} rows/s (incl. summary and pauses), "
              f"peak RSS {purge.rss_mb:.0f} MB; overlapped {overlap:.1f} s of the "
              f"second send; {left} old rows left")
        print("  " + purge.output.strip().replace("\n", "\n  "))
        for line in rss_lines(cluster):
            print(line)
        own = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
        print(f"bench process peak RSS {own:.0f} MB")


def raw_scalar(name: str, statement: str, *params: object) -> object:
    conn = raw_connect(name)
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            row = cur.fetchone()
    finally:
        conn.close()
    return row[0] if row else None


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rows", type=int, default=1_000_000, help="old message rows to purge")
    ap.add_argument("-n", "--recipients", type=int, default=20_000)
    ap.add_argument("--sort", type=int, default=2, help="sort workers")
    ap.add_argument("--send", type=int, default=2, help="send workers")
    ap.add_argument("--sink", choices=("smtp-sink", "counting"), default="smtp-sink")
    ap.add_argument("--chunk", type=int, default=5000, help="purge --chunk-size")
    ap.add_argument("--pause", type=float, default=0.1, help="purge --pause")
    ap.add_argument("--timeout", type=float, default=900.0)
    ap.add_argument("--no-warmup", dest="warmup", action="store_false",
                    help="skip the unmeasured first send")
    ap.add_argument("--keep", action="store_true", help="keep the database afterwards")
    tuning_args(ap)
    args = ap.parse_args()
    logging.basicConfig(level=logging.WARNING)
    work = Path(tempfile.mkdtemp(prefix="sendsystem-purge-bench-"))
    with bench_database(keep=args.keep) as (config, db):
        conn = raw_connect()
        print(server_line(conn))
        conn.close()
        run(args, config, db, work)
    import shutil
    shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
