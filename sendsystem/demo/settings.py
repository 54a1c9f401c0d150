"""The config.ini of a one-machine cluster: the demo's, and the benches' with overrides.

The tests write theirs with the same two functions (tests/harness/env.py), from
settings of their own (a short heartbeat, a fixed secret per database).
"""

from __future__ import annotations

import os
from collections.abc import Mapping, Sequence
from pathlib import Path

from ..config import DatabaseConfig, Relay


def write_config(path: Path, settings: Mapping[str, Mapping[str, object]]) -> Path:
    """Write a config.ini from {section: {key: value}}."""
    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in values.items())
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def with_overrides(settings: Mapping[str, Mapping[str, object]],
                   overrides: Mapping[str, Mapping[str, object]]) -> dict[str, dict[str, object]]:
    """A copy of ``settings`` with ``overrides`` replacing keys section by section."""
    merged = {section: dict(values) for section, values in settings.items()}
    for section, values in overrides.items():
        merged.setdefault(section, {}).update(values)
    return merged


def cluster_settings(db: DatabaseConfig, work_dir: Path, relays: Sequence[Relay],
                     **overrides: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """config.ini sections for a one-machine cluster (tuned with bench/pipeline.py)."""
    settings: dict[str, dict[str, object]] = {
        "database": {"host": db.host, "port": db.port, "user": db.user,
                     "password": db.password, "name": db.name},
        "paths": {"lock_dir": work_dir / "locks", "journal_dir": work_dir / "journal"},
        # Short horizon and tick: the run lasts under a minute, so the
        # balancer must react within a second rather than plan for 30 s.
        "balancer": {"horizon_seconds": 4, "heartbeat_interval": 1, "heartbeat_timeout": 10,
                     "batch_min": 50, "batch_max": 2000, "tick_seconds": 0.5,
                     "probe_batch": 200},
        "sending": {"relays": ", ".join(str(r) for r in relays), "connections": 8,
                    "messages_per_connection": 1000, "timeout": 30, "retry_min": 5,
                    "retry_max": 60, "max_age": 3600, "envelope_domain": "bounces.example.com",
                    "helo": "demo.example.com"},
        "unsubscribe": {"url": "https://news.example.com/unsubscribe/{token}",
                        "mailto": "unsubscribe@bounces.example.com",
                        "secret": os.urandom(24).hex()},
    }
    return with_overrides(settings, overrides)
