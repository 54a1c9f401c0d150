"""The database at scale: do the send path's hot statements stay flat as `messages` grows?

    .venv/bin/python bench/db_growth.py                     # newsletters of 1,000,000, 0..3 of them
    .venv/bin/python bench/db_growth.py --millions 0.2 --calls 500   # a quick look (~2 min)

Issue 17, direction 4. On a throw-away database (bench/common.py), with the
shipped configuration (a role's `Database`: the named statements, PREPAREd
as the roles do at start-up, client-side interpolation, its kept-counts slot):

1. a list of ``--millions`` x 1,000,000 subscribers (enqueue_bench.py's
   INSERT ... SELECT from the sequence engine), and the newsletter being sent
   to it, enqueued through the real release path (admin.enqueue), shaped as
   a send in progress: 10 % sent, 2 % merged (650-byte bodies), the rest
   queued; a sort batch and a send batch of ``--batch`` rows are assigned
   (sort_assign / send_assign, committed), as the balancers leave them;
2. the hot statements are timed (``--calls`` calls each, after a warm-up;
   the assigning UPDATEs, the chunk fetches and sort_mark a quarter as often), then
3. one finished newsletter of the same size is added to `messages` (INSERT
   ... SELECT from the sequence engine: 95 % sent, 2 % bounced, 2 % failed,
   1 % skipped, one in 20 deferred once, each with its Message-ID, reply,
   workers and times, finished 100+ days ago; its `done` batches; its kept
   counts recounted with keptcounts.repair, as `sendsystem counts verify
   --repair` would), and 2. is repeated, ``--history`` times;
4. `sendsystem purge --older-than 90d` (retention.purge in-process, with
   ``--purge-chunk`` rows per DELETE and no pauses, to keep the run short)
   removes the finished newsletters; once InnoDB's purge has caught up
   (history list length), the table's bytes per message row kept are
   compared with those before the purge and with the table that held only
   the running newsletter.

The statements, as the roles run them (sendsystem/roles/):

* sort balancer, per batch: ``sort_assign`` (UPDATE ... LIMIT ``--batch``);
* send balancer, per batch: ``send_assign``; per tick and running
  newsletter: ``send_ready_count``, ``newsletter_unfinished``, and
  ``backlog_by_worker``;
* sort worker, per chunk of 200: ``sort_batch_messages`` (the fetch) and
  ``sort_mark`` (the merged rows written, one UPDATE ... JOIN of a row set);
* send worker, per chunk of 500: ``send_batch_messages`` (the batch's
  merged rows with their bodies);
* outcome writer, per write: ``send_mark_sent`` of ``--outcomes`` rows (the
  single-kind UPDATE of roles/outcomes.py; one write holds whatever
  accumulated during the previous one).

Writes are timed inside a transaction that is then rolled back, so every
call sees the same rows and the table does not drift between stages (the
statement's own work, triggers included, is all there; the commit's redo
log flush, which no table size changes, is not). The assigning UPDATEs get a
fresh batch row first (untimed), as the balancer's transaction does.

Each call is also measured as the CPU time of the mariadbd thread serving
the connection (ServerClock): what the statement cost the server, not how
long it waited for a core, so a flat line there holds whatever a neighbour
does to the wall times. What this does not see: the running newsletter's
rows are the same few thousand every call (the timed writes are rolled
back), so they stay in the buffer pool; a real worker reads fresh rows each
chunk, which on a table far larger than the buffer pool may come from disk
(or the OS cache). The running newsletter's rows are also created first, so
their ids are lower than the finished ones' (in production the finished ones
are older); every statement here finds its rows by newsletter, batch or
primary key, which that order does not change.

Prints, per statement and history size: median and p99 in ms, the ratio of
the median to the empty table's and the verdict (flat: within 20 %), the
EXPLAIN of each (table:access type:index:rows), and the bytes per row. Run
by hand; the load average is printed with each stage (the box may be shared).

Measured 2026-11-30 (2 cores, MariaDB 10.11 defaults, 128 MB buffer pool,
load ~1.1-1.3 from a neighbour; 559 s): every statement keeps its plan and
reads the same rows at 0, 1, 2 and 3 million finished rows; medians within
20 % up to 2 M (one at 1.21), five of nine 1.2-1.5x at 3 M and as high again
after the purge (the table back to 236 MB): the run's drift, not the table's
size. 256 bytes per message row kept after the purge (186 in a fresh table).
bench/README.md has the table.
"""

