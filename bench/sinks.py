"""Where bench/pipeline.py's messages end, counted as they arrive, and the C ceilings.

Counting at the sink, not in the database: the throughput series of a run
(msgs/s for each 100,000 delivered recipients) is what a receiving MTA saw.
SendSystem sends one recipient per envelope, so messages = recipients here.

* ``smtp-sink`` (Postfix's C test server) runs with ``-c``: it writes a
  running ``sess=.. quit=.. mesg=N`` counter to stdout after every message;
  a thread reads the pipe in large chunks and keeps only the last ``mesg=``
  of each chunk with the time it was read. The bytes it received (commands
  and DATA) are ``rchar`` of ``/proc/PID/io``: wire bytes per message.
* the demo's ``CountingSink`` notes the time of every message it accepts.
* a private Postfix (``--relay postfix``): a thread tails its maillog every
  0.1 s and counts ``status=sent`` lines (the discard transport delivered
  the queue file), and reads the queue file size from qmgr's ``size=``.

The ceilings are Postfix's own load generator ``smtp-source`` against the
same sink (or the same Postfix), with about the pipeline's message size
(a short calibration run measures smtp-source's header overhead at that
sink, so the wire size / queue file size is matched, not the ``-l`` payload)
and enough messages for at least ``seconds`` (a second calibration run
measures the rate first).
"""

from __future__ import annotations

import bisect
import contextlib
import math
import re
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

from smtp_bench import SMTP_SINK, free_port, wait_listening

from sendsystem.config import Relay
from sendsystem.demo import CountingSink

# The private Postfix is the tests' (one copy of that code): the repository root
# on the path, as bench/tracking_load.py does for tests.harness.proxy.
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from tests.harness.postfix import PostfixInstance, PostfixUnavailable, private_postfix

__all__ = ["ClockedCountingSink", "DeliveryClock", "MaillogCounter", "PostfixInstance",
           "SmtpSink", "ceiling", "postfix_relay", "series_lines", "series_step",
           "smtp_source", "wait_drained"]

SMTP_SOURCE = "/usr/sbin/smtp-source"


@dataclass
class DeliveryClock:
    """(monotonic time, cumulative count) as the sink counts: one writer thread
    appends, readers copy. Marks less than 10 ms apart share one entry (the latest
    count and time), so a million deliveries do not make a million entries; a
    step's end is then known to within 10 ms."""

    marks: list[tuple[float, int]] = field(default_factory=list)
    _bucket: float = -1.0

    def mark(self, count: int) -> None:
        if self.marks and count <= self.marks[-1][1]:
            return
        now = time.monotonic()
        if self.marks and now - self._bucket < 0.01:
            self.marks[-1] = (now, count)
        else:
            self.marks.append((now, count))
            self._bucket = now

    @property
    def count(self) -> int:
        return self.marks[-1][1] if self.marks else 0

    def when(self, count: int) -> float | None:
        """The time the count first reached ``count`` (None: not yet)."""
        marks = list(self.marks)
        i = bisect.bisect_left(marks, count, key=lambda m: m[1])
        return marks[i][0] if i < len(marks) else None

    def series(self, start: float, base: int, step: int, total: int
               ) -> list[tuple[int, int, float]]:
        """[(first, last, seconds)] for deliveries base+1 .. base+total in ``step``s,
        the first step timed from ``start``."""
        out = []
        prev_t, lo = start, 0
        while lo < total:
            hi = min(lo + step, total)
            t = self.when(base + hi)
            if t is None:
                break
            out.append((lo + 1, hi, t - prev_t))
            prev_t, lo = t, hi
        return out


def series_lines(clock: DeliveryClock, start: float, base: int, total: int,
                 step: int) -> list[str]:
    lines = []
    for lo, hi, seconds in clock.series(start, base, step, total):
        rate = (hi - lo + 1) / seconds if seconds > 0 else math.inf
        lines.append(f"  {lo:>9,} - {hi:>9,}: {rate:7,.0f} msgs/s  ({seconds:6.2f} s)")
    return lines


