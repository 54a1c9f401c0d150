"""The file-reading and sorting parts of `list import` (sendsystem/importer.py); the
import itself is in tests/integration/test_import_export.py."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from sendsystem import importer
from sendsystem.errors import UserError
from sendsystem.importer import Source, read_rows, sweep_stale_temp, unique_records, utf8_error


def rows_of(path: Path) -> list[tuple[int, list[str] | str]]:
    source = Source(path)
    try:
        return list(read_rows(source))
    finally:
        source.close()


def test_line_numbers_are_the_files_lines(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_bytes(b'\xef\xbb\xbfemail,note\r\n'
                     b'a@example.com,one\r\n'
                     b'\r\n'
                     b'b@example.com,"two\r\nlines"\r\n'
                     b' , \r\n'
                     b'c@example.com,"x""y"\n'
                     b'd@example.com,old mac\rE@example.com,cr only\r')
    assert rows_of(path) == [
        (1, ["email", "note"]),
        (2, ["a@example.com", "one"]),
        (5, ["b@example.com", "two\r\nlines"]),  # a quoted row ends on its last line
        (7, ["c@example.com", 'x"y']),
        (8, ["d@example.com", "old mac"]),
        (9, ["E@example.com", "cr only"]),
    ]


def test_overlong_line_is_a_bad_line_and_memory_stays_bounded(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(importer, "MAX_LINE", 64)
    path = tmp_path / "s.csv"
    path.write_text("email,note\na@example.com,ok\nb@example.com," + "x" * 1000 +
                    "\nc@example.com,ok\n", encoding="utf-8")
    assert rows_of(path) == [(1, ["email", "note"]), (2, ["a@example.com", "ok"]),
                             (3, "is longer than 64 characters"),
                             (4, ["c@example.com", "ok"])]


def test_csv_errors_name_the_line_the_row_began_on(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    path.write_text("email,note\na@example.com,ok\nb@example.com,\"" + "y" * 140_000 +
                    "\nc@example.com,ok\n", encoding="utf-8")
    rows = rows_of(path)
    assert rows[2][0] == 3 and "longer than 131072" in str(rows[2][1])


def test_not_utf8_names_byte_and_line(tmp_path: Path) -> None:
    path = tmp_path / "s.csv"
    data = b"email,by\n" + b"a@example.com,Aarhus\n" * 100_000 + \
        "b@example.com,Århus\n".encode("latin-1")
    path.write_bytes(data)
    bad_at = data.index(b"\xc5")
    assert utf8_error(path) == f"invalid continuation byte at byte {bad_at}, line 100002"
    with pytest.raises(UserError, match=f"not UTF-8 text .*at byte {bad_at}, line 100002"):
        rows_of(path)


def test_no_such_file(tmp_path: Path) -> None:
    with pytest.raises(UserError, match="no such file"):
        Source(tmp_path / "missing.csv")


def test_unique_records_marks_repeats_with_the_first_line() -> None:
    records = ["a\t0000000007\tx\n", "a\t0000000009\tx\n", "b\t0000000002\tx\n",
               "c\t0000000001\tx\n", "c\t0000000003\tx\n", "c\t0000000004\tx\n"]
    assert [first for _, first in unique_records(iter(records))] == [0, 7, 0, 0, 1, 1]


def test_sweep_removes_only_dead_imports_temp_dirs(tmp_path: Path) -> None:
    dead = tmp_path / (importer.TEMP_PREFIX + "dead")
    dead.mkdir()
    (dead / "rows-000001").write_text("x\n")
    young = tmp_path / (importer.TEMP_PREFIX + "young")
    young.mkdir()
    alive = tmp_path / (importer.TEMP_PREFIX + "alive")
    alive.mkdir()
    other = tmp_path / "something-else"
    other.mkdir()
    old = time.time() - 3600
    for d in (dead, alive, other):
        os.utime(d, (old, old))
    with importer._held(alive / "lock"):
        sweep_stale_temp(tmp_path)
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            [young.name, alive.name, other.name])
