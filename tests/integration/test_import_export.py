"""`list import` of large files and `list export`, against a real MariaDB.

Small sort runs (``extsort.RUN_CHARS``) make a 200,000-row file go through
many runs and a multi-level merge, so repeated addresses meet across run
boundaries as they do in a file of ten million. Memory is measured in
bench/import_bench.py, not here.
"""

from __future__ import annotations

import csv
import os
import socket
import stat
import tempfile
from pathlib import Path
from typing import Any

import pytest

from sendsystem import admin, extsort, history, importer, liststats
from sendsystem.bounce import recipients
from sendsystem.config import BounceConfig
from sendsystem.db import Database
from sendsystem.errors import DatabaseUnavailable, ImportRowsError, UserError
from tests.harness.env import Env
from tests.harness.helpers import sql

BIG = 200_000


@pytest.fixture
def news(env: Env, monkeypatch: pytest.MonkeyPatch) -> Env:
    admin.create_list(env.db, "news", "Nyheder <news@example.com>")
    monkeypatch.setattr(extsort, "RUN_CHARS", 1 << 20)
    monkeypatch.setattr(extsort, "FAN_IN", 4)
    # The import's temporary directories go here, so the tests can see them go.
    temp = env.tmp / "tmp"
    temp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(temp))
    return env


def write_big(path: Path, n: int, extra: str = "") -> Path:
    with path.open("w", encoding="utf-8", newline="") as fh:
        fh.write("email,first_name,city\n")
        for i in range(n):
            fh.write(f"user{i}@example.com,Bruger {i},Århus\n")
        fh.write(extra)
    return path


def count(env: Env, table: str = "subscribers") -> int:
    return int(sql(env, f"SELECT COUNT(*) AS n FROM {table}")[0]["n"])


def subscribers(env: Env, list_name: str) -> list[dict[str, Any]]:
    return sql(env, "SELECT s.email, s.fields, s.status, s.left_at, s.left_reason "
                    "FROM subscribers s JOIN lists l ON l.id = s.list_id "
                    "WHERE l.name = %s ORDER BY s.email", (list_name,))


def test_strict_import_with_a_bad_row_at_the_end_of_a_large_file_leaves_nothing(
        news: Env) -> None:
    path = write_big(news.tmp / "big.csv", BIG, extra="not-an-address,Bo,Odense\n")
    seen: list[tuple[int, str]] = []
    with pytest.raises(ImportRowsError) as info:
        admin.import_csv(news.db, "news", path, on_problem=lambda ln, why: seen.append((ln, why)))
    assert info.value.problems == [(BIG + 2, "'not-an-address' must contain exactly one @")]
    assert seen == info.value.problems and info.value.count == 1
    assert count(news) == 0
    assert list((news.tmp / "tmp").iterdir()) == []  # the sort's runs are gone
    row = sql(news, "SELECT state, rows_read, bad_rows, rows_written FROM imports")[0]
    assert row == {"state": "failed", "rows_read": BIG + 1, "bad_rows": 1, "rows_written": 0}


def test_repeats_across_runs_are_named_with_the_first_line_in_line_order(news: Env) -> None:
    extra = ("USER7@example.com,again,x\n"            # line BIG+2 repeats line 9
             "user199999@EXAMPLE.com,again,x\n"       # BIG+3 repeats BIG+1
             "broken,x,y\n"                           # BIG+4
             "user7@example.com,third,x\n")           # BIG+5 repeats line 9 too
    path = write_big(news.tmp / "big.csv", BIG, extra=extra)
    seen: list[tuple[int, str]] = []
    with pytest.raises(ImportRowsError):
        admin.import_csv(news.db, "news", path, on_problem=lambda ln, why: seen.append((ln, why)))
    assert [line for line, _ in seen] == [BIG + 2, BIG + 3, BIG + 4, BIG + 5]
    assert seen[0][1] == "USER7@example.com already appears on line 9"
    assert seen[1][1] == f"user199999@example.com already appears on line {BIG + 1}"
    assert seen[3][1] == "user7@example.com already appears on line 9"
    assert count(news) == 0


