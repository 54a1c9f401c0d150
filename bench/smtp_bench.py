"""Throughput of the DeliveryPool in ONE process against Postfix's smtp-sink (or the demo's sink).

    .venv/bin/python bench/smtp_bench.py                      # 20,000 x 22 KB to smtp-sink
    .venv/bin/python bench/smtp_bench.py --cpu 0                # this process on one core
    .venv/bin/python bench/smtp_bench.py -n 5000 --connections 8 --profile
    .venv/bin/python bench/smtp_bench.py --sink counting -n 2000

Prints messages/s and the peak RSS of this process (the sink runs apart: smtp-sink
as a subprocess, the demo's CountingSink in its own thread, which then shares our
CPU and RSS).
Targets: >= 900 msg/s on one core to smtp-sink, RSS <= 100 MB.
"""

from __future__ import annotations

import argparse
import asyncio
import cProfile
import os
import pstats
import resource
import socket
import subprocess
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

from sendsystem.config import Relay
from sendsystem.delivery import DeliveryPool, Envelope
from sendsystem.demo import CountingSink

SMTP_SINK = "/usr/sbin/smtp-sink"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def wait_listening(port: int, seconds: float = 10.0) -> None:
    deadline = time.monotonic() + seconds
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0) as s:
                s.recv(100)  # the 220 greeting
                return
        except OSError:
            if time.monotonic() > deadline:
                raise SystemExit(f"sink on 127.0.0.1:{port} did not come up") from None
            time.sleep(0.05)


@contextmanager
def smtp_sink(port: int) -> Iterator[Relay]:
    if not Path(SMTP_SINK).exists():
        raise SystemExit(f"{SMTP_SINK} missing: apt-get install postfix")
    # -u postfix: smtp-sink refuses to run as root without dropping privileges.
    # backlog 1000; -m (max concurrency) stays at its default 256.
    cmd = [SMTP_SINK, "-u", "postfix", f"127.0.0.1:{port}", "1000"]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        wait_listening(port)
        yield Relay("127.0.0.1", port)
    finally:
        proc.terminate()
        try:
            proc.wait(5)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@contextmanager
def counting_sink() -> Iterator[Relay]:
    """The demo's sink (sendsystem.demo.CountingSink) in a thread of this process."""
    with CountingSink() as sink:
        yield sink.relay


def make_message(size: int) -> bytes:
    """A realistic ~size-byte newsletter: headers, quoted-printable HTML lines."""
    head = (
        b"Return-Path: <bounce@bounces.example.com>\r\n"
        b"From: Example List <list@example.com>\r\nTo: <someone@example.org>\r\n"
        b"Subject: Our monthly newsletter\r\nMIME-Version: 1.0\r\n"
        b"Content-Type: text/html; charset=utf-8\r\n"
        b"Content-Transfer-Encoding: quoted-printable\r\n\r\n"
    )
    line = b"<p>Lorem ipsum dolor sit amet, consectetur adipiscing elit, sed do eiusmo=\r\n"
    body = bytearray()
    while len(head) + len(body) < size:
        body += line
    return head + bytes(body[: size - len(head) - 2]) + b"\r\n"


async def run(relays: list[Relay], n: int, size: int, connections: int, per_conn: int,
              tasks: int) -> tuple[float, Counter[str]]:
    pool = DeliveryPool(relays, connections=connections, messages_per_connection=per_conn,
                        timeout=30.0, helo="bench.example.com")
    data = make_message(size)
    outcomes: Counter[str] = Counter()
    counter = iter(range(n))

    async def worker() -> None:
        for i in counter:
            result = await pool.deliver(
                Envelope(i, f"b+{i}@bounces.example.com", f"user{i}@example.org", data))
            outcomes[result.outcome] += 1

    start = time.perf_counter()
    await asyncio.gather(*(worker() for _ in range(tasks)))
    elapsed = time.perf_counter() - start
    await pool.close()
    return elapsed, outcomes


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("-n", "--messages", type=int, default=20_000)
    ap.add_argument("--size", type=int, default=22 * 1024, help="message size in bytes")
    ap.add_argument("--connections", type=int, default=8, help="connections per relay")
    ap.add_argument("--per-connection", type=int, default=1000)
    ap.add_argument("--tasks", type=int, default=0,
                    help="concurrent deliver() callers (default: 2 x connections)")
    ap.add_argument("--sink", choices=("smtp-sink", "counting"), default="smtp-sink")
    ap.add_argument("--cpu", type=int, default=None,
                    help="pin this process to one CPU (after starting the sink, which stays free)")
    ap.add_argument("--profile", action="store_true", help="cProfile the run, print top 25")
    args = ap.parse_args()
    tasks = args.tasks or 2 * args.connections

    sink = smtp_sink(free_port()) if args.sink == "smtp-sink" else counting_sink()
    with sink as relay:
        if args.cpu is not None:
            os.sched_setaffinity(0, {args.cpu})
        coro = run([relay], args.messages, args.size, args.connections, args.per_connection,
                   tasks)
        if args.profile:
            prof = cProfile.Profile()
            elapsed, outcomes = prof.runcall(asyncio.run, coro)
            pstats.Stats(prof).sort_stats("tottime").print_stats(25)
        else:
            elapsed, outcomes = asyncio.run(coro)
    rss_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    cpu = resource.getrusage(resource.RUSAGE_SELF)
    print(f"sink={args.sink} messages={args.messages} size={args.size} "
          f"connections={args.connections} tasks={tasks} outcomes={dict(outcomes)}")
    print(f"{args.messages / elapsed:,.0f} messages/s  ({elapsed:.2f} s, "
          f"{args.messages * args.size / elapsed / 1e6:.1f} MB/s)  "
          f"cpu user+sys {cpu.ru_utime + cpu.ru_stime:.1f} s  peak RSS {rss_mb:.1f} MB")


if __name__ == "__main__":
    main()
