"""`list stats` and `subscriber forget` on a big list; the workers' blocklist lookup.

    .venv/bin/python bench/liststats_bench.py [--subscribers 1000000] [--newsletters 10]
                                              [--messages 100000] [--blocklist 5000] [--keep]

Set-up (server-side, with MariaDB's SEQUENCE engine, so no row crosses the
wire): a list of N subscribers who joined over two years, 8 % of them
unsubscribed, 3 % bounced and 0.2 % complained, each with the history event
a real change writes (a few weeks after joining, a third of the unsubscribes
attributed to a newsletter); ``--newsletters`` newsletters of ``--messages``
sent messages each (with some verified bounces and complaints);
``--blocklist`` blocked addresses and a tenth as many domains.

Then, timed: ``liststats.list_stats`` with the default 26 weeks: the first
report of the list (it counts the whole history and keeps the completed
weeks), the next one (kept weeks plus the current one), with newsletters, and
with ``--verify``; the JSON, text and HTML
renderings, one ``forget`` of an address that has messages and bounces, and
a sort worker's fetch of 2,000 messages with the blocklist check as it is
now (three EXISTS) and as it was (an OR in one subquery). Prints seconds
and peak RSS.
"""

from __future__ import annotations

import argparse
import json
import time

from common import Timer, bench_database, raw_connect, rss_line, server_line

from sendsystem import admin, forget, liststats
from sendsystem.reports.list_html import render_list_html
from sendsystem.reports.list_text import format_list_stats