def test_skip_invalid_imports_the_good_rows_first_of_each_address(news: Env) -> None:
    extra = "user5@example.com,Second,Odense\nbad@,x,y\nnew@example.com,New,Vejle\n"
    path = write_big(news.tmp / "big.csv", BIG, extra=extra)
    result = admin.import_csv(news.db, "news", path, skip_invalid=True)
    assert (result.imported, result.total, result.bad_count) == (BIG + 1, BIG + 3, 2)
    assert [line for line, _ in result.bad] == [BIG + 2, BIG + 3]
    assert count(news) == BIG + 1
    first = sql(news, "SELECT fields FROM subscribers WHERE email = 'user5@example.com'")
    assert first[0]["fields"] == '{"first_name": "Bruger 5", "city": "Århus"}'
    assert sql(news, "SELECT state, rows_written FROM imports") == [
        {"state": "done", "rows_written": BIG + 1}]


def test_chunks_stay_short(news: Env, monkeypatch: pytest.MonkeyPatch) -> None:
    sizes: list[int] = []
    real = Database.execute_rows

    def spy(self: Database, name: str, rows: Any) -> int:
        sizes.append(len(rows))
        return real(self, name, rows)
    monkeypatch.setattr(Database, "execute_rows", spy)
    admin.import_csv(news.db, "news", write_big(news.tmp / "big.csv", BIG))
    assert sum(sizes) == BIG and max(sizes) <= importer.CHUNK_MAX and len(sizes) > 10


def test_a_write_that_stops_half_way_is_finished_by_running_it_again(
        news: Env, monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture) -> None:
    path = write_big(news.tmp / "big.csv", 30_000)
    monkeypatch.setattr(importer, "CHUNK_FIRST", 1000)
    monkeypatch.setattr(importer, "CHUNK_MAX", 1000)
    real = Database.execute_rows
    calls = 0

    def failing(self: Database, name: str, rows: Any) -> int:
        nonlocal calls
        calls += 1
        if calls == 4:
            raise DatabaseUnavailable("MariaDB at 127.0.0.1 is unreachable; try again later.")
        return real(self, name, rows)
    monkeypatch.setattr(Database, "execute_rows", failing)
    with pytest.raises(DatabaseUnavailable):
        admin.import_csv(news.db, "news", path)
    assert count(news) == 3000  # three chunks, each complete
    row = sql(news, "SELECT state, rows_written, message FROM imports")[0]
    assert row["state"] == "failed" and row["rows_written"] == 3000
    assert "stopped after writing 3,000 of 30,000 rows" in row["message"]
    assert "Run the same import again to finish it" in caplog.text
    monkeypatch.setattr(Database, "execute_rows", real)
    assert admin.import_csv(news.db, "news", path).imported == 30_000
    assert count(news) == 30_000


def test_a_second_import_waits_for_a_live_one_and_reports_a_dead_one(
        news: Env, caplog: pytest.LogCaptureFixture) -> None:
    path = write_big(news.tmp / "s.csv", 10)
    list_id = admin.get_list(news.db, "news")["id"]
    live = news.db.insert("import_begin", {"list_id": list_id, "file": "/data/live.csv",
                                           "host": "elsewhere", "pid": 1})
    with pytest.raises(UserError, match=r"Another import into 'news' is running: /data/live\.csv"):
        admin.import_csv(news.db, "news", path)
    # Silent for longer than STALE_AFTER (another host: only its silence tells).
    sql(news, "UPDATE imports SET state = 'writing', rows_to_write = 500, rows_written = 200, "
              "heartbeat_at = NOW(6) - INTERVAL 1 HOUR WHERE id = %s", (live,))
    # On this host with a pid that is gone: stopped at once.
    news.db.execute("import_begin", {"list_id": list_id, "file": "/data/dead.csv",
                                     "host": socket.gethostname(),
                                     "pid": 2 ** 22 + 12345})
    assert admin.import_csv(news.db, "news", path).imported == 10
    states = sql(news, "SELECT file, state FROM imports ORDER BY id")
    assert [r["state"] for r in states] == ["interrupted", "interrupted", "done"]
    assert "stopped after writing 200 of 500 rows" in caplog.text
    assert "/data/dead.csv" in caplog.text and "nothing of it was imported" in caplog.text


