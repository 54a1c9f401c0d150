"""Group commit of the send worker's delivery outcomes.

The promise is that a message the relay accepted is not sent again, except
those on the wire at the instant of a crash. So the gap between a 250 and
the database knowing it must be as short as possible, even when the worker
never comes back and its batch is reclaimed by another server, which cannot
read this server's journal. A writer thread with its own connection writes
whatever outcomes have accumulated as soon as its previous write is done
and the gathering below is over (one statement per outcome kind, one
transaction; a write of one kind only, the common case, is that one
statement without BEGIN/COMMIT, atomic by itself): the gap is at most
GATHER plus one write's latency, and the event loop never waits for MySQL.

Gathering: the send worker's window slots are freed only by a commit, and a
write of 1 to 8 outcomes took ~2 ms of wall time in the send benchmark (p10
1.6 ms; this thread's CPU 0.2 ms; a bare autocommitted INSERT on the same
server 0.34 ms). With the slot taken after the relay's 354 (send_worker.py),
writing whatever is there the moment the previous write returns made writes
of about 2 rows (10,298 writes for 20,000 messages), because the slots a
write frees are what produces the next 250s: the window went in a ping-pong
of tiny writes. So a write waits, at most
GATHER (2 ms), until every body on the wire (``in_flight``: messages past the
point of no return whose outcome is not yet here) has been answered: with
the whole window in one write (2,534 writes, 7.9 rows each), a commit frees
every slot at once. Gathering adds at most GATHER to any outcome's wait
for the database, and ``add()`` wakes this thread only for the first outcome
and for the last one it waits for (each wake is a thread switch on the
event loop's core).

Each final outcome is also appended to a local journal before it is queued
for writing. Two journal files take turns: new entries go to one while the
entries of the other are being written, and a file is emptied only once all
of its entries are committed. At start-up both are replayed into the
database before any new work, and then each is probed with one write, so a
full or read-only file system stops the worker before it sends anything.

A journal that cannot be written mid-run (disk full, file system remounted
read-only, permissions; append or truncate) never loses an outcome and
never kills the writer thread: the outcome is still queued for the database
(it is the journal that is lost, not the outcome), later outcomes skip the
journal, and ``on_journal_error`` is called once so the worker stops taking
messages and hands back its batches once everything in memory is committed.
Nothing is resent: the accepted messages are in the database before their
batch goes back. What is lost is only the SIGKILL protection for the few
messages in flight while the worker drains.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from ..bounce.recipients import RECIPIENT_STATEMENTS, record_bounce
from ..config import Config
from ..db import Database
from ..errors import TemporaryError
from ..journal import Journal, JournalError
from ..smtpstatus import reply_code
from ..states import MessageState

log = logging.getLogger(__name__)

# Longest a write waits for outcomes still on the wire (see the module docstring).
GATHER = 0.002

OUTCOME_STATEMENTS = ("send_mark_sent", "send_mark_failed", "send_mark_deferred",
                      "send_mark_skipped", *RECIPIENT_STATEMENTS)


@dataclass
class Pending:
    """Outcomes not yet in the database, as row tuples in the order of each
    statement's `-- values:` columns."""

    sent: list[tuple[Any, ...]] = field(default_factory=list)
    failed: list[tuple[Any, ...]] = field(default_factory=list)
    deferred: list[tuple[Any, ...]] = field(default_factory=list)
    skipped: list[tuple[Any, ...]] = field(default_factory=list)
    bounces: list[dict[str, Any]] = field(default_factory=list)

    def __bool__(self) -> bool:
        return bool(self.sent or self.failed or self.deferred or self.skipped or self.bounces)

    def ids(self) -> list[int]:
        return [int(r[0]) for group in (self.sent, self.failed, self.deferred, self.skipped)
                for r in group]


