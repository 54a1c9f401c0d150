"""The demo's own throw-away database: created, recognised and dropped by its COMMENT mark.

The demo only ever drops or reuses a database it created itself: it marks it
with a schema COMMENT, and refuses a name that exists without that mark (so
pointing it at a production database by mistake does nothing). The SQL lives
in the database layer (:meth:`Database.create_database`, :meth:`Database.drop_database`).
"""

from __future__ import annotations

import os
from collections.abc import Mapping

from ..config import Config, DatabaseConfig
from ..db import Database

DEMO_DB_NAME = "sendsystem_demo"
DB_MARK = "sendsystem demo database (dropped by sendsystem demo)"


def create_demo_database(db: DatabaseConfig) -> None:
    """Create ``db.name`` afresh, marked as a demo database; refuse to touch any other."""
    database = Database(db)
    try:
        database.create_database(DB_MARK)
    finally:
        database.close()


def drop_demo_database(db: DatabaseConfig) -> None:
    """Drop ``db.name`` if (and only if) it carries the demo's mark."""
    database = Database(db)
    try:
        database.drop_database(DB_MARK)
    finally:
        database.close()


def demo_database_name(config: Config, env: Mapping[str, str] | None = None) -> str:
    """The configured name, unless it is only the default ``sendsystem``."""
    env = os.environ if env is None else env
    name = config.database.name
    if "SENDSYSTEM_DB_NAME" in env or name != DatabaseConfig().name:
        return name
    return DEMO_DB_NAME