def test_import_file_status_never_reactivates_and_sets_when_and_why(news: Env) -> None:
    first = news.tmp / "a.csv"
    first.write_text("email,name\nann@example.com,Ann\nbo@example.com,Bo\ncy@example.com,Cy\n",
                     encoding="utf-8")
    admin.import_csv(news.db, "news", first)
    ids = {r["email"]: r["id"] for r in sql(news, "SELECT id, email FROM subscribers")}
    list_id = admin.get_list(news.db, "news")["id"]
    recipients.unsubscribe(news.db, ids["cy@example.com"], list_id,
                           via=history.UNSUBSCRIBE_LINK)
    second = news.tmp / "b.csv"
    second.write_text("email,name,status,left_at,left_reason\n"
                      "ann@example.com,Ann 2,,,\n"                              # stays active
                      "bo@example.com,Bo 2,bounced,2020-01-02 03:04:05,old bounce\n"
                      "cy@example.com,Cy 2,active,,\n"                          # never back
                      "dot@example.com,Dot,unsubscribed,,\n"                    # new, left
                      "eve@example.com,Eve,complained,2021-05-06 07:08:09,spam\n",
                      encoding="utf-8")
    admin.import_csv(news.db, "news", second)
    rows = {r["email"]: r for r in subscribers(news, "news")}
    assert rows["ann@example.com"]["status"] == "active"
    assert rows["ann@example.com"]["fields"] == '{"name": "Ann 2"}'
    bo = rows["bo@example.com"]
    assert (bo["status"], str(bo["left_at"]), bo["left_reason"]) == (
        "bounced", "2020-01-02 03:04:05", "old bounce")
    cy = rows["cy@example.com"]
    assert (cy["status"], cy["left_reason"], cy["fields"]) == (
        "unsubscribed", "unsubscribe link", '{"name": "Cy 2"}')
    dot = rows["dot@example.com"]
    assert (dot["status"], dot["left_at"], dot["left_reason"]) == ("unsubscribed", None, None)
    assert (rows["eve@example.com"]["status"], rows["eve@example.com"]["left_reason"]) == (
        "complained", "spam")
    # An active subscriber whose file row says unsubscribed without saying when: now.
    third = news.tmp / "c.csv"
    third.write_text("email,name,status\nann@example.com,Ann 3,unsubscribed\n"
                     "bo@example.com,Bo 3,complained\n", encoding="utf-8")
    admin.import_csv(news.db, "news", third)
    rows = {r["email"]: r for r in subscribers(news, "news")}
    ann = rows["ann@example.com"]
    assert (ann["status"], ann["left_reason"]) == ("unsubscribed", "import")
    assert ann["left_at"] is not None
    assert rows["bo@example.com"]["status"] == "bounced"  # already left: kept with its reason
    assert rows["bo@example.com"]["left_reason"] == "old bounce"
    # Every status the imports set left its history event (one each; none for a
    # subscription that had already left), so list stats agrees with the table.
    events = sql(news, "SELECT s.email, e.from_status, e.to_status, e.reason "
                       "FROM subscriber_events e JOIN subscribers s ON s.id = e.subscriber_id "
                       "ORDER BY s.email")
    assert [tuple(e.values()) for e in events] == [
        ("ann@example.com", "active", "unsubscribed", "import"),
        ("bo@example.com", "active", "bounced", "old bounce"),
        ("cy@example.com", "active", "unsubscribed", "unsubscribe link"),
        ("dot@example.com", "active", "unsubscribed", "import"),
        ("eve@example.com", "active", "complained", "spam")]
    report = liststats.list_stats(news.db, "news", verify=True)
    assert not [n for n in report["notes"] if "disagree" in n]