from __future__ import annotations

import argparse
import os
import random
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pymysql
from common import bench_database, raw_connect, server_line, table_bytes
from enqueue_bench import FILL_SUBSCRIBERS, HTML

from sendsystem import admin, keptcounts, retention
from sendsystem.config import Config
from sendsystem.db import Database

SORT_CHUNK = 200      # sendsystem/roles/sort_worker.py CHUNK
SEND_CHUNK = 500      # sendsystem/roles/send_worker.py CHUNK
BODY_BYTES = 650      # a compressed merge of the demo newsletter (bench/README.md)
FLAT = 1.20           # "flat": a median within 20 % of the empty table's

# One finished newsletter's rows, made server-side from the sequence engine.
HISTORY_ROWS = """
INSERT INTO messages (newsletter_id, subscriber_id, state, sort_worker_id, send_worker_id,
                      message_id, attempts, deferrals, merged_at, finished_at, reply_code,
                      reply, detail)
SELECT %(nid)s, %(lo)s + seq - 1,
       ELT(1 + (seq %% 100 >= 95) + (seq %% 100 >= 97) + (seq %% 100 >= 99),
           'sent', 'bounced', 'failed', 'skipped'),
       %(sort_worker)s, %(send_worker)s,
       IF(seq %% 100 >= 99, NULL,
          CONCAT('<', %(nid)s, '.', seq, '.', LPAD(HEX(seq * 2654435761 %% 4294967296), 8, '0'),
                 '@bounce.example.dk>')),
       1 + (seq %% 20 = 0) - (seq %% 100 >= 99), (seq %% 20 = 0),
       TIMESTAMPADD(MICROSECOND, seq * 400, %(t0)s),
       TIMESTAMPADD(MICROSECOND, seq * 800 + 1000000, %(t0)s),
       ELT(1 + (seq %% 100 >= 97) + (seq %% 100 >= 99), 250, 550, NULL),
       ELT(1 + (seq %% 100 >= 97) + (seq %% 100 >= 99),
           CONCAT('250 2.0.0 Ok: queued as ', LPAD(HEX(seq * 40503 %% 16777216), 6, '0'),
                  LPAD(HEX(seq %% 65536), 5, '0')),
           '550 5.1.1 <user@example.dk>: Recipient address rejected: User unknown', NULL),
       IF(seq %% 100 >= 99, 'unsubscribed',
          IF(seq %% 100 IN (95, 96), 'hard bounce 5.1.1 (verp)', NULL))
FROM seq_1_to_{n}
"""

HISTORY_BATCHES = """
INSERT INTO batches (role, worker_id, newsletter_id, size, state, created_at, finished_at)
SELECT IF(seq %% 2, 'sort', 'send'), IF(seq %% 2, %(sort_worker)s, %(send_worker)s), %(nid)s,
       1000, 'done', TIMESTAMPADD(SECOND, seq DIV 2, %(t0)s),
       TIMESTAMPADD(SECOND, seq DIV 2 + 1, %(t0)s)
FROM seq_1_to_{n}
"""

HISTORY_DONE = """
UPDATE newsletters SET state = 'done', total = %(n)s, released_at = %(t0)s,
       finished_at = TIMESTAMPADD(HOUR, 2, %(t0)s), send_at = NULL
WHERE id = %(nid)s
"""

# The running newsletter, shaped as a send in progress (these UPDATEs fire the
# kept-counts triggers, so its counts stay true).
CURRENT_SENT = """
UPDATE messages SET state = 'sent', sort_worker_id = %(sort_worker)s,
       send_worker_id = %(send_worker)s, attempts = 1, merged_at = NOW(6), finished_at = NOW(6),
       reply_code = 250, reply = CONCAT('250 2.0.0 Ok: queued as ', HEX(id)),
       message_id = CONCAT('<', newsletter_id, '.', id, '.0badc0de@bounce.example.dk>')
WHERE newsletter_id = %(nid)s AND id < %(lo)s + %(sent)s
"""
CURRENT_MERGED = """
UPDATE messages SET state = 'merged', sort_worker_id = %(sort_worker)s, merged_at = NOW(6),
       body = RANDOM_BYTES(%(body)s)
WHERE newsletter_id = %(nid)s AND id >= %(lo)s + %(sent)s AND id < %(lo)s + %(sent)s + %(merged)s
"""


