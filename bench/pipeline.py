"""The whole pipeline on this machine: both balancers, K sort and M send workers, a sink.

    .venv/bin/python bench/pipeline.py                          # 20,000 x 22 KB, 2+2, smtp-sink
    .venv/bin/python bench/pipeline.py -n 1000000               # series per 100,000
    .venv/bin/python bench/pipeline.py --no-ceiling             # without the smtp-source run
    .venv/bin/python bench/pipeline.py --relay postfix          # through a private Postfix
    .venv/bin/python bench/pipeline.py --sink counting          # the demo's sink (counts)
    .venv/bin/python bench/pipeline.py --sort 1 --send 1 -n 50000
    .venv/bin/python bench/pipeline.py --send-only --cpu 0      # ONE send worker, one core
    .venv/bin/python bench/pipeline.py --profile send-worker    # cProfile that role

Every role is a real `python -m sendsystem` subprocess with its own --name, on a
throw-away database (bench/common.py). The newsletter is the demo's (sendsystem/demo/):
10-article HTML + text, 5 merge fields, a small PDF: ~22 KB on the wire.

Prints: end-to-end messages/s (from the newsletter's release to its last sent
message), per-stage rates (sort: release -> last merged; send: first -> last
sent); the throughput series: msgs/s of each 100,000 deliveries (N/10 for
fewer than 1,000,000 recipients; --series-step) counted where the messages
arrive (bench/sinks.py: smtp-sink's own -c counter, the counting sink's
accept, or the private Postfix's discard lines), the first step timed from
the release; the peak RSS of every process of the run (both balancers, each
sort worker and its render child and multiprocessing resource tracker, each
send worker; a restarted role is a new line) against the target "each under
100 MB": VmHWM from /proc/PID/status, read every 0.25 s and once just before
SIGTERM (VmHWM is the kernel's high-water mark, so the only thing missed is
growth in the last 0.25 s or during shutdown); and the database cost per
message.

The ceiling, after the pipeline in the same run (--no-ceiling skips it):
Postfix's smtp-source against the same smtp-sink, as many sessions as the
pipeline opens (send workers x [sending] connections), kept open (-d), the
pipeline's message size as the sink measured it, enough messages for about
12 s (calibrated): its msgs/s and pipeline / ceiling. Not with --sink
counting (a Python sink is no C ceiling).

--relay postfix: instead of a sink, a private Postfix instance
(tests/harness/postfix.py, the tests' code) on a free 127.0.0.1 port that
queues each message as Postfix always does (cleanup fsyncs the queue file
before answering 250) and delivers it with discard(8). The pipeline sends
through it; then smtp-source measures Postfix alone (msgs/s accepted, same
message size by qmgr's size=, same sessions); printed with the ratio (goal
>= 60 %). The instance is stopped and its directory and queue removed at the
end, also on Ctrl-C or SIGTERM.

--send-only: merge everything first (sort roles only), measure the table with
every body stored, then run the send balancer and ONE send worker (pinned with
taskset to --cpu) against the sink: the single-send-worker rate and RSS
(issue 4: >= 900 msgs/s on one core with 22 KB messages, RSS <= 100 MB), and
its CPU time per message (user + system of the whole process, every thread,
from /proc between the first and the last poll that saw messages sent): on a
shared machine the rate depends on what else runs, the CPU per message much less.

Tuning: the shipped defaults ([balancer] and [sending] of sendsystem/config.py,
the values config.ini.example documents); the options override them.
"""

from __future__ import annotations

import argparse
import contextlib
import logging
import os
import pstats
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from common import PeakMemory, bench_database, pid_of, raw_connect, server_line, table_bytes
from sinks import (
    ClockedCountingSink,
    DeliveryClock,
    PostfixInstance,
    SmtpSink,
    ceiling,
    postfix_relay,
    series_lines,
    series_step,
    wait_drained,
)

from sendsystem import admin, stats
from sendsystem.config import BalancerConfig, Config, Relay, SendingConfig, load_config
from sendsystem.db import Database
from sendsystem.demo import (
    LIST_NAME,
    TEMPLATE_NAME,
    Cluster,
    CountingSink,
    RoleSpec,
    cluster_settings,
    install_sample,
    wait_registered,
    write_config,
)