def test_a_large_import_of_left_subscribers_agrees_with_list_stats(news: Env) -> None:
    """Many chunks, fresh list and then an existing one, left rows mixed in."""
    path = news.tmp / "left.csv"
    with path.open("w", encoding="utf-8") as fh:
        fh.write("email,status\n")
        for i in range(30_000):
            fh.write(f"u{i}@example.com,{'unsubscribed' if i % 7 == 0 else ''}\n")
    admin.import_csv(news.db, "news", path)
    with path.open("w", encoding="utf-8") as fh:
        fh.write("email,status\n")
        for i in range(40_000):
            fh.write(f"U{i}@Example.com,{'bounced' if i % 5 == 0 else ''}\n")
    admin.import_csv(news.db, "news", path)
    left = sql(news, "SELECT status, COUNT(*) AS n FROM subscribers GROUP BY status")
    events = sql(news, "SELECT to_status, COUNT(*) AS n FROM subscriber_events GROUP BY 1")
    assert {r["status"]: r["n"] for r in left if r["status"] != "active"} == {
        r["to_status"]: r["n"] for r in events}
    report = liststats.list_stats(news.db, "news", verify=True)
    assert not [n for n in report["notes"] if "disagree" in n]


def test_reimport_writes_only_what_changes(news: Env) -> None:
    path = write_big(news.tmp / "big.csv", 20_000)
    assert admin.import_csv(news.db, "news", path).unchanged == 0
    again = admin.import_csv(news.db, "news", path)
    assert (again.imported, again.unchanged) == (20_000, 20_000)
    before = sql(news, "SELECT MAX(updated_at) AS t FROM subscribers")[0]["t"]
    edited = news.tmp / "edited.csv"
    edited.write_text("email,first_name,city,status\n"
                      "user1@example.com,Bruger 1,Århus,unsubscribed\n"   # same fields, leaves
                      "user2@example.com,Bruger 2,Vejle,\n"               # moved
                      "user3@example.com,Bruger 3,Århus,\n"               # as it was
                      "new@example.com,Ny,Køge,\n", encoding="utf-8")
    result = admin.import_csv(news.db, "news", edited)
    assert (result.imported, result.unchanged) == (4, 1)
    changed = sql(news, "SELECT email, status, fields FROM subscribers WHERE updated_at > %s "
                        "ORDER BY email", (before,))
    assert [(r["email"], r["status"]) for r in changed] == [
        ("new@example.com", "active"), ("user1@example.com", "unsubscribed"),
        ("user2@example.com", "active")]


def test_status_changes_record_when_and_why(news: Env) -> None:
    path = news.tmp / "s.csv"
    path.write_text("email\n" + "".join(f"u{i}@example.com\n" for i in range(4)), "utf-8")
    admin.import_csv(news.db, "news", path)
    ids = {r["email"]: int(r["id"]) for r in sql(news, "SELECT id, email FROM subscribers")}
    list_id = int(admin.get_list(news.db, "news")["id"])
    limits = BounceConfig()
    recipients.unsubscribe(news.db, ids["u0@example.com"], list_id,
                           via=history.UNSUBSCRIBE_EMAIL)
    recipients.record_bounce(news.db, limits, email="u1@example.com", kind="hard",
                             evidence="smtp", subscriber_id=ids["u1@example.com"],
                             status="5.1.1")
    recipients.record_complaint(news.db, limits, email="u2@example.com", evidence="webhook",
                                message_id=None, subscriber_id=ids["u2@example.com"])
    news.db.execute("subscriber_set_status", {"id": ids["u3@example.com"],
                                              "status": "unsubscribed", "reason": "admin"})
    rows = {r["email"]: r for r in subscribers(news, "news")}
    assert {e: r["left_reason"] for e, r in rows.items()} == {
        # The history's reasons (sendsystem/history.py): one vocabulary.
        "u0@example.com": "unsubscribe email",
        "u1@example.com": "hard bounce 5.1.1",
        "u2@example.com": "complaint (webhook)",
        "u3@example.com": "admin"}
    assert all(r["left_at"] is not None for r in rows.values())
    # A complaint after an unsubscribe replaces it; a second complaint changes nothing.
    recipients.record_complaint(news.db, limits, email="u0@example.com", evidence="verp",
                                message_id=None, subscriber_id=ids["u0@example.com"])
    again = recipients.record_complaint(news.db, limits, email="u0@example.com",
                                        evidence="webhook", message_id=None,
                                        subscriber_id=ids["u0@example.com"])
    assert not again.status_changed
    u0 = subscribers(news, "news")[0]
    assert (u0["status"], u0["left_reason"]) == ("complained", "complaint (ARF)")