class _Undo(Exception):
    """Raised inside db.transaction() to roll a timed write back."""


@dataclass
class Stat:
    median_ms: float
    p99_ms: float
    cpu_us: float  # median CPU time of the server thread per call
    calls: int


@dataclass
class Stage:
    history_rows: int
    load: str
    label: str = ""   # the column's heading: the finished rows, or "purged"
    stats: dict[str, Stat] = field(default_factory=dict)
    explain: dict[str, str] = field(default_factory=dict)
    reads: dict[str, int] = field(default_factory=dict)  # Handler_read_* of one call
    table_mb: float = 0.0


@dataclass
class World:
    """What the statements run against: the running newsletter and the workers' batches."""

    config: Config
    db: Database      # the roles' connection (read_timeout), for the timed statements
    setup: Database   # no read timeout: set-up, kept-count recounts, the purge
    nid: int
    list_id: int
    lo_sub: int
    sort_worker: int
    send_worker: int
    sort_batch: int
    send_batch: int
    sort_ids: list[int]
    send_ids: list[int]
    batch: int
    outcomes: int


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def mrows(rows: int) -> str:
    return f"{rows / 1e6:g}M"


def loadavg() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


Sample = tuple[float, float]  # (wall seconds, server-thread CPU seconds) of one call


class ServerClock:
    """A call's wall time, and the CPU time the server spent on it.

    The CPU time is that of the mariadbd thread serving the connection (one
    thread per connection, MariaDB's default): its ``schedstat`` run time in
    /proc, in nanoseconds, read before and after the call. It counts only
    what the statement cost the server, not the time it waited for a core,
    so it stays comparable when neighbours load the box (InnoDB's background
    threads, e.g. page flushing, are not in it). Zero where /proc is not ours
    to read (a remote server).
    """

    def __init__(self, db: Database) -> None:
        self.db = db
        # When set, measure() also counts the rows the call read (last_reads).
        self.counting = False
        self.last_reads = 0
        conn = _conn(db)
        with conn.cursor(pymysql.cursors.Cursor) as cur:
            cur.execute("SELECT @@pid_file, (SELECT TID FROM information_schema.PROCESSLIST "
                        "WHERE ID = CONNECTION_ID())")
            pid_file, tid = cur.fetchone()  # type: ignore[misc]
        self.path: Path | None = None
        try:
            pid = int(Path(str(pid_file)).read_text().strip())
            self.path = Path(f"/proc/{pid}/task/{int(tid)}/schedstat")
            self.path.read_text()
        except (OSError, ValueError, TypeError):
            self.path = None
        first = self.handler_reads()
        self.overhead = self.handler_reads() - first  # what reading the counters reads

    def handler_reads(self) -> int:
        """The session's Handler_read_* counters added up: index and row reads so far."""
        with _conn(self.db).cursor(pymysql.cursors.Cursor) as cur:
            cur.execute("SELECT SUM(VARIABLE_VALUE) FROM information_schema.SESSION_STATUS "
                        "WHERE VARIABLE_NAME LIKE 'HANDLER_READ%'")
            row = cur.fetchone()
        return int(row[0]) if row and row[0] is not None else 0

    def cpu(self) -> float:
        if self.path is None:
            return 0.0
        try:
            return int(self.path.read_text().split()[0]) / 1e9
        except (OSError, ValueError, IndexError):
            return 0.0

    def measure(self, fn: Callable[[], object]) -> Sample:
        r0 = self.handler_reads() if self.counting else 0
        c0 = self.cpu()
        t0 = time.perf_counter()
        fn()
        t1 = time.perf_counter()
        c1 = self.cpu()
        if self.counting:
            self.last_reads = self.handler_reads() - r0 - self.overhead
        return t1 - t0, c1 - c0


# Warm-up: at least this long, so the pages a statement touches are in the
# buffer pool's young list (InnoDB moves a page there only when it is touched
# again more than innodb_old_blocks_time, 1 s by default, after it was read).
WARMUP_SECONDS = 1.5


def time_calls(calls: int, warmup: int, call: Callable[[int], Sample]) -> Stat:
    i = 0
    until = time.perf_counter() + WARMUP_SECONDS
    while i < warmup or time.perf_counter() < until:
        call(i)
        i += 1
    walls, cpus = [], []
    for j in range(i, i + calls):
        wall, cpu = call(j)
        walls.append(wall * 1000)
        cpus.append(cpu * 1e6)
    return Stat(statistics.median(walls), percentile(walls, 0.99), statistics.median(cpus), calls)


