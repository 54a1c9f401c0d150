"""A worker's measured throughput, over *busy* time.

The balancers split work in proportion to each worker's rate, so the rate must
describe what the worker can do, not how much it happened to be given. A worker
that sat idle for a minute because nothing was ready is not slow. So the meter
divides messages by the seconds the worker spent working on them (waiting for
the relay or the database counts as working; waiting for work does not):

    rate = messages in the window / busy seconds in the window

and the window is the last ``window_seconds`` of **busy** time, not of wall
time. Idle time therefore neither lowers the rate nor ages it out: a worker
that comes back after an idle hour is trusted with its last known rate (the
machine did not get slower), and a change of speed (``--max-rate``, a
congested relay) shows fully after ``window_seconds`` of work. A sliding
window rather than an EWMA because it has an exact meaning ("the last 10 s of
work") that ops can check against the logs.

Samples are merged into buckets of ``window_seconds / 20`` busy seconds, so
memory stays constant however often ``busy()`` is called. Not thread-safe: use
one meter per worker loop (the send worker's event loop, the sort worker's
main thread).
"""

from __future__ import annotations

import time
from collections import deque
from collections.abc import Callable

_BUCKETS = 20


class RateMeter:
    """Messages per second over the last ``window_seconds`` of busy time.

    :meth:`rate` is None until there is enough data: at least
    ``min_busy_seconds`` of busy time or ``min_messages`` messages. The second
    condition lets a fast worker be measured from one small probe batch (50
    messages may take 50 ms), which the balancer needs before it hands out
    real batches.
    """

    def __init__(
        self,
        window_seconds: float = 10.0,
        clock: Callable[[], float] = time.monotonic,
        *,
        min_busy_seconds: float = 1.0,
        min_messages: int = 10,
    ) -> None:
        if not window_seconds > 0:
            raise ValueError(f"window_seconds must be > 0, got {window_seconds}")
        self._window = float(window_seconds)
        self._bucket = self._window / _BUCKETS
        self._clock = clock
        self._min_busy = min(min_busy_seconds, self._window)
        self._min_messages = min_messages
        # Each bucket is [messages, busy_seconds]; oldest on the left.
        self._buckets: deque[list[float]] = deque()
        self._messages = 0.0
        self._seconds = 0.0
        self._mark = clock()
        self._total = 0

    @property
    def total(self) -> int:
        """All messages ever recorded (not just those in the window)."""
        return self._total

    def busy(self, n: int, seconds: float) -> None:
        """Record ``n`` messages processed in ``seconds`` of busy time.

        The preferred call: a worker times each batch (or each send) itself,
        so idle waits between batches never enter the measurement.
        """
        if n < 0 or seconds < 0:
            raise ValueError(f"busy() needs n >= 0 and seconds >= 0, got {n}, {seconds}")
        self._total += n
        if self._buckets and self._buckets[-1][1] < self._bucket:
            self._buckets[-1][0] += n
            self._buckets[-1][1] += seconds
        else:
            self._buckets.append([float(n), float(seconds)])
        # Keep at least a full window of busy time, dropping whole buckets.
        seconds_in_window = sum(b[1] for b in self._buckets)
        while len(self._buckets) > 1 and seconds_in_window - self._buckets[0][1] >= self._window:
            seconds_in_window -= self._buckets.popleft()[1]
        # Re-summed rather than kept as running totals so float error cannot
        # accumulate over a long-lived worker; there are only ~20 buckets.
        self._messages = sum(b[0] for b in self._buckets)
        self._seconds = sum(b[1] for b in self._buckets)

    def mark(self) -> None:
        """Start timing a busy interval now (call when work resumes after idling)."""
        self._mark = self._clock()

    def record(self, n: int) -> None:
        """Record ``n`` messages done since the last :meth:`record`/:meth:`mark`.

        The wall time since then counts as busy: call :meth:`mark` when work
        resumes after an idle wait, or use :meth:`busy` with your own timing.
        """
        now = self._clock()
        self.busy(n, max(0.0, now - self._mark))
        self._mark = now

    def rate(self) -> float | None:
        """Smoothed messages per busy second, or None while not yet known."""
        if self._seconds <= 0:
            return None
        if self._seconds < self._min_busy and self._messages < self._min_messages:
            return None
        return self._messages / self._seconds
