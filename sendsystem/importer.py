"""`list import`: a CSV file of any size, read as a stream; strict by default.

The promise: any bad row and nothing is imported, and every bad line is
named; with ``--skip-invalid`` the good rows are imported and the bad ones
named. A file of 10,000,000 rows must take minutes and little memory (the
old import kept the whole file and every row in memory: 956 MB for
1,000,000 rows).

How, in three phases over a temporary directory (:func:`~sendsystem.extsort.work_dir`:
``$TMPDIR``, else /var/tmp):

1. **Read and check** the file once, as a stream (:class:`Source`): each
   row is checked (:class:`~sendsystem.listcsv.RowChecker`: address, line
   breaks, status columns) and becomes one line of text, the lower-cased
   address first, that goes to an external sort
   (:mod:`sendsystem.extsort`): sorted runs of 24 MB on disk. Bad lines go
   to a second external sort, by line number.
2. **Check** for repeated addresses: the runs are read back merged, so the
   rows of one address are next to each other, the first line first: every
   later one is a bad line naming the first; the first of each goes to one
   file, in address order. Nothing has been written to the database yet,
   so a strict import with any bad line stops here, having changed nothing,
   and names every bad line, in line order.
3. **Write** that file with one ``INSERT … ON DUPLICATE KEY UPDATE`` per
   chunk (``subscribers_import``), each its own short transaction: the
   chunk size adapts so that one takes about a quarter of a second, so a
   running send never waits on the import for long. A thread runs the
   statements while the next chunk is prepared. Into a list that already
   has subscribers, only the rows that would change something are written.
   A chunk that ends subscriptions (a ``status`` column saying they left)
   also writes their history events (``subscriber_events``) in the same
   transaction, so ``list stats`` agrees with the table; an import of active
   rows writes none (a join is the row's ``created_at``).

Why not a staging table and a merge in SQL: measured on the 2-core bench
machine (MariaDB 10.11, 128 MB buffer pool), for 10,000,000 rows, filling a
staging table took 104 s through multi-row INSERTs (35 s with LOAD DATA
LOCAL, which lets the server read any file of the client), finding repeats
with ``GROUP BY email`` 42 s per million rows, and the merge
``INSERT … SELECT`` in file order crawled at 13,000 rows/s: random order
in the two address indexes of a table that outgrows the buffer pool. The
same rows in address order went in at 65,000 rows/s, with or without
staging. Sorting on the client gives both: repeats found for free, and
index-ordered writes, and the database never holds rows that may not be
imported. The price: disk in the temporary directory (up to about 5 times
the file, for a while: the runs and the file of phase 3), and new
subscribers get their ids in address order, not file order (nothing
depends on it; a newsletter goes out in id order).

What "nothing imported" means across a crash: until phase 3 starts,
nothing has been written, whatever happens. Phase 3 commits chunk by chunk
(a single transaction of millions of rows would lock the table for
minutes, and exceed a Galera writeset's limits), so a process killed in
phase 3 leaves the rows of the chunks written so far, in address order.
Each is complete, and importing the same file again finishes the job: the
upsert makes a second import idempotent (and it skips what is already
there). The ``imports`` table records every import, its state and progress
with a heartbeat: the next import into the same list finds one that
stopped (its host says its process is gone, or it has been silent for
:data:`STALE_AFTER` seconds), marks it ``interrupted`` and says how far it
got and to run it again. An import that fails on its own (database
unreachable for too long, Ctrl-C) says so itself. While one import of a
list is alive, a second one refuses to start. Doing better than "run it
again" would mean keeping the checked rows in the database until the
merge is complete (a staging table: the costs above, and Galera
replicating every row twice) for a window that is minutes long.
"""

from __future__ import annotations

import codecs
import contextlib
import csv
import errno
import fcntl
import hashlib
import io
import json
import logging
import os
import queue
import shutil
import socket
import tempfile
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from json.encoder import encode_basestring
from pathlib import Path
from typing import Any

