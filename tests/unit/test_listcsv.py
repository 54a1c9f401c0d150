"""The CSV layout `list import` reads and `list export` writes (sendsystem/listcsv.py)."""

from __future__ import annotations

import json

import pytest
from hypothesis import given
from hypothesis import strategies as st

from sendsystem.listcsv import (
    HeaderError,
    RowChecker,
    export_header,
    parse_header,
    parse_left_at,
    spreadsheet_safe,
)


def test_header_reserved_columns_any_case_and_merge_fields_as_written() -> None:
    layout = parse_header([" Email ", "First Name", "STATUS", "Left_At", "left_reason", "city"])
    assert (layout.email, layout.status, layout.left_at, layout.left_reason) == (0, 2, 3, 4)
    assert layout.fields == ((1, "First Name"), (5, "city"))


def test_header_field_prefix_is_a_merge_field_even_when_reserved() -> None:
    layout = parse_header(["email", "field:status", "status", "field:field:x"])
    assert layout.status == 2
    assert layout.fields == ((1, "status"), (3, "field:x"))


@pytest.mark.parametrize(("header", "message"), [
    (["mail", "name"], "no 'email' column"),
    (["email", ""], "empty column name"),
    (["email", "field:"], "empty column name"),
    (["email", "City", "city"], "names 'city' twice"),
    (["Email", "email"], "twice"),
    (["email", "status", "Status"], "twice"),
    (["email", "field:Plan", "plan"], "twice"),
])
def test_header_refusals(header: list[str], message: str) -> None:
    with pytest.raises(HeaderError, match=message):
        parse_header(header)


names_st = st.lists(st.text(st.characters(blacklist_categories=("Cs", "Cc")), min_size=1,
                            max_size=12).map(str.strip).filter(bool),
                    max_size=6, unique_by=str.lower)


@given(names_st)
def test_export_header_reads_back_as_the_same_merge_fields(names: list[str]) -> None:
    layout = parse_header(export_header(names))
    assert [name for _, name in layout.fields] == names
    assert layout.status is not None and layout.left_at is not None


def test_fields_json_is_what_json_dumps_writes() -> None:
    checker = RowChecker(parse_header(["email", "navn", "by", "note"]))
    row = checker.check(["soren@Example.DK", "Søren \"Ø\"", "Århus", "tab\there\\"])
    assert row.email == "soren@example.dk"
    expected = {"navn": "Søren \"Ø\"", "by": "Århus", "note": "tab\there\\"}
    assert row.fields == json.dumps(expected, ensure_ascii=False)


def test_row_checks() -> None:
    checker = RowChecker(parse_header(["email", "name", "status", "left_at", "left_reason"]))
    ok = checker.check(["bo@example.com", "Bo", "Unsubscribed ", "2026-01-02T03:04:05+01:00",
                        "moved away"])
    assert (ok.status, ok.left_at, ok.left_reason) == ("unsubscribed", "2026-01-02 02:04:05",
                                                       "moved away")
    plain = checker.check(["bo@example.com", "Bo", "", "", ""])
    assert (plain.status, plain.left_at, plain.left_reason) == (None, None, None)
    with pytest.raises(ValueError, match="has 2 fields, the header has 5"):
        checker.check(["bo@example.com", "Bo"])
    with pytest.raises(ValueError, match="field 'name' contains a line break"):
        checker.check(["bo@example.com", "Bo\r\nBcc: x@y.z", "", "", ""])
    with pytest.raises(ValueError, match="status 'gold' is not one of active, unsubscribed"):
        checker.check(["bo@example.com", "Bo", "gold", "", ""])
    with pytest.raises(ValueError, match="only for a subscriber who left"):
        checker.check(["bo@example.com", "Bo", "active", "2026-01-02 03:04:05", ""])
    with pytest.raises(ValueError, match="only for a subscriber who left"):
        checker.check(["bo@example.com", "Bo", "", "", "why"])
    with pytest.raises(ValueError, match="longer than 100"):
        checker.check(["bo@example.com", "Bo", "bounced", "", "x" * 101])
    with pytest.raises(ValueError, match="invalid domain"):
        checker.check(["bo@example", "Bo", "", "", ""])


@pytest.mark.parametrize(("text", "stored"), [
    ("2026-11-29 14:03:00", "2026-11-29 14:03:00"),
    ("2026-11-29T14:03:00Z", "2026-11-29 14:03:00"),
    ("2026-11-29 14:03", "2026-11-29 14:03:00"),
    ("2026-11-29", "2026-11-29 00:00:00"),
    ("2026-11-29T16:03:00.75+02:00", "2026-11-29 14:03:00"),
    ("  ", None),
])
def test_left_at_is_utc_to_the_second(text: str, stored: str | None) -> None:
    assert parse_left_at(text) == stored


def test_left_at_refuses_what_is_not_a_time() -> None:
    with pytest.raises(ValueError, match="not a time like 2026-11-29 14:03:00"):
        parse_left_at("yesterday")


@pytest.mark.parametrize(("cell", "safe"), [
    ("=HYPERLINK(\"http://x\")", "'=HYPERLINK(\"http://x\")"),
    ("+45 1234", "'+45 1234"), ("-1", "'-1"), ("@SUM(A1)", "'@SUM(A1)"),
    ("\tx", "'\tx"), ("plain", "plain"), ("", ""), ("a=b", "a=b"),
])
def test_spreadsheet_safe(cell: str, safe: str) -> None:
    assert spreadsheet_safe(cell) == safe
