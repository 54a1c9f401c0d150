"""The load-balancing decision, as a pure function.

Both balancers (sort and send) call :func:`balance` once per tick with a
snapshot of the live workers and the number of messages ready to assign; the
answer says how many messages each worker gets *now*. Nothing here touches the
database, so the policy is tested exhaustively on its own.

The policy, in order:

1. **Unavailable workers get nothing** (disabled, stopping, dead).
2. **Probe.** A worker with no measured rate (``rate`` is None or <= 0) gets
   one small batch, ``min(probe_batch, batch_max, ready)``, and only when its
   backlog is 0: it must finish the probe, so its rate gets measured, before
   it is trusted with more. Probes are served first (lowest worker id first)
   so that a new server joins the rotation quickly.
3. **Capacity.** A measured worker may hold at most ``rate * horizon_seconds``
   messages (floored; at least 1 so that a very slow worker keeps being
   exercised and re-measured). Its *room* is that capacity minus its backlog,
   capped at ``batch_max`` per tick. A worker whose backlog already covers the
   horizon has no room: a slow server never falls further behind, and the
   total handed out never exceeds what the workers can finish in the horizon.
4. **No dribbling.** A room smaller than ``batch_min`` (or the worker's whole
   capacity, if that is smaller) is left alone until it grows, *unless* what
   is left to assign is itself smaller than ``batch_min``: that is the tail of
   a run (or a trickle from upstream) and must be assigned, otherwise the run
   never finishes.
5. **Split by finish time.** When the ready messages fill every room, every
   worker is filled to its room, i.e. to the same finish time (the horizon).
   When they do not, the messages are *water-filled*: find the finish time
   ``T`` such that giving each worker ``rate*T - backlog`` (clipped to
   ``[0, room]``) uses exactly the ready messages, then round with the
   largest-remainder method. With equal queue times (e.g. empty backlogs) this
   is exactly a split in proportion to rate; with unequal ones it gives less
   to whoever is already further behind, so at the end of a run all workers
   finish at about the same time.
6. **Consolidation.** If a split would hand some worker a batch smaller than
   ``batch_min`` (and smaller than its room), the worker with the smallest
   share is dropped from this tick and the split is redone over the others.
   In the tail (fewer than ``batch_min`` left) a worker is only dropped when
   the others still have room for everything, so the tail is always assigned
   and typically lands in one batch on the worker that will be idle first.
   The cost is at most about ``batch_min / rate`` seconds of finish time.

``batch_max`` should be at least the fastest worker's rate times the balancer
tick, or that worker cannot be kept busy and shares stop being proportional.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Sequence
from dataclasses import dataclass, replace

from .errors import ConfigError

log = logging.getLogger(__name__)

# rate * horizon is a float; without this a capacity of exactly 21 computed as
# 20.999999999999996 would be floored to 20.
_EPS = 1e-9
# See _level(): the lowest share of the horizon the others are held at while
# a worker ramps up.
_LEVEL_FLOOR = 0.25


@dataclass(frozen=True)
class WorkerLoad:
    """One worker as the balancer sees it at the start of a tick."""

    worker_id: int
    rate: float | None  # measured messages/s, smoothed; None (or <= 0) = not yet known
    backlog: int  # messages assigned to it and not yet processed
    available: bool = True  # False = disabled, stopping or dead: gets nothing


@dataclass(frozen=True)
class BalanceParams:
    """The ``[balancer]`` knobs that shape each decision."""

    horizon_seconds: float
    batch_min: int
    batch_max: int
    probe_batch: int

    def __post_init__(self) -> None:
        problems = []
        if not self.horizon_seconds > 0:
            problems.append(f"horizon_seconds must be > 0 (got {self.horizon_seconds})")
        if self.batch_max < 1:
            problems.append(f"batch_max must be >= 1 (got {self.batch_max})")
        if not 0 <= self.batch_min <= self.batch_max:
            problems.append(
                f"batch_min must be between 0 and batch_max={self.batch_max} (got {self.batch_min})"
            )
        if self.probe_batch < 1:
            problems.append(f"probe_batch must be >= 1 (got {self.probe_batch})")
        if problems:
            raise ConfigError(
                "Invalid [balancer] settings: " + "; ".join(problems) + ". Fix them in config.ini."
            )


@dataclass(frozen=True)
class _Slot:
    """A measured worker that can take messages this tick."""

    worker_id: int
    rate: float
    backlog: int
    room: int  # most it may receive now
    min_batch: int  # smallest batch worth sending it (unless it fills its room)

    def finish_after(self, extra: float) -> float:
        return (self.backlog + extra) / self.rate


def is_measured(worker: WorkerLoad) -> bool:
    """True when the worker's rate is known (not None and > 0)."""
    return worker.rate is not None and worker.rate > 0


def capacity(rate: float, params: BalanceParams) -> int:
    """Most messages a worker of this rate may hold: rate*horizon, at least 1."""
    return max(1, math.floor(rate * params.horizon_seconds + _EPS))


def balance(workers: Sequence[WorkerLoad], ready: int, params: BalanceParams) -> dict[int, int]:
    """How many messages each worker gets now (only entries > 0).

    See the module docstring for the policy. Deterministic: the same input
    always gives the same answer, whatever the order of ``workers``.
    """
    ids = [w.worker_id for w in workers]
    if len(set(ids)) != len(ids):
        raise ValueError(f"duplicate worker ids in {sorted(ids)}")
    remaining = max(0, ready)
    live = sorted((w for w in workers if w.available), key=lambda w: w.worker_id)

    out: dict[int, int] = {}
    for w in live:
        if remaining == 0:
            break
        if not is_measured(w) and w.backlog <= 0:
            n = min(params.probe_batch, params.batch_max, remaining)
            out[w.worker_id] = n
            remaining -= n

    if remaining > 0:
        out.update(_split([w for w in live if is_measured(w)], remaining, params))
    result = {k: v for k, v in out.items() if v > 0}
    log.debug("balance ready=%d -> %s", ready, result)
    return result