from . import extsort
from .db import Database
from .errors import ImportRowsError, UserError
from .extsort import ExternalSort
from .listcsv import HeaderError, RowChecker, parse_header
from .states import SubscriberStatus

log = logging.getLogger(__name__)

# Longest physical line read (characters): bounds the memory one hostile line
# can take. csv's own limit (131,072 per field) bounds a field spread over lines.
MAX_LINE = 4 << 20
KEPT_PROBLEMS = 100  # bad lines kept in memory (ImportResult.bad); all are reported
HEARTBEAT_EVERY = 2.0  # seconds between `imports` heartbeats
STALE_AFTER = 300  # seconds of silence after which an import counts as stopped
CHUNK_SECONDS = 0.25  # target duration of one write statement
CHUNK_MIN, CHUNK_MAX, CHUNK_FIRST = 200, 20_000, 2_000
CHUNK_CHARS = 4 << 20  # and at most this much text per statement (max_allowed_packet)
TEMP_PREFIX = "sendsystem-import-"

# progress(phase, done, total): "Reading" counts bytes, "Checking" and "Writing" rows.
Progress = Callable[[str, int, int], None]
Problems = Callable[[int, str], None]


@dataclass
class ImportResult:
    imported: int = 0  # rows now in the list (new, updated, or already so)
    unchanged: int = 0  # of those, rows that were in the list just so already
    bad: list[tuple[int, str]] = field(default_factory=list)  # the first KEPT_PROBLEMS
    total: int = 0  # rows read (blank lines are not rows)
    bad_count: int = 0
    import_id: int | None = None
    seconds: dict[str, float] = field(default_factory=dict)  # per phase, for the bench


# ------------------------------------------------------------------ reading