FILL = """
INSERT INTO subscribers (list_id, email, domain, fields, status, created_at)
SELECT %(list_id)s, CONCAT('user', seq, '@', ELT(1 + seq %% 5, 'gmail.com', 'hotmail.com',
                           'outlook.dk', 'yahoo.dk', 'mail.dk')),
       ELT(1 + seq %% 5, 'gmail.com', 'hotmail.com', 'outlook.dk', 'yahoo.dk', 'mail.dk'),
       JSON_OBJECT('first_name', 'Anders', 'city', 'Odense'),
       CASE WHEN RAND(seq) < 0.08 THEN 'unsubscribed' WHEN RAND(seq) < 0.11 THEN 'bounced'
            WHEN RAND(seq) < 0.112 THEN 'complained' ELSE 'active' END,
       TIMESTAMPADD(MINUTE, -(seq %% (730 * 1440)), NOW(6))
FROM seq_1_to_{n}
"""
# What a real change writes: active -> status, a few weeks after joining (not in the future).
EVENTS = """
INSERT INTO subscriber_events (list_id, subscriber_id, at, from_status, to_status, reason,
                               newsletter_id)
SELECT s.list_id, s.id, LEAST(NOW(6), TIMESTAMPADD(DAY, 1 + s.id %% 60, s.created_at)),
       'active', s.status,
       CASE s.status WHEN 'unsubscribed' THEN ELT(1 + s.id %% 3, 'List-Unsubscribe one-click',
                                                  'unsubscribe link', 'unsubscribe email')
                     WHEN 'bounced' THEN 'hard bounce 5.1.1' ELSE 'complaint (ARF)' END,
       IF(s.status = 'unsubscribed' AND s.id %% 3 = 0, %(newsletter)s, NULL)
FROM subscribers s WHERE s.list_id = %(list_id)s AND s.status <> 'active'
"""
MESSAGES = """
INSERT INTO messages (newsletter_id, subscriber_id, state, finished_at, reply_code, reply)
SELECT %(newsletter)s, s.id, 'sent', NOW(6), 250, '250 2.0.0 Ok: queued as 4XyZ'
FROM subscribers s WHERE s.list_id = %(list_id)s AND s.id <= %(messages)s
"""
BOUNCES = """
INSERT INTO bounces (newsletter_id, message_id, subscriber_id, email, kind, verified, evidence,
                     status, diagnostic)
SELECT m.newsletter_id, m.id, m.subscriber_id, s.email, IF(m.id %% 7 = 0, 'complaint', 'hard'),
       1, 'verp', '5.1.1', CONCAT('550 5.1.1 <', s.email, '>: User unknown')
FROM messages m JOIN subscribers s ON s.id = m.subscriber_id
WHERE m.newsletter_id = %(newsletter)s AND m.id %% %(every)s = 0
"""
BLOCK = """
INSERT IGNORE INTO blocklist (pattern, reason)
SELECT CONCAT('blocked', seq, '@example.org'), 'bench' FROM seq_1_to_{n}
UNION ALL SELECT CONCAT('@blocked', seq, '.example'), 'bench' FROM seq_1_to_{d}
UNION ALL SELECT CONCAT('user', seq * 97, '@', ELT(1 + (seq * 97) % 5, 'gmail.com',
                        'hotmail.com', 'outlook.dk', 'yahoo.dk', 'mail.dk')), 'bench'
          FROM seq_1_to_{d}
"""
OLD_BLOCK_CHECK = """
SELECT m.id, m.subscriber_id, s.list_id, s.email, s.fields, s.status,
       (SELECT COUNT(*) FROM blocklist b
        WHERE b.pattern = s.email OR b.pattern = CONCAT('@', s.domain)) AS blocked
FROM messages m JOIN subscribers s ON s.id = m.subscriber_id
WHERE m.batch_id = %(batch)s AND m.state = 'queued'
ORDER BY m.id LIMIT %(limit)s
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subscribers", type=int, default=1_000_000)
    parser.add_argument("--newsletters", type=int, default=10)
    parser.add_argument("--messages", type=int, default=100_000,
                        help="sent messages per newsletter")
    parser.add_argument("--blocklist", type=int, default=5000)
    parser.add_argument("--keep", action="store_true", help="do not drop the database")
    args = parser.parse_args()
    n = args.subscribers

    with bench_database(keep=args.keep) as (config, db):
        name = config.database.name
        timer = Timer()
        list_id = admin.create_list(db, "bench", "Nyhedsbrevet <nyheder@example.dk>")
        conn = raw_connect(name)
        with timer.section("setup"), conn.cursor() as cur:
            cur.execute("INSERT INTO templates (id, name, subject, html) "
                        "VALUES (1, 't', 'Nyt', '<p>Hej</p>')")
            cur.execute(FILL.format(n=int(n)), {"list_id": list_id})
            nids = []
            for i in range(args.newsletters):
                cur.execute("INSERT INTO newsletters (list_id, template_id, subject, html, state, "
                            "total, released_at, finished_at) VALUES (%s, 1, %s, '<p>Hej</p>', "
                            "'done', %s, TIMESTAMPADD(WEEK, %s, NOW(6)), "
                            "TIMESTAMPADD(WEEK, %s, NOW(6)))",
                            (list_id, f"Nyhedsbrev {i + 1}", args.messages,
                             i - args.newsletters, i - args.newsletters))
                nid = int(cur.lastrowid)
                nids.append(nid)
                cur.execute(MESSAGES, {"newsletter": nid, "list_id": list_id,
                                       "messages": args.messages})
                cur.execute(BOUNCES, {"newsletter": nid, "every": 90 + 10 * (i % 4)})
            cur.execute(EVENTS, {"list_id": list_id, "newsletter": nids[-1] if nids else None})
            cur.execute(BLOCK.format(n=args.blocklist, d=max(args.blocklist // 10, 1)))
            cur.execute("ANALYZE TABLE subscribers, subscriber_events, messages, bounces, "
                        "blocklist")
            cur.fetchall()
            cur.execute("SELECT COUNT(*) FROM subscriber_events")
            events = int(cur.fetchone()[0])  # type: ignore[index]
        print(f"set-up: {n:,} subscribers, {events:,} history events, {len(nids)} newsletters "
              f"x {args.messages:,} messages, {args.blocklist:,}+ blocked addresses "
              f"in {timer.seconds['setup']:.1f} s")

        list_stats = liststats.list_stats
        runs = (("first report: counts the whole history (--newsletters 0)", 0, False),
                ("next report: kept weekly counts (--newsletters 0)", 0, False),
                (f"next report with {len(nids)} newsletters", args.newsletters, False),
                ("the same with --verify (counts the table too)", args.newsletters, True))
        for label, letters, verify in runs:
            with timer.section(label):
                facts = list_stats(db, "bench", newsletters=letters, verify=verify)
            print(f"list stats, 26 weeks, {label}: {timer.seconds[label]:.2f} s")
        with timer.section("render"):
            size = (len(json.dumps(facts)), len(format_list_stats(facts)),
                    len(render_list_html(facts)))
        print(f"render JSON/text/HTML: {timer.seconds['render'] * 1000:.0f} ms "
              f"({size[0]:,} / {size[1]:,} / {size[2]:,} bytes)")
        print(f"  now: {facts['now']}")

        with conn.cursor() as cur:  # someone with messages and the most bounces
            cur.execute("SELECT email FROM bounces GROUP BY email ORDER BY COUNT(*) DESC, email "
                        "LIMIT 1")
            who = str(cur.fetchone()[0])  # type: ignore[index]
        with timer.section("forget"):
            report = forget.forget(db, who)
        print(f"forget one address: {timer.seconds['forget']:.2f} s "
              f"({report.subscriptions} subscription, rows {report.rows})")

        with conn.cursor() as cur:
            cur.execute("INSERT INTO workers (id, host, role, name) VALUES (1, 'h', 'sort', 'w')")
            cur.execute("INSERT INTO batches (id, role, worker_id, newsletter_id) "
                        "VALUES (1, 'sort', 1, %s)", (nids[0],))
            cur.execute("UPDATE messages SET state = 'queued', batch_id = 1 "
                        "WHERE newsletter_id = %s ORDER BY id LIMIT 2000", (nids[0],))
            params = {"batch": 1, "limit": 2000}
            for label, statement in (("now (three EXISTS)", db.sql("sort_batch_messages")),
                                     ("before (OR in one subquery)", OLD_BLOCK_CHECK)):
                cur.execute(statement, params)
                cur.fetchall()
                start = time.perf_counter()
                for _ in range(3):
                    cur.execute(statement, params)
                    cur.fetchall()
                took = (time.perf_counter() - start) / 3
                print(f"sort worker fetch of 2,000 messages, blocklist check {label}: "
                      f"{took * 1000:.0f} ms")
        print(server_line(conn))
        conn.close()
        print(rss_line())


if __name__ == "__main__":
    main()
