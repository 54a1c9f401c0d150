"""The web app's writer of hits: batched, off the request path, spooled when the database is away.

The request path only appends the hit to an in-process buffer (a deque: one
C call, no lock, no I/O) and answers. A background thread per web worker
process (gunicorn forks workers; the thread starts in each at its first hit)
takes what is buffered every ``flush_interval`` seconds, or as soon as
``flush_rows`` are waiting, and writes it in one transaction:

1. the messages' delivery times (one ``IN`` query) make hits within
   ``machine_seconds`` of delivery machine hits (:mod:`.machine`);
2. all hits in one multi-row ``INSERT IGNORE`` (each hit carries its own
   16-byte id, so a batch written twice is stored once);
3. the burst rule over the touched recipients' recent clicks (from the
   database, so clicks that other workers or servers took count too), and
   again one flush later for the recipients of the previous batch, whose
   other clicks may have been committed by another worker meanwhile;
4. the touched recipients' ``tracking_unique`` rows rebuilt from their events.

When the database cannot be reached (or the transaction fails), the batch is
appended to this process's spool file, ``<spool_dir>/hits-<pid>-<random>.spool``
(JSON lines, fsync'd per batch), and while it stays away (back-off 0.5 s up to
5 s) further batches go straight there. Once a write succeeds again, the spool
is replayed in chunks and truncated. A process that dies leaves its file; the
others replay it: each process holds an exclusive ``flock`` on its own file
for its whole life, so a file whose lock can be taken belongs to a dead
process, and taking it also keeps two replayers apart. The files are checked
when the thread starts and every 30 s.

What can be lost: the hits buffered in a process that is SIGKILLed (at most
one flush interval's worth), and a spool write torn by a crash or a full disk
(logged). A graceful stop (SIGTERM, gunicorn's worker exit) flushes first.
Every hit that reached a spool file is stored exactly once.
"""

from __future__ import annotations

import atexit
import collections
import fcntl
import itertools
import json
import logging
import os
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import IO

from ..config import TrackingConfig
from ..db import Database
from ..errors import SendSystemError
from . import machine
from .tokens import Hit

log = logging.getLogger(__name__)

STATEMENTS = ("tracking_events_insert", "tracking_delivered_at", "tracking_recent_clicks",
              "tracking_mark_burst", "tracking_unique_delete", "tracking_unique_rebuild")
ORPHAN_CHECK = 30.0
REPLAY_CHUNK = 5000
_BACKOFF_MIN, _BACKOFF_MAX = 0.5, 5.0
# Hits kept in memory when even the spool cannot be written (a full disk).
MAX_BUFFERED = 1_000_000


@dataclass(frozen=True)
class HitRow:
    hit: bytes            # 16 bytes, unique
    newsletter_id: int
    message_id: int
    kind: str             # "open" | "click"
    link_idx: int
    at: datetime          # naive UTC
    verdict: int

    def to_json(self) -> str:
        return json.dumps([self.hit.hex(), self.newsletter_id, self.message_id, self.kind,
                           self.link_idx, self.at.isoformat(), self.verdict])

    @classmethod
    def from_json(cls, line: str) -> HitRow:
        h, nid, mid, kind, idx, at, verdict = json.loads(line)
        return cls(bytes.fromhex(h), int(nid), int(mid), str(kind), int(idx),
                   datetime.fromisoformat(at), int(verdict))


def utcnow() -> datetime:
    return datetime.now(UTC).replace(tzinfo=None)


