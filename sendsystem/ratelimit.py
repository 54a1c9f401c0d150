"""Token-bucket rate limits: ``--max-rate`` for workers, per-domain rates for sending.

A bucket holds at most ``burst`` tokens and refills at ``rate`` tokens per
second. ``acquire(n)`` takes ``n`` tokens and, when the bucket goes into debt,
waits exactly as long as the debt takes to refill. Debiting *before* waiting
(a reservation) keeps the long-run rate exact, lets ``n`` exceed ``burst``
(a sort batch of 500 under ``--max-rate 100`` waits 5 s instead of failing),
and lets concurrent callers queue up fairly: each one waits for its own place
in line. The default burst is one second's worth of tokens (at least 1), so a
limited worker starts at once and then runs smoothly at its rate.

Per-domain limits (``[sending] domain_rates``) match a listed domain and all
its subdomains, sharing one bucket: ``gmail.com:50`` caps everything sent to
``gmail.com`` *and* ``googlemail.gmail.com`` together at 50/s, which is what
ops mean when they throttle a provider. The most specific listed entry wins,
so ``mx.example.com:5`` can be tighter than ``example.com:50``. Domains not
covered by any entry are not limited.
"""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import Awaitable, Callable, Mapping

from .errors import ConfigError

log = logging.getLogger(__name__)


def _check_rate(rate: float, what: str) -> float:
    if not rate > 0:
        raise ConfigError(
            f"{what} must be a positive number of messages per second (got {rate!r}); "
            "leave it out for no limit."
        )
    return float(rate)


class _Bucket:
    """Bookkeeping shared by the sync and async limiters (no waiting here)."""

    def __init__(self, rate: float, burst: float | None, clock: Callable[[], float]) -> None:
        self.rate = rate
        self.burst = float(burst) if burst is not None else max(1.0, rate)
        if not self.burst > 0:
            raise ConfigError(f"burst must be positive (got {burst!r}).")
        self.clock = clock
        self.tokens = self.burst
        self.stamp = clock()

    def reserve(self, n: int) -> float:
        """Take ``n`` tokens now; return how long the caller must wait."""
        now = self.clock()
        self.tokens = min(self.burst, self.tokens + (now - self.stamp) * self.rate)
        self.stamp = now
        self.tokens -= n
        return -self.tokens / self.rate if self.tokens < 0 else 0.0

    def refund(self, n: int) -> None:
        self.tokens += n


def _make_bucket(
    rate: float | None, burst: float | None, clock: Callable[[], float]
) -> _Bucket | None:
    return None if rate is None else _Bucket(_check_rate(rate, "max rate"), burst, clock)


class RateLimiter:
    """Blocking token bucket; ``rate=None`` means unlimited (``acquire`` is a no-op).

    Thread-safe: the reservation is made under a lock, the sleep is not.
    """

    def __init__(
        self,
        rate: float | None,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], object] = time.sleep,
    ) -> None:
        self._bucket = _make_bucket(rate, burst, clock)
        self._sleep = sleep
        self._lock = threading.Lock()

    @property
    def rate(self) -> float | None:
        return None if self._bucket is None else self._bucket.rate

    def acquire(self, n: int = 1) -> None:
        """Wait until ``n`` more messages may be processed."""
        if self._bucket is None or n <= 0:
            return
        with self._lock:
            wait = self._bucket.reserve(n)
        if wait > 0:
            self._sleep(wait)


class AsyncRateLimiter:
    """The asyncio version of :class:`RateLimiter` (for the send worker).

    A caller cancelled while waiting gets its tokens back, so cancelled sends
    do not eat into the rate.
    """

    def __init__(
        self,
        rate: float | None,
        burst: float | None = None,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._bucket = _make_bucket(rate, burst, clock)
        self._sleep = sleep

    @property
    def rate(self) -> float | None:
        return None if self._bucket is None else self._bucket.rate

    async def acquire(self, n: int = 1) -> None:
        """Wait until ``n`` more messages may be sent."""
        if self._bucket is None or n <= 0:
            return
        # No lock needed: reserve() runs without an await, so it is atomic
        # on the event loop.
        wait = self._bucket.reserve(n)
        if wait > 0:
            try:
                await self._sleep(wait)
            except asyncio.CancelledError:
                self._bucket.refund(n)
                raise


def normalize_domain(domain: str) -> str:
    """``"User@Mail.Example.COM."`` -> ``"mail.example.com"``; also accepts ``@dom``."""
    d = domain.strip()
    if "@" in d:
        d = d.rsplit("@", 1)[1]
    return d.strip(".").lower()


class DomainRateLimiter:
    """Per-recipient-domain token buckets (async), from ``[sending] domain_rates``.

    ``rates`` maps a domain to messages/s; keys are normalised with
    :func:`normalize_domain` (so ``"Gmail.com"`` and ``"@gmail.com"`` work).
    A domain is limited by the most specific entry that equals it or is a
    parent of it; subdomains share their parent entry's bucket. ``burst`` is
    in seconds' worth of tokens for every bucket (default 1 s, at least 1).
    """

    def __init__(
        self,
        rates: Mapping[str, float],
        *,
        burst_seconds: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
        sleep: Callable[[float], Awaitable[object]] = asyncio.sleep,
    ) -> None:
        self._limiters: dict[str, AsyncRateLimiter] = {}
        for raw, rate in rates.items():
            key = normalize_domain(raw)
            if not key:
                raise ConfigError(
                    f"domain_rates has an empty domain in entry {raw!r}; "
                    "write entries as domain:rate, e.g. gmail.com:50."
                )
            r = _check_rate(rate, f"domain_rates rate for {key}")
            self._limiters[key] = AsyncRateLimiter(
                r, burst=max(1.0, r * burst_seconds), clock=clock, sleep=sleep
            )

    def entry_for(self, domain: str) -> str | None:
        """The listed domain whose limit applies to ``domain``, or None."""
        d = normalize_domain(domain)
        while d:
            if d in self._limiters:
                return d
            _, _, d = d.partition(".")
        return None

    def rate_for(self, domain: str) -> float | None:
        """Messages/s allowed to ``domain`` (None = unlimited)."""
        key = self.entry_for(domain)
        return None if key is None else self._limiters[key].rate

    async def acquire(self, domain: str) -> None:
        """Wait until one more message may go to ``domain`` (or an address there)."""
        if not self._limiters:
            return
        key = self.entry_for(domain)
        if key is not None:
            await self._limiters[key].acquire(1)