log = logging.getLogger(__name__)


# ------------------------------------------------------------------ sinks

@dataclass
class Endpoint:
    """Where the run's messages go, and how they are counted there (bench/sinks.py)."""

    kind: str                                  # smtp-sink | counting | postfix
    relay: Relay
    clock: DeliveryClock
    size_mark: Callable[[], tuple[int, int]]   # (messages, bytes) counted so far
    settle: Callable[[], None]                 # until what was sent is counted
    sink: CountingSink | None = None
    postfix: PostfixInstance | None = None
    pid: int | None = None                     # the C sink, or Postfix's master

    def roots(self) -> dict[int, str]:
        """The processes besides the roles whose CPU the run costs: the database, the sink."""
        out = {}
        db = pid_of("mariadbd") or pid_of("mysqld")
        if db is not None:
            out[db] = "MariaDB (every client of it)"
        pid = self.postfix.master_pid() if self.postfix is not None else self.pid
        if pid is not None:
            out[pid] = "Postfix (master + daemons)" if self.postfix is not None else self.kind
        return out

    @property
    def size_unit(self) -> str:
        return {"smtp-sink": "wire bytes (commands + DATA, rchar of smtp-sink)",
                "counting": "DATA bytes",
                "postfix": "queue file bytes (qmgr size=)"}[self.kind]


@contextlib.contextmanager
def open_sink(kind: str, count: bool = True) -> Iterator[Endpoint]:
    if kind == "smtp-sink":
        with SmtpSink(count) as smtp:
            yield Endpoint(kind, smtp.relay, smtp.clock,
                           lambda: (smtp.clock.count, smtp.wire_bytes()),
                           lambda: time.sleep(0.3),
                           pid=smtp.proc.pid if smtp.proc is not None else None)
    elif kind == "counting":
        with ClockedCountingSink() as sink:
            yield Endpoint(kind, sink.relay, sink.clock,
                           lambda: (sink.tally.messages, sink.tally.bytes),
                           lambda: time.sleep(0.3), sink=sink)
    else:
        with postfix_relay() as (relay, counter, instance):
            def settle() -> None:
                wait_drained(instance)
                time.sleep(0.3)  # the maillog tail catches up
            yield Endpoint(kind, relay, counter.clock, counter.size_mark, settle,
                           postfix=instance)


# ------------------------------------------------------------------ set-up and measuring

_B = BalancerConfig()
_S = SendingConfig()


@dataclass(frozen=True)
class Tuning:
    """What the benchmark may tune; by default the shipped defaults (issue 17: the
    benchmark runs with the defaults, so a figure is what an installation gets)."""

    horizon: float = _B.horizon_seconds
    tick: float = _B.tick_seconds
    batch_min: int = _B.batch_min
    batch_max: int = _B.batch_max
    probe: int = _B.probe_batch
    heartbeat: float = _B.heartbeat_interval
    heartbeat_timeout: float = _B.heartbeat_timeout
    connections: int = _S.connections
    per_connection: int = _S.messages_per_connection
    window: int = _S.unconfirmed_window

    def overrides(self) -> dict[str, dict[str, object]]:
        return {"balancer": {"horizon_seconds": self.horizon, "tick_seconds": self.tick,
                             "batch_min": self.batch_min, "batch_max": self.batch_max,
                             "probe_batch": self.probe, "heartbeat_interval": self.heartbeat,
                             "heartbeat_timeout": self.heartbeat_timeout},
                "sending": {"connections": self.connections,
                            "messages_per_connection": self.per_connection,
                            "unconfirmed_window": self.window}}


