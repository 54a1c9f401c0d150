"""The CSV layout that `list import` reads and `list export` writes. Pure.

A header row names the columns. ``email`` is required; ``status``,
``left_at`` and ``left_reason`` are optional; all four are matched without
regard to case and are never merge fields. Every other column is a merge
field, by its name as written.

The reserved columns let an export of one list be imported into another
without mailing anyone who left: ``status`` is one of active, unsubscribed,
bounced, complained (blank: active for a new subscriber, unchanged for an
existing one); ``left_at`` (UTC, ``YYYY-MM-DD HH:MM:SS``; ISO 8601 with an
offset is converted) and ``left_reason`` (at most 100 characters) say when
and why a subscriber who left did so, and are refused for an active one.
What an import does with them is in the ``subscribers_import`` statement:
a new subscriber gets them as written; an existing one never goes back to
active.

Reserving ``status`` changes one thing for files written before: a merge
field called ``status`` (any case) is now read as the subscription status,
and a value that is not one is a bad line, named. Such a field, and any
merge field whose name is reserved, is written by `list export` as
``field:NAME``: a ``field:`` prefix always means "the merge field NAME", so
the round trip stays exact.

A merge field a subscriber does not have is exported empty and comes back
as an empty value: CSV has no "absent". Lists imported from files of one
layout (every subscriber has the same fields) round-trip exactly.

Spreadsheets run a cell that begins with ``=``, ``+``, ``-`` or ``@`` (or a
tab or CR) as a formula (OWASP "CSV injection"). An export is a copy of the
list for `list import`, so by default it writes values exactly;
``--for-spreadsheet`` prefixes such cells with ``'`` (what OWASP
recommends), which makes the file safe to open and no longer exact.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from datetime import UTC, datetime
from json.encoder import encode_basestring
from typing import NamedTuple

from .addresses import validate_email
from .states import SubscriberStatus

RESERVED = ("email", "status", "left_at", "left_reason")
FIELD_PREFIX = "field:"
STATUSES = tuple(s.value for s in SubscriberStatus)
LEFT_REASON_MAX = 100
TIME_FORMAT = "%Y-%m-%d %H:%M:%S"
_UNSAFE_RE = re.compile(r"[\r\n\x00]")
_FORMULA_START = ("=", "+", "-", "@", "\t", "\r")


class HeaderError(ValueError):
    """The header row cannot be used; the message says why."""


@dataclass(frozen=True)
class Layout:
    """Which column is what, from the header row."""

    names: tuple[str, ...]  # the header as written (stripped)
    email: int
    status: int | None
    left_at: int | None
    left_reason: int | None
    fields: tuple[tuple[int, str], ...]  # (column, merge-field name), in header order

    @property
    def width(self) -> int:
        return len(self.names)


def parse_header(header: list[str]) -> Layout:
    """The layout of a header row; :class:`HeaderError` when it has no email column,
    an empty name, or a name twice."""
    names = tuple(h.strip() for h in header)
    reserved: dict[str, int] = {}
    fields: list[tuple[int, str]] = []
    seen: set[str] = set()
    for index, name in enumerate(names):
        lowered = name.lower()
        if lowered.startswith(FIELD_PREFIX):
            role, field_name = "field", name[len(FIELD_PREFIX):]
        elif lowered in RESERVED:
            role, field_name = lowered, ""
        else:
            role, field_name = "field", name
        if not name or (role == "field" and not field_name):
            raise HeaderError("the header row has an empty column name")
        key = f"field {field_name.lower()}" if role == "field" else role
        if key in seen:
            raise HeaderError(f"the header row names {name!r} twice (column names are "
                              "compared without regard to case)")
        seen.add(key)
        if role == "field":
            fields.append((index, field_name))
        else:
            reserved[role] = index
    if "email" not in reserved:
        raise HeaderError(f"the header row has no 'email' column (it has: {', '.join(names)})")
    return Layout(names=names, email=reserved["email"], status=reserved.get("status"),
                  left_at=reserved.get("left_at"), left_reason=reserved.get("left_reason"),
                  fields=tuple(fields))


def export_header(field_names: list[str]) -> list[str]:
    """The header `list export` writes: email, the merge fields, status, left_at,
    left_reason (a merge field whose name is reserved or starts with ``field:``
    gets the ``field:`` prefix)."""
    def column(name: str) -> str:
        lowered = name.lower()
        if lowered in RESERVED or lowered.startswith(FIELD_PREFIX):
            return FIELD_PREFIX + name
        return name
    return ["email", *(column(n) for n in field_names), "status", "left_at", "left_reason"]


class Checked(NamedTuple):
    """One good row, ready to store (a tuple: a list of millions makes millions)."""

    email: str
    status: str | None  # None: the file did not say
    left_at: str | None  # normalised TIME_FORMAT, UTC
    left_reason: str | None
    fields: str  # the merge fields as a JSON object, in header order


class RowChecker:
    """Checks rows of one layout; :meth:`check` raises ValueError with the reason."""

    def __init__(self, layout: Layout) -> None:
        self.layout = layout
        self._width = layout.width
        self._email = layout.email
        # The optional columns: checked only when the file has any of them.
        self._statuses = (layout.status, layout.left_at, layout.left_reason) != (None,) * 3
        # JSON keys are encoded once per file, not once per row; the object is
        # byte-for-byte what json.dumps(..., ensure_ascii=False) writes.
        self._keys = tuple((index, encode_basestring(name) + ": ")
                           for index, name in layout.fields)

    def check(self, row: list[str]) -> Checked:
        if len(row) != self._width:
            raise ValueError(f"has {len(row)} fields, the header has {self._width}")
        if _UNSAFE_RE.search("".join(row)):
            for name, value in zip(self.layout.names, row, strict=True):
                if _UNSAFE_RE.search(value):
                    raise ValueError(f"field {name!r} contains a line break or NUL")
        email = validate_email(row[self._email])
        fields = "{" + ", ".join([key + encode_basestring(row[index])
                                  for index, key in self._keys]) + "}"
        if not self._statuses:
            return Checked(email, None, None, None, fields)
        layout = self.layout
        status = None if layout.status is None else parse_status(row[layout.status])
        left_at = None if layout.left_at is None else parse_left_at(row[layout.left_at])
        reason = None
        if layout.left_reason is not None and row[layout.left_reason]:
            reason = row[layout.left_reason]
            if len(reason) > LEFT_REASON_MAX:
                raise ValueError(f"left_reason is longer than {LEFT_REASON_MAX} characters")
        if (left_at or reason) and status in (None, SubscriberStatus.ACTIVE):
            raise ValueError("left_at and left_reason are only for a subscriber who left "
                             "(status unsubscribed, bounced or complained)")
        return Checked(email, status, left_at, reason, fields)


def parse_status(value: str) -> str | None:
    text = value.strip().lower()
    if not text:
        return None
    if text not in STATUSES:
        raise ValueError(f"status {value!r} is not one of {', '.join(STATUSES)} (the "
                         "'status' column is the subscription status; a merge field of "
                         f"that name must be called '{FIELD_PREFIX}status')")
    return text


def parse_left_at(value: str) -> str | None:
    """``left_at`` as UTC ``YYYY-MM-DD HH:MM:SS`` (seconds, as stored), or None if blank."""
    text = value.strip()
    if not text:
        return None
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise ValueError(f"left_at {value!r} is not a time like 2026-11-29 14:03:00 "
                         "(UTC)") from None
    if when.tzinfo is not None:
        when = when.astimezone(UTC).replace(tzinfo=None)
    return when.strftime(TIME_FORMAT)


def format_left_at(value: datetime | None) -> str:
    return "" if value is None else value.strftime(TIME_FORMAT)


def spreadsheet_safe(value: str) -> str:
    """``'`` before a cell a spreadsheet would run as a formula (see the module docstring)."""
    return "'" + value if value.startswith(_FORMULA_START) else value