def timed_write(db: Database, clock: ServerClock, before: Callable[[], dict[str, Any]],
                write: Callable[[dict[str, Any]], object]) -> Sample:
    """One write inside a transaction, rolled back: the write's own sample."""
    sample = (0.0, 0.0)
    try:
        with db.transaction():
            extra = before()
            sample = clock.measure(lambda: write(extra))
            raise _Undo
    except _Undo:
        pass
    return sample


Call = Callable[[int], Sample]


def statements(w: World, clock: ServerClock) -> dict[str, tuple[Call, int, Callable[[int], str]]]:
    """name -> (one call, calls divisor, the SQL text of call i for EXPLAIN)."""
    db = w.db
    rng = random.Random(17)
    bodies = [rng.randbytes(BODY_BYTES) for _ in range(16)]

    def new_batch(role: str) -> Callable[[], dict[str, Any]]:
        def make() -> dict[str, Any]:
            worker = w.sort_worker if role == "sort" else w.send_worker
            return {"batch": db.insert("batch_insert", {"role": role, "worker": worker,
                                                        "newsletter": w.nid})}
        return make

    def assign(name: str, role: str) -> Call:
        def call(i: int) -> Sample:
            return timed_write(db, clock, new_batch(role), lambda b: db.execute(name, {
                "batch": b["batch"], "newsletter": w.nid, "n": w.batch}))
        return call

    def sort_rows(i: int) -> list[tuple[Any, ...]]:
        start = (i * SORT_CHUNK) % max(1, len(w.sort_ids) - SORT_CHUNK + 1)
        return [(mid, "merged", bodies[(i + k) % len(bodies)], None)
                for k, mid in enumerate(w.sort_ids[start:start + SORT_CHUNK])]

    def sent_rows(i: int) -> list[tuple[Any, ...]]:
        start = (i * w.outcomes) % max(1, len(w.send_ids) - w.outcomes + 1)
        return [(mid, 250, f"250 2.0.0 Ok: queued as {mid:X}{i:05X}",
                 f"<{w.nid}.{mid}.0badc0de@bounce.example.dk>")
                for mid in w.send_ids[start:start + w.outcomes]]

    def sort_mark(i: int) -> Sample:
        return timed_write(db, clock, dict, lambda _: db.execute_values(
            "sort_mark", sort_rows(i), {"batch": w.sort_batch, "worker": w.sort_worker}))

    def mark_sent(i: int) -> Sample:
        return timed_write(db, clock, dict, lambda _: db.execute_values(
            "send_mark_sent", sent_rows(i), {"worker": w.send_worker}))

    def reads(name: str, params: dict[str, Any]) -> Call:
        def call(i: int) -> Sample:
            return clock.measure(lambda: db.fetchall(name, params))
        return call

    assign_params = {"batch": 0, "newsletter": w.nid, "n": w.batch}
    return {
        "sort_assign (balancer)": (assign("sort_assign", "sort"), 4,
                                   lambda i: sql_text(db, "sort_assign", assign_params)),
        "send_assign (balancer)": (assign("send_assign", "send"), 4,
                                   lambda i: sql_text(db, "send_assign", assign_params)),
        "send_ready_count (tick)": (
            reads("send_ready_count", {"newsletter": w.nid, "cap": 4000}), 1,
            lambda i: sql_text(db, "send_ready_count", {"newsletter": w.nid, "cap": 4000})),
        "newsletter_unfinished (tick)": (
            reads("newsletter_unfinished", {"id": w.nid}), 1,
            lambda i: sql_text(db, "newsletter_unfinished", {"id": w.nid})),
        "backlog_by_worker (tick)": (
            reads("backlog_by_worker", {"role": "send"}), 1,
            lambda i: sql_text(db, "backlog_by_worker", {"role": "send"})),
        f"sort_batch_messages ({SORT_CHUNK})": (
            reads("sort_batch_messages", {"batch": w.sort_batch, "limit": SORT_CHUNK}), 4,
            lambda i: sql_text(db, "sort_batch_messages",
                               {"batch": w.sort_batch, "limit": SORT_CHUNK})),
        f"sort_mark ({SORT_CHUNK} rows)": (
            sort_mark, 4,
            lambda i: values_text(db, "sort_mark", sort_rows(i),
                                  {"batch": w.sort_batch, "worker": w.sort_worker})),
        f"send_batch_messages ({SEND_CHUNK})": (
            reads("send_batch_messages", {"batch": w.send_batch, "limit": SEND_CHUNK}), 4,
            lambda i: sql_text(db, "send_batch_messages",
                               {"batch": w.send_batch, "limit": SEND_CHUNK})),
        f"send_mark_sent ({w.outcomes} rows)": (
            mark_sent, 1,
            lambda i: values_text(db, "send_mark_sent", sent_rows(i),
                                  {"worker": w.send_worker})),
    }


