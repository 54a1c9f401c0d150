"""Kept counts' pure parts: folding the slots, which timeline rows a bucket reads,
how a difference is named."""

from __future__ import annotations

from datetime import datetime, timedelta
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sendsystem.keptcounts import NO_REPLY, SLOTS, Difference, fold_counts
from sendsystem.stats import TIMELINE_BUCKETS, bucket_start, timeline_resolution

T0 = datetime(2026, 11, 29, 12, 0, 0)


def at(seconds: int | None) -> datetime | None:
    return None if seconds is None else T0 + timedelta(seconds=seconds)


def row(state: str, code: int, slot: int, n: int, deferrals: int = 0, *,
        sample: str | None = None, merged: int | None = None,
        finished: int | None = None) -> dict[str, Any]:
    return {"state": state, "reply_code": code, "slot": slot, "n": n, "deferrals": deferrals,
            "sample": sample, "first_merged": at(merged), "last_merged": at(merged),
            "last_finished": at(finished)}


def test_fold_adds_slots_up_and_keeps_the_extremes() -> None:
    rows = [row("sent", 250, 3, 5, 1, sample="250 b", merged=10, finished=20),
            row("sent", 250, 7, -2, 0, sample="250 a", merged=5, finished=30),
            row("merged", NO_REPLY, 3, -5, merged=10),
            row("merged", NO_REPLY, 7, 5, merged=4),
            row("queued", NO_REPLY, 0, 10),
            row("queued", NO_REPLY, 3, -10)]
    folded = {(r["state"], r["reply_code"]): r for r in fold_counts(rows)}
    sent = folded[("sent", 250)]
    assert (sent["n"], sent["deferrals"], sent["sample"]) == (3, 1, "250 a")
    assert sent["first_merged"] == T0 + timedelta(seconds=5)
    assert sent["last_merged"] == T0 + timedelta(seconds=10)
    assert sent["last_finished"] == T0 + timedelta(seconds=30)
    # Empty sums are kept for their times (the span), unless asked to drop them.
    assert folded[("merged", NO_REPLY)]["n"] == 0
    assert folded[("merged", NO_REPLY)]["first_merged"] == T0 + timedelta(seconds=4)
    assert folded[("queued", NO_REPLY)]["n"] == 0
    dropped = fold_counts(rows, drop_empty=True)
    assert [(r["state"], r["n"]) for r in dropped] == [("sent", 3)]


@given(st.lists(st.tuples(st.sampled_from(["queued", "merged", "sent", "deferred"]),
                          st.sampled_from([NO_REPLY, 250, 421]),
                          st.integers(0, SLOTS - 1), st.integers(-50, 50),
                          st.integers(-5, 5)), max_size=60))
def test_folding_keeps_every_sum(parts: list[tuple[str, int, int, int, int]]) -> None:
    rows = [row(state, code, slot, n, d) for state, code, slot, n, d in parts]
    folded = fold_counts(rows)
    keys = [(r["state"], r["reply_code"]) for r in folded]
    assert len(keys) == len(set(keys)) == len({(p[0], p[1]) for p in parts})
    for state in ("queued", "merged", "sent", "deferred"):
        assert sum(r["n"] for r in folded if r["state"] == state) \
            == sum(p[3] for p in parts if p[0] == state)
        assert sum(r["deferrals"] for r in folded if r["state"] == state) \
            == sum(p[4] for p in parts if p[0] == state)
    assert fold_counts(folded) == folded  # folding twice changes nothing
    assert all(r["n"] or r["deferrals"] for r in fold_counts(rows, drop_empty=True))


@pytest.mark.parametrize("bucket", TIMELINE_BUCKETS)
def test_a_bucket_reads_rows_it_is_made_of(bucket: int) -> None:
    """Rows of a resolution serve only buckets made of whole rows, starting on one,
    and few of them: at most 24 per bucket and worker (a day of hours)."""
    resolution = timeline_resolution(bucket)
    assert bucket % resolution == 0 and bucket // resolution <= 24
    start = bucket_start(datetime(2026, 11, 29, 21, 47, 13, 500000), bucket)
    assert (start - datetime(1970, 1, 1)).total_seconds() % resolution == 0
    assert resolution == {1: 1, 10: 10, 60: 60, 600: 600, 3600: 3600, 86400: 3600}[bucket]


def test_a_difference_names_newsletter_key_and_both_numbers() -> None:
    d = Difference(7, "counts", "sent reply 250", kept=12, actual=10)
    assert str(d) == "newsletter 7 counts sent reply 250: kept 12, rows 10"
