"""The tests' world on a MariaDB: where the server is, a test config.ini, and ``Env``
(one test's config file, parsed config and database handle).

The server is the machine's MariaDB (127.0.0.1:3306, root) unless
SENDSYSTEM_TEST_DB_HOST/_PORT/_USER/_PASSWORD say otherwise. The fixtures
that build on this (``db_name``, ``schema``, ``env``) are in tests/conftest.py.
"""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

import pymysql

from sendsystem import demo
from sendsystem.config import Config, load_config
from sendsystem.db import Database

TABLES = ("bounces", "blocklist", "messages", "batches", "workers", "attachments",
          "newsletters", "templates", "subscribers", "lists", "leases",
          "relay_usage", "relay_health", "newsletter_summaries",
          "newsletter_links", "tracking_events", "tracking_unique", "subscriber_events",
          "privacy_salt", "list_stats_weeks", "list_stats_cache", "imports",
          # TRUNCATE fires no trigger: the kept tables are emptied with the rows.
          "kept_counts", "kept_timeline", "kept_sort_workers", "kept_failures")


def server_settings() -> dict[str, object]:
    env = os.environ
    return {
        "host": env.get("SENDSYSTEM_TEST_DB_HOST", "127.0.0.1"),
        "port": int(env.get("SENDSYSTEM_TEST_DB_PORT", "3306")),
        "user": env.get("SENDSYSTEM_TEST_DB_USER", "root"),
        "password": env.get("SENDSYSTEM_TEST_DB_PASSWORD", ""),
    }


def base_settings(db_name: str, folder: Path, db: dict[str, object] | None = None
                  ) -> dict[str, dict[str, object]]:
    s = db or server_settings()
    return {
        "database": {**s, "name": db_name},
        "paths": {"lock_dir": folder / "locks", "journal_dir": folder / "journal"},
        "balancer": {"horizon_seconds": 10, "heartbeat_interval": 0.5, "heartbeat_timeout": 3,
                     "batch_min": 10, "batch_max": 500, "tick_seconds": 0.3,
                     "probe_batch": 20},
        "sending": {"relays": "127.0.0.1:2525", "connections": 4, "timeout": 5,
                    "retry_min": 1, "retry_max": 5, "max_age": 600,
                    "envelope_domain": "bounces.test.example"},
        "unsubscribe": {"url": "https://lists.test.example/unsubscribe/{token}",
                        "mailto": "unsubscribe@bounces.test.example",
                        # Deterministic per database (a rewritten config keeps it) and
                        # always longer than the 32 characters Config.secret() requires.
                        "secret": f"test-secret-{db_name}-{'0123456789abcdef' * 2}"},
        "bounce": {"hard_limit": 1, "soft_limit": 3, "soft_window_days": 7},
    }


def write_config(path: Path, db_name: str, *,
                 overrides: dict[str, dict[str, object]] | None = None,
                 db: dict[str, object] | None = None) -> Path:
    """Write a config.ini for tests; ``overrides`` replace keys section by section."""
    return demo.write_config(path, demo.with_overrides(base_settings(db_name, path.parent, db),
                                                       overrides or {}))


@dataclass
class Env:
    """One test's world: its config file, parsed config and a database handle."""

    path: Path
    config: Config
    db: Database
    tmp: Path

    def cli(self, *args: str, timeout: float = 120) -> tuple[int, str, str]:
        """Run `sendsystem --config ... ARGS` as a real subprocess."""
        proc = subprocess.run([sys.executable, "-m", "sendsystem", "--config", str(self.path),
                               *args], capture_output=True, text=True, timeout=timeout)
        return proc.returncode, proc.stdout, proc.stderr

    def spawn(self, *args: str, log_name: str | None = None) -> subprocess.Popen[bytes]:
        """Start a role process in the background; its log goes to tmp/<log_name>.log."""
        log = open(self.tmp / f"{log_name or args[0]}.log", "ab")  # noqa: SIM115 - child owns it
        return subprocess.Popen([sys.executable, "-m", "sendsystem", "--config", str(self.path),
                                 *args], stdout=log, stderr=subprocess.STDOUT)

    def configure(self, **overrides: dict[str, object]) -> None:
        """Rewrite the config file with these per-section overrides."""
        write_config(self.path, self.config.database.name, overrides=overrides)
        self.config = load_config(self.path)


def truncate_all(db: Database) -> None:
    conn = pymysql.connect(**server_settings(), database=db.config.name)  # type: ignore[arg-type]
    with conn.cursor() as cur:
        cur.execute("SET FOREIGN_KEY_CHECKS = 0")
        for table in TABLES:
            cur.execute(f"TRUNCATE TABLE `{table}`")
        cur.execute("INSERT INTO leases (kind) VALUES ('sort'), ('send')")  # as db init seeds
        cur.execute("SET FOREIGN_KEY_CHECKS = 1")
    conn.commit()
    conn.close()