# ------------------------------------------------------------------------ EXPLAIN

def _conn(db: Database) -> pymysql.connections.Connection:
    return db._ensure()  # the role's own connection (same session settings)


def sql_text(db: Database, name: str, params: dict[str, Any]) -> str:
    conn = _conn(db)
    with conn.cursor() as cur:
        return str(cur.mogrify(db.sql(name), params))


def values_text(db: Database, name: str, rows: list[tuple[Any, ...]],
                params: dict[str, Any]) -> str:
    """The statement as Database.execute_values sends it."""
    conn = _conn(db)
    columns = db._value_columns[name]
    literals = [[str(conn.escape(v)) for v in row] for row in rows]
    first = ", ".join(f"{lit} AS `{col}`" for lit, col in zip(literals[0], columns, strict=True))
    table = " UNION ALL ".join([f"SELECT {first}",
                                *(f"SELECT {', '.join(r)}" for r in literals[1:])])
    statement = db.sql(name).replace("%(values)s", table.replace("%", "%%"))
    with conn.cursor() as cur:
        return str(cur.mogrify(statement, params))


def explain(db: Database, text: str) -> str:
    """``table:type:key:rows`` of each row of the plan (the derived row set left out)."""
    conn = _conn(db)
    parts = []
    with conn.cursor(pymysql.cursors.DictCursor) as cur:
        cur.execute("EXPLAIN " + text.replace("%", "%%"))
        for row in cur.fetchall():
            table = str(row.get("table") or row.get("select_type") or "")
            if row.get("select_type") in ("UNION", "UNION RESULT") or table.startswith("<union"):
                continue
            if table in ("", "None") and row.get("select_type") == "DERIVED":
                continue
            extra = str(row.get("Extra") or "")
            flags = "".join(f"+{tag}" for tag, word in (("sort", "filesort"),
                                                        ("tmp", "temporary"))
                            if word in extra)
            parts.append(f"{table}:{row.get('type')}:{row.get('key') or '-'}:"
                         f"{row.get('rows')}{flags}")
    return " ".join(parts)


# ------------------------------------------------------------------------ set-up

