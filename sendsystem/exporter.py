"""`list export`: a list as CSV, in the layout `list import` reads, streamed.

Columns: ``email``, the merge fields, ``status``, ``left_at`` (UTC) and
``left_reason`` (see :mod:`sendsystem.listcsv` for the layout, the
``field:`` escape and the spreadsheet option). Rows come in subscriber id
order, read with keyset pagination (``id > last``, 10,000 at a time) on
``ix_subscribers_list_status``, one status after another merged by id: the
whole list is never fetched at once, and no statement runs for long.

The header must name every merge field before the first row, and the
fields are known only once every row has been read. A first pass asking
the database for the key sets (``SELECT DISTINCT JSON_KEYS(fields)``) took
40 s for 10,000,000 subscribers on the bench machine, and its result is
only right if the list does not change before the second pass (which
needs one transaction open for minutes, or a refusal when it did change).
So there is one pass: the rows go to a spool file in ``TMPDIR`` (as CSV,
each with the number of its key set), the union of the key sets in
first-seen order becomes the header, and the spool is copied out with
every row's values moved to their columns. A row is exported as it was
when its chunk was read: a subscriber who unsubscribes during an export
may appear as still active, as with any copy of a changing list.

The file is the list's personal data: `list export` writes it with mode
0600, through a temporary name, so a failed export leaves no half file.
"""

from __future__ import annotations

import csv
import heapq
import json
import tempfile
from collections.abc import Callable, Iterator
from operator import itemgetter
from pathlib import Path
from typing import Any, TextIO

from .db import Database
from .errors import UserError
from .extsort import work_dir
from .listcsv import STATUSES, export_header, format_left_at, spreadsheet_safe

CHUNK = 10_000
MAX_FIELDS = 10_000  # distinct merge-field names (a CSV wider than this is not a list)
MAX_KEY_SETS = 100_000

# progress(phase, done, total): "Reading" and "Writing", in rows.
Progress = Callable[[str, int, int], None]


def rows_by_id(db: Database, list_id: int, statuses: tuple[str, ...],
               chunk: int = CHUNK) -> Iterator[dict[str, Any]]:
    """The list's subscribers of these statuses in id order, ``chunk`` rows a statement."""
    def one(status: str) -> Iterator[dict[str, Any]]:
        after = 0
        while True:
            rows = db.fetchall("subscribers_export_chunk", {
                "list_id": list_id, "status": status, "after": after, "limit": chunk})
            yield from rows
            if len(rows) < chunk:
                return
            after = int(rows[-1]["id"])
    if len(statuses) == 1:
        return one(statuses[0])
    return heapq.merge(*(one(s) for s in statuses), key=itemgetter("id"))


def _text(value: Any) -> str:
    """A merge value as a cell: import stores strings; anything else as JSON."""
    return value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)


def export_csv(db: Database, list_id: int, out: TextIO, *, status: str | None = None,
               for_spreadsheet: bool = False, progress: Progress | None = None,
               temp_dir: Path | None = None) -> int:
    """Write the list (or its subscribers of one ``status``) to ``out``; the row count."""
    if status is not None and status not in STATUSES:
        raise UserError(f"--status {status!r}: use one of {', '.join(STATUSES)}.")
    statuses = (status,) if status else STATUSES
    report = progress or (lambda phase, done, total: None)
    counts = {r["status"]: int(r["n"]) for r in db.fetchall("list_status_counts",
                                                             {"list_id": list_id})}
    expected = sum(counts.get(s, 0) for s in statuses)
    key_sets: dict[tuple[str, ...], int] = {}
    with tempfile.TemporaryFile("w+", encoding="utf-8", newline="",
                                dir=temp_dir or work_dir()) as spool:
        spool_writer = csv.writer(spool, lineterminator="\n")
        n = 0
        report("Reading", 0, expected)
        for row in rows_by_id(db, list_id, statuses):
            fields = json.loads(row["fields"])
            keys = tuple(fields)
            number = key_sets.get(keys)
            if number is None:
                if len(key_sets) >= MAX_KEY_SETS:
                    raise UserError(f"The list's subscribers have more than {MAX_KEY_SETS} "
                                    "different sets of merge fields; it cannot be one CSV.")
                number = key_sets[keys] = len(key_sets)
            spool_writer.writerow([number, row["email"], *map(_text, fields.values()),
                                   row["status"], format_left_at(row["left_at"]),
                                   row["left_reason"] or ""])
            n += 1
            if not n % CHUNK:
                report("Reading", n, max(n, expected))
        report("Reading", n, n)

        names: list[str] = []
        column: dict[str, int] = {}
        for keys in key_sets:
            for key in keys:
                if key not in column:
                    column[key] = len(names)
                    names.append(key)
        if len(names) > MAX_FIELDS:
            raise UserError(f"The list has {len(names)} different merge fields; more than "
                            f"{MAX_FIELDS} cannot be one CSV.")
        width = len(names)
        # For each key set: None when its fields are exactly the header's, in order
        # (the usual case: the row is copied as it is), else their columns.
        places: list[list[int] | None] = [
            None if list(keys) == names else [column[k] for k in keys] for keys in key_sets]

        writer = csv.writer(out, lineterminator="\n")
        if for_spreadsheet:
            out.write("\ufeff")  # how a spreadsheet knows the file is UTF-8
        header = export_header(names)
        writer.writerow([spreadsheet_safe(c) for c in header] if for_spreadsheet else header)
        spool.seek(0)
        report("Writing", 0, n)
        for done, record in enumerate(csv.reader(spool), 1):
            where = places[int(record[0])]
            if where is None:
                cells = record[1:]
            else:
                values = [""] * width
                for position, value in zip(where, record[2:2 + len(where)], strict=True):
                    values[position] = value
                cells = [record[1], *values, *record[-3:]]
            if for_spreadsheet:
                cells = [spreadsheet_safe(c) for c in cells]
            writer.writerow(cells)
            if not done % CHUNK:
                report("Writing", done, n)
        report("Writing", n, n)
    return n
