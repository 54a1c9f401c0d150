"""Self-fencing: when a worker may hand a message to the relay (pure; injectable clock).

The balancer reclaims a worker's batches once the worker's heartbeat in the
database is older than ``heartbeat_timeout`` (on the database's clock). A
worker cut off from the database (a partition, a dead host) cannot know when
that happens, so it stops on its own clock first: it hands nothing new to the
relay once ``heartbeat_timeout / 2`` has passed since the *start* of its last
completed heartbeat. The start, not the end: the row's ``heartbeat_at`` is
written somewhere between the two, so measuring from the start can only make
the worker stop earlier. The other half of the timeout is the margin for the
two clocks and for messages already on the wire.

Coming back is the dangerous moment: the worker still holds rows of batches
that may have been reclaimed while it was away. So after a gap (a heartbeat
that completed when the fence was already shut) or a reconnect of the
database connection, the fence stays shut until the worker has verified which
batches are still its own. The order on heal is: reconnect, heartbeat, verify
ownership (and drop what is no longer ours), send. Verifying *after* the
heartbeat matters: the balancer's reclaim re-reads the heartbeat under lock in
the same statement that marks the batch reclaimed, so once a fresh heartbeat
is committed no later reclaim can succeed; a check made before that heartbeat
could be overtaken by a reclaim the balancer decided on the old one.

:class:`Fence` only decides; the send worker owns the clock readings, the
database calls and the logging.
"""

from __future__ import annotations

import time
from collections.abc import Callable


class Fence:
    """Tracks heartbeats and ownership checks; :meth:`is_open` says whether to send."""

    def __init__(self, heartbeat_timeout: float,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if heartbeat_timeout <= 0:
            raise ValueError("heartbeat_timeout must be positive")
        self.limit = heartbeat_timeout / 2
        self.clock = clock
        self._since: float | None = None  # start of the last completed heartbeat
        self._verified = False            # ownership checked since the last gap
        self._generation: int | None = None  # connection generation at that check

    def heartbeat_done(self, started: float) -> bool:
        """Record a heartbeat that started at ``started`` (this clock) and has just
        completed. True when ownership must be verified before sending again: the
        heartbeat came after a gap in which the balancer may have reclaimed."""
        now = self.clock()
        if self._since is None or now - self._since >= self.limit:
            self._verified = False
        if self._since is None or started > self._since:
            self._since = started
        return not self._verified

    def verified(self, generation: int) -> None:
        """Ownership was checked (and what was lost dropped) on connection ``generation``.
        Call with the generation read *before* the check ran."""
        self._verified = True
        self._generation = generation

    def needs_verification(self, generation: int) -> bool:
        """True after a gap, or when the connection was lost since the last check."""
        return not self._verified or generation != self._generation

    def heartbeat_age(self) -> float | None:
        """Seconds since the start of the last completed heartbeat (None: never)."""
        return None if self._since is None else self.clock() - self._since

    def is_open(self, generation: int) -> bool:
        """May a new message be handed to the relay now?"""
        age = self.heartbeat_age()
        return age is not None and age < self.limit and not self.needs_verification(generation)

    def reason(self, generation: int) -> str:
        """Why the fence is shut (for the log), or 'open'."""
        age = self.heartbeat_age()
        if age is None:
            return "no heartbeat yet"
        if age >= self.limit:
            return (f"no heartbeat completed for {age:.1f}s (limit {self.limit:g}s = "
                    "heartbeat_timeout/2)")
        if self.needs_verification(generation):
            return "batch ownership not verified since the database came back"
        return "open"
