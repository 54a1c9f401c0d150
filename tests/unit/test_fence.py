"""The send worker's self-fence decision (sendsystem.fencing.Fence), pure, on an
injectable clock. Its SQL side (the guarded reclaim, outcome writes conditional on
ownership) is in tests/integration/test_fence.py; the cluster scenarios with a real
partition in tests/cluster/test_fencing.py."""

from __future__ import annotations

import pytest

from sendsystem.fencing import Fence


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_shut_until_the_first_heartbeat_and_verification() -> None:
    clock = Clock()
    fence = Fence(3.0, clock)
    assert not fence.is_open(0) and fence.reason(0) == "no heartbeat yet"
    assert fence.heartbeat_done(clock.now) is True  # must verify before sending
    assert not fence.is_open(0)
    fence.verified(0)
    assert fence.is_open(0)


def test_shuts_at_half_the_timeout_after_the_start_of_the_last_heartbeat() -> None:
    clock = Clock()
    fence = Fence(3.0, clock)
    started = clock.now
    clock.now += 0.4  # the heartbeat took 0.4 s
    fence.heartbeat_done(started)
    fence.verified(0)
    clock.now = started + 1.49
    assert fence.is_open(0)
    clock.now = started + 1.5  # measured from the start, not the end
    assert not fence.is_open(0)
    assert "no heartbeat completed for 1.5s" in fence.reason(0)


def test_regular_heartbeats_keep_it_open_without_reverifying() -> None:
    clock = Clock()
    fence = Fence(3.0, clock)
    fence.heartbeat_done(clock.now)
    fence.verified(0)
    for _ in range(20):
        clock.now += 0.5
        assert fence.heartbeat_done(clock.now) is False
        assert fence.is_open(0)


def test_a_heartbeat_after_a_gap_needs_verification_before_opening() -> None:
    clock = Clock()
    fence = Fence(3.0, clock)
    fence.heartbeat_done(clock.now)
    fence.verified(0)
    clock.now += 25  # partition: the heartbeat hung
    started = clock.now - 24.9  # it started long ago and only now completed
    assert fence.heartbeat_done(started) is True
    assert not fence.is_open(0)  # still stale, and unverified
    clock.now += 0.1
    fence.heartbeat_done(clock.now)  # the next one, fresh
    assert not fence.is_open(0)
    assert "ownership not verified" in fence.reason(0)
    fence.verified(0)
    assert fence.is_open(0)


def test_a_reconnect_shuts_it_until_verified_again() -> None:
    clock = Clock()
    fence = Fence(3.0, clock)
    fence.heartbeat_done(clock.now)
    fence.verified(4)
    assert fence.is_open(4)
    assert not fence.is_open(5)  # the connection was lost since the check
    assert fence.needs_verification(5)
    fence.verified(5)
    assert fence.is_open(5)


def test_an_older_heartbeat_completing_late_does_not_move_the_start_back() -> None:
    clock = Clock()
    fence = Fence(4.0, clock)
    fence.heartbeat_done(clock.now)
    fence.verified(0)
    clock.now += 1
    fence.heartbeat_done(clock.now - 1.5)
    assert fence.heartbeat_age() == pytest.approx(1.0)
