"""Load the named SQL statements from sendsystem/sql/queries.sql.

Every statement SendSystem runs lives in that one file under a
``-- name: <name>`` header, like procrastinate's queries.sql. Placeholders are
PyMySQL's ``%(name)s`` style.
"""

from __future__ import annotations

import re
from functools import cache
from importlib.resources import files
from importlib.resources.abc import Traversable

from ..errors import SchemaError

_NAME_RE = re.compile(r"^--\s*name:\s*([a-z0-9_]+)\s*$", re.MULTILINE)
_VALUES_RE = re.compile(r"^--\s*values:\s*(.+?)\s*$", re.MULTILINE)


def sql_dir() -> Traversable:
    """The package's sql/ directory (queries.sql and migrations/), as package data."""
    return files("sendsystem") / "sql"


def parse_queries(text: str) -> dict[str, str]:
    queries: dict[str, str] = {}
    parts = _NAME_RE.split(text)
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        lines = [ln for ln in body.strip().splitlines() if not ln.strip().startswith("--")]
        statement = "\n".join(lines).strip().rstrip(";")
        if name in queries:
            raise SchemaError(f"queries.sql defines {name!r} twice")
        queries[name] = statement
    return queries


def parse_value_columns(text: str) -> dict[str, tuple[str, ...]]:
    """Columns of the ``%(values)s`` row set, from a ``-- values: a, b`` line."""
    columns: dict[str, tuple[str, ...]] = {}
    parts = _NAME_RE.split(text)
    for name, body in zip(parts[1::2], parts[2::2], strict=True):
        m = _VALUES_RE.search(body)
        if m:
            columns[name] = tuple(c.strip() for c in m.group(1).split(","))
    return columns


@cache
def load_queries() -> dict[str, str]:
    return parse_queries((sql_dir() / "queries.sql").read_text(encoding="utf-8"))


@cache
def load_value_columns() -> dict[str, tuple[str, ...]]:
    return parse_value_columns((sql_dir() / "queries.sql").read_text(encoding="utf-8"))


def migrations() -> list[tuple[int, Traversable]]:
    """(version, file) for every sql/migrations/NNN_*.sql, in order."""
    found = [(int(path.name[:3]), path) for path in (sql_dir() / "migrations").iterdir()
             if re.fullmatch(r"[0-9]{3}_\w+\.sql", path.name)]
    return sorted(found, key=lambda item: item[0])


_PARAM_RE = re.compile(r"%\((\w+)\)s|%s")
_IN_PARAM_RE = re.compile(r"\bIN\s+%\((\w+)\)s", re.IGNORECASE)


def to_server_syntax(statement: str, values_columns: tuple[str, ...] = ()) -> str:
    """The statement as the server's PREPARE wants it: every placeholder a '?'.

    A PyMySQL list parameter (``IN %(ids)s``, expanded client-side) becomes
    ``IN (?)`` so the statement still parses and names its columns.
    """
    statement = _IN_PARAM_RE.sub("IN (?)", statement)
    if values_columns:
        row = ", ".join(f"? AS `{c}`" for c in values_columns)
        statement = statement.replace("%(values)s", f"SELECT {row}")
        # Database.execute_rows: one row of the multi-row VALUES list.
        statement = statement.replace("%(rows)s", f"({', '.join('?' * len(values_columns))})")
    return _PARAM_RE.sub("?", statement).replace("%%", "%")
