"""Kept counts' pure parts: folding the slots, which timeline rows a bucket reads,
how a difference is named."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sendsystem.keptcounts import NO_REPLY, SLOTS, Difference, fold_counts
from sendsystem.stats import TIMELINE_BUCKETS, bucket_start, timeline_resolution


def row(state: str, code: int, slot: int, n: int, deferrals: int = 0, *,
        sample: str | None = None) -> dict[str, Any]:
    return {"state": state, "reply_code": code, "slot": slot, "n": n, "deferrals": deferrals,
            "sample": sample}


def test_fold_adds_slots_up_and_drops_what_moved_on() -> None:
    rows = [row("sent", 250, 3, 5, 1, sample="250 b"),
            row("sent", 250, 7, -2, 0, sample="250 a"),
            row("merged", NO_REPLY, 3, -5),
            row("merged", NO_REPLY, 7, 5),
            row("deferred", 421, 3, 1, 2, sample="421 x"),
            row("queued", NO_REPLY, 0, 10),
            row("queued", NO_REPLY, 3, -10)]
    folded = {(r["state"], r["reply_code"]): r for r in fold_counts(rows)}
    assert set(folded) == {("sent", 250), ("deferred", 421)}
    sent = folded[("sent", 250)]
    assert (sent["n"], sent["deferrals"], sent["sample"]) == (3, 1, "250 a")
    assert (folded[("deferred", 421)]["n"], folded[("deferred", 421)]["deferrals"]) == (1, 2)


@given(st.lists(st.tuples(st.sampled_from(["queued", "merged", "sent", "deferred"]),
                          st.sampled_from([NO_REPLY, 250, 421]),
                          st.integers(0, SLOTS - 1), st.integers(-50, 50),
                          st.integers(-5, 5)), max_size=60))
def test_folding_keeps_every_sum(parts: list[tuple[str, int, int, int, int]]) -> None:
    rows = [row(state, code, slot, n, d) for state, code, slot, n, d in parts]
    folded = fold_counts(rows)
    keys = [(r["state"], r["reply_code"]) for r in folded]
    assert len(keys) == len(set(keys))
    for state in ("queued", "merged", "sent", "deferred"):
        assert sum(r["n"] for r in folded if r["state"] == state) \
            == sum(p[3] for p in parts if p[0] == state)
        assert sum(r["deferrals"] for r in folded if r["state"] == state) \
            == sum(p[4] for p in parts if p[0] == state)
    assert all(r["n"] or r["deferrals"] for r in folded)
    assert fold_counts(folded) == folded  # folding twice changes nothing


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
