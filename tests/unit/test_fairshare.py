"""A worker's share split evenly across running newsletters (sendsystem.fairshare)."""

from __future__ import annotations

import pytest

from sendsystem.fairshare import split_evenly


@pytest.mark.parametrize(("amount", "ready", "expected"), [
    (10, {1: 100, 2: 100}, {1: 5, 2: 5}),
    (10, {1: 2, 2: 100}, {1: 2, 2: 8}),
    (11, {1: 100, 2: 100, 3: 100}, {1: 4, 2: 4, 3: 3}),
    (10, {1: 3, 2: 3}, {1: 3, 2: 3}),
    (5, {1: 0, 2: 9}, {2: 5}),
    (0, {1: 5}, {}),
])
def test_newsletters_share_a_worker_evenly(amount: int, ready: dict[int, int],
                                           expected: dict[int, int]) -> None:
    assert split_evenly(amount, ready) == expected