def tuning_args(ap: argparse.ArgumentParser) -> None:
    d = Tuning()
    ap.add_argument("--horizon", type=float, default=d.horizon, help="[balancer] horizon_seconds")
    ap.add_argument("--tick", type=float, default=d.tick, help="[balancer] tick_seconds")
    ap.add_argument("--batch-min", type=int, default=d.batch_min)
    ap.add_argument("--batch-max", type=int, default=d.batch_max)
    ap.add_argument("--probe", type=int, default=d.probe, help="[balancer] probe_batch")
    ap.add_argument("--heartbeat", type=float, default=d.heartbeat,
                    help="[balancer] heartbeat_interval")
    ap.add_argument("--heartbeat-timeout", type=float, default=d.heartbeat_timeout,
                    help="[balancer] heartbeat_timeout")
    ap.add_argument("--connections", type=int, default=d.connections,
                    help="[sending] connections per relay")
    ap.add_argument("--per-connection", type=int, default=d.per_connection,
                    help="[sending] messages_per_connection")
    ap.add_argument("--window", type=int, default=d.window,
                    help="[sending] unconfirmed_window (0: the connections)")


def tuning_from(args: argparse.Namespace) -> Tuning:
    return Tuning(horizon=args.horizon, tick=args.tick, batch_min=args.batch_min,
                  batch_max=args.batch_max, probe=args.probe, heartbeat=args.heartbeat,
                  heartbeat_timeout=args.heartbeat_timeout, connections=args.connections,
                  per_connection=args.per_connection, window=args.window)


def prepare(config: Config, db: Database, work: Path, relay: Relay, tuning: Tuning,
            n: int) -> Path:
    """List + template + attachment in the bench database; the cluster's config.ini."""
    install_sample(db, work, n)
    return write_config(work / "config.ini",
                        cluster_settings(config.database, work, [relay], **tuning.overrides()))


def enqueue(db: Database, work: Path) -> tuple[int, int]:
    return admin.enqueue(db, LIST_NAME, TEMPLATE_NAME, attachments=(work / "katalog.pdf",))


def interpreter_for(profile: str | None, cpu_for: dict[str, int], work: Path
                    ) -> Any:
    def interpreter(role: RoleSpec) -> list[str]:
        prefix: list[str] = []
        if role.command in cpu_for:
            prefix = ["taskset", "-c", str(cpu_for[role.command])]
        if profile == role.command:
            return [*prefix, sys.executable, "-m", "cProfile", "-o",
                    str(work / f"{role.command}-{role.name}.prof")]
        return [*prefix, sys.executable]
    return interpreter


def follow(db: Database, cluster: Cluster, nid: int, total: int, until: tuple[str, ...],
           timeout: float, on_poll: Any = None) -> float:
    """Poll until ``total`` messages are in the ``until`` states; the seconds it took."""
    started = time.monotonic()
    last_print = 0.0
    while True:
        c = stats.counts(db, nid)
        cluster.sample_memory()
        if on_poll is not None:
            on_poll(c)
        done = sum(c[s] for s in until)
        now = time.monotonic()
        if now - last_print >= 5:
            last_print = now
            print(f"  {now - started:5.1f}s  " + " ".join(f"{k}={v}" for k, v in c.items() if v),
                  flush=True)
        if done >= total:
            return now - started
        dead = cluster.revive(max_restarts=1000)
        if dead:
            role, code = dead[0]
            raise SystemExit(f"{role.command} {role.name} keeps exiting ({code}):\n"
                             f"{cluster.tail(role)}")
        if now - started > timeout:
            raise SystemExit(f"timed out after {timeout:.0f}s: {dict(c)}")
        time.sleep(0.25)


def cpu_seconds(pid: int) -> float | None:
    """User + system CPU of a live process and all its threads (None: it is gone)."""
    try:
        with open(f"/proc/{pid}/stat", encoding="ascii") as fh:
            fields = fh.read().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None
    # Fields 14 and 15 of proc(5); the list starts at field 3 (state).
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class CpuPerMessage:
    """CPU time of one role process per message, between the first and the last
    poll that saw messages done (start-up and the idle tail are left out)."""

    def __init__(self, cluster: Cluster, role: RoleSpec) -> None:
        self.cluster = cluster
        self.role = role
        self.pid: int | None = None
        self.first: tuple[float, int] | None = None
        self.last: tuple[float, int] | None = None

    def sample(self, done: int) -> None:
        proc = self.cluster.current(self.role)
        if proc is None or not proc.alive():
            return
        if proc.pid != self.pid:  # (re)started: measure this process only
            self.pid, self.first, self.last = proc.pid, None, None
        cpu = cpu_seconds(proc.pid)
        if cpu is None or done <= 0:
            return
        if self.first is None:
            self.first = (cpu, done)
        elif self.last is None or done > self.last[1]:
            self.last = (cpu, done)

    def line(self) -> str:
        if self.first is None or self.last is None or self.last[1] <= self.first[1]:
            return "  CPU per message: not measured (too short a run)"
        cpu = self.last[0] - self.first[0]
        n = self.last[1] - self.first[1]
        return (f"  CPU per message: {cpu / n * 1e6:,.0f} us ({cpu:.2f} s user+system, "
                f"every thread, for {n:,} messages)")