class Recorder:
    """Buffers hits and writes them in batches (see the module docstring).

    ``database``: makes the flusher's connection (``retry_for=0``: an outage
    fails the batch at once, which then goes to the spool).
    """

    def __init__(self, config: TrackingConfig, database: Callable[[], Database], *,
                 clock: Callable[[], datetime] = utcnow, start_thread: bool = True) -> None:
        self.config = config
        self._make_db = database
        self._db: Database | None = None
        self.clock = clock
        self.start_thread = start_thread
        self._buffer: collections.deque[HitRow] = collections.deque()
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pid = 0
        self._prefix = b""
        # gunicorn's gthread workers record from several threads at once: next()
        # on itertools.count is one C call, so no two hits share an id (INSERT
        # IGNORE would keep one of them).
        self._ids = itertools.count(1)
        self._spool: IO[bytes] | None = None
        self._spool_path: Path | None = None
        self._spooled = 0            # rows in our spool file not yet replayed
        self._down_until = 0.0
        self._backoff = _BACKOFF_MIN
        self._recheck: set[int] = set()
        self._orphans_at = 0.0
        self._lock = threading.Lock()   # one flush at a time (thread, close, tests)
        self.written = 0             # rows stored (for tests and logs)
        self.spooled_total = 0
        self.lost = 0

    # -- request path --------------------------------------------------------------

    def record(self, hit: Hit, verdict: int) -> None:
        """Buffer one verified hit. Cheap and never blocks on I/O."""
        if os.getpid() != self._pid:
            self._start()
        row = HitRow(self._prefix + next(self._ids).to_bytes(8, "big"), hit.newsletter_id,
                     hit.message_id, hit.kind, hit.link_idx, self.clock(), verdict)
        self._buffer.append(row)
        if len(self._buffer) >= self.config.flush_rows:
            self._wake.set()

    def _start(self) -> None:
        with self._lock:
            if os.getpid() == self._pid:
                return
            # A new process (first use, or a fork of one that recorded): own ids,
            # own spool, own thread; the parent's buffer is the parent's. The pid
            # is published last: other request threads check it without the lock,
            # and one that saw it early would buffer a hit this then cleared.
            self._prefix = os.urandom(8)
            self._ids = itertools.count(1)
            self._buffer.clear()
            self._spool, self._spool_path, self._spooled = None, None, 0
            self._db = None
            self._pid = os.getpid()
            if self.start_thread:
                self._stop.clear()
                self._thread = threading.Thread(target=self._run, name="tracking-flusher",
                                                daemon=True)
                self._thread.start()
                atexit.register(self.close)

    # -- the flusher thread --------------------------------------------------------

    def _run(self) -> None:
        while not self._stop.is_set():
            self._wake.wait(self.config.flush_interval)
            self._wake.clear()
            try:
                self.flush()
            except Exception:  # never let the thread die: hits would pile up unseen
                log.exception("tracking flusher failed; retrying")
                time.sleep(self.config.flush_interval)

    def close(self, timeout: float = 10.0) -> None:
        """Stop the thread and write (or spool) what is buffered."""
        self._stop.set()
        self._wake.set()
        thread = self._thread
        if thread is not None and thread is not threading.current_thread():
            thread.join(timeout)
        if os.getpid() == self._pid:
            self.flush(final=True)
        if self._db is not None:
            self._db.close()

    def flush(self, *, final: bool = False) -> int:
        """Write what is buffered (and replay spools when the database answers); rows
        stored by this call."""
        with self._lock:
            if self._pid == 0:
                self._pid = os.getpid()
                self._prefix = os.urandom(8)
            stored = 0
            while self._buffer:
                batch = [self._buffer.popleft()
                         for _ in range(min(len(self._buffer), self.config.flush_rows))]
                if self._try_write(batch):
                    stored += len(batch)
                else:
                    self._to_spool(batch)
            if final:
                return stored
            if self._spooled and time.monotonic() >= self._down_until:
                stored += self._replay_own()
            now = time.monotonic()
            if now >= self._orphans_at and now >= self._down_until:
                self._orphans_at = now + ORPHAN_CHECK
                stored += self._replay_orphans()
            return stored

    def _database(self) -> Database:
        if self._db is None:
            self._db = self._make_db()
        return self._db

    def _try_write(self, batch: Sequence[HitRow]) -> bool:
        if time.monotonic() < self._down_until:
            return False
        try:
            self.write(batch)
        except SendSystemError as exc:
            self._went_down(exc)
            return False
        except Exception as exc:  # a driver error mid-batch: treat as an outage, keep the hits
            log.exception("writing %d tracking hits failed", len(batch))
            self._went_down(exc)
            return False
        if self._backoff != _BACKOFF_MIN:
            log.warning("tracking: database reachable again; writing hits")
        self._backoff = _BACKOFF_MIN
        return True

    def _went_down(self, exc: BaseException) -> None:
        if self._backoff == _BACKOFF_MIN:
            log.warning("tracking: cannot write hits (%s); spooling them to %s", exc,
                        self.config.spool_dir)
        self._down_until = time.monotonic() + self._backoff
        self._backoff = min(self._backoff * 2, _BACKOFF_MAX)
        if self._db is not None:
            self._db.close()

    # -- one transaction per batch ------------------------------------------------

    def write(self, batch: Sequence[HitRow]) -> None:
        """Store one batch (see the module docstring); raises on any database error."""
        if not batch:
            return
        db = self._database()
        t = self.config
        ids = sorted({r.message_id for r in batch})
        delivered = {int(r["id"]): r["finished_at"]
                     for r in db.fetchall("tracking_delivered_at", {"ids": ids})}
        rows = [(r.hit, r.newsletter_id, r.message_id, r.kind, r.link_idx, r.at,
                 int(machine.with_delivery(r.verdict, r.at, delivered.get(r.message_id),
                                           t.machine_seconds)))
                for r in batch]
        clicked = {r.message_id for r in batch if r.kind == "click"}
        recheck = sorted(clicked | self._recheck)
        since = min(r.at for r in batch) - timedelta(seconds=t.burst_seconds)
        with db.transaction():
            db.execute_values("tracking_events_insert", rows)
            touched = set(ids)
            if recheck:
                touched |= self._mark_bursts(db, recheck, since)
            touched_ids = sorted(touched)
            db.execute("tracking_unique_delete", {"ids": touched_ids})
            db.execute("tracking_unique_rebuild", {"ids": touched_ids})
        self._recheck = clicked
        self.written += len(batch)

    def _mark_bursts(self, db: Database, message_ids: list[int], since: datetime) -> set[int]:
        """Mark the touched recipients' burst clicks; the recipients whose clicks changed."""
        t = self.config
        recent = db.fetchall("tracking_recent_clicks", {"ids": message_ids, "since": since})
        clicks = [machine.Click(int(r["id"]), int(r["message_id"]), int(r["link_idx"]), r["at"])
                  for r in recent]
        found = machine.bursts(clicks, t.burst_links, t.burst_seconds)
        marked = [int(r["id"]) for r in recent
                  if int(r["id"]) in found and int(r["verdict"]) < machine.Verdict.BURST]
        if not marked:
            return set()
        db.execute("tracking_mark_burst", {"ids": marked})
        return {int(r["message_id"]) for r in recent if int(r["id"]) in found}

    # -- the spool -------------------------------------------------------------------

    def _own_spool(self) -> IO[bytes]:
        if self._spool is None:
            directory = self.config.spool_dir
            directory.mkdir(mode=0o700, parents=True, exist_ok=True)
            path = directory / f"hits-{os.getpid()}-{os.urandom(4).hex()}.spool"
            fh = open(path, "ab")  # noqa: SIM115 - kept open (and locked) for life
            fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
            self._spool, self._spool_path = fh, path
        return self._spool

    def _to_spool(self, batch: Sequence[HitRow]) -> None:
        data = "".join(r.to_json() + "\n" for r in batch).encode()
        try:
            fh = self._own_spool()
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        except OSError as exc:
            # Keep them in memory and try again next time, up to a bound.
            if len(self._buffer) + len(batch) <= MAX_BUFFERED:
                self._buffer.extendleft(reversed(batch))
                log.error("tracking: cannot write the spool in %s (%s); %d hits held in "
                          "memory", self.config.spool_dir, exc, len(self._buffer))
            else:
                self.lost += len(batch)
                log.error("tracking: spool unwritable and %d hits already in memory: %d "
                          "hits lost", len(self._buffer), len(batch))
            return
        self._spooled += len(batch)
        self.spooled_total += len(batch)

    def _replay_own(self) -> int:
        fh = self._spool
        if fh is None or self._spool_path is None:
            return 0
        done = self._replay_file(self._spool_path)
        if done is None:
            return 0
        fh.truncate(0)
        fh.flush()
        os.fsync(fh.fileno())
        log.warning("tracking: replayed %d spooled hits", done)
        self._spooled = 0
        return done

    def _replay_orphans(self) -> int:
        """Replay the spool files of processes that are gone (their lock is free)."""
        directory = self.config.spool_dir
        if not directory.is_dir():
            return 0
        stored = 0
        for path in sorted(directory.glob("hits-*.spool")):
            if path == self._spool_path:
                continue
            try:
                fh = open(path, "rb")  # noqa: SIM115 - closed below
            except OSError:
                continue
            try:
                try:
                    fcntl.flock(fh.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
                except OSError:
                    continue  # its process lives, or another one is replaying it
                if os.fstat(fh.fileno()).st_nlink == 0:
                    continue  # replayed and removed while we waited
                done = self._replay_file(path)
                if done is None:
                    return stored
                path.unlink(missing_ok=True)
                stored += done
                log.warning("tracking: replayed %d hits left in %s by a process that is "
                            "gone", done, path.name)
            finally:
                fh.close()
        return stored

    def _replay_file(self, path: Path) -> int | None:
        """Write a spool file's hits in chunks; how many, or None if the database failed."""
        try:
            rows = list(_read_spool(path))
        except OSError as exc:
            log.error("tracking: cannot read spool %s: %s", path, exc)
            return None
        for start in range(0, len(rows), REPLAY_CHUNK):
            if not self._try_write(rows[start:start + REPLAY_CHUNK]):
                return None
        return len(rows)


def _read_spool(path: Path) -> Iterable[HitRow]:
    with open(path, "rb") as fh:
        data = fh.read()
    lines = data.split(b"\n")
    if lines and lines[-1]:
        log.error("tracking: %s ends with a torn line (a crash while writing); it is skipped",
                  path)
    for line in lines[:-1]:
        if not line.strip():
            continue
        try:
            yield HitRow.from_json(line.decode())
        except (ValueError, TypeError, UnicodeDecodeError) as exc:
            log.error("tracking: a bad line in %s is skipped: %s", path, exc)

