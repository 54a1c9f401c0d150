"""Shared fixtures for every tier: a throw-away MariaDB database per test run and
a clean ``Env`` (config file, parsed config, database handle) per test.

What they build on (server settings, the test config.ini, ``Env``) is in
tests/harness/env.py, importable from every tier. tests/unit/conftest.py
refuses these fixtures: a unit test takes no database.
"""

from __future__ import annotations

import os
import secrets
from collections.abc import Iterator
from pathlib import Path

import pymysql
import pytest
from hypothesis import settings

from sendsystem import keptcounts
from sendsystem.config import load_config
from sendsystem.db import Database
from tests.harness.env import Env, server_settings, truncate_all, write_config

# CI runs the property tests with a fixed seed, so a red CI run is reproducible;
# on a developer's machine they explore new examples every run.
settings.register_profile("ci", derandomize=True, print_blob=True)
if os.environ.get("CI"):
    settings.load_profile("ci")

TIERS = ("unit", "integration", "cluster")


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Mark each test with its tier (the directory it is in): `pytest -m unit`."""
    for item in items:
        tier = item.path.parent.name
        if tier in TIERS:
            item.add_marker(tier)


@pytest.fixture(scope="session")
def db_name() -> Iterator[str]:
    """One throw-away database for the whole run, dropped at the end."""
    name = f"sendsystem_test_{os.getpid()}_{secrets.token_hex(3)}"
    s = server_settings()
    try:
        conn = pymysql.connect(**s)  # type: ignore[arg-type]
    except pymysql.err.OperationalError as exc:
        pytest.exit(f"MariaDB is not reachable at {s['host']}:{s['port']}: {exc}. "
                    "Run `make test`, which starts it.", returncode=3)
    conn.close()
    yield name
    conn = pymysql.connect(**s)  # type: ignore[arg-type]
    with conn.cursor() as cur:
        cur.execute(f"DROP DATABASE IF EXISTS `{name}`")
    conn.close()


@pytest.fixture(scope="session")
def schema(db_name: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    config = load_config(write_config(tmp_path_factory.mktemp("schema") / "config.ini", db_name))
    Database(config.database).init_schema()
    return db_name


@pytest.fixture
def env(schema: str, tmp_path: Path) -> Iterator[Env]:
    """A clean database (all tables emptied) and a config pointing at it."""
    path = write_config(tmp_path / "config.ini", schema)
    config = load_config(path)
    db = Database(config.database)
    truncate_all(db)
    yield Env(path=path, config=config, db=db, tmp=tmp_path)
    try:
        # Whatever the test did to the messages (a real send, a cancel, a bounce,
        # a purge, or its own SQL), the kept counts must still equal the rows.
        assert keptcounts.verify(db) == [], "kept counts differ from the message rows"
    finally:
        db.close()