TRICKY = [
    ("anne@example.com", {"navn": "Anne", "by": "Århus", "note": ""}),
    ("o'brien@example.com", {"navn": "O'Brien", "by": "Cork, IE", "note": 'say "hi"\\n'}),
    ("=cmd@example.com", {"navn": "=1+1", "by": "-x", "note": "@SUM(A1)\ttab"}),
    ("zoe@bücher.example", {"navn": "Zoë 😀", "by": "Zürich", "note": "x" * 1000}),
]


def test_export_then_import_round_trips_exactly(news: Env) -> None:
    src = news.tmp / "src.csv"
    with src.open("w", encoding="utf-8", newline="") as fh:
        out = csv.writer(fh)
        out.writerow(["email", "navn", "by", "note"])
        for email, fields in TRICKY:
            out.writerow([email, *fields.values()])
        for i in range(25_000):
            out.writerow([f"u{i}@example.com", f"N{i}", "Vejle", ""])
    admin.import_csv(news.db, "news", src)
    ids = {r["email"]: int(r["id"]) for r in sql(news, "SELECT id, email FROM subscribers")}
    list_id = int(admin.get_list(news.db, "news")["id"])
    recipients.unsubscribe(news.db, ids["anne@example.com"], list_id, via="web")
    recipients.record_bounce(news.db, BounceConfig(), email="u7@example.com", kind="hard",
                             evidence="smtp", subscriber_id=ids["u7@example.com"],
                             status="5.1.1")
    recipients.record_complaint(news.db, BounceConfig(), email="u8@example.com",
                                evidence="webhook", message_id=None,
                                subscriber_id=ids["u8@example.com"])
    exported = news.tmp / "news.csv"
    code, out, err = news.cli("list", "export", "news", str(exported))
    assert code == 0, err
    assert "Exported 25004 subscribers of 'news'" in err and out == ""
    assert stat.S_IMODE(os.stat(exported).st_mode) == 0o600
    with exported.open(encoding="utf-8", newline="") as fh:
        header = next(csv.reader(fh))
    assert header == ["email", "navn", "by", "note", "status", "left_at", "left_reason"]

    admin.create_list(news.db, "copy", "Kopi <copy@example.com>")
    code, out, err = news.cli("list", "import", "copy", str(exported))
    assert code == 0, err
    assert subscribers(news, "copy") == subscribers(news, "news")
    copy = {r["email"]: r for r in subscribers(news, "copy")}
    assert copy["u8@example.com"]["left_reason"] == "complaint (webhook)"
    assert copy["anne@example.com"]["status"] == "unsubscribed"
    # And the copy exports to the same bytes (to stdout this time).
    code, again, err = news.cli("list", "export", "copy")
    assert code == 0, err
    assert again == exported.read_text(encoding="utf-8")


def test_export_status_filter_and_mixed_fields(news: Env) -> None:
    first = news.tmp / "a.csv"
    first.write_text("email,name,plan\na@example.com,A,gold\nb@example.com,B,free\n", "utf-8")
    admin.import_csv(news.db, "news", first)
    second = news.tmp / "b.csv"
    second.write_text("email,name,Status,field:status,city\nc@example.com,C,,vip,Vejle\n"
                      "d@example.com,D,unsubscribed,,Køge\n", "utf-8")
    admin.import_csv(news.db, "news", second)
    code, out, err = news.cli("list", "export", "news")
    assert code == 0, err
    assert out.splitlines() == [
        "email,name,plan,field:status,city,status,left_at,left_reason",
        "a@example.com,A,gold,,,active,,",
        "b@example.com,B,free,,,active,,",
        "c@example.com,C,,vip,Vejle,active,,",
        "d@example.com,D,,,Køge,unsubscribed,,"]
    code, out, err = news.cli("list", "export", "news", "--status", "unsubscribed")
    assert code == 0, err
    assert out.splitlines() == ["email,name,field:status,city,status,left_at,left_reason",
                                "d@example.com,D,,Køge,unsubscribed,,"]
    code, out, err = news.cli("list", "export", "news", "--status", "bounced")
    assert (code, out) == (0, "email,status,left_at,left_reason\n")
    code, out, err = news.cli("list", "export", "nope")
    assert code == 1 and "no list named 'nope'" in err


