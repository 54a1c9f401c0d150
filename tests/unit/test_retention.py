"""The purge's duration parsing (pure)."""

from __future__ import annotations

import pytest

from sendsystem.errors import UserError
from sendsystem.retention import parse_duration
from sendsystem.stats import merge_bounce_rows


@pytest.mark.parametrize(("text", "seconds"), [("90d", 90 * 86400), ("12h", 43200),
                                               ("30m", 1800), ("45s", 45), ("2w", 1209600),
                                               (" 7 d ", 7 * 86400)])
def test_durations(text: str, seconds: int) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize("text", ["", "90", "d", "1.5d", "-3d", "0d", "3y", "90 days"])
def test_bad_durations_say_how(text: str) -> None:
    with pytest.raises(UserError, match="90d"):
        parse_duration(text)


def test_bounce_rows_add_up_by_kind_and_evidence() -> None:
    assert merge_bounce_rows([{"kind": "hard", "verified": 1, "n": 2}],
                             [{"kind": "hard", "verified": 1, "n": 1},
                              {"kind": "hard", "verified": 0, "n": 4}]) \
        == [{"kind": "hard", "verified": 0, "n": 4}, {"kind": "hard", "verified": 1, "n": 3}]
