"""Customer templates render in a child process, under CPU, memory and wall-clock limits.

Why a child: a template can loop for ever (``range`` inside ``range``, a macro
that calls itself twice per level), eat gigabytes (a string that doubles in a
``namespace``) or sit in C code the interpreter cannot interrupt (big-integer
arithmetic). Rendered in the sort worker itself, that stops its heartbeat,
its batch is reclaimed and handed to the next worker, which hangs the same
way, and every other customer's newsletter waits. The sandbox's caps
(merge.py) catch the common bombs cheaply; this module is the backstop for
the rest, so that one newsletter's message fails alone with a reason and the
worker goes on.

Shape (one child per sort worker, kept alive across chunks):

- The child is started with ``multiprocessing``'s *spawn* context: a fresh
  interpreter, never a fork of a process that holds a database connection.
  It imports only the merge code, ignores SIGINT/SIGTERM (the parent decides
  when it ends; a Ctrl-C to the process group must not fail a message) and
  exits at EOF on its pipe, so it never outlives the worker for long.
- In the child every render has a CPU-time limit (``[sorting]
  render_timeout``, ``ITIMER_PROF``: user + system time, so page-faulting
  through memory counts too) whose alarm raises :class:`RenderTimeout`, and
  the whole child has an address-space limit (``render_memory_mb``,
  ``RLIMIT_AS``) so a huge allocation, even in C, is a MemoryError for that
  message. CPU time, not wall time: a loaded machine slows a render down but
  does not make it fail. The same limit applies to compiling the template
  (Jinja folds constants at compile time) and to the once-per-newsletter
  compression-dictionary render.
- The parent sends a newsletter's template once per child, then chunks of
  rows; the child sends back each message's result as soon as it is done.
  The parent waits in short polls and heartbeats in between, and keeps a
  watchdog per message for a child stuck where the alarm cannot reach (C
  code): it kills the child, fails the message in progress with the reason,
  starts a new child and goes on with the rest of the chunk. A child that
  dies (EOF) fails only the message in progress the same way.
- The watchdog counts the child's CPU time (/proc/PID/stat), 2 x
  render_timeout + 1 s per message, not wall time: measured on the shared
  2-core test machine at load 4.7, a render stopped by its 0.5 s CPU alarm
  took over 2 s of wall time, and a wall-clock watchdog of 2 s killed a
  healthy child and blamed the template for the machine's load. A wall-clock
  backstop of 5x that catches a child that does not run at all (stopped,
  swapped out); where /proc is missing the wall-clock watchdog is used.
- The consumer may stop reading a chunk (a newsletter paused itself): the
  parent sends ``cancel``, which the child reads between two messages, and
  discards what was still in flight.

Measured (bench/merge_bench.py --child, README): the pipe costs a few
percent of a core at ~2-4k messages/s; a healthy child's address space is
~30 MB (VmPeak, the 18 KB bench newsletter), far under the default limit of
1024 MB.
"""

from __future__ import annotations

import contextlib
import json
import logging
import multiprocessing
import os
import resource
import signal
import sys
import time
import types
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from multiprocessing.connection import Connection
from types import FrameType
from typing import Any

from .errors import SendSystemError
from .merge import MergeError, Merger, NewsletterInfo, RenderTimeout, TemplateSource
from .states import MessageState

log = logging.getLogger(__name__)

# How long a new child may take to start (interpreter + imports) on a busy server.
START_TIMEOUT = 60.0
POLL = 0.1


@dataclass(frozen=True)
class RenderLimits:
    timeout: float = 2.0          # CPU seconds per render
    memory_mb: int = 1024         # address space of the child
    hoist: bool = True            # constant parts rendered once per newsletter (hoisting.py)

    @property
    def watchdog(self) -> float:
        """CPU seconds the child may spend on one message before it is killed."""
        return 2 * self.timeout + 1.0

    @property
    def backstop(self) -> float:
        """Wall-clock seconds one message may take whatever the CPU (a stopped child)."""
        return 5 * self.watchdog