def stage_times(name: str, nid: int) -> dict[str, float]:
    """From the rows themselves: release, sort span, send span (seconds)."""
    conn = raw_connect(name)
    try:
        with conn.cursor() as cur:
            cur.execute(
                "SELECT TIMESTAMPDIFF(MICROSECOND, n.released_at, MAX(m.merged_at)) / 1e6,"
                "       TIMESTAMPDIFF(MICROSECOND, MIN(m.merged_at), MAX(m.merged_at)) / 1e6,"
                "       TIMESTAMPDIFF(MICROSECOND, MIN(m.finished_at), MAX(m.finished_at)) / 1e6,"
                "       TIMESTAMPDIFF(MICROSECOND, n.released_at, MAX(m.finished_at)) / 1e6,"
                "       TIMESTAMPDIFF(MICROSECOND, n.released_at, MIN(m.finished_at)) / 1e6 "
                "FROM messages m JOIN newsletters n ON n.id = m.newsletter_id "
                "WHERE m.newsletter_id = %s GROUP BY n.released_at", (nid,))
            row = cur.fetchone()
    finally:
        conn.close()
    assert row is not None
    keys = ("release_to_last_merged", "sort_span", "send_span", "end_to_end",
            "release_to_first_sent")
    return {k: float(v or 0) for k, v in zip(keys, row, strict=True)}


def body_bytes(name: str, nid: int) -> tuple[int, int]:
    """(messages holding a body, their stored body bytes)."""
    conn = raw_connect(name)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT COUNT(*), COALESCE(SUM(LENGTH(body)), 0) FROM messages "
                        "WHERE newsletter_id = %s AND body IS NOT NULL", (nid,))
            row = cur.fetchone()
    finally:
        conn.close()
    assert row is not None
    return int(row[0]), int(row[1])


def table_line(name: str, label: str) -> str:
    conn = raw_connect()
    try:
        data, index, _estimate = table_bytes(conn, name, "messages")
        with conn.cursor() as cur:
            cur.execute(f"SELECT COUNT(*) FROM `{name}`.messages")
            got = cur.fetchone()
            assert got is not None
            rows = int(got[0])
    finally:
        conn.close()
    per = (data + index) / rows if rows else 0.0
    return (f"messages table {label}: {data / 1e6:.1f} MB data + {index / 1e6:.1f} MB index "
            f"for {rows:,} rows = {per:,.0f} bytes/message")


def restart_lines(cluster: Cluster) -> list[str]:
    return [f"  RESTARTED {r.role.command} {r.role.name} (exit {r.code}): {r.reason[:200]}"
            for r in cluster.restarts]


def rss_lines(cluster: Cluster) -> list[str]:
    lines = restart_lines(cluster)
    by_role: dict[str, list[int]] = {}
    for role, kb in cluster.peak_rss_kb.items():
        by_role.setdefault(role.command, []).append(kb)
    return lines + [f"  {cmd:<14} peak RSS " + ", ".join(f"{kb / 1024:.0f}" for kb in kbs)
                    + " MB" for cmd, kbs in sorted(by_role.items())]


def print_profiles(work: Path, role: str, limit: int = 30) -> None:
    for path in sorted(work.glob(f"{role}-*.prof")):
        print(f"\n== cProfile {path.name} (tottime) ==")
        pstats.Stats(str(path)).sort_stats("tottime").print_stats(limit)
        print(f"== cProfile {path.name} (cumulative) ==")
        pstats.Stats(str(path)).sort_stats("cumulative").print_stats(limit)


