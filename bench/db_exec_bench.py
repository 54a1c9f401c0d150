"""How should hot-path statements execute? PyMySQL interpolation vs server-side PREPARE.

    .venv/bin/python bench/db_exec_bench.py [--rows 4000] [--chunk 200] [--body-bytes 5000]
                                            [--rounds 3] [--keep]

Issue 2 asks that hot paths "use whatever executes fastest (measure it;
PyMySQL interpolates client-side)". This measures, on 127.0.0.1 and on the
real schema, two typical hot-path statements:

* the sort worker's ``sort_mark`` UPDATE by primary key (with a compressed
  body of ``--body-bytes`` random bytes, guarded by batch_id and state), and
* a point SELECT by primary key (``subscriber_get``),

executed per call in these ways (UPDATEs in transactions of ``--chunk``
rows, as the sort worker commits them, so fsync does not swamp the figure):

  (a)  PyMySQL ``cursor.execute`` with client-side interpolation
  (b1) server-side ``PREPARE`` once, then per call ``SET @p1=..`` and
       ``EXECUTE s USING @p1..`` as two round trips
  (b2) the same ``SET ...; EXECUTE ...`` as one multi-statement round trip
       (CLIENT.MULTI_STATEMENTS)

and, for a chunk of UPDATEs in one transaction:

  (c)  ``executemany`` of single-row UPDATEs (what Database.executemany
       does: PyMySQL only folds INSERT ... VALUES, so one round trip per row)
  (d)  one multi-row ``INSERT ... ON DUPLICATE KEY UPDATE`` doing the same
       updates, the batch/state guard kept with IF() and a user variable
  (e)  the chunk's UPDATEs joined with ';' into one multi-statement round trip
  (f)  one ``UPDATE messages JOIN (SELECT .. UNION ALL SELECT ..)`` statement

Every timed UPDATE changes a fresh row (checked by the affected-row count),
so all variants do the same work in InnoDB. Prints microseconds per
statement (per row) for each, the best of ``--rounds`` rounds, and peak RSS.
PyMySQL has no binary protocol, so every variant still sends the values as
escaped text; (b) only moves parsing/planning to the server.
"""

from __future__ import annotations

import argparse
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import pymysql
from common import bench_database, raw_connect, rss_line, server_line
from pymysql.constants import CLIENT

from sendsystem import admin
from sendsystem.db.queries import load_queries, to_server_syntax

_NAMED = re.compile(r"%\((\w+)\)s")

FILL = """
INSERT INTO subscribers (list_id, email, domain, fields)
SELECT %(list_id)s, CONCAT('user', seq, '@example.dk'), 'example.dk',
       JSON_OBJECT('first_name', 'Søren', 'city', 'Køge')
FROM seq_1_to_{n}
"""

# (d): the guard is computed once per row into @own, before any column of the row changes
# (MariaDB evaluates the assignments left to right, and later ones see earlier results).
IODKU = """
INSERT INTO messages (id, newsletter_id, subscriber_id, batch_id, state, body, detail,
                      sort_worker_id)
VALUES {values}
ON DUPLICATE KEY UPDATE
    body = IF(@own := (messages.batch_id <=> VALUES(batch_id) AND messages.state = 'queued'),
              VALUES(body), messages.body),
    detail = IF(@own, VALUES(detail), messages.detail),
    sort_worker_id = IF(@own, VALUES(sort_worker_id), messages.sort_worker_id),
    merged_at = IF(@own, NOW(6), messages.merged_at),
    finished_at = IF(@own, IF(VALUES(state) = 'merged', NULL, NOW(6)), messages.finished_at),
    state = IF(@own, VALUES(state), messages.state),
    batch_id = IF(@own, NULL, messages.batch_id)
"""

# (f): one UPDATE over a derived table of the chunk's values.
JOIN_UPDATE = """
UPDATE messages m JOIN ({rows}) v ON m.id = v.id
SET m.state = v.state, m.body = v.body, m.detail = v.detail, m.sort_worker_id = v.worker,
    m.merged_at = NOW(6), m.finished_at = IF(v.state = 'merged', NULL, NOW(6)),
    m.batch_id = NULL
WHERE m.batch_id = v.batch AND m.state = 'queued'
"""


@dataclass(frozen=True)
class Case:
    label: str
    kind: str  # "update" or "select"
    run: Callable[[Sequence[dict[str, Any]]], int]  # one chunk -> rows affected / fetched