class Source:
    """The file as text lines for :func:`csv.reader`: UTF-8 (a BOM is allowed),
    one item per physical line (so csv's ``line_num`` is the file's line
    number), no line longer than :data:`MAX_LINE`, bytes read counted."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            self._raw = path.open("rb")
        except FileNotFoundError:
            raise UserError(f"{path}: no such file.") from None
        except OSError as exc:
            raise UserError(f"{path}: {exc.strerror or exc}.") from None
        self.size = os.fstat(self._raw.fileno()).st_size
        self._text = io.TextIOWrapper(self._raw, encoding="utf-8-sig", newline="")
        self.lines = 0
        self.overlong: deque[int] = deque()

    def __iter__(self) -> Iterator[str]:
        readline = self._text.readline
        while True:
            line = readline(MAX_LINE)
            if not line:
                return
            self.lines += 1
            if len(line) == MAX_LINE and not line.endswith(("\n", "\r")):
                # Skip the rest of it; the row it belongs to is named as bad.
                self.overlong.append(self.lines)
                while (rest := readline(MAX_LINE)) and not rest.endswith(("\n", "\r")):
                    pass
                yield "\n"
                continue
            yield line

    def tell(self) -> int:
        return self._raw.tell()

    def close(self) -> None:
        self._text.close()


def utf8_error(path: Path) -> str:
    """Where the file stops being UTF-8 (byte offset, line), for the error message."""
    decoder = codecs.getincrementaldecoder("utf-8")()
    offset, line = 0, 1
    with path.open("rb") as fh:
        while chunk := fh.read(1 << 20):
            # The decoder may hold back up to 3 bytes of an unfinished character;
            # an error's position counts from the first of them.
            pending = len(decoder.getstate()[0])
            try:
                decoder.decode(chunk)
            except UnicodeDecodeError as exc:
                at = offset - pending + exc.start
                line += chunk[:max(0, exc.start - pending)].count(b"\n")
                return f"{exc.reason} at byte {at}, line {line}"
            offset += len(chunk)
            line += chunk.count(b"\n")
        try:
            decoder.decode(b"", final=True)
        except UnicodeDecodeError as exc:
            return f"{exc.reason} at the end of the file"
    return "cannot be decoded"


def csv_problem(exc: csv.Error) -> str:
    """A csv module error as a reason an admin can act on."""
    if "field limit" in str(exc):
        # The limit (128 KiB) is kept: no merge field needs more, and it bounds
        # the memory a hostile file can make one row take.
        return (f"a field is longer than {csv.field_size_limit()} characters "
                "(or a quote that is never closed runs on over the following lines)")
    return f"cannot be read as CSV: {exc}"


def read_rows(source: Source) -> Iterator[tuple[int, list[str] | str]]:
    """(line, fields) for each row, (line, reason) for a row that cannot be read;
    the header row first (line 1). Blank rows are skipped."""
    reader = csv.reader(source)
    overlong = source.overlong
    while True:
        start = reader.line_num + 1
        try:
            row = next(reader)
        except StopIteration:
            return
        except csv.Error as exc:
            # The reader carries on with the next line; report the line the
            # row began on (a never-closed quote runs on over many lines).
            yield start, csv_problem(exc)
            continue
        except UnicodeDecodeError:
            source.close()
            raise UserError(f"{source.path}: not UTF-8 text ({utf8_error(source.path)}); "
                            "save the file as UTF-8 CSV.") from None
        line = reader.line_num
        if overlong and overlong[0] <= line:
            at = overlong.popleft()
            while overlong and overlong[0] <= line:
                overlong.popleft()
            yield at, f"is longer than {MAX_LINE} characters"
            continue
        if not row or all(not c.strip() for c in row):
            continue
        yield line, row


# ------------------------------------------------------------------ records
#
# A checked row travels through the sort as one line of text:
#   key TAB line TAB email TAB status TAB left_at TAB left_reason TAB fields NL
# key: the address lower-cased (the database compares addresses without case);
# line: zero-padded, so that string order is (key, line). No part holds a tab,
# a line break or a character below the tab: addresses are validated, fields
# and left_reason are JSON strings, which escape every control character.

def _record(key: str, line: int, email: str, status: str | None, left_at: str | None,
            reason: str | None, fields: str) -> str:
    reason_json = "" if reason is None else encode_basestring(reason)
    return (f"{key}\t{line:010d}\t{email}\t{status or ''}\t{left_at or ''}\t{reason_json}"
            f"\t{fields}\n")


def _problem_record(line: int, reason: str) -> str:
    return f"{line:010d}\t{reason.replace(chr(10), ' ').replace(chr(13), ' ')}\n"


def unique_records(records: Iterator[str]) -> Iterator[tuple[str, int]]:
    """(record, 0) for the first row of each address, (record, first line) for a repeat;
    ``records`` in sorted order."""
    previous_key, first_line = "", 0
    for record in records:
        key, _, rest = record.partition("\t")
        if key == previous_key:
            yield record, first_line
        else:
            previous_key, first_line = key, int(rest[:10])
            yield record, 0


# ------------------------------------------------------------------ the import

def import_csv(db: Database, list_id: int, list_name: str, path: Path, *,
               skip_invalid: bool = False, progress: Progress | None = None,
               on_problem: Problems | None = None, temp_dir: Path | None = None
               ) -> ImportResult:
    """Import (or update) subscribers from ``path`` into the list; see the module docstring.

    ``on_problem(line, reason)`` is called for every bad line, in line order,
    before anything is written (strict: then :class:`ImportRowsError`).
    """
    parent = temp_dir or extsort.work_dir()
    size = path.stat().st_size if path.is_file() else 0
    with contextlib.suppress(OSError):
        free = shutil.disk_usage(parent).free
        if free < 5 * size:
            log.warning("%s has %.1f GB free; an import of %s may need up to %.1f GB there "
                        "(set TMPDIR to choose another place)", parent, free / 1e9, path.name,
                        5 * size / 1e9)
    sweep_stale_temp(parent)
    with contextlib.ExitStack() as stack:
        source = Source(path)
        stack.callback(source.close)
        tracker = _Tracker(db, list_id, list_name, path)
        stack.callback(tracker.close)
        try:
            tmp = stack.enter_context(tempfile.TemporaryDirectory(prefix=TEMP_PREFIX,
                                                                  dir=parent))
            stack.enter_context(_held(Path(tmp) / "lock"))
            return _import(db, list_id, source, tracker, Path(tmp), skip_invalid,
                           progress, on_problem)
        except OSError as exc:
            if exc.errno == errno.ENOSPC:
                raise UserError(f"{parent} is full: an import needs up to 5 times the file's "
                                "size there for a while. Set TMPDIR to a bigger file system "
                                "and import again (nothing was imported).") from None
            raise
    raise AssertionError("unreachable")


def _import(db: Database, list_id: int, source: Source, tracker: _Tracker, tmp: Path,
            skip_invalid: bool, progress: Progress | None, on_problem: Problems | None
            ) -> ImportResult:
    result = ImportResult(import_id=tracker.id)
    rows = ExternalSort(tmp, "rows")
    # Bad lines are few, or a whole file of them: a smaller buffer (both are in memory).
    problems = ExternalSort(tmp, "problems", run_chars=max(1, extsort.RUN_CHARS // 4))
    report = progress or (lambda phase, done, total: None)

    # 1. Read and check.
    it = read_rows(source)
    try:
        first = next(it, None)
        if first is None:
            raise UserError(f"{source.path}: the file is empty; it needs a header row "
                            "with 'email'.")
        if isinstance(first[1], str):
            raise UserError(f"{source.path}: the header row (line 1) {first[1]}.")
        layout = parse_header(first[1])
    except HeaderError as exc:
        raise UserError(f"{source.path}: {exc}.") from None
    checker = RowChecker(layout)
    check, add, add_problem = checker.check, rows.add, problems.add
    started = next_beat = time.monotonic()
    next_beat += HEARTBEAT_EVERY
    report("Reading", 0, source.size)
    for n, (line, row) in enumerate(it, 1):
        try:
            if isinstance(row, str):
                raise ValueError(row)
            ok = check(row)
        except ValueError as exc:
            add_problem(_problem_record(line, str(exc)))
        else:
            add(_record(ok.email.lower(), line, ok.email, ok.status, ok.left_at,
                        ok.left_reason, ok.fields))
        if not n & 4095 and time.monotonic() >= next_beat:
            next_beat = time.monotonic() + HEARTBEAT_EVERY
            report("Reading", source.tell(), source.size)
            tracker.beat(rows_read=n, bad_rows=problems.count)
    result.total = rows.count + problems.count
    report("Reading", source.size, source.size)
    result.seconds["read"] = time.monotonic() - started
    started = time.monotonic()

    # 2. Repeated addresses. The first row of each address goes, in order, to
    # one file that phase 3 reads straight through (merging the runs again
    # cost it 25 s of CPU at 10,000,000 rows, next to the database's work).
    report("Checking", 0, rows.count)
    unique = 0
    to_write = tmp / "rows-to-write"
    with to_write.open("w", encoding="utf-8", newline="\n", buffering=1 << 16) as out:
        write = out.write
        for n, (record, first_line) in enumerate(unique_records(rows.sorted()), 1):
            _, line_text, rest = record.split("\t", 2)
            if first_line:
                add_problem(_problem_record(
                    int(line_text),
                    f"{rest[:rest.index(chr(9))]} already appears on line {first_line}"))
            else:
                unique += 1
                write(rest)
            if not n & 4095 and time.monotonic() >= next_beat:
                next_beat = time.monotonic() + HEARTBEAT_EVERY
                report("Checking", n, rows.count)
                tracker.beat(rows_read=result.total, bad_rows=problems.count)
    rows.close()
    report("Checking", rows.count, rows.count)
    result.seconds["check"] = time.monotonic() - started
    result.bad_count = problems.count
    for record in problems.sorted():
        line, reason = int(record[:10]), record[11:-1]
        if len(result.bad) < KEPT_PROBLEMS:
            result.bad.append((line, reason))
        if on_problem is not None:
            on_problem(line, reason)
    problems.close()
    tracker.counts(rows_read=result.total, bad_rows=result.bad_count, rows_to_write=unique)
    if result.bad_count and not skip_invalid:
        tracker.finish("failed", f"{result.bad_count} bad rows; nothing imported")
        raise ImportRowsError(result.bad, result.total, result.bad_count)

    # 3. Write, in address order.
    tracker.beat(state="writing")
    started = time.monotonic()
    result.imported, result.unchanged = _write(db, list_id, to_write, unique, tracker, report)
    result.seconds["write"] = time.monotonic() - started
    tracker.finish("done", None)
    log.info("import %s: %d rows read, %d imported (%d unchanged), %d bad; %s", tracker.id,
             result.total, result.imported, result.unchanged, result.bad_count,
             ", ".join(f"{k} {v:.1f} s" for k, v in result.seconds.items()))
    return result


def _write(db: Database, list_id: int, rows: Path, unique: int, tracker: _Tracker,
           report: Progress) -> tuple[int, int]:
    """Write the rows of ``rows`` (one per address, in address order), in chunks of
    about CHUNK_SECONDS each; (rows done, rows unchanged).

    A thread (:class:`_ChunkWriter`) runs the statements while this one reads
    and prepares the next chunk: the database's time and ours overlap.
    """
    loads = json.loads
    fresh = not db.fetchone("list_has_subscribers", {"list_id": list_id})
    writer = _ChunkWriter(db, tracker, list_id, fresh)
    chunk: list[tuple[Any, ...]] = []
    chars = 0
    report("Writing", 0, unique)
    writer.start()
    try:
        with rows.open(encoding="utf-8", newline="\n", buffering=1 << 16) as records:
            for record in records:
                email, status, left_at, reason, fields = record[:-1].split("\t")
                chunk.append((list_id, email, email.rpartition("@")[2], fields,
                              status or "active", left_at or None,
                              loads(reason) if reason else None))
                chars += len(fields)
                if len(chunk) >= writer.size or chars >= CHUNK_CHARS:
                    writer.put(chunk)
                    chunk, chars = [], 0
                    report("Writing", writer.written, unique)
        if chunk:
            writer.put(chunk)
        writer.finish()
    except BaseException as exc:
        writer.abort()
        # Said here, and kept in `imports`, so whoever runs it next knows.
        message = (f"stopped after writing {writer.written:,} of {unique:,} rows (in "
                   f"address order; the list holds those): {type(exc).__name__}: {exc}")
        log.error("import %s %s. Run the same import again to finish it: importing is "
                  "idempotent.", tracker.id, message)
        with contextlib.suppress(Exception):
            tracker.finish("failed", message[:1000])
        raise
    report("Writing", writer.written, unique)
    return writer.written, writer.unchanged


class _ChunkWriter(threading.Thread):
    """Runs ``subscribers_import`` for each chunk it is given, one at a time, and is
    the only user of the database connection meanwhile (heartbeats included).
    At most two chunks wait, so memory stays bounded.

    Into a list that had subscribers, the database first says which rows of a
    chunk would change something (``subscribers_import_changes``), and only
    those are written: an upsert of an existing row costs an insert attempt,
    its rollback and the update even when nothing changes (re-importing the
    same 1,000,000 rows took 38 s of writing, against 15 s for a fresh
    import), and reading the rows back to compare them in Python cost 17 µs
    a row in PyMySQL's row parsing alone.
    """

    def __init__(self, db: Database, tracker: _Tracker, list_id: int, fresh: bool) -> None:
        super().__init__(name="import-writer", daemon=True)
        self.db = db
        self.tracker = tracker
        self.list_id = list_id
        self.fresh = fresh  # the list was empty: every row is new
        self.size = CHUNK_FIRST  # rows per statement, adapted to CHUNK_SECONDS
        self.written = 0  # rows of the file done (new, updated, or unchanged)
        self.unchanged = 0
        self.error: BaseException | None = None
        self._queue: queue.Queue[list[tuple[Any, ...]] | None] = queue.Queue(maxsize=2)
        self._halt = threading.Event()

    def run(self) -> None:
        next_beat = time.monotonic() + HEARTBEAT_EVERY
        try:
            while (chunk := self._queue.get()) is not None and not self._halt.is_set():
                started = time.monotonic()
                changes = chunk if self.fresh else self._changes(chunk)
                if changes:
                    self._write(changes)
                elapsed = time.monotonic() - started
                self.unchanged += len(chunk) - len(changes)
                self.written += len(chunk)
                self.tracker.written = self.written
                # Aim for CHUNK_SECONDS a statement, moving halfway there each time.
                wanted = len(chunk) * CHUNK_SECONDS / max(elapsed, 0.001)
                self.size = int(min(CHUNK_MAX, max(CHUNK_MIN, (self.size + wanted) / 2)))
                if time.monotonic() >= next_beat:
                    next_beat = time.monotonic() + HEARTBEAT_EVERY
                    self.tracker.beat()
        except BaseException as exc:
            self.error = exc

    def _write(self, rows: list[tuple[Any, ...]]) -> None:
        """One chunk's upsert, and a history event for each subscription it ends
        (an active one the file says left, or a new one created left), in one
        transaction: ``list stats`` then agrees with the subscribers table. A
        file of active rows (the usual case) is one statement, as before."""
        # rows: (list_id, email, domain, fields, status, left_at, left_reason)
        leaving = [(row[0], row[1]) for row in rows if row[4] != SubscriberStatus.ACTIVE]
        if not leaving:
            self.db.execute_rows("subscribers_import", rows)
            return
        with self.db.transaction():
            if not self.fresh:
                gone = {str(r["email"]).lower()
                        for r in self.db.fetch_rows("subscribers_import_left", leaving)}
                leaving = [v for v in leaving if v[1].lower() not in gone]
            self.db.execute_rows("subscribers_import", rows)
            if leaving:
                self.db.execute_rows("subscriber_events_import", leaving)

    def _changes(self, chunk: list[tuple[Any, ...]]) -> list[tuple[Any, ...]]:
        """The rows that are new or would change their subscriber (the database
        compares; see ``subscribers_import_changes``)."""
        md5 = hashlib.md5
        # chunk rows: (list_id, email, domain, fields, status, left_at, left_reason)
        probe = [(row[0], row[1], md5(f"{row[2]}\t{row[3]}".encode()).hexdigest(), row[4])
                 for row in chunk]
        changed = {r["email"] for r in self.db.fetch_rows("subscribers_import_changes", probe)}
        return [row for row in chunk if row[1] in changed]

    def put(self, chunk: list[tuple[Any, ...]] | None) -> None:
        while True:
            if self.error is not None:
                raise self.error
            try:
                self._queue.put(chunk, timeout=0.2)
                return
            except queue.Full:
                continue

    def finish(self) -> None:
        """Wait for the last chunk; raise what the thread met."""
        self.put(None)
        self.join()
        if self.error is not None:
            raise self.error

    def abort(self) -> None:
        """Stop after the statement in progress (if any); wait for it."""
        self._halt.set()
        with contextlib.suppress(queue.Full):
            self._queue.put_nowait(None)
        self.join()


# ------------------------------------------------------------------ bookkeeping

class _Tracker:
    """This import's row in `imports`: refuses a second live import of the list,
    reports stopped ones, heartbeats (throttled) and records the end."""

    def __init__(self, db: Database, list_id: int, list_name: str, path: Path) -> None:
        self.db = db
        self.written = 0
        self._counts: dict[str, int] = {"rows_read": 0, "bad_rows": 0, "rows_to_write": 0}
        self._state = "reading"
        self._done = False
        host = socket.gethostname()
        with db.transaction():
            db.fetchone("list_lock", {"list_id": list_id})
            for other in db.fetchall("imports_unfinished", {"list_id": list_id}):
                _settle(db, other, list_name, host)
            self.id = db.insert("import_begin", {
                "list_id": list_id, "file": str(path.resolve())[-500:], "host": host[:255],
                "pid": os.getpid()})

    def counts(self, **counts: int) -> None:
        self._counts.update(counts)

    def beat(self, state: str | None = None, **counts: int) -> None:
        self._counts.update(counts)
        self._state = state or self._state
        self.db.execute("import_progress", {"id": self.id, "state": self._state,
                                            "rows_written": self.written, **self._counts})

    def finish(self, state: str, message: str | None) -> None:
        self._done = True
        self.db.execute("import_finish", {"id": self.id, "state": state,
                                          "rows_written": self.written, "message": message,
                                          **self._counts})

    def close(self) -> None:
        """An import that ended by an error before writing (a bad header, a file that is
        not UTF-8) is recorded as failed: nothing of it was written."""
        if not self._done:
            with contextlib.suppress(Exception):
                self.finish("failed", "stopped before writing anything")


def _settle(db: Database, other: dict[str, Any], list_name: str, host: str) -> None:
    """Another unfinished import of the list: refuse if it is alive, else mark and report it."""
    idle = int(other["idle"] or 0)
    gone = other["host"] == host and not process_exists(int(other["pid"]))
    if not gone and idle < STALE_AFTER:
        raise UserError(
            f"Another import into {list_name!r} is running: {other['file']} (pid "
            f"{other['pid']} on {other['host']}, started {other['started_at']:%Y-%m-%d %H:%M} "
            f"UTC, last heard of {idle} s ago). Wait for it to finish; an import that "
            f"stopped counts as stopped after {STALE_AFTER} s of silence.")
    if other["state"] == "writing":
        what = (f"stopped after writing {int(other['rows_written']):,} of "
                f"{int(other['rows_to_write']):,} rows (in address order; the list holds "
                "those). Run that import again to finish it: importing is idempotent")
    else:
        what = "stopped before writing anything: nothing of it was imported"
    stale = 0 if gone else STALE_AFTER
    if db.execute("import_interrupted", {"id": other["id"], "stale": stale,
                                         "message": what[:1000]}):
        log.warning("An earlier import into %r, %s (started %s UTC on %s), %s.", list_name,
                    other["file"], f"{other['started_at']:%Y-%m-%d %H:%M}", other["host"], what)


def process_exists(pid: int) -> bool:
    """Whether a process with this id runs on this host (signal 0: nothing is sent)."""
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


@contextlib.contextmanager
def _held(lock_path: Path) -> Iterator[None]:
    """An exclusive flock for as long as the import runs: tells :func:`sweep_stale_temp`
    that this temporary directory is in use."""
    with lock_path.open("w") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        yield


def sweep_stale_temp(parent: Path, min_age: float = 600.0) -> None:
    """Remove the temporary directories of imports that died (SIGKILL, a crash): those
    whose lock nobody holds, older than ``min_age`` seconds (a new one is briefly
    unlocked)."""
    now = time.time()
    try:
        candidates = list(parent.glob(TEMP_PREFIX + "*"))
    except OSError:
        return
    for directory in candidates:
        try:
            if now - directory.stat().st_mtime < min_age:
                continue
            with (directory / "lock").open("a") as fh:
                fcntl.flock(fh, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            continue  # a live import holds it
        except OSError:
            pass  # no lock file: it died before taking it
        log.info("removing %s, left by an import that stopped", directory)
        shutil.rmtree(directory, ignore_errors=True)
