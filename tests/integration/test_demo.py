"""`sendsystem demo` end to end (small), its database safety, and its SMTP sink."""

from __future__ import annotations

import os
import secrets
import smtplib
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest

from sendsystem.config import DatabaseConfig
from sendsystem.demo import CountingSink, create_demo_database, drop_demo_database
from sendsystem.errors import UserError
from tests.harness.env import server_settings


def _db_env(name: str) -> dict[str, str]:
    s = server_settings()
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENDSYSTEM_")}
    env.update({"SENDSYSTEM_DB_HOST": str(s["host"]), "SENDSYSTEM_DB_PORT": str(s["port"]),
                "SENDSYSTEM_DB_USER": str(s["user"]), "SENDSYSTEM_DB_PASSWORD": str(s["password"]),
                "SENDSYSTEM_DB_NAME": name})
    return env


def _schemas() -> set[str]:
    conn = pymysql.connect(**server_settings())  # type: ignore[arg-type]
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT schema_name FROM information_schema.schemata")
            return {row[0] for row in cur.fetchall()}
    finally:
        conn.close()


@pytest.fixture
def demo_db() -> Iterator[str]:
    name = f"sendsystem_demo_test_{os.getpid()}_{secrets.token_hex(3)}"
    yield name
    conn = pymysql.connect(**server_settings())  # type: ignore[arg-type]
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


def test_demo_delivers_each_recipient_once(tmp_path: Path, demo_db: str) -> None:
    work = tmp_path / "work"
    proc = subprocess.run(
        [sys.executable, "-m", "sendsystem", "demo", "--recipients", "300",
         "--work-dir", str(work)],
        cwd=tmp_path, env=_db_env(demo_db), capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    out = proc.stdout
    assert "delivered      300 of 300 recipients, checked against the SMTP sink" in out
    assert "duplicates     0   missing 0" in out
    assert "OK - every recipient got exactly one message." in out
    assert "sort-1" in out and "send-2" in out
    report = work / "report.html"
    assert report.exists() and "<svg" in report.read_text(encoding="utf-8")
    assert (work / "config.ini").exists()
    # Not a tty: quiet progress lines, no carriage-return repainting.
    assert "\r" not in proc.stderr
    assert demo_db not in _schemas()  # dropped at the end (no --keep)


def test_demo_never_touches_a_database_it_did_not_create(demo_db: str) -> None:
    s = server_settings()
    conn = pymysql.connect(**s)  # type: ignore[arg-type]
    with conn.cursor() as cur:
        cur.execute(f"CREATE DATABASE `{demo_db}`")
        cur.execute(f"CREATE TABLE `{demo_db}`.precious (id INT)")
    conn.close()
    config = DatabaseConfig(host=str(s["host"]), port=int(str(s["port"])),
                            user=str(s["user"]), password=str(s["password"]), name=demo_db)
    with pytest.raises(UserError, match="was not created by `sendsystem demo`"):
        create_demo_database(config)
    drop_demo_database(config)
    assert demo_db in _schemas()
    # Its own (marked) database is replaced on the next run, then dropped.
    conn = pymysql.connect(**s)  # type: ignore[arg-type]
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE `{demo_db}`")
    conn.close()
    create_demo_database(config)
    create_demo_database(config)
    drop_demo_database(config)
    assert demo_db not in _schemas()


def test_counting_sink_counts_by_recipient() -> None:
    with CountingSink() as sink:
        with smtplib.SMTP(sink.relay.host, sink.relay.port, timeout=5) as smtp:
            smtp.sendmail("a@example.com", ["X@example.com", "y@example.com"],
                          b"Subject: one\r\n\r\n.leading dot\r\nbody\r\n")
            smtp.sendmail("a@example.com", ["x@example.com"], b"Subject: two\r\n\r\n")
            smtp.rset()
            smtp.noop()
        counts = sink.counts()
        assert counts == {"x@example.com": 2, "y@example.com": 1}
        assert sink.messages == 2
        assert sink.tally.connections == 1


def test_counting_sink_counts_by_message_id_and_a_subclass_can_refuse() -> None:
    class Refusing(CountingSink):
        def rcpt_reply(self, address: str) -> str | None:
            return "421 4.3.2 try later" if address == "no@example.com" else None

    with Refusing() as sink:
        with smtplib.SMTP(sink.relay.host, sink.relay.port, timeout=5) as smtp:
            for to in ("x@example.com", "y@example.com"):
                smtp.sendmail("a@example.com", [to], b"Message-ID: <1.2.sig@b.example>\r\n"
                              b"Subject: one\r\n\r\nMessage-ID: <not@header>\r\n")
            smtp.sendmail("a@example.com", ["z@example.com"], b"Subject: none\r\n\r\nx\r\n")
        with pytest.raises(smtplib.SMTPRecipientsRefused), \
                smtplib.SMTP(sink.relay.host, sink.relay.port, timeout=5) as smtp:
            smtp.sendmail("a@example.com", ["no@example.com"], b"Subject: refused\r\n\r\n")
        assert sink.counts_by_message_id() == {"<1.2.sig@b.example>": 2, "(none)": 1}
        assert "no@example.com" not in sink.counts()
        assert sink.messages == 3