def make_world(config: Config, db: Database, args: argparse.Namespace, n: int,
               work: Path) -> tuple[World, float]:
    """The list, the running newsletter (released, shaped) and the batches; enqueue seconds."""
    list_id = admin.create_list(db, "growth", "Nyhedsbrevet <nyheder@example.dk>")
    html = work / "t.html"
    html.write_text(HTML, encoding="utf-8")
    admin.add_template(db, "growth", "Nyt fra os, {{ first_name }}", html, None)
    conn = raw_connect(config.database.name)
    t0 = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute(FILL_SUBSCRIBERS.format(n=int(n)), {"list_id": list_id, "unsubscribed": 0.0})
    print(f"set-up: {n:,} subscribers in {time.perf_counter() - t0:.1f} s")

    sort_worker = db.insert("worker_register", {"host": "bench", "role": "sort",
                                                "name": "growth-sort", "pid": os.getpid(),
                                                "db_node": None})
    send_worker = db.insert("worker_register", {"host": "bench", "role": "send",
                                                "name": "growth-send", "pid": os.getpid(),
                                                "db_node": None})
    db.set_slot(send_worker)
    t0 = time.perf_counter()
    nid, created = admin.enqueue(db, "growth", "growth")
    enqueue_s = time.perf_counter() - t0
    print(f"running newsletter {nid}: {created:,} message rows enqueued in {enqueue_s:.2f} s "
          f"(release path, empty table; load {loadavg()})")
    with conn.cursor() as cur:
        cur.execute("SELECT MIN(id) FROM messages WHERE newsletter_id = %s", (nid,))
        lo = int(cur.fetchone()[0])  # type: ignore[index]
        cur.execute("SELECT MIN(id) FROM subscribers WHERE list_id = %s", (list_id,))
        lo_sub = int(cur.fetchone()[0])  # type: ignore[index]
    sent, merged = created // 10, max(created // 50, 2 * args.batch + SEND_CHUNK)
    shape = {"nid": nid, "lo": lo, "sent": sent, "merged": merged, "body": BODY_BYTES,
             "sort_worker": sort_worker, "send_worker": send_worker}
    t0 = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute(CURRENT_SENT, shape)
        cur.execute(CURRENT_MERGED, shape)
    conn.close()
    print(f"shaped as a send in progress: {sent:,} sent, {merged:,} merged, "
          f"{created - sent - merged:,} queued ({time.perf_counter() - t0:.1f} s)")

    batches = {}
    for role, name in (("sort", "sort_assign"), ("send", "send_assign")):
        with db.transaction():
            worker = sort_worker if role == "sort" else send_worker
            batch = db.insert("batch_insert", {"role": role, "worker": worker, "newsletter": nid})
            got = db.execute(name, {"batch": batch, "newsletter": nid, "n": args.batch})
            db.execute("batch_set_size", {"batch": batch, "size": got})
        batches[role] = batch
    conn = raw_connect(config.database.name)
    with conn.cursor() as cur:
        ids = {}
        for role, batch in batches.items():
            cur.execute("SELECT id FROM messages WHERE batch_id = %s ORDER BY id", (batch,))
            ids[role] = [int(r[0]) for r in cur.fetchall()]
    conn.close()
    world = World(config=config, db=db, setup=db, nid=nid, list_id=list_id, lo_sub=lo_sub,
                  sort_worker=sort_worker, send_worker=send_worker,
                  sort_batch=batches["sort"], send_batch=batches["send"],
                  sort_ids=ids["sort"], send_ids=ids["send"], batch=args.batch,
                  outcomes=args.outcomes)
    return world, enqueue_s


