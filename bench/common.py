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


# ------------------------------------------------------------------ every process's peak RSS

def _status_fields(pid: int) -> dict[str, str]:
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            return dict(line.rstrip("\n").split(":\t", 1) for line in fh if ":\t" in line)
    except OSError:
        return {}


def children_of(pids: set[int]) -> dict[int, int]:
    """{child pid: parent pid} of every live process whose parent is in ``pids``
    (a scan of /proc: this kernel has no /proc/PID/task/TID/children)."""
    found: dict[int, int] = {}
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            with open(f"/proc/{entry.name}/stat", encoding="ascii", errors="replace") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except (OSError, IndexError, ValueError):
            continue
        if ppid in pids:
            found[int(entry.name)] = ppid
    return found


def cpu_ticks(pid: int) -> int | None:
    """utime + stime of a live process (its threads included), in clock ticks. Not its
    children's: they are sampled as processes of their own (counting the children a
    process has reaped too would count them twice)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii", errors="replace") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    return int(fields[11]) + int(fields[12])


def pid_of(command: str) -> int | None:
    """The oldest live process whose command name is ``command`` (e.g. the database)."""
    found = []
    for entry in os.scandir("/proc"):
        if entry.name.isdigit():
            try:
                with open(f"/proc/{entry.name}/comm", encoding="ascii", errors="replace") as fh:
                    if fh.read().strip() == command:
                        found.append(int(entry.name))
            except OSError:
                continue
    return min(found) if found else None


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode("utf-8", "replace")
    except OSError:
        return ""


@dataclass
class PeakMemory:
    """Peak RSS of a set of processes and all their descendants, by pid.

    ``sample({pid: label})`` reads VmHWM (the kernel's high-water mark of the
    resident set since the process started) of each live process and of every
    descendant (labelled "<parent label> / render child" for a
    ``multiprocessing`` spawn child, else its command). VmHWM is a peak, so one
    read shortly before a process exits is exact up to that moment; the caller
    samples periodically (bench/pipeline.py: every 0.25 s) and once just before
    it stops the processes. A restarted role is a new pid, so a new line.
    """

    peak_kb: dict[int, int] = field(default_factory=dict)
    labels: dict[int, str] = field(default_factory=dict)
    # CPU clock ticks (its own and its exited children's) when first and last sampled.
    cpu_first: dict[int, int] = field(default_factory=dict)
    cpu_last: dict[int, int] = field(default_factory=dict)

    def sample(self, roots: dict[int, str]) -> None:
        pending = dict(roots)
        while pending:
            for pid, label in pending.items():
                self.labels.setdefault(pid, label)
                kb = _status_fields(pid).get("VmHWM", "0 kB").split()[0]
                if kb.isdigit() and int(kb):
                    self.peak_kb[pid] = max(self.peak_kb.get(pid, 0), int(kb))
                ticks = cpu_ticks(pid)
                if ticks is not None:
                    self.cpu_first.setdefault(pid, ticks)
                    self.cpu_last[pid] = ticks
            kids = children_of(set(pending))
            pending = {}
            for kid, parent in kids.items():
                cmd = _cmdline(kid)
                what = ("render child" if "multiprocessing" in cmd and "spawn" in cmd
                        and "resource_tracker" not in cmd
                        else "resource tracker" if "resource_tracker" in cmd
                        else cmd.split(" ")[0].rsplit("/", 1)[-1] or "child")
                pending[kid] = f"{self.labels.get(parent, str(parent))} / {what}"

    def cpu_lines(self, messages: int) -> list[str]:
        """CPU time per message of each kind of process between its first and last sample
        (processes of one label, e.g. Postfix's smtpd, summed on one line)."""
        hz = os.sysconf("SC_CLK_TCK")
        used: dict[str, float] = {}
        count: dict[str, int] = {}
        for pid, first in self.cpu_first.items():
            label = self.labels[pid]
            used[label] = used.get(label, 0.0) + (self.cpu_last[pid] - first) / hz
            count[label] = count.get(label, 0) + 1
        out = [f"  {label + (f' (x{count[label]})' if count[label] > 1 else ''):<42} {sec:7.1f} s "
               f"CPU  {sec / max(messages, 1) * 1e6:7.0f} us/msg"
               for label, sec in sorted(used.items()) if sec > 0]
        total = sum(used.values())
        return [*out, f"  {'all of them':<42} {total:7.1f} s CPU  "
                      f"{total / max(messages, 1) * 1e6:7.0f} us/msg (utime+stime of each "
                      "process from /proc/PID/stat, sampled every 0.25 s: one that exits "
                      "between two samples loses at most that)"]

    def lines(self, limit_mb: float = 100.0) -> list[str]:
        out = []
        over = 0
        for pid, kb in sorted(self.peak_kb.items(), key=lambda p: self.labels[p[0]]):
            mb = kb / 1024
            ok = mb < limit_mb
            over += not ok
            out.append(f"  {self.labels[pid]:<38} pid {pid:<7} peak RSS {mb:6.1f} MB  "
                       f"{'ok' if ok else 'OVER'}")
        verdict = (f"  every process under {limit_mb:.0f} MB: "
                   + ("yes" if not over else f"NO ({over} over)")
                   + f" ({len(self.peak_kb)} processes; VmHWM from /proc/PID/status, "
                     "read every 0.25 s and just before SIGTERM)")
        return [*out, verdict]
