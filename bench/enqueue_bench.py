"""Enqueue speed: ``admin.enqueue`` creating the message rows for N subscribers.

    .venv/bin/python bench/enqueue_bench.py [--subscribers 1000000] [--newsletters 2]
                                            [--unsubscribed 0.0] [--keep]

Set-up (not timed against the target): a list of N subscribers bulk-inserted
with one INSERT ... SELECT from MariaDB's SEQUENCE engine (seq_1_to_N),
with 5 merge fields in the JSON `fields` column, a share of them
unsubscribed if asked; and a template. Then ``admin.enqueue`` runs
``--newsletters`` times on that list: the first into an empty `messages`
table, the next ones into a table that already holds the earlier
newsletters' rows (the steady state of a busy server). Each enqueue creates
its rows with one set-based INSERT ... SELECT (newsletter_release_messages).

Prints seconds and rows/s per enqueue, the size of `messages`
(information_schema data_length + index_length) and so the bytes the
database spends per message row, and peak RSS of this process (the work
happens in mariadbd, so it stays small). Target (issue 2): 1,000,000 rows
in <= 30 s.
"""

from __future__ import annotations

import argparse
import tempfile
from pathlib import Path

from common import Timer, bench_database, raw_connect, rss_line, server_line, table_bytes

from sendsystem import admin

# Built server-side so a million rows never cross the wire at set-up.
FILL_SUBSCRIBERS = """
INSERT INTO subscribers (list_id, email, domain, fields, status)
SELECT %(list_id)s,
       CONCAT(ELT(1 + seq %% 7, 'anders', 'mette', 'soeren', 'karen', 'jens', 'freja', 'ole'),
              '.', ELT(1 + seq %% 5, 'jensen', 'nielsen', 'hansen', 'pedersen', 'moeller'),
              seq, '@', ELT(1 + seq %% 6, 'gmail.com', 'hotmail.com', 'outlook.dk',
                                  'yahoo.dk', 'mail.dk', 'jubii.dk')),
       ELT(1 + seq %% 6, 'gmail.com', 'hotmail.com', 'outlook.dk', 'yahoo.dk', 'mail.dk',
           'jubii.dk'),
       JSON_OBJECT(
           'first_name', ELT(1 + seq %% 7, 'Anders', 'Mette', 'Søren', 'Karen', 'Jens',
                             'Freja', 'Ole'),
           'last_name', ELT(1 + seq %% 5, 'Jensen', 'Nielsen', 'Hansen', 'Pedersen', 'Møller'),
           'city', ELT(1 + seq %% 8, 'København', 'Aarhus', 'Odense', 'Aalborg', 'Esbjerg',
                       'Køge', 'Hørsholm', 'Rønne'),
           'plan', ELT(1 + seq %% 4, 'gratis', 'basis', 'plus', 'premium'),
           'signup_date', DATE_FORMAT(DATE_ADD('2015-01-01', INTERVAL seq %% 3650 DAY),
                                      '%%Y-%%m-%%d')),
       IF(RAND(seq) < %(unsubscribed)s, 'unsubscribed', 'active')
FROM seq_1_to_{n}
"""

HTML = ("<p>Hej {{ first_name }} fra {{ city }}!</p>"
        "<p><a href='{{ unsubscribe_url }}'>Afmeld</a></p>")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--newsletters", type=int, default=2,
                        help="enqueue this many newsletters, one after the other")
    parser.add_argument("--unsubscribed", type=float, default=0.0,
                        help="share of subscribers set to unsubscribed (not enqueued)")
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    args = parser.parse_args()
    n = args.subscribers

    with tempfile.TemporaryDirectory(prefix="sendsystem-bench-") as tmp, \
            bench_database(keep=args.keep) as (config, db):
        name = config.database.name
        timer = Timer()
        list_id = admin.create_list(db, "bench", "Nyhedsbrevet <nyheder@example.dk>")
        html = Path(tmp) / "t.html"
        html.write_text(HTML, encoding="utf-8")
        admin.add_template(db, "bench", "Nyt fra os, {{ first_name }}", html, None)

        conn = raw_connect(name)
        with timer.section("setup"), conn.cursor() as cur:
            cur.execute(FILL_SUBSCRIBERS.format(n=int(n)),
                        {"list_id": list_id, "unsubscribed": args.unsubscribed})
        print(f"set-up: {n:,} subscribers bulk-inserted in {timer.seconds['setup']:.1f} s")

        created_total = 0
        for i in range(1, args.newsletters + 1):
            with timer.section(f"enqueue{i}"):
                nid, created = admin.enqueue(db, "bench", "bench")
            secs = timer.seconds[f"enqueue{i}"]
            created_total += created
            before = "empty" if i == 1 else f"{created_total - created:,} rows already"
            print(f"enqueue #{i} (newsletter {nid}, messages table {before}): "
                  f"{created:,} rows in {secs:.2f} s = {created / secs:,.0f} rows/s")

        data, index, _ = table_bytes(conn, name, "messages")
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*) FROM messages")
            rows = int(cur.fetchone()[0])  # type: ignore[index]
        print(f"messages: {rows:,} rows, data {data / 1e6:.1f} MB + index {index / 1e6:.1f} MB "
              f"= {(data + index) / 1e6:.1f} MB -> {(data + index) / max(rows, 1):.0f} "
              f"bytes/row ({data / max(rows, 1):.0f} data + {index / max(rows, 1):.0f} index)")
        print(server_line(conn))
        conn.close()
        first = timer.seconds["enqueue1"] * 1_000_000 / max(n, 1)
        verdict = "OK" if first <= 30 else "SLOWER THAN TARGET"
        print(f"target: 1,000,000 rows in <= 30 s -> {verdict} "
              f"(first enqueue scaled to 1M: {first:.1f} s)")
        print(rss_line())


if __name__ == "__main__":
    main()