def worker_shares(db: Database, nid: int) -> list[str]:
    facts = stats.newsletter_stats(db, nid)
    lines = []
    for role in ("sort", "send"):
        ws = [w for w in facts["workers"] if w["role"] == role]
        total = sum(w["messages"] for w in ws) or 1
        lines.append(f"  {role} shares: " + ", ".join(
            f"{w['name']} {w['messages']} ({w['messages'] / total:.0%})" for w in ws))
    return lines


# ------------------------------------------------------------------ the two modes

def role_roots(cluster: Cluster) -> dict[int, str]:
    """{pid: "command name"} of the live role processes (PeakMemory adds their children)."""
    return {proc.pid: f"{proc.command} {proc.name}" for proc in cluster.procs if proc.alive()}


def run_pipeline(args: argparse.Namespace, config: Config, db: Database, work: Path) -> None:
    tuning = tuning_from(args)
    kind = "postfix" if args.relay == "postfix" else args.sink
    with open_sink(kind) as ep:
        config_path = prepare(config, db, work, ep.relay, tuning, args.recipients)
        roles = ([RoleSpec("sort-balancer", "b1"), RoleSpec("send-balancer", "b1")]
                 + [RoleSpec("sort-worker", f"sort-{i + 1}") for i in range(args.sort)]
                 + [RoleSpec("send-worker", f"send-{i + 1}") for i in range(args.send)])
        cluster = Cluster(config_path, roles, work / "logs", log_level="WARNING",
                          interpreter=interpreter_for(args.profile, {}, work))
        cluster.start()
        memory = PeakMemory()
        peak_body = [0, 0]

        extra = ep.roots()   # CPU only: their peak RSS is not this run's
        cpu = PeakMemory()
        cpu.sample(extra)

        def on_poll(c: dict[str, int]) -> None:
            memory.sample(role_roots(cluster))
            cpu.sample(extra)
            if c["merged"] > peak_body[0]:
                peak_body[:] = list(body_bytes(config.database.name, nid))

        try:
            wait_registered(Database(load_config(config_path, env={}).database), cluster)
            size0 = ep.size_mark()
            nid, total = enqueue(db, work)
            released = time.monotonic()  # the rows are committed: sorting can start
            base = ep.clock.count
            wall = follow(db, cluster, nid, total, ("sent", "failed", "skipped", "bounced"),
                          args.timeout, on_poll)
        finally:
            memory.sample(role_roots(cluster))
            codes = cluster.stop()
        ep.settle()
        cpu.sample(extra)
        size1 = ep.size_mark()
        msg_size = (size1[1] - size0[1]) / max(size1[0] - size0[0], 1)
        t = stage_times(config.database.name, nid)
        c = stats.counts(db, nid)
        n = c["sent"]
        e2e = n / t["end_to_end"]
        target = "relay=postfix (private, queue + discard)" if kind == "postfix" else \
            f"sink={kind}"
        print(f"\nrecipients={args.recipients} sort={args.sort} send={args.send} "
              f"{target} {tuning}")
        print(f"states: {dict((k, v) for k, v in c.items() if v)}   exit codes: "
              f"{sorted(set(codes.values()), key=str)}")
        if ep.sink is not None:
            got = ep.sink.counts()
            dup = sum(v - 1 for v in got.values() if v > 1)
            print(f"sink: {ep.sink.messages} messages, {len(got)} recipients, {dup} duplicates, "
                  f"{ep.sink.tally.bytes / max(ep.sink.messages, 1) / 1024:.1f} KB average")
        print(f"END TO END: {e2e:,.0f} msgs/s  ({n} sent in "
              f"{t['end_to_end']:.2f} s from release to last sent; wall {wall:.1f} s)")
        print(f"  sort stage: {n / t['release_to_last_merged']:,.0f} msgs/s (release -> last "
              f"merged {t['release_to_last_merged']:.2f} s)")
        print(f"  send stage: {n / t['send_span']:,.0f} msgs/s (first -> last sent "
              f"{t['send_span']:.2f} s; first sent {t['release_to_first_sent']:.2f} s after "
              "release)")
        step = args.series_step or series_step(args.recipients)
        where = {"postfix": "discarded by the private Postfix", "smtp-sink": "counted at smtp-sink",
                 "counting": "counted at the counting sink"}[kind]
        print(f"throughput per {step:,} delivered recipients ({where}; the first step "
              "from the release):")
        for line in series_lines(ep.clock, released, base, ep.clock.count - base, step):
            print(line)
        print(f"  delivered at the {'relay' if kind == 'postfix' else 'sink'}: "
              f"{ep.clock.count - base:,}; message size {msg_size:,.0f} {ep.size_unit}")
        for line in worker_shares(db, nid) + restart_lines(cluster):
            print(line)
        print("peak RSS of every process of the run (target: each under 100 MB):")
        for line in memory.lines(100.0):
            print(line)
        print("CPU per delivered message, by process (from the release to the end):")
        memory.cpu_first.update(cpu.cpu_first)
        memory.cpu_last.update(cpu.cpu_last)
        memory.labels.update(cpu.labels)
        for line in memory.cpu_lines(n):
            print(line)
        if peak_body[0]:
            print(f"stored merged body while merged: {peak_body[1] / peak_body[0]:,.0f} "
                  f"bytes/message (sampled at {peak_body[0]:,} merged)")
        print(table_line(config.database.name, "after the run (bodies purged)"))
        if args.no_ceiling:
            print("ceiling: skipped (--no-ceiling)")
        elif kind == "counting":
            print("ceiling: skipped (smtp-source is measured against smtp-sink or Postfix; "
                  "use --sink smtp-sink)")
        else:
            sessions = args.ceiling_sessions or args.send * tuning.connections
            ceil = ceiling(ep.relay.port, sessions, msg_size, ep.size_mark,
                           seconds=args.ceiling_seconds, settle=ep.settle)
            what = ("POSTFIX ALONE (smtp-source -> private Postfix, accepted)"
                    if kind == "postfix" else "C CEILING (smtp-source -> the same smtp-sink)")
            print(f"{what}: {ceil.run.rate:,.0f} msgs/s  ({ceil.run.messages:,} messages in "
                  f"{ceil.run.seconds:.1f} s, {sessions} sessions kept open, -l "
                  f"{ceil.run.payload:,}: {ceil.size:,.0f} {ep.size_unit} vs the pipeline's "
                  f"{msg_size:,.0f})")
            goal = "  (goal >= 60 %)" if kind == "postfix" else ""
            print(f"RATIO pipeline / {'Postfix alone' if kind == 'postfix' else 'ceiling'}: "
                  f"{e2e / ceil.run.rate:.1%}  ({e2e:,.0f} / {ceil.run.rate:,.0f}){goal}")
    if args.profile:
        print_profiles(work, args.profile)