def test_export_for_a_spreadsheet(news: Env) -> None:
    src = news.tmp / "s.csv"
    src.write_text("email,formula\n=x@example.com,=HYPERLINK(\"http://evil\")\n", "utf-8")
    admin.import_csv(news.db, "news", src)
    out_file = news.tmp / "sheet.csv"
    code, _, err = news.cli("list", "export", "news", str(out_file), "--for-spreadsheet")
    assert code == 0, err
    assert out_file.read_text(encoding="utf-8") == (
        "\ufeffemail,formula,status,left_at,left_reason\n"
        "'=x@example.com,\"'=HYPERLINK(\"\"http://evil\"\")\",active,,\n")


def test_cli_names_every_bad_line_and_leaves_no_file_on_failure(news: Env) -> None:
    path = news.tmp / "s.csv"
    path.write_text("email,name\n" + "".join(f"bad{i},x\n" for i in range(120)) +
                    "good@example.com,x\n", "utf-8")
    code, out, err = news.cli("list", "import", "news", str(path))
    assert code == 1
    assert all(f"line {i + 2}: 'bad{i}' must contain exactly one @" in err for i in range(120))
    assert "error: 120 of 121 rows are invalid; nothing was imported." in err
    assert "Traceback" not in err and count(news) == 0
    code, out, err = news.cli("list", "import", "news", str(path), "--skip-invalid")
    assert code == 0 and "Imported 1 of 121 rows into 'news'." in out
    assert "line 121: 'bad119'" in err and "Skipped 120 invalid rows" in err
    # An export to a directory that does not exist fails without a trace.
    code, out, err = news.cli("list", "export", "news", str(news.tmp / "no" / "x.csv"))
    assert code == 1 and "cannot write there" in err


def session(db: Database, statement: str, *args: str) -> Any:
    """Run a raw statement on the Database's own connection (test set-up only)."""
    def op(cur: Any) -> Any:
        cur.execute(statement, args or None)
        return cur.fetchall()
    # The session's sql_mode is what is under test: the Database's own connection.
    return db._run(op)


def test_execute_rows_quotes_exactly_in_both_sql_modes(news: Env) -> None:
    list_id = int(admin.get_list(news.db, "news")["id"])
    values = ["it's", "back\\slash\\", "\\'", "''", "%s %(x)s", "ø😀", "tab\tand\x1a", ""]
    for mode, prefix in (("", "a"), ("NO_BACKSLASH_ESCAPES", "b")):
        session(news.db, "SET SESSION sql_mode = %s", mode)
        assert session(news.db, "SELECT @@SESSION.sql_mode AS m")[0]["m"] == mode
        rows = [(list_id, f"{prefix}{i}@example.com", "example.com", v, "active", None, None)
                for i, v in enumerate(values)]
        assert news.db.execute_rows("subscribers_import", rows) == len(values)
        stored = sql(news, "SELECT fields FROM subscribers WHERE email LIKE %s ORDER BY id",
                     (f"{prefix}%",))
        assert [r["fields"] for r in stored] == values, mode
    news.db.close()


def test_connections_use_the_schemas_collation(news: Env) -> None:
    """With the server's utf8mb4_general_ci, an export chunk's `status = 'active'`
    did not fix the column for its ORDER BY, and MariaDB read the list's whole
    index range and sorted it for every chunk (0.74 s a chunk at ten million
    subscribers: an export was quadratic). The plan only shows at that size
    (bench/scale.py); here, that the session has the schema's collation."""
    assert session(news.db, "SELECT @@collation_connection AS c")[0]["c"] == "utf8mb4_unicode_ci"
    assert session(news.db, "SELECT @@collation_database AS c")[0]["c"] == "utf8mb4_unicode_ci"