def add_history(w: World, n: int, k: int) -> None:
    """One finished newsletter of ``n`` rows, done 100 + k days ago, its kept counts true."""
    db = w.setup
    nid, _ = admin.enqueue(db, "growth", "growth", at="2099-01-01 00:00")  # no rows yet
    conn = raw_connect(w.config.database.name)
    params = {"nid": nid, "lo": w.lo_sub, "sort_worker": w.sort_worker,
              "send_worker": w.send_worker, "n": n}
    t0 = time.perf_counter()
    with conn.cursor() as cur:
        cur.execute("SELECT TIMESTAMPADD(DAY, %s, NOW(6))", (-100 - k,))
        params["t0"] = cur.fetchone()[0]  # type: ignore[index]
        cur.execute(HISTORY_ROWS.format(n=int(n)), params)
        rows_s = time.perf_counter() - t0
        cur.execute(HISTORY_BATCHES.format(n=max(2, 2 * n // 1000)), params)
        cur.execute(HISTORY_DONE, params)
    conn.close()
    t1 = time.perf_counter()
    keptcounts.repair(db, nid)  # rows made behind the triggers' back: count them
    print(f"  finished newsletter {nid}: {n:,} rows in {rows_s:.1f} s "
          f"({n / rows_s:,.0f} rows/s, INSERT ... SELECT), kept counts "
          f"{time.perf_counter() - t1:.1f} s; load {loadavg()}")


def measure(w: World, history_rows: int, args: argparse.Namespace) -> Stage:
    stage = Stage(history_rows=history_rows, load=loadavg(), label=mrows(history_rows))
    clock = ServerClock(w.db)
    for name, (call, divisor, text) in statements(w, clock).items():
        calls = max(50, args.calls // divisor)
        stage.stats[name] = time_calls(calls, max(10, calls // 20), call)
        clock.counting = True
        call(0)
        stage.reads[name] = clock.last_reads
        clock.counting = False
        stage.explain[name] = explain(w.db, text(0))
    conn = raw_connect(w.config.database.name)
    data, index, _ = table_bytes(conn, w.config.database.name, "messages")
    conn.close()
    stage.table_mb = (data + index) / 1e6
    return stage


# ------------------------------------------------------------------------ purge

def history_list_length(conn: pymysql.connections.Connection) -> int:
    with conn.cursor() as cur:
        cur.execute("SHOW ENGINE INNODB STATUS")
        text = str(cur.fetchone()[2])  # type: ignore[index]
    for line in text.splitlines():
        if line.startswith("History list length"):
            return int(line.split()[-1])
    return 0


def bytes_line(conn: pymysql.connections.Connection, schema: str) -> tuple[int, int, int, int]:
    """(data, index, data_free, exact rows) of `messages`."""
    data, index, _ = table_bytes(conn, schema, "messages")
    with conn.cursor() as cur:
        cur.execute("SELECT data_free FROM information_schema.tables "
                    "WHERE table_schema = %s AND table_name = 'messages'", (schema,))
        free = int(cur.fetchone()[0])  # type: ignore[index]
        cur.execute("SELECT COUNT(*) FROM messages")
        rows = int(cur.fetchone()[0])  # type: ignore[index]
    return data, index, free, rows


def index_mb(conn: pymysql.connections.Connection, schema: str) -> dict[str, float]:
    """Each index of `messages` in MB (pages allocated, from the last ANALYZE)."""
    with conn.cursor() as cur:
        cur.execute("SELECT index_name, stat_value * @@innodb_page_size "
                    "FROM mysql.innodb_index_stats WHERE database_name = %s "
                    "AND table_name = 'messages' AND stat_name = 'size'",
                    (schema,))
        return {str(r[0]): int(r[1]) / 1e6 for r in cur.fetchall()}


def show_indexes(label: str, sizes: dict[str, float]) -> str:
    return f"  {label:<32} " + ", ".join(f"{k} {v:.0f}" for k, v in sorted(sizes.items()))


def show_bytes(label: str, b: tuple[int, int, int, int]) -> str:
    data, index, free, rows = b
    per = (data + index) / max(rows, 1)
    return (f"{label:<34} {rows:>10,} rows  data {data / 1e6:7.1f} MB + index "
            f"{index / 1e6:7.1f} MB = {(data + index) / 1e6:7.1f} MB  -> {per:5.0f} bytes/row "
            f"(data_free {free / 1e6:.0f} MB)")


def purge(w: World, args: argparse.Namespace,
          alone: tuple[tuple[int, int, int, int], dict[str, float]]) -> None:
    schema = w.config.database.name
    conn = raw_connect(schema)
    before = bytes_line(conn, schema)
    before_ix = index_mb(conn, schema)
    t0 = time.perf_counter()
    done = retention.purge(w.setup, retention.Options(older_than=90 * 86400, chunk=args.purge_chunk,
                                                   pause=0.0, sleep_coef=0.0))
    took = time.perf_counter() - t0
    deleted = sum(p.messages for p in done)
    print(f"\npurge --older-than 90d --chunk-size {args.purge_chunk} --pause 0 --sleep-coef 0: "
          f"{len(done)} newsletters, {deleted:,} rows in {took:.1f} s "
          f"({deleted / max(took, 1e-9):,.0f} rows/s); load {loadavg()}")
    t0 = time.perf_counter()
    length = history_list_length(conn)
    while length > 1000 and time.perf_counter() - t0 < args.purge_wait:
        time.sleep(2)
        length = history_list_length(conn)
    print(f"InnoDB purge: history list length {length} after {time.perf_counter() - t0:.0f} s "
          f"(waited at most {args.purge_wait:.0f} s)")
    after = bytes_line(conn, schema)
    after_ix = index_mb(conn, schema)
    conn.close()
    print(show_bytes("running newsletter alone (before):", alone[0]))
    print(show_bytes("with the finished ones (before):", before))
    print(show_bytes("after purge (rows kept):", after))
    print("MB per index (PRIMARY = the rows):")
    print(show_indexes("running newsletter alone:", alone[1]))
    print(show_indexes("with the finished ones:", before_ix))
    print(show_indexes("after purge:", after_ix))


# ------------------------------------------------------------------------ report

def report(stages: list[Stage]) -> None:
    names = list(stages[0].stats)
    head = "".join(f" | {s.label:>6} hist: median  p99" for s in stages)
    print(f"\n{'statement (ms per call)':<32}{head} | ratio (median / empty)  verdict "
          f"(flat: every history size within {FLAT - 1:.0%})")
    for name in names:
        base = stages[0].stats[name].median_ms
        cells = "".join(f" | {s.stats[name].median_ms:>16.3f} {s.stats[name].p99_ms:>6.2f}"
                        for s in stages)
        ratios = [s.stats[name].median_ms / base for s in stages[1:]]
        grown = [r for s, r in zip(stages[1:], ratios, strict=True) if s.label != "purged"]
        verdict = "flat" if all(r <= FLAT for r in grown) else "NOT FLAT"
        print(f"{name:<32}{cells} | {' '.join(f'{r:.2f}' for r in ratios):<22} {verdict}")
    cpu_head = "".join(f" | {s.label:>6}" for s in stages)
    print(f"\n{'server-thread CPU, us per call':<32}{cpu_head} | ratio (to empty)")
    for name in names:
        base_cpu = stages[0].stats[name].cpu_us
        cells = "".join(f" | {s.stats[name].cpu_us:>6.0f}" for s in stages)
        ratios = [s.stats[name].cpu_us / base_cpu if base_cpu else 0.0 for s in stages[1:]]
        print(f"{name:<32}{cells} | {' '.join(f'{r:.2f}' for r in ratios)}")
    print(f"\n{'index/row reads per call':<32}{cpu_head} | (Handler_read_*, one call)")
    for name in names:
        print(f"{name:<32}" + "".join(f" | {s.reads[name]:>6}" for s in stages))
    print("calls per statement: " + ", ".join(f"{n} {stages[0].stats[n].calls}" for n in names))
    print("load average (1/5/15 min) per stage: "
          + "; ".join(f"{s.label}: {s.load}" for s in stages))
    print("messages table (data + index) per stage: "
          + ", ".join(f"{s.label}: {s.table_mb:.0f} MB" for s in stages))
    print("\nEXPLAIN (table:type:key:rows), per history size:")
    for name in names:
        plans = [s.explain[name] for s in stages]
        if len(set(plans)) == 1:
            print(f"  {name}: {plans[0]}  (same at every size)")
        else:
            print(f"  {name}:")
            for s, plan in zip(stages, plans, strict=True):
                print(f"    {s.label}: {plan}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--millions", type=float, default=1.0,
                    help="subscribers, and rows per finished newsletter, in millions")
    ap.add_argument("--history", type=int, default=3,
                    help="finished newsletters added, one a stage")
    ap.add_argument("--calls", type=int, default=2000,
                    help="timed calls per statement and stage (the assigning UPDATEs, the "
                         "chunk fetches and sort_mark a quarter of it)")
    ap.add_argument("--batch", type=int, default=1000, help="rows per assigned batch")
    ap.add_argument("--outcomes", type=int, default=10, help="rows per send_mark_sent write")
    ap.add_argument("--purge-chunk", type=int, default=10000)
    ap.add_argument("--purge-wait", type=float, default=120.0,
                    help="wait at most this long for InnoDB's purge before measuring bytes")
    ap.add_argument("--no-purge", dest="purge", action="store_false")
    ap.add_argument("--keep", action="store_true", help="keep the database afterwards")
    args = ap.parse_args()
    n = int(args.millions * 1_000_000)
    started = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="sendsystem-growth-") as tmp, \
            bench_database(keep=args.keep) as (config, setup_db):
        conn = raw_connect()
        print(server_line(conn) + f"; load {loadavg()}")
        conn.close()
        # The roles' connection: read_timeout as the long-running roles, PREPAREd statements.
        db = Database(config.database, retry_for=None, read_timeout=config.database.read_timeout)
        world, _ = make_world(config, setup_db, args, n, Path(tmp))
        db.set_slot(world.send_worker)
        db.prepare(["sort_assign", "send_assign", "send_ready_count", "newsletter_unfinished",
                    "backlog_by_worker", "sort_batch_messages", "sort_mark",
                    "send_batch_messages", "send_mark_sent", "batch_insert"])
        world.db = db
        conn = raw_connect(config.database.name)
        alone = (bytes_line(conn, config.database.name), index_mb(conn, config.database.name))
        conn.close()
        stages = []
        for k in range(args.history + 1):
            if k:
                add_history(world, n, k)
            t0 = time.perf_counter()
            stages.append(measure(world, k * n, args))
            print(f"stage {k} ({k * n:,} finished rows): measured in "
                  f"{time.perf_counter() - t0:.0f} s; load {stages[-1].load}")
        if args.purge and args.history:
            purge(world, args, alone)
            # The control: the same statements once the finished rows are gone. Back
            # at the empty table's figures, the growth was the history's; still up,
            # it was the run's own (the box, the rolled-back writes' page splits).
            stages.append(measure(world, 0, args))
            stages[-1].label = "purged"
            print(f"after the purge: measured; load {stages[-1].load}")
        report(stages)
        db.close()
    print(f"\nwhole run {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