def run_send_only(args: argparse.Namespace, config: Config, db: Database, work: Path) -> None:
    tuning = tuning_from(args)
    with open_sink(args.sink, count=False) as ep:
        relay, sink = ep.relay, ep.sink
        config_path = prepare(config, db, work, relay, tuning, args.recipients)
        nid, total = enqueue(db, work)
        sorters = Cluster(config_path, [RoleSpec("sort-balancer", "b1")]
                          + [RoleSpec("sort-worker", f"sort-{i + 1}") for i in range(2)],
                          work / "logs", log_level="WARNING")
        sorters.start()
        try:
            merge_wall = follow(db, sorters, nid, total, ("merged", "skipped", "failed"),
                                args.timeout)
        finally:
            sorters.stop()
        merged, body = body_bytes(config.database.name, nid)
        print(f"merged {merged:,} messages beforehand in {merge_wall:.1f} s "
              f"(2 sort workers)")
        print(f"stored merged body: {body / merged:,.0f} bytes/message")
        print(table_line(config.database.name, "with every body stored"))
        cpu = {"send-worker": args.cpu} if args.cpu is not None else {}
        senders = Cluster(config_path, [RoleSpec("send-balancer", "b1"),
                                        RoleSpec("send-worker", "send-1")], work / "logs",
                          log_level="WARNING", interpreter=interpreter_for(args.profile, cpu,
                                                                           work))
        meter = CpuPerMessage(senders, RoleSpec("send-worker", "send-1"))
        senders.start()
        try:
            wall = follow(db, senders, nid, total, ("sent", "failed", "skipped", "bounced"),
                          args.timeout, lambda c: meter.sample(
                              c["sent"] + c["failed"] + c["skipped"] + c["bounced"]))
        finally:
            senders.stop()
        t = stage_times(config.database.name, nid)
        n = stats.counts(db, nid)["sent"]
        pinned = f"pinned to CPU {args.cpu}" if args.cpu is not None else "not pinned"
        print(f"\nSEND ONLY: one send worker ({pinned}), sink={args.sink}, {tuning}")
        print(f"  {n / t['send_span']:,.0f} msgs/s  ({n} sent, first -> last "
              f"{t['send_span']:.2f} s; wall incl. start-up {wall:.1f} s)")
        print(meter.line())
        for line in rss_lines(senders):
            print(line)
        if sink is not None:
            print(f"  sink: {sink.messages} messages, "
                  f"{sink.tally.bytes / max(sink.messages, 1) / 1024:.1f} KB average")
        print(table_line(config.database.name, "after sending (bodies purged)"))
    if args.profile:
        print_profiles(work, args.profile)