def series_step(n: int) -> int:
    """100,000; for a run of fewer than 1,000,000 recipients N/10 (at least 1)."""
    return 100_000 if n >= 1_000_000 else max(1, n // 10)


def rchar(pid: int) -> int:
    """Bytes the process has read (sockets included), from /proc/PID/io (0: gone)."""
    try:
        with open(f"/proc/{pid}/io", encoding="ascii") as fh:
            for line in fh:
                if line.startswith("rchar:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


class SmtpSink:
    """``smtp-sink -c`` on a free port, its deliveries counted from its counter output
    (``count=False``: plain smtp-sink, as --send-only has always measured against)."""

    def __init__(self, count: bool = True) -> None:
        self.count = count
        self.port = free_port()
        self.clock = DeliveryClock()
        self.proc: subprocess.Popen[bytes] | None = None
        self._reader: threading.Thread | None = None

    @property
    def relay(self) -> Relay:
        return Relay("127.0.0.1", self.port)

    def __enter__(self) -> SmtpSink:
        if not Path(SMTP_SINK).exists():
            raise SystemExit(f"{SMTP_SINK} missing: apt-get install postfix (`make postfix`)")
        # -u postfix: smtp-sink refuses to run as root without dropping privileges.
        # backlog 1000; -m (max concurrency) stays at its default 256.
        counter = ["-c"] if self.count else []
        self.proc = subprocess.Popen(
            [SMTP_SINK, *counter, "-u", "postfix", f"127.0.0.1:{self.port}", "1000"],
            stdout=subprocess.PIPE if self.count else subprocess.DEVNULL,
            stderr=subprocess.DEVNULL, bufsize=0)
        if self.count:
            self._reader = threading.Thread(target=self._read, name="smtp-sink-counter",
                                            daemon=True)
            self._reader.start()
        try:
            wait_listening(self.port)
        except BaseException:
            self.__exit__()
            raise
        return self

    def _read(self) -> None:
        assert self.proc is not None and self.proc.stdout is not None
        pattern = re.compile(rb"mesg=(\d+)")
        tail = b""
        while True:
            chunk = self.proc.stdout.read(65536)
            if not chunk:
                return
            text = tail + chunk
            cut = text.rfind(b"\r")
            if cut < 0:
                tail = text[-200:]
                continue
            tail = text[cut + 1:]
            found = pattern.findall(text[:cut])
            if found:
                self.clock.mark(int(found[-1]))

    def wire_bytes(self) -> int:
        return rchar(self.proc.pid) if self.proc is not None else 0

    def __exit__(self, *exc: object) -> None:
        if self.proc is not None:
            self.proc.terminate()
            try:
                self.proc.wait(5)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self._reader is not None:
            self._reader.join(timeout=5)


class ClockedCountingSink(CountingSink):
    """The demo's sink, noting when each message arrived."""

    def __init__(self) -> None:
        super().__init__()
        self.clock = DeliveryClock()

    def __enter__(self) -> ClockedCountingSink:
        self.start()
        return self

    def accepted(self, recipients: list[str], message_id: str) -> None:
        self.clock.mark(self.tally.messages)


class MaillogCounter:
    """Tails a Postfix maillog: discarded (delivered) messages and qmgr's queue file sizes."""

    SENT = re.compile(rb" status=sent ")
    SIZE = re.compile(rb"qmgr\[\d+\]: \w+: from=<[^>]*>, size=(\d+), nrcpt=")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.clock = DeliveryClock()
        self.sizes = 0
        self.sized = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="maillog-counter", daemon=True)

    def __enter__(self) -> MaillogCounter:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=5)

    def size_mark(self) -> tuple[int, int]:
        """(messages sized so far, their bytes): take two and subtract for a phase."""
        return self.sized, self.sizes

    def _run(self) -> None:
        sent, offset, rest = 0, 0, b""
        while not self._stop.is_set():
            try:
                with self.path.open("rb") as fh:
                    fh.seek(offset)
                    data = fh.read()
            except OSError:
                data = b""
            if data:
                offset += len(data)
                data = rest + data
                cut = data.rfind(b"\n") + 1
                rest, data = data[cut:], data[:cut]
                sent += len(self.SENT.findall(data))
                for size in self.SIZE.findall(data):
                    self.sized += 1
                    self.sizes += int(size)
                self.clock.mark(sent)
            self._stop.wait(0.1)


# ------------------------------------------------------------------ smtp-source