def positional(statement: str, params: dict[str, Any]) -> list[Any]:
    """The parameters in the order of the statement's placeholders (as '?' after PREPARE)."""
    return [params[name] for name in _NAMED.findall(statement)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rows", type=int, default=4000, help="statements per variant per round")
    parser.add_argument("--chunk", type=int, default=200,
                        help="UPDATEs per transaction (the sort worker's CHUNK)")
    parser.add_argument("--body-bytes", type=int, default=5000,
                        help="size of the compressed body written by sort_mark")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    args = parser.parse_args()

    queries = load_queries()
    sort_mark, point_select = queries["sort_mark"], queries["subscriber_get"]
    variants_needing_rows = 7  # a, b1, b2, c, d, e, f each change fresh rows
    total = args.rows * variants_needing_rows * args.rounds + 30  # + the guard check

    with bench_database(keep=args.keep) as (config, db):
        name = config.database.name
        list_id = admin.create_list(db, "bench", "Bench <bench@example.dk>")
        setup = raw_connect(name)
        with setup.cursor() as cur:
            cur.execute(FILL.format(n=int(total)), {"list_id": list_id})
            cur.execute("INSERT INTO templates (name, subject, html) VALUES ('t', 's', 'h')")
            cur.execute("INSERT INTO newsletters (list_id, template_id, subject, html, state) "
                        "VALUES (%s, LAST_INSERT_ID(), 's', 'h', 'running')", (list_id,))
            cur.execute("INSERT INTO messages (newsletter_id, subscriber_id, batch_id) "
                        "SELECT LAST_INSERT_ID(), id, 1 FROM subscribers ORDER BY id")
            cur.execute("SELECT MIN(id), MAX(id) FROM messages")
            lo, hi = cur.fetchone()  # type: ignore[misc]
        setup.close()
        print(f"set-up: {hi - lo + 1:,} queued messages in batch 1; body {args.body_bytes} bytes, "
              f"chunk {args.chunk}, {args.rows} statements per variant, best of {args.rounds}")

        body = os.urandom(args.body_bytes)
        next_id = [int(lo)]

        def fresh_params(n: int) -> list[dict[str, Any]]:
            start = next_id[0]
            next_id[0] += n
            return [{"id": i, "batch": 1, "state": "merged", "body": body, "detail": None,
                     "worker": 7} for i in range(start, start + n)]

        conn = raw_connect(name)
        multi = raw_connect(name, client_flag=CLIENT.MULTI_STATEMENTS)
        cur, mcur = conn.cursor(), multi.cursor()
        update_ps, select_ps = to_server_syntax(sort_mark), to_server_syntax(point_select)
        for c in (cur, mcur):
            c.execute("PREPARE upd FROM %s", (update_ps,))
            c.execute("PREPARE sel FROM %s", (select_ps,))
        n_upd = len(_NAMED.findall(sort_mark))
        set_upd = "SET " + ", ".join(f"@p{i} = %s" for i in range(n_upd))
        using_upd = "EXECUTE upd USING " + ", ".join(f"@p{i}" for i in range(n_upd))

        def a_update(chunk: Sequence[dict[str, Any]]) -> int:
            return sum(cur.execute(sort_mark, p) for p in chunk)

        def b1_update(chunk: Sequence[dict[str, Any]]) -> int:
            done = 0
            for p in chunk:
                cur.execute(set_upd, positional(sort_mark, p))
                done += cur.execute(using_upd)
            return done

        def b2_update(chunk: Sequence[dict[str, Any]]) -> int:
            done = 0
            for p in chunk:
                mcur.execute(f"{set_upd}; {using_upd}", positional(sort_mark, p))
                mcur.nextset()
                done += mcur.rowcount
            return done

        def c_executemany(chunk: Sequence[dict[str, Any]]) -> int:
            return int(cur.executemany(sort_mark, chunk) or 0)

        def d_iodku(chunk: Sequence[dict[str, Any]]) -> int:
            values = ",".join(
                conn.escape((p["id"], 0, 0, p["batch"], p["state"], p["body"], p["detail"],
                             p["worker"])) for p in chunk)
            cur.execute(IODKU.format(values=values))
            # MariaDB counts 2 per updated row in ON DUPLICATE KEY UPDATE.
            return cur.rowcount // 2

        def e_multi(chunk: Sequence[dict[str, Any]]) -> int:
            text = ";\n".join(mcur.mogrify(sort_mark, p) for p in chunk)
            done = mcur.execute(text)
            while mcur.nextset():
                done += mcur.rowcount
            return done

        def f_join(chunk: Sequence[dict[str, Any]]) -> int:
            rows = " UNION ALL ".join(
                "SELECT {} AS id, {} AS batch, {} AS state, {} AS body, {} AS detail, "
                "{} AS worker".format(*(conn.escape(p[k]) for k in
                                        ("id", "batch", "state", "body", "detail", "worker")))
                for p in chunk)
            return int(cur.execute(JOIN_UPDATE.format(rows=rows)))

        def a_select(chunk: Sequence[dict[str, Any]]) -> int:
            for p in chunk:
                cur.execute(point_select, p)
                cur.fetchall()
            return len(chunk)

        def b1_select(chunk: Sequence[dict[str, Any]]) -> int:
            for p in chunk:
                cur.execute("SET @p0 = %s", (p["id"],))
                cur.execute("EXECUTE sel USING @p0")
                cur.fetchall()
            return len(chunk)

        def b2_select(chunk: Sequence[dict[str, Any]]) -> int:
            for p in chunk:
                mcur.execute("SET @p0 = %s; EXECUTE sel USING @p0", (p["id"],))
                mcur.nextset()
                mcur.fetchall()
            return len(chunk)

        cases = [
            Case("(a)  point UPDATE, client-side interpolation", "update", a_update),
            Case("(b1) point UPDATE, SET + EXECUTE (2 round trips)", "update", b1_update),
            Case("(b2) point UPDATE, SET; EXECUTE (1 multi-stmt trip)", "update", b2_update),
            Case("(c)  chunk: executemany of single-row UPDATEs", "update", c_executemany),
            Case("(d)  chunk: one multi-row INSERT .. ON DUP KEY UPDATE", "update", d_iodku),
            Case("(e)  chunk: UPDATEs joined by ';', 1 multi-stmt trip", "update", e_multi),
            Case("(f)  chunk: one UPDATE .. JOIN (SELECT .. UNION ALL ..)", "update", f_join),
            Case("(a)  point SELECT, client-side interpolation", "select", a_select),
            Case("(b1) point SELECT, SET + EXECUTE (2 round trips)", "select", b1_select),
            Case("(b2) point SELECT, SET; EXECUTE (1 multi-stmt trip)", "select", b2_select),
        ]
        best: dict[str, float] = {}
        for _ in range(args.rounds):
            for case in cases:
                if case.kind == "update":
                    params = fresh_params(args.rows)
                else:
                    ids = range(int(lo), int(lo) + args.rows)
                    params = [{"id": i} for i in ids]
                elapsed = 0.0
                for start in range(0, len(params), args.chunk):
                    chunk = params[start:start + args.chunk]
                    conns = (conn, multi)
                    t0 = time.perf_counter()
                    if case.kind == "update":
                        for c in conns:
                            c.begin()
                    done = case.run(chunk)
                    if case.kind == "update":
                        for c in conns:
                            c.commit()
                    elapsed += time.perf_counter() - t0
                    if done != len(chunk):
                        raise SystemExit(f"{case.label}: {done} rows instead of {len(chunk)}")
                us = elapsed / len(params) * 1e6
                best[case.label] = min(best.get(case.label, us), us)

        for case in cases:
            print(f"{case.label:58s} {best[case.label]:8.1f} µs/statement")

        # The set-based variants must keep sort_mark's guard: rows no longer ours stay as
        # they are. Half of a fresh chunk is moved to another batch before each runs.
        for case in (cases[4], cases[5], cases[6]):
            params = fresh_params(10)
            cur.execute("UPDATE messages SET batch_id = 2 WHERE id IN %s",
                        ([p["id"] for p in params[::2]],))
            conn.begin()
            done = case.run(params)
            conn.commit()
            if done != 5:
                raise SystemExit(f"{case.label}: changed {done} rows of 10, 5 were not ours")
        updated = sum(args.rows for c in cases if c.kind == "update") * args.rounds + 15
        cur.execute("SELECT COUNT(*) FROM messages WHERE state = 'merged' AND batch_id IS NULL "
                    "AND LENGTH(body) = %s AND merged_at IS NOT NULL AND sort_worker_id = 7",
                    (args.body_bytes,))
        merged = cur.fetchone()[0]  # type: ignore[index]
        if merged != updated:
            raise SystemExit(f"expected {updated} merged rows, found {merged}")
        print(f"checked: {merged:,} rows merged exactly as sort_mark does; guard kept by (d)-(f)")
        print(server_line(conn))
        for c in (cur, mcur):
            c.close()
        conn.close()
        multi.close()
        print(f"pymysql {pymysql.__version__}; " + rss_line())


if __name__ == "__main__":
    main()