@dataclass(frozen=True)
class TrackingJob:
    """Open and click tracking of one newsletter (sendsystem/tracking/links.py)."""

    key: bytes                    # tokens.tracking_key(secret)
    click_base: str
    open_base: str
    skip_prefixes: tuple[str, ...]
    opens: bool
    clicks: bool
    text_links: bool = False
    max_links: int = 1000


@dataclass
class NewsletterJob:
    """What the child needs to render one newsletter; ``zdict`` None: compute it."""

    newsletter_id: int
    src: TemplateSource
    info: NewsletterInfo
    zdict: bytes | None = None
    tracking: TrackingJob | None = None


@dataclass(frozen=True)
class Rendered:
    message_id: int
    state: MessageState          # MERGED or FAILED
    kind: str | None = None      # for failed: render | limit | recipient | data
    body: bytes | None = None
    detail: str | None = None
    # Link table rows (idx, url) this message used first (tracking): stored with it.
    links: tuple[tuple[int, str], ...] = ()


class RendererUnavailable(SendSystemError):
    """The render child could not be started at all (not a template's fault)."""


def _seconds(t: float) -> str:
    return f"{t:g}"


_TICKS = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def process_cpu_seconds(pid: int) -> float | None:
    """User + system CPU time of a process (Linux /proc), or None when unknown."""
    try:
        with open(f"/proc/{pid}/stat", "rb") as fh:
            fields = fh.read().rsplit(b")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / _TICKS
    except (OSError, IndexError, ValueError):
        return None


# ----------------------------------------------------------------- the child


class _CpuAlarm:
    """``with alarm():`` raises RenderTimeout after ``seconds`` of CPU time."""

    def __init__(self, seconds: float) -> None:
        self.seconds = seconds
        self.armed = False
        signal.signal(signal.SIGPROF, self._fire)

    def _fire(self, _signum: int, _frame: FrameType | None) -> None:
        if self.armed:
            self.armed = False
            raise RenderTimeout(f"render took more than {_seconds(self.seconds)} s of CPU")

    @contextlib.contextmanager
    def __call__(self) -> Iterator[None]:
        self.armed = True
        signal.setitimer(signal.ITIMER_PROF, self.seconds)
        try:
            yield
        finally:
            self.armed = False
            signal.setitimer(signal.ITIMER_PROF, 0)


def _limit_memory(megabytes: int) -> None:
    if megabytes <= 0:
        return
    soft, hard = resource.getrlimit(resource.RLIMIT_AS)
    want = megabytes * 1024 * 1024
    if hard != resource.RLIM_INFINITY:
        want = min(want, hard)
    if soft == resource.RLIM_INFINITY or want < soft:
        resource.setrlimit(resource.RLIMIT_AS, (want, hard))


def _load(job: NewsletterJob, alarm: _CpuAlarm, hoist: bool = True) -> Merger:
    # Compiling folds constants, so it runs customer code too: Merger compiles
    # and renders the dictionary (when not stored yet) each under the alarm.
    tracker = None
    t = job.tracking
    if t is not None and (t.opens or t.clicks):
        from .tracking.links import Rewriter
        from .tracking.tokens import Signer
        tracker = Rewriter(Signer(t.key), job.newsletter_id, t.click_base, t.open_base,
                           t.skip_prefixes, clicks=t.clicks, opens=t.opens,
                           text_links=t.text_links, max_links=t.max_links)
    return Merger(job.src, job.info, zdict=job.zdict, limit=alarm, tracker=tracker, hoist=hoist)


def _render_tracked(merger: Merger, alarm: _CpuAlarm, row: tuple[int, str, str, str]
                    ) -> tuple[Any, ...]:
    mid, email, fields_json, url = row
    new_links: list[tuple[int, str]] = []
    try:
        try:
            with alarm():
                message = merger.render(email, json.loads(fields_json), url, message_id=mid,
                                        new_links=new_links)
        except RenderTimeout as exc:  # fired between two template statements
            raise MergeError(str(exc), "limit") from None
        return ("r", mid, MessageState.MERGED, None, merger.compress(message),
                tuple(new_links))
    except BaseException:
        if merger.tracker is not None:
            merger.tracker.unlearn(new_links)
        raise


def _render_one(merger: Merger, alarm: _CpuAlarm, row: tuple[int, str, str, str],
                memory_mb: int) -> tuple[Any, ...]:
    mid = row[0]
    try:
        return _render_tracked(merger, alarm, row)
    except MergeError as exc:
        reason = str(exc)
        if "render memory limit" in reason:
            reason = reason.replace("render memory limit",
                                    f"render memory limit of {memory_mb} MB")
        return ("r", mid, MessageState.FAILED, exc.kind, reason[:500])
    except MemoryError:
        return ("r", mid, MessageState.FAILED, "limit",
                f"ran out of memory (over the render memory limit of {memory_mb} MB)")
    except Exception as exc:
        # This row's data (fields that are not JSON, or that make render raise
        # something else): it fails alone, and it is not the template's fault.
        what = ("subscriber fields are not valid JSON" if isinstance(exc, json.JSONDecodeError)
                else "cannot merge")
        return ("r", mid, MessageState.FAILED, "data", f"{what}: {type(exc).__name__}: {exc}"[:500])


def child_main(conn: Connection, limits: RenderLimits) -> None:
    """The child's loop: load newsletters, render chunks, until EOF."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    alarm = _CpuAlarm(limits.timeout)
    _limit_memory(limits.memory_mb)
    mergers: dict[int, Merger | str] = {}
    conn.send(("ready",))
    while True:
        try:
            msg = conn.recv()
        except (EOFError, OSError):
            return
        op = msg[0]
        if op == "load":
            job: NewsletterJob = msg[1]
            computed = None
            try:
                merger = _load(job, alarm, limits.hoist)
                mergers[job.newsletter_id] = merger
                computed = merger.zdict if job.zdict is None else None
                error = None
            except RenderTimeout as exc:
                error = f"compiling the template: {exc}"
            except MemoryError:
                error = ("compiling the template ran out of memory (over the render memory "
                         f"limit of {limits.memory_mb} MB)")
            except Exception as exc:
                error = str(exc) or type(exc).__name__
            if error is not None:
                mergers[job.newsletter_id] = error
            conn.send(("loaded", job.newsletter_id, computed, error))
        elif op == "render":
            nid, rows = msg[1], msg[2]
            loaded = mergers.get(nid)
            for row in rows:
                if conn.poll() and conn.recv()[0] == "cancel":
                    break
                if not isinstance(loaded, Merger):
                    reply: tuple[Any, ...] = ("r", row[0], MessageState.FAILED, "render",
                                              f"cannot build messages: {loaded}")
                else:
                    reply = _render_one(loaded, alarm, row, limits.memory_mb)
                conn.send(reply)
            conn.send(("end",))
        elif op == "forget":
            mergers.pop(msg[1], None)
        # "cancel" when idle: the chunk it meant is already finished; ignore it.


# ----------------------------------------------------------------- the parent


@contextlib.contextmanager
def _main_not_inherited() -> Iterator[None]:
    """Spawn without re-running the parent's ``__main__`` in the child.

    ``spawn`` re-imports the parent's main script in the child (a console
    script imports the whole CLI; an unguarded script would run). The child
    needs only this module, so the parent's main is hidden while it starts.
    """
    main = sys.modules["__main__"]
    sys.modules["__main__"] = types.ModuleType("__main__")
    try:
        yield
    finally:
        sys.modules["__main__"] = main


class RenderProcess:
    """The sort worker's side: one child, restarted when it hangs or dies.

    ``heartbeat`` is called between polls while waiting for the child, so the
    worker never stops reporting, whatever the template does.
    """

    def __init__(self, limits: RenderLimits, heartbeat: Callable[[], None],
                 name: str = "sendsystem-render") -> None:
        self.limits = limits
        self.heartbeat = heartbeat
        self.name = name
        self._ctx = multiprocessing.get_context("spawn")
        self._proc: Any = None
        self._conn: Connection | None = None
        self._loaded: set[int] = set()
        self.restarts = 0

    # -- the child's life ------------------------------------------------------

    def _start(self) -> Connection:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(target=child_main, args=(child, self.limits),
                                 name=self.name, daemon=True)
        with _main_not_inherited():
            proc.start()
        child.close()
        self._proc, self._conn = proc, parent
        self._loaded.clear()
        reply = self._receive(START_TIMEOUT, START_TIMEOUT)
        if reply is None or reply[0] != "ready":
            self._kill()
            raise RendererUnavailable(
                f"the render child did not start within {START_TIMEOUT:g} s "
                f"({self._death or 'no answer'}); check the worker's log and memory limits")
        log.debug("render child pid %s started", proc.pid)
        return parent

    def _kill(self) -> None:
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
        if self._proc is not None:
            if self._proc.is_alive():
                self._proc.kill()
            self._proc.join(5)
        self._proc, self._conn = None, None
        self._loaded.clear()

    def close(self) -> None:
        """End the child: EOF first (it exits at once when idle), then a kill."""
        if self._conn is not None:
            with contextlib.suppress(OSError):
                self._conn.close()
            self._conn = None
        if self._proc is not None:
            self._proc.join(2)
            if self._proc.is_alive():
                self._proc.kill()
                self._proc.join(5)
            self._proc = None
        self._loaded.clear()

    def start(self) -> None:
        """Start the child now (else at the first render), so the first batch does not wait."""
        if self._conn is None:
            self._start()

    @property
    def pid(self) -> int | None:
        return self._proc.pid if self._proc is not None else None

    _death: str | None = None

    def _receive(self, cpu_limit: float, wall_limit: float | None = None
                 ) -> tuple[Any, ...] | None:
        """The child's next reply, or None when it died or the watchdog fired (see _death).

        ``cpu_limit``: CPU seconds the child may use meanwhile; ``wall_limit``
        (default 5x that) bounds the wait whatever the CPU. Without /proc,
        ``cpu_limit`` is a wall-clock limit.
        """
        assert self._conn is not None
        pid = self.pid
        cpu0 = process_cpu_seconds(pid) if pid is not None else None
        start = time.monotonic()
        if cpu0 is None:
            wall_limit = cpu_limit
        elif wall_limit is None:
            wall_limit = 5 * cpu_limit
        self._death = None
        while True:
            now = time.monotonic()
            if now - start >= wall_limit:
                self._death = "wall"
                return None
            try:
                if self._conn.poll(min(POLL, start + wall_limit - now)):
                    reply: tuple[Any, ...] = self._conn.recv()
                    return reply
            except (EOFError, OSError):
                code = self._proc.exitcode if self._proc is not None else None
                if self._proc is not None and code is None:
                    self._proc.join(1)
                    code = self._proc.exitcode
                self._death = (f"killed by signal {-code}" if code is not None and code < 0
                               else f"exit code {code}")
                return None
            if cpu0 is not None and pid is not None:
                cpu = process_cpu_seconds(pid)
                if cpu is not None and cpu - cpu0 > cpu_limit:
                    self._death = "cpu"
                    return None
            self.heartbeat()

    def _send(self, msg: tuple[Any, ...]) -> None:
        if self._conn is None:
            self._start()
        assert self._conn is not None
        try:
            self._conn.send(msg)
        except OSError:  # died while idle: start again and resend
            self._kill()
            self._start()
            assert self._conn is not None
            self._conn.send(msg)

    def _ensure(self, job: NewsletterJob) -> str | None:
        """Load ``job`` into the child; the load error, or None. Sets job.zdict if computed."""
        if job.newsletter_id in self._loaded:
            return None
        self._send(("load", job))
        # Compile + up to three dictionary renders, each under the CPU limit.
        reply = self._receive(4 * self.limits.watchdog)
        if reply is None:
            reason = self._lost("loading the template", 4 * self.limits.watchdog)
            self._kill()
            return reason
        _, _nid, computed, error = reply
        if computed is not None:
            job.zdict = computed
        self._loaded.add(job.newsletter_id)
        return error  # type: ignore[no-any-return]

    def _lost(self, doing: str, limit: float) -> str:
        if self._death == "cpu":
            return (f"{doing} used more than {_seconds(limit)} s of CPU without stopping; "
                    "the render process was stopped (stuck outside the render time limit)")
        if self._death == "wall":
            return (f"{doing} made no progress in {_seconds(5 * limit)} s; the render "
                    "process was stopped")
        return f"the render process died while {doing} ({self._death})"

    # -- the API -----------------------------------------------------------------

    def dictionary(self, job: NewsletterJob) -> tuple[bytes | None, str | None]:
        """Compute the newsletter's compression dictionary in the child, under the limits.

        (dictionary, None), or (None, why not): the template does not compile,
        or loading it hung or killed the child.
        """
        error = self._ensure(job)
        return job.zdict, error

    def forget(self, newsletter_id: int) -> None:
        """Drop a newsletter from the child (its job changed, e.g. the stored zdict)."""
        if newsletter_id in self._loaded and self._conn is not None:
            self._loaded.discard(newsletter_id)
            self._send(("forget", newsletter_id))

    def render(self, job: NewsletterJob,
               rows: list[tuple[int, str, str, str]]) -> Iterator[Rendered]:
        """Render rows (id, email, fields JSON, unsubscribe URL); one result each, in order.

        Close the iterator early to cancel the rest of the chunk.
        """
        pending = list(rows)
        while pending:
            error = self._ensure(job)
            if error is not None and job.newsletter_id not in self._loaded:
                # The child died or hung loading: every message fails the same way.
                for row in pending:
                    yield Rendered(row[0], MessageState.FAILED, "limit", detail=error[:500])
                return
            self._send(("render", job.newsletter_id, pending))
            in_chunk = True
            try:
                while pending:
                    reply = self._receive(self.limits.watchdog)
                    if reply is None:
                        mid = pending.pop(0)[0]
                        reason = self._lost("rendering", self.limits.watchdog)
                        log.warning("newsletter %s message %s: %s; starting a new render "
                                    "process", job.newsletter_id, mid, reason)
                        self._kill()
                        self.restarts += 1
                        in_chunk = False
                        yield Rendered(mid, MessageState.FAILED, "limit", detail=reason[:500])
                        break
                    _, mid, state, kind, payload, *links = reply
                    assert mid == pending[0][0], "render child answered out of order"
                    pending.pop(0)
                    if state == MessageState.MERGED:
                        yield Rendered(mid, MessageState.MERGED, body=payload,
                                       links=links[0] if links else ())
                    else:
                        if kind in ("limit", "data"):
                            log.warning("newsletter %s message %s: %s", job.newsletter_id,
                                        mid, payload)
                        yield Rendered(mid, MessageState.FAILED, kind, detail=payload)
                if in_chunk:
                    self._end_chunk()
                    in_chunk = False
            finally:
                if in_chunk:  # the consumer stopped reading: cancel the rest
                    self._cancel()

    def _end_chunk(self) -> None:
        reply = self._receive(self.limits.watchdog)
        if reply is None or reply[0] != "end":
            self._kill()

    def _cancel(self) -> None:
        if self._conn is None:
            return
        with contextlib.suppress(OSError):
            self._conn.send(("cancel",))
        while True:
            reply = self._receive(self.limits.watchdog)
            if reply is None:
                self._kill()
                return
            if reply[0] == "end":
                return
