"""What the kept-count triggers (migration 013) add to each statement that changes messages.

    .venv/bin/python bench/trigger_bench.py                  # 5,000 messages a round, 5 rounds
    .venv/bin/python bench/trigger_bench.py --rows 20000 --rounds 3

The product's own statements, in 500-row chunks as the roles run them, on a
table of --table rows: the sort balancer's assignment (batch_id only: the
triggers leave at once), the sort worker's sort_mark, the send balancer's
assignment, the send worker's send_mark_sent (and, for one message in 20,
send_mark_failed), and purge's chunked delete. Each round runs every step
twice on fresh rows, once with the triggers and once without them (dropped
and put back: the bench's own database), alternating which goes first; the
figure is the best round of each, since a shared machine only ever adds
time. Prints microseconds per row for each statement, with and without, and
per message for the whole way (assign, merge, assign, send).
"""

from __future__ import annotations

import argparse
import time
from collections.abc import Callable

from common import bench_database, raw_connect, rss_line, server_line

from sendsystem import keptcounts
from sendsystem.db import Database

CHUNK = 500
BODY = b"x" * 640  # about the stored merged body per message (bench/README.md)
STEPS = ("sort assign", "sort_mark", "send assign", "send_mark_sent/failed", "purge delete")


def triggers(name: str) -> dict[str, str]:
    conn = raw_connect(name)
    try:
        with conn.cursor() as cur:
            out = {}
            for trigger in ("messages_kept_update", "messages_kept_delete"):
                cur.execute(f"SHOW CREATE TRIGGER {trigger}")
                out[trigger] = str(cur.fetchone()[2])  # type: ignore[index]
            return out
    finally:
        conn.close()


def set_triggers(name: str, on: bool, text: dict[str, str]) -> None:
    conn = raw_connect(name)
    try:
        with conn.cursor() as cur:
            for trigger, create in text.items():
                cur.execute(f"DROP TRIGGER IF EXISTS {trigger}")
                if on:
                    cur.execute(create)
    finally:
        conn.close()


def per_row(fn: Callable[[], int]) -> float:
    """Microseconds per changed row of ``fn`` (which returns the rows it changed)."""
    t0 = time.perf_counter()
    n = fn()
    return (time.perf_counter() - t0) / max(n, 1) * 1e6


def round_trip(db: Database, nid: int, rows: int, sort_worker: int, send_worker: int
               ) -> dict[str, float]:
    """One pass of ``rows`` queued messages through every step; µs per row per step."""
    out: dict[str, float] = {}
    sort_batches: list[int] = []

    def sort_assign() -> int:
        done = 0
        while done < rows:
            batch = db.insert("batch_insert", {"role": "sort", "worker": sort_worker,
                                               "newsletter": nid})
            sort_batches.append(batch)
            with db.transaction():
                done += db.execute("sort_assign", {"batch": batch, "newsletter": nid,
                                                   "n": CHUNK})
        return done
    out["sort assign"] = per_row(sort_assign)

    def sort_mark() -> int:
        done = 0
        for batch in sort_batches:
            ids = [int(r["id"]) for r in db.fetchall("sort_batch_messages",
                                                     {"batch": batch, "limit": CHUNK})]
            with db.transaction():
                done += db.execute_values("sort_mark", [(i, "merged", BODY, None) for i in ids],
                                          {"batch": batch, "worker": sort_worker})
        return done
    out["sort_mark"] = per_row(sort_mark)

    send_batches: list[int] = []

    def send_assign() -> int:
        done = 0
        while done < rows:
            batch = db.insert("batch_insert", {"role": "send", "worker": send_worker,
                                               "newsletter": nid})
            send_batches.append(batch)
            with db.transaction():
                done += db.execute("send_assign", {"batch": batch, "newsletter": nid,
                                                   "n": CHUNK})
        return done
    out["send assign"] = per_row(send_assign)

    def send_mark() -> int:
        done = 0
        for batch in send_batches:
            ids = [int(r["id"]) for r in db.fetchall("send_batch_messages",
                                                     {"batch": batch, "limit": CHUNK})]
            sent = [(i, 250, f"250 2.0.0 Ok: queued as {i:X}", f"<{i}.bench@example.com>")
                    for i in ids if i % 20]
            failed = [(i, 550, f"550 5.1.1 <user{i}@example.com>: User unknown", None)
                      for i in ids if not i % 20]
            with db.transaction():
                done += db.execute_values("send_mark_sent", sent, {"worker": send_worker})
                done += db.execute_values("send_mark_failed", failed, {"worker": send_worker})
        return done
    out["send_mark_sent/failed"] = per_row(send_mark)
    return out