class OutcomeWriter:
    """Writes outcomes in a background thread; see the module docstring."""

    def __init__(self, config: Config, worker_id: int, name: str,
                 should_abort: Callable[[], bool],
                 on_journal_error: Callable[[JournalError], None] | None = None,
                 on_written: Callable[[list[int]], None] | None = None,
                 in_flight: Callable[[], int] | None = None) -> None:
        self.config = config
        self.on_journal_error = on_journal_error
        # The first failure to write the journal; from then on it is not written.
        self.journal_error: JournalError | None = None
        self.worker_id = worker_id
        self.db = Database(config.database, retry_for=None, should_abort=should_abort,
                           read_timeout=config.database.read_timeout)
        self.db.set_slot(worker_id)  # the worker's kept-counts slot, as its main connection
        # Called from the writer thread with the ids of each committed write.
        self.on_written = on_written
        # How many outcomes are about to arrive (bodies on the wire): a write
        # waits for them, at most GATHER seconds (module docstring).
        self.in_flight = in_flight
        directory = config.paths.journal_dir
        self.journals = (Journal(directory, f"send-{name}"), Journal(directory, f"send-{name}.b"))
        self._current = 0
        self._cond = threading.Condition()
        self._pending = Pending()
        self._writing = False
        self._stopping = False
        self._written: list[int] = []
        self._thread = threading.Thread(target=self._run, name="outcome-writer", daemon=True)
        self.writes = 0

    # -- start and stop ---------------------------------------------------------------

    def replay(self) -> int:
        """Put what earlier runs journaled into the database; call before start()."""
        entries: dict[int, tuple[str, str]] = {}
        for journal in self.journals:
            for mid, outcome, reply in journal.replay():
                if outcome in (MessageState.SENT, MessageState.FAILED):  # not a probe line
                    entries[mid] = (outcome, reply)
        if entries:
            batch = Pending()
            for mid, (outcome, reply) in entries.items():
                row = (mid, reply_code(reply), reply[:500], None)
                (batch.sent if outcome == MessageState.SENT else batch.failed).append(row)
            self._write(batch)
            log.warning("replayed %d journal entries of an earlier run into the database "
                        "(they are not sent again)", len(entries))
        for journal in self.journals:
            journal.truncate()
            journal.check_writable()
        return len(entries)

    def start(self) -> None:
        self._thread.start()

    def close(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify_all()
        if self._thread.is_alive():
            self._thread.join()
        for journal in self.journals:
            journal.close()
        self.db.close()

    # -- called from the event loop ---------------------------------------------------

    def add(self, kind: MessageState, row: tuple[Any, ...],
            journal_entry: tuple[int, str, str] | None = None,
            bounce: dict[str, Any] | None = None) -> None:
        """Queue one outcome (``kind``: SENT, FAILED, DEFERRED or SKIPPED, the
        :class:`Pending` list it goes to); a final one is journaled first."""
        failure = None
        with self._cond:
            if journal_entry is not None and self.journal_error is None:
                try:
                    self.journals[self._current].append([journal_entry])
                except JournalError as exc:
                    failure = self.journal_error = exc
            # Queued for the database whether or not the journal took it.
            first = not self._pending
            getattr(self._pending, kind).append(row)
            if bounce is not None:
                self._pending.bounces.append(bounce)
            # The writer needs waking for the first outcome (it starts gathering) and
            # for the last one it waits for; waking it for each in between would only
            # cost thread switches on the event loop's core.
            if first or self.in_flight is None or self.in_flight() == 0:
                self._cond.notify()
        if failure is not None:
            self._journal_failed(failure)

    def take_written(self) -> list[int]:
        """Message ids whose outcome is now in the database."""
        with self._cond:
            done, self._written = self._written, []
        return done

    def drain(self) -> None:
        """Block until everything added so far is committed."""
        with self._cond:
            while self._pending or self._writing:
                if not self._thread.is_alive():
                    raise RuntimeError("the outcome writer stopped")
                self._cond.wait(timeout=0.5)

    # -- the writer thread --------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while not self._pending and not self._stopping:
                    self._cond.wait()
                if not self._pending:
                    return
                if self.in_flight is not None:
                    deadline = time.monotonic() + GATHER
                    while self.in_flight() > 0 and not self._stopping:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
                batch, self._pending = self._pending, Pending()
                journal = self.journals[self._current]
                self._current ^= 1
                self._writing = True
            while True:
                try:
                    self._write(batch)
                    break
                except TemporaryError as exc:
                    log.warning("writing outcomes failed (%s); retrying", exc)
                    time.sleep(0.5)
                except Exception:
                    log.exception("writing outcomes failed; retrying in 5 s")
                    time.sleep(5)
            # Committed: the window slots are freed before the journal is emptied.
            # Emptying it costs an fdatasync (3 ms on this machine's disk) that
            # has nothing to do with the commit; the next batch is taken (and the
            # current journal swapped) only after it, in this thread, so a file
            # is still emptied only once every entry in it is committed.
            with self._cond:
                self._written.extend(batch.ids())
                self._writing = False
                self._cond.notify_all()
            if self.on_written is not None:
                self.on_written(batch.ids())
            try:
                journal.truncate()
            except JournalError as exc:
                # Harmless for the entries (they are committed, and replaying them is
                # idempotent), but the journal can no longer be trusted to work.
                with self._cond:
                    first = self.journal_error is None
                    if first:
                        self.journal_error = exc
                if first:
                    self._journal_failed(exc)

    def _journal_failed(self, exc: JournalError) -> None:
        log.error("%s Outcomes still go to the database; this worker stops.", exc)
        if self.on_journal_error is not None:
            self.on_journal_error(exc)

    def _write(self, batch: Pending) -> None:
        worker = {"worker": self.worker_id}
        kinds = [(name, rows) for name, rows in (
            ("send_mark_sent", batch.sent), ("send_mark_failed", batch.failed),
            ("send_mark_deferred", batch.deferred), ("send_mark_skipped", batch.skipped))
            if rows]
        if len(kinds) == 1:
            # The common case (only 250s): one statement is atomic on its own (the
            # connection autocommits; the kept-counts triggers run inside it), so
            # BEGIN and COMMIT would only add two round trips to every write and to
            # the wait of every window slot.
            self.db.execute_values(kinds[0][0], kinds[0][1], worker)
        elif kinds:
            with self.db.transaction():
                for name, rows in kinds:
                    self.db.execute_values(name, rows, worker)
        self.writes += 1
        for bounce in batch.bounces:
            # Our relay's own 5.1.x reply on our own connection: first-hand
            # evidence nobody outside can forge, so it acts (on the message's list).
            record_bounce(self.db, self.config.bounce, kind="hard", evidence="smtp", **bounce)