@dataclass(frozen=True)
class SourceRun:
    messages: int
    seconds: float
    sessions: int
    payload: int      # smtp-source -l

    @property
    def rate(self) -> float:
        return self.messages / self.seconds if self.seconds > 0 else 0.0


def smtp_source(port: int, messages: int, sessions: int, payload: int) -> SourceRun:
    """Postfix's smtp-source: ``sessions`` parallel connections kept open (-d) for
    ``messages`` messages of ``payload`` body bytes, distinct recipients (-N)."""
    if not Path(SMTP_SOURCE).exists():
        raise SystemExit(f"{SMTP_SOURCE} missing: apt-get install postfix (`make postfix`)")
    cmd = [SMTP_SOURCE, "-d", "-N", "-s", str(sessions), "-m", str(messages),
           "-l", str(payload), "-f", "bench@bounces.example.com", "-t", "rcpt@example.org",
           "-M", "source.bench.example", f"127.0.0.1:{port}"]
    start = time.monotonic()
    run = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    seconds = time.monotonic() - start
    if run.returncode != 0:
        raise SystemExit(f"smtp-source failed (exit {run.returncode}): "
                         f"{run.stderr.strip()[-2000:]}")
    return SourceRun(messages, seconds, sessions, payload)


@dataclass(frozen=True)
class Ceiling:
    run: SourceRun
    size: float     # bytes per message as measured at the sink / relay


def ceiling(port: int, sessions: int, size: float, measure: Callable[[], tuple[int, int]],
            *, seconds: float = 12.0, settle: Callable[[], None] | None = None) -> Ceiling:
    """smtp-source at ``size`` bytes a message for ~``seconds``.

    ``measure()``: (messages, bytes) the sink / relay has counted so far (the
    size as it counts it); ``settle()``: wait until what was sent is counted."""
    probe_payload = 1000
    n0, b0 = measure()
    smtp_source(port, 200, min(sessions, 200), probe_payload)
    if settle is not None:
        settle()
    n1, b1 = measure()
    overhead = (b1 - b0) / max(n1 - n0, 1) - probe_payload
    payload = max(0, round(size - overhead))
    calib = smtp_source(port, max(sessions * 50, 1000), sessions, payload)
    if settle is not None:
        settle()
    wanted = max(sessions * 20, math.ceil(calib.rate * seconds))
    for _attempt in range(2):  # once more, longer, if the calibration overestimated
        n2, b2 = measure()
        run = smtp_source(port, wanted, sessions, payload)
        if settle is not None:
            settle()
        n3, b3 = measure()
        if run.seconds >= min(10.0, seconds):
            break
        wanted = math.ceil(run.rate * seconds * 1.1)
    return Ceiling(run, (b3 - b2) / max(n3 - n2, 1))


# ------------------------------------------------------------------ a private Postfix

# After tests/harness/postfix.py's MAIN_CF_BASE: accept from loopback, queue as
# Postfix always does (cleanup fsyncs each queue file before the 250), then
# deliver with discard(8), which logs status=sent and removes the queue file.
BENCH_MAIN_CF = """\
myhostname = relay.bench.example
mydomain = bench.example
mydestination =
relay_domains =
local_recipient_maps =
alias_maps =
alias_database =
default_transport = discard:bench
"""


@contextlib.contextmanager
def postfix_relay() -> Iterator[tuple[Relay, MaillogCounter, PostfixInstance]]:
    """A private Postfix that queues and discards; (relay, its counter, the instance).
    Stopped and its directory (queue included) removed at the end, also on Ctrl-C."""
    try:
        with private_postfix(BENCH_MAIN_CF, prefix="sspb-") as pf, \
                MaillogCounter(pf.log) as counter:
            yield Relay("127.0.0.1", pf.port), counter, pf
    except PostfixUnavailable as exc:
        raise SystemExit(f"--relay postfix: {exc}") from None


def wait_drained(instance: PostfixInstance, timeout: float = 120.0) -> None:
    """Until the private Postfix's queue is empty (discard is quick)."""
    deadline = time.monotonic() + timeout
    while instance.queue_files() > 0:
        if time.monotonic() > deadline:
            raise SystemExit(f"Postfix's queue did not drain within {timeout:.0f}s")
        time.sleep(0.1)