def main(argv: Sequence[str] | None = None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--recipients", type=int, default=20_000)
    ap.add_argument("--sort", type=int, default=2, help="sort workers (K)")
    ap.add_argument("--send", type=int, default=2, help="send workers (M)")
    ap.add_argument("--sink", choices=("smtp-sink", "counting"),
                    default="smtp-sink")
    ap.add_argument("--relay", choices=("sink", "postfix"), default="sink",
                    help="postfix: send through a private Postfix (queue + discard) instead "
                         "of --sink, and measure that Postfix alone with smtp-source")
    ap.add_argument("--series-step", type=int, default=0,
                    help="deliveries per line of the throughput series (default: 100,000, "
                         "or N/10 below 1,000,000 recipients)")
    ap.add_argument("--no-ceiling", action="store_true",
                    help="skip the smtp-source run after the pipeline")
    ap.add_argument("--ceiling-seconds", type=float, default=12.0,
                    help="smtp-source runs about this long (calibrated first)")
    ap.add_argument("--ceiling-sessions", type=int, default=0,
                    help="smtp-source parallel sessions (default: send workers x "
                         "[sending] connections, as many as the pipeline opens)")
    ap.add_argument("--send-only", action="store_true",
                    help="merge first, then ONE send worker alone against the sink")
    ap.add_argument("--cpu", type=int, default=None,
                    help="--send-only: pin the send worker to this CPU (taskset)")
    ap.add_argument("--profile", choices=("sort-worker", "send-worker", "sort-balancer",
                                          "send-balancer"),
                    help="run that role under cProfile and print where its time goes")
    ap.add_argument("--timeout", type=float, default=0.0,
                    help="give up after this many seconds (default: 600, or N/100 for a "
                         "larger run: it fails below 100 msgs/s)")
    ap.add_argument("--keep", action="store_true", help="keep the database and work dir")
    tuning_args(ap)
    args = ap.parse_args(argv)
    args.timeout = args.timeout or max(600.0, args.recipients / 100)
    logging.basicConfig(level=logging.WARNING)
    if args.relay == "postfix" and args.send_only:
        ap.error("--relay postfix measures the whole pipeline; not with --send-only")
    # SIGTERM like Ctrl-C: unwind, so role processes stop and a private Postfix
    # and its queue are removed.
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    work = Path(tempfile.mkdtemp(prefix="sendsystem-bench-"))
    with bench_database(keep=args.keep) as (config, db):
        conn = raw_connect()
        print(server_line(conn))
        conn.close()
        if args.send_only:
            run_send_only(args, config, db, work)
        else:
            run_pipeline(args, config, db, work)
    if args.keep:
        print(f"kept work directory {work}")
    else:
        import shutil
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
