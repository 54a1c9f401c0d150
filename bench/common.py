"""Shared helpers for the bench/ scripts: a throw-away database, a timer, peak RSS.

Benchmarks are run by hand (never as timed assertions in tests). Each script
creates its own database on the machine's MariaDB (127.0.0.1:3306, root, or
SENDSYSTEM_BENCH_DB_HOST/_PORT/_USER/_PASSWORD), named
``sendsystem_bench_<pid>_<random>``, and drops it when it exits, unless
``--keep`` asked to look at it afterwards.
"""

from __future__ import annotations

import contextlib
import logging
import os
import resource
import secrets
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any

import pymysql

from sendsystem.config import Config, DatabaseConfig
from sendsystem.db import Database

log = logging.getLogger(__name__)


def server_settings() -> dict[str, Any]:
    env = os.environ
    return {
        "host": env.get("SENDSYSTEM_BENCH_DB_HOST", "127.0.0.1"),
        "port": int(env.get("SENDSYSTEM_BENCH_DB_PORT", "3306")),
        "user": env.get("SENDSYSTEM_BENCH_DB_USER", "root"),
        "password": env.get("SENDSYSTEM_BENCH_DB_PASSWORD", ""),
    }


def raw_connect(database: str | None = None, **extra: Any) -> pymysql.connections.Connection:
    """A plain PyMySQL connection (autocommit, utf8mb4) for set-up and driver measurements."""
    return pymysql.connect(**server_settings(), database=database, charset="utf8mb4",
                           autocommit=True, **extra)


@contextlib.contextmanager
def bench_database(*, keep: bool = False) -> Iterator[tuple[Config, Database]]:
    """A fresh database with the current schema; dropped at exit (even on error)."""
    name = f"sendsystem_bench_{os.getpid()}_{secrets.token_hex(3)}"
    s = server_settings()
    config = Config(database=DatabaseConfig(host=s["host"], port=s["port"], user=s["user"],
                                            password=s["password"], name=name),
                    source="(bench)")
    try:
        raw_connect().close()
    except pymysql.err.OperationalError as exc:
        sys.exit(f"MariaDB is not reachable at {s['host']}:{s['port']}: {exc}. "
                 "Start it (`make test` does) and retry.")
    db = Database(config.database)
    try:
        db.init_schema()
        yield config, db
    finally:
        db.close()
        if keep:
            print(f"kept database {name}")
        else:
            conn = raw_connect()
            with conn.cursor() as cur:
                cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
            conn.close()


def peak_rss_mb(who: int = resource.RUSAGE_SELF) -> float:
    """Peak resident set size in MB (Linux reports ru_maxrss in KiB)."""
    return resource.getrusage(who).ru_maxrss / 1024


def rss_line() -> str:
    return (f"peak RSS: self {peak_rss_mb():.0f} MB, "
            f"children {peak_rss_mb(resource.RUSAGE_CHILDREN):.0f} MB")


@dataclass
class Timer:
    """Wall-clock sections: ``with t.section("import"): ...``; then ``t.seconds["import"]``."""

    seconds: dict[str, float] = field(default_factory=dict)

    @contextlib.contextmanager
    def section(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        try:
            yield
        finally:
            self.seconds[name] = time.perf_counter() - start


def table_bytes(conn: pymysql.connections.Connection, schema: str, table: str
                ) -> tuple[int, int, int]:
    """(data_length, index_length, table_rows estimate) after refreshing the statistics."""
    with conn.cursor() as cur:
        cur.execute(f"ANALYZE TABLE `{schema}`.`{table}`")
        cur.fetchall()
        cur.execute(
            "SELECT data_length, index_length, table_rows FROM information_schema.tables "
            "WHERE table_schema = %s AND table_name = %s", (schema, table))
        row = cur.fetchone()
    assert row is not None
    return int(row[0]), int(row[1]), int(row[2])


def server_line(conn: pymysql.connections.Connection) -> str:
    """The server settings that matter most for these numbers, for the record."""
    with conn.cursor() as cur:
        cur.execute("SELECT VERSION(), @@innodb_buffer_pool_size, "
                    "@@innodb_flush_log_at_trx_commit")
        row = cur.fetchone()
    assert row is not None
    return (f"server: MariaDB {row[0]}, innodb_buffer_pool_size {int(row[1]) >> 20} MB, "
            f"innodb_flush_log_at_trx_commit {row[2]}; cpus: {os.cpu_count()}")