def _split(known: list[WorkerLoad], remaining: int, params: BalanceParams) -> dict[int, int]:
    tail = remaining < params.batch_min
    candidates: list[tuple[_Slot, bool]] = []
    for w in known:
        assert w.rate is not None  # is_measured() checked it
        cap = capacity(w.rate, params)
        backlog = max(0, w.backlog)
        room = min(params.batch_max, cap - backlog)
        if room <= 0:
            continue
        min_batch = max(1, min(params.batch_min, cap, params.batch_max))
        ramping = cap - backlog > params.batch_max
        candidates.append((_Slot(w.worker_id, w.rate, backlog, room, min_batch), ramping))

    level = _level(candidates, params) if not tail else params.horizon_seconds
    slots: list[_Slot] = []
    for slot, _ramping in candidates:
        if level < params.horizon_seconds:
            room = min(slot.room, math.floor(slot.rate * level + _EPS) - slot.backlog)
            slot = replace(slot, room=room)
        if slot.room <= 0 or (slot.room < slot.min_batch and not tail):
            continue
        slots.append(slot)

    while slots:
        shares = _waterfill(slots, remaining)
        total_room = sum(s.room for s in slots)
        small = [
            s
            for s in slots
            if 0 < shares[s.worker_id] < min(s.min_batch, remaining)
            and shares[s.worker_id] < s.room
        ]
        if not small:
            return shares
        drop = min(
            small,
            key=lambda s: (shares[s.worker_id], -s.finish_after(0), -s.worker_id),
        )
        if tail and total_room - drop.room < remaining:
            # Dropping it would leave part of the tail unassigned: accept the
            # small batches rather than stall the end of the run.
            return shares
        slots = [s for s in slots if s is not drop]
    return {}


def _level(candidates: list[tuple[_Slot, bool]], params: BalanceParams) -> float:
    """The finish time (seconds of backlog) the others are filled to this tick.

    Normally the horizon. But a worker whose room exceeds ``batch_max`` (a new
    or fast worker still ramping up, ``batch_max`` per tick) cannot reach the
    horizon yet; filling the others to the horizon meanwhile would leave them
    with more queued work than it has, and a run that ends then finishes late
    on them. So the others are held at the ramping worker's finish time, but
    never below a quarter of the horizon, which keeps them busy even when
    ``batch_max`` is set too low for a worker to ever catch up.
    """
    ramping = [(s.backlog + s.room) / s.rate for s, is_ramping in candidates if is_ramping]
    if not ramping:
        return params.horizon_seconds
    return min(params.horizon_seconds, max(params.horizon_seconds * _LEVEL_FLOOR, min(ramping)))


def _waterfill(slots: list[_Slot], total: int) -> dict[int, int]:
    """Give ``total`` messages so that the slots finish at the same time.

    Returns integer shares summing to ``min(total, sum of rooms)``.
    """
    total_room = sum(s.room for s in slots)
    if total >= total_room:
        return {s.worker_id: s.room for s in slots}

    def given(s: _Slot, t: float) -> float:
        return min(float(s.room), max(0.0, s.rate * t - s.backlog))

    def filled(t: float) -> float:
        return sum(given(s, t) for s in slots)

    # filled() is piecewise linear and non-decreasing in T; its kinks are
    # where a slot starts receiving (backlog/rate) or is full.
    points = sorted(
        {s.backlog / s.rate for s in slots} | {(s.backlog + s.room) / s.rate for s in slots}
    )
    # Binary search for the first kink where everything is used (filled() is
    # 0 at points[0] and total_room > total at points[-1]), then interpolate.
    i, j = 0, len(points) - 1
    while j - i > 1:
        mid = (i + j) // 2
        if filled(points[mid]) >= total:
            j = mid
        else:
            i = mid
    lo, hi = points[i], points[j]
    f_lo, f_hi = filled(lo), filled(hi)
    level = lo + (hi - lo) * (total - f_lo) / (f_hi - f_lo) if f_hi > f_lo else hi

    exact = {s.worker_id: given(s, level) for s in slots}
    shares = {s.worker_id: min(s.room, math.floor(exact[s.worker_id] + _EPS)) for s in slots}
    # Largest remainder: the units lost to flooring go to the largest
    # fractions; ties go to whoever finishes first, then the lower id.
    order = sorted(
        slots,
        key=lambda s: (
            -(exact[s.worker_id] - shares[s.worker_id]),
            s.finish_after(shares[s.worker_id]),
            s.worker_id,
        ),
    )
    missing = total - sum(shares.values())
    while missing > 0:
        progressed = False
        for s in order:
            if missing == 0:
                break
            if shares[s.worker_id] < s.room:
                shares[s.worker_id] += 1
                missing -= 1
                progressed = True
        if not progressed:  # cannot happen while total < total_room
            break
    while missing < 0:  # float safety net: take back from the latest finisher
        s = max(
            (s for s in slots if shares[s.worker_id] > 0),
            key=lambda s: (s.finish_after(shares[s.worker_id]), s.worker_id),
        )
        shares[s.worker_id] -= 1
        missing += 1
    return shares