def purge_delete(db: Database, nid: int, lo: int, hi: int) -> float:
    def run() -> int:
        done = 0
        for start in range(lo, hi + 1, CHUNK):
            done += db.execute("retention_delete_messages",
                               {"id": nid, "lo": start, "chunk": CHUNK})
        return done
    return per_row(run)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", type=int, default=5000, help="messages per round and mode")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--table", type=int, default=200_000,
                        help="message rows already in the table (other newsletters)")
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    args = parser.parse_args()
    with bench_database(keep=args.keep) as (config, db):
        name = config.database.name
        conn = raw_connect(name)
        print(server_line(conn))
        need = args.rows * args.rounds * 2
        with conn.cursor() as cur:
            cur.execute("INSERT INTO lists (name, from_name, from_address) "
                        "VALUES ('b', 'B', 'b@example.com')")
            cur.execute("INSERT INTO templates (name, subject, html) VALUES ('t', 's', 'h')")
            for state in ("done", "running"):
                cur.execute("INSERT INTO newsletters (list_id, template_id, subject, html, "
                            "state) VALUES (1, 1, 's', 'h', %s)", (state,))
            cur.execute("INSERT INTO workers (host, role, name, state) VALUES "
                        "('b', 'sort', 's', 'running'), ('b', 'send', 'd', 'running')")
            # Ballast: another newsletter's rows, sent; then this one's, queued.
            cur.execute(f"INSERT INTO messages (newsletter_id, subscriber_id, state, "
                        f"send_worker_id, finished_at, reply_code) SELECT 1, seq, 'sent', 2, "
                        f"NOW(6), 250 FROM seq_1_to_{args.table}")
            cur.execute(f"INSERT INTO subscribers (list_id, email, domain, fields) "
                        f"SELECT 1, CONCAT('u', seq, '@example.com'), 'example.com', '{{}}' "
                        f"FROM seq_1_to_{need}")
            cur.execute(f"INSERT INTO messages (newsletter_id, subscriber_id) "
                        f"SELECT 2, seq FROM seq_1_to_{need}")
        conn.close()
        for nid in (1, 2):
            keptcounts.repair(db, nid)
        text = triggers(name)
        print(f"{args.table:,} rows of ballast; {args.rounds} rounds of {args.rows:,} messages "
              "with and without the triggers")
        best: dict[tuple[str, bool], float] = {}
        for r in range(args.rounds):
            for on in ((True, False) if r % 2 else (False, True)):
                set_triggers(name, on, text)
                times = round_trip(db, 2, args.rows, 1, 2)
                # This round's rows have the lowest ids left (the balancers pick in
                # id order, and the rounds before deleted theirs).
                span = db.fetchone("retention_message_span", {"id": 2}) or {}
                lo = int(span["lo"])
                times["purge delete"] = purge_delete(db, 2, lo, lo + args.rows - 1)
                for step, us in times.items():
                    best[(step, on)] = min(best.get((step, on), 1e12), us)
        set_triggers(name, True, text)
        print(f"{'statement':24s} {'without':>9s} {'with':>9s} {'added':>9s}  "
              "(us per row, best round)")
        for step in STEPS:
            a, b = best[(step, False)], best[(step, True)]
            print(f"{step:24s} {a:9.1f} {b:9.1f} {b - a:+9.1f}")
        way = STEPS[:4]
        a = sum(best[(s, False)] for s in way)
        b = sum(best[(s, True)] for s in way)
        print(f"{'per message, queued->sent':24s} {a:9.1f} {b:9.1f} {b - a:+9.1f}  "
              f"(+{(b - a) / a:.0%} of the database time of these statements)")
        print(rss_line())


if __name__ == "__main__":
    main()
