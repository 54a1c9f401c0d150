"""The base runner every role process stands on.

Lifecycle (ARCHITECTURE.md, "The four roles"): take the file lock for this role and ``--name`` (a
second copy exits 0 at once), connect, PREPARE the role's statements,
register in ``workers`` (never re-enabling a disabled row), then loop:
heartbeat every ``heartbeat_interval`` (which is also when the ``enabled``
flag is read), do one unit of work, sleep when idle. A disabled worker, the
first SIGTERM/SIGINT, ``--max-runtime`` or, with ``--once``, running out of
work, ends the loop gracefully: the role hands back what it holds, marks
itself stopped and exits 0. A second signal stops at once (like rq's cold
shutdown).

A role that finds it cannot go on safely (the send worker's journal cannot
be written) calls :meth:`Runner.fail`: the same graceful stop, then an
error line saying what to fix and the error's exit status instead of 0, so
cron mail and supervisors see it. An error while setting up (before the
loop) marks the worker stopped before it propagates, so the balancer takes
its batches back at once instead of after ``heartbeat_timeout``.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import time
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import ClassVar

from filelock import FileLock, Timeout

from .config import Config
from .db import Database
from .errors import DatabaseUnavailable, SendSystemError, TemporaryError, UsageError
from .states import WorkerState

log = logging.getLogger(__name__)

# Statements every role uses; roles add their own in `statements`.
BASE_STATEMENTS = ("worker_register", "worker_get", "worker_heartbeat", "worker_set_state")


class ForcedStop(BaseException):
    """Raised by the second signal: unwind now (BaseException so no handler eats it)."""


# A worker name is part of its lock file's and journal's file names, used
# as-is: mapping odd characters to '_' would let "a b" and "a_b" share one
# lock, and a name the journal refuses would fail only after registering.
NAME_MAX = 64
_NAME = re.compile(rf"[A-Za-z0-9_-][A-Za-z0-9._-]{{0,{NAME_MAX - 1}}}")
NAME_RULE = (f"1 to {NAME_MAX} letters, digits, '-', '_' and '.' (ASCII), "
             "not starting with '.'")


@dataclass(frozen=True)
class RunOptions:
    """How one role process runs. ``name`` is checked here, before anything is
    locked or registered (:class:`UsageError`, exit 2)."""

    name: str
    once: bool = False
    max_runtime: float | None = None
    max_rate: float | None = None
    host: str = ""
    # True when ``name`` is this host's name rather than a given --name.
    default_name: bool = False

    def __post_init__(self) -> None:
        if _NAME.fullmatch(self.name) is None:
            what = (f"This host's name {self.name!r} cannot be the instance name (give one "
                    "with --name)" if self.default_name
                    else f"--name {self.name!r} is not allowed")
            raise UsageError(f"{what}: use {NAME_RULE}. It names this instance's lock file "
                             "and journal.")

    @property
    def hostname(self) -> str:
        return self.host or socket.gethostname()


class Runner:
    """One role process. Subclasses set ``role``/``statements`` and implement ``work``."""

    role: ClassVar[str]
    statements: ClassVar[tuple[str, ...]] = ()
    idle_sleep: float = 0.5  # seconds to wait when work() found nothing

    def __init__(self, config: Config, options: RunOptions) -> None:
        self.config = config
        self.options = options
        self.stop_reason: str | None = None
        # Set by fail(): why this process must not go on; it exits with its status.
        self.failure: SendSystemError | None = None
        self._signals = 0
        self.worker_id = 0
        self.processed = 0
        self.db = Database(config.database, retry_for=None, should_abort=self._abort_db_wait,
                           read_timeout=config.database.read_timeout)
        self._last_heartbeat = 0.0
        self._started = time.monotonic()

    # -- hooks for the roles --------------------------------------------------

    def setup(self) -> None:
        """After registration, before the loop (e.g. replay a journal)."""

    def work(self) -> int:
        """Do one unit of work; return how much was done (0 = idle)."""
        raise NotImplementedError

    def drained(self) -> bool:
        """With --once: True when nothing is left that this role could do."""
        return True

    def shutdown(self) -> None:
        """Hand back or finish what this process holds; called once on the way out."""

    def heartbeat_fields(self) -> dict[str, object]:
        return {"rate": None, "backlog": 0}

    def heartbeat_done(self, started: float) -> None:
        """A heartbeat that started at ``started`` (time.monotonic) is committed."""

    @property
    def heartbeat_state(self) -> WorkerState:
        return WorkerState.RUNNING

    # -- lifecycle --------------------------------------------------------------

    @property
    def stopping(self) -> bool:
        return self.stop_reason is not None

    def request_stop(self, reason: str) -> None:
        if self.stop_reason is None:
            log.info("%s %s: stopping (%s)", self.role, self.options.name, reason)
            self.stop_reason = reason

    def fail(self, error: SendSystemError, reason: str) -> None:
        """Stop gracefully (hand back, mark stopped), then exit with ``error``'s status."""
        if self.failure is None:
            self.failure = error
        self.request_stop(reason)

    def _abort_db_wait(self) -> bool:
        return self._signals > 0

    def _on_signal(self, signum: int, _frame: FrameType | None) -> None:
        self._signals += 1
        if self._signals == 1:
            self.request_stop(signal.Signals(signum).name)
        else:
            raise ForcedStop(signal.Signals(signum).name)

    def lock_path(self) -> Path:
        return self.config.paths.lock_dir / f"{self.role}-{self.options.name}.lock"

    def run(self) -> int:
        path = self.lock_path()
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise SendSystemError(
                f"Cannot create lock directory {path.parent}: {exc}. Fix [paths] lock_dir."
            ) from None
        lock = FileLock(str(path))
        try:
            lock.acquire(timeout=0)
        except Timeout:
            log.info("%s %s already runs on this server (lock %s); exiting",
                     self.role, self.options.name, path)
            return 0
        try:
            return self._run_locked()
        finally:
            lock.release()

    def _run_locked(self) -> int:
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._on_signal)
        try:
            self.db.prepare(BASE_STATEMENTS + self.statements)
            self.worker_id = self.db.insert("worker_register", {
                "host": self.options.hostname, "role": self.role,
                "name": self.options.name, "pid": os.getpid(), "db_node": self.db.node_name,
            })
            self.db.set_slot(self.worker_id)  # its kept counts' own slot (migration 014)
            row = self.db.fetchone("worker_get", {"id": self.worker_id})
            if row is None or not row["enabled"]:
                log.info("%s %s (worker %s) is disabled; exiting. Enable it with "
                         "`sendsystem workers enable %s`.", self.role, self.options.name,
                         self.worker_id, self.worker_id)
                self._mark_stopped()
                return 0
            log.info("%s %s registered as worker %s (pid %s)", self.role, self.options.name,
                     self.worker_id, os.getpid())
            try:
                self.setup()
            except SendSystemError as exc:
                if not isinstance(exc, TemporaryError):
                    self._best_effort_stopped()
                raise
            self.heartbeat(force=True)
            self._loop()
            if self.failure is not None:
                log.error("%s %s exits with status %d: %s", self.role, self.options.name,
                          self.failure.exit_code, self.failure)
                return self.failure.exit_code
            return 0
        except ForcedStop as exc:
            log.warning("%s %s: second %s, stopping now", self.role, self.options.name, exc)
            self._best_effort_stopped()
            return 1
        except DatabaseUnavailable:
            if self._signals:
                log.warning("%s %s: stopped while the database was unreachable",
                            self.role, self.options.name)
                return 0
            raise
        finally:
            self.db.close()

    def _loop(self) -> None:
        while not self.stopping:
            try:
                self.heartbeat()
                if self.stopping:
                    break
                done = self.work()
            except TemporaryError as exc:
                # Connection lost mid-transaction, or a deadlock: the unit of
                # work was rolled back by the server; run it again.
                log.warning("%s %s: %s; retrying", self.role, self.options.name, exc)
                self.sleep(1.0)
                continue
            if self.options.max_runtime is not None and \
                    time.monotonic() - self._started >= self.options.max_runtime:
                self.request_stop("max-runtime reached")
            elif done == 0:
                if self.options.once and self.drained():
                    self.request_stop("--once: nothing left to do")
                else:
                    self.sleep(self.idle_sleep)
        self.shutdown()
        self.heartbeat(force=True)
        self._mark_stopped()
        log.info("%s %s stopped (%s)", self.role, self.options.name, self.stop_reason)

    def _mark_stopped(self) -> None:
        self.db.execute("worker_set_state", {"id": self.worker_id, "state": WorkerState.STOPPED})

    def _best_effort_stopped(self) -> None:
        try:
            self.db.retry_for = 2.0
            self._mark_stopped()
        except Exception:  # a forced stop must not hang on a dead database
            log.debug("could not mark worker stopped", exc_info=True)

    def heartbeat_due(self) -> bool:
        return time.monotonic() - self._last_heartbeat >= self.config.balancer.heartbeat_interval

    def heartbeat(self, *, force: bool = False) -> None:
        """Report liveness, rate and backlog; read the enabled flag. Cheap when not due."""
        now = time.monotonic()
        if not force and now - self._last_heartbeat < self.config.balancer.heartbeat_interval:
            return
        self._last_heartbeat = now
        fields = self.heartbeat_fields()
        self.db.execute("worker_heartbeat", {
            "id": self.worker_id,
            "state": WorkerState.STOPPING if self.stopping else self.heartbeat_state,
            "rate": fields.get("rate"), "backlog": fields.get("backlog", 0),
            "processed": self.processed, "db_node": self.db.node_name,
        })
        row = self.db.fetchone("worker_get", {"id": self.worker_id})
        if row is not None and not row["enabled"]:
            self.request_stop("disabled by an admin")
        self.heartbeat_done(now)

    def sleep(self, seconds: float) -> None:
        """Sleep, but wake for a stop request and keep heartbeating."""
        deadline = time.monotonic() + seconds
        while not self.stopping:
            left = deadline - time.monotonic()
            if left <= 0:
                return
            time.sleep(min(left, 0.1))
