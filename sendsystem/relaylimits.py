"""Cluster-wide ``rate`` and ``daily_quota`` of a relay: a token bucket in the database.

Why a bucket in the database and not shares handed out by the send
balancer: a share is only right while the balancer's picture is right. A
worker that starts, stops or stalls between two ticks would leave its share
unused or, worse, two workers would briefly hold shares that add up to more
than the relay allows (the balancer runs every ``tick_seconds`` and learns of
a dead worker only after ``heartbeat_timeout``). A bucket row is right by
construction: each worker claims a small block of tokens with one
conditional UPDATE (``relay_claim``), which refills the bucket at ``rate``
up to ``burst`` on the database's clock and refuses a claim the bucket or
today's quota cannot cover. The row lock serialises concurrent claims, so in
any interval of length T the cluster is granted at most ``burst + rate x T``
tokens whatever the number of workers (1 or 10), and idle workers cost
nothing. Measured at the relay: tests/test_relays.py::test_cluster_rate_two_workers.

The price is a database round trip per block: blocks are a tenth of a
second's worth (``rate / 10``, at least 1), so a relay with ``rate = 50``
costs the cluster 10 small UPDATEs per second, and a worker blocked on the
database (fenced) claims nothing, which is what we want anyway. Tokens a
worker claimed and did not use (at most one block when it stops) are lost:
the relay sees slightly less than its rate, never more.

``daily_quota`` counts claims per day of the database's clock (its
``CURRENT_DATE``), so every worker agrees when a day ends; when a claim
would pass it, the relay is reported as "daily quota used up" and its
messages are deferred (the pool tries the group's other relays first) until
the day turns. Tests move the clock with ``now``.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from datetime import datetime

from .config import Relay
from .db import Database

log = logging.getLogger(__name__)

RELAY_STATEMENTS = ("relay_usage_seed", "relay_claim", "relay_peek", "relay_health_put")
UNLIMITED_RATE = 1e9
UNLIMITED_QUOTA = 2**31


@dataclass(frozen=True)
class Claim:
    granted: int  # tokens granted (0: none)
    wait: float  # seconds until the bucket can cover the claim (when none was granted)
    quota_left: int | None  # messages left today; None without a quota


def block_size(relay: Relay) -> int:
    """Tokens per claim: a tenth of a second's worth, at least 1."""
    return max(1, int((relay.rate or 100.0) / 10))


def burst_of(relay: Relay) -> float:
    """The bucket's depth: two blocks or half a second's worth, whichever is more.
    Deep enough that two workers polling a little late lose no tokens; the
    overshoot over a minute is at most this many messages (<1 % at 50/s)."""
    if relay.rate is None:
        return UNLIMITED_RATE
    return float(max(2 * block_size(relay), relay.rate / 2))


def claim(db: Database, relay: Relay, n: int, now: datetime | None = None,
          factor: float = 1.0) -> Claim:
    """Take ``n`` tokens of ``relay`` (blocking database calls; run it in a thread).
    ``factor`` < 1 while the relay throttles us: the bucket refills that much slower
    for this claim (every worker sees the throttling, so all claim slower)."""
    rate = relay.rate * factor if relay.rate else UNLIMITED_RATE
    burst = burst_of(relay)
    quota = relay.daily_quota or UNLIMITED_QUOTA
    params = {"relay": str(relay), "n": n, "rate": rate, "burst": burst, "quota": quota,
              "now": now}
    if db.execute("relay_claim", params):
        return Claim(n, 0.0, None)
    row = db.fetchone("relay_peek", params)
    if row is None:
        db.execute("relay_usage_seed", params)
        return Claim(n, 0.0, None) if db.execute("relay_claim", params) else \
            Claim(0, 0.1, None)
    tokens = float(row["tokens"])
    left = quota - int(row["used_today"])
    if relay.daily_quota is not None and left < n:
        return Claim(0, 0.0, max(left, 0))
    return Claim(0, max(0.0, (n - tokens) / rate), None)


class ClusterLimits:
    """The pool's side: waits for a relay's tokens; says when its quota is used up.

    ``claim`` runs :func:`claim` (the send worker runs it in a thread with its
    database handle); ``now`` is the clock passed to it (None: the database's).
    """

    def __init__(self, claim_fn: Callable[[Relay, int, datetime | None, float],
                                          Awaitable[Claim]],
                 now: Callable[[], datetime | None] = lambda: None) -> None:
        self._claim = claim_fn
        self._now = now
        self._tokens: dict[str, int] = {}
        self._locks: dict[str, asyncio.Lock] = {}
        self.used_up: dict[str, str] = {}

    async def take(self, relay: Relay, factor: float = 1.0) -> str | None:
        name = str(relay)
        lock = self._locks.setdefault(name, asyncio.Lock())
        async with lock:
            while self._tokens.get(name, 0) <= 0:
                n = block_size(relay)
                try:
                    got = await self._claim(relay, n, self._now(), factor)
                    if got.quota_left is not None and 0 < got.quota_left < n:
                        # The day's last few: claim exactly what is left.
                        got = await self._claim(relay, got.quota_left, self._now(),
                                                     factor)
                except Exception as exc:  # database trouble: the fence decides; wait
                    log.warning("relay %s: cannot claim tokens (%s); waiting", name, exc)
                    await asyncio.sleep(0.5)
                    continue
                if got.granted:
                    self._tokens[name] = got.granted
                    break
                if got.quota_left is not None:
                    reason = (f"daily quota of {relay.daily_quota} used up; the rest waits "
                              "for the next day (database clock)")
                    self.used_up[name] = reason
                    return reason
                await asyncio.sleep(min(max(got.wait, 0.005), 1.0))
            self._tokens[name] -= 1
            self.used_up.pop(name, None)
            return None
