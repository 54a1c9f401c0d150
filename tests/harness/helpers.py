"""Test helpers: build lists and newsletters quickly, wait for processes and states."""

from __future__ import annotations

import os
import subprocess
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pymysql
import pytest

from sendsystem import admin

from .env import Env, server_settings

HTML = """<html><body><h1>Hej {{ first_name }}!</h1>
{% set greeting = "Kære " ~ first_name %}<p>{{ greeting }} fra {{ city }}</p>
{% for i in range(3) %}<p>Artikel {{ i }}: {{ newsletter.subject }}</p>{% endfor %}
<p><a href="{{ unsubscribe_url }}">Afmeld</a> {{ list.name }}</p></body></html>"""
TEXT = "Hej {{ first_name }}\n{% for i in range(3) %}Artikel {{ i }}\n{% endfor %}" \
       "Afmeld: {{ unsubscribe_url }}\n"


def make_newsletter(env: Env, n: int, *, list_name: str = "news", at: str | None = None,
                    html: str = HTML, text: str | None = TEXT,
                    subject: str = "Nyt fra {{ city }}", attachments: tuple[Path, ...] = (),
                    domain: str = "example.com") -> int:
    """A list of ``n`` subscribers, a template and an enqueued newsletter; its id."""
    if env.db.fetchone("list_by_name", {"name": list_name}) is None:
        admin.create_list(env.db, list_name, "Nyhedsbrevet <news@example.com>")
        csv = env.tmp / f"{list_name}.csv"
        with csv.open("w", encoding="utf-8") as fh:
            fh.write("email,first_name,city\n")
            for i in range(n):
                fh.write(f"user{i}@{domain},Bruger {i},Århus\n")
        admin.import_csv(env.db, list_name, csv)
    (env.tmp / "t.html").write_text(html, encoding="utf-8")
    text_path = None
    if text is not None:
        text_path = env.tmp / "t.txt"
        text_path.write_text(text, encoding="utf-8")
    admin.add_template(env.db, "t", subject, env.tmp / "t.html", text_path)
    nid, _ = admin.enqueue(env.db, list_name, "t", at=at, attachments=attachments)
    return nid


def query(conn: pymysql.connections.Connection, statement: str, params: Any = None
          ) -> list[dict[str, Any]]:
    """Run one statement on a fresh DictCursor connection, close it, return the rows."""
    try:
        with conn.cursor() as cur:
            cur.execute(statement, params)
            return list(cur.fetchall())
    finally:
        conn.close()


def sql(env: Env, statement: str, params: Any = None) -> list[dict[str, Any]]:
    """Inspect or arrange the database directly (tests only)."""
    return query(pymysql.connect(**server_settings(),  # type: ignore[arg-type]
                                 database=env.config.database.name, autocommit=True,
                                 cursorclass=pymysql.cursors.DictCursor), statement, params)


@contextmanager
def mounted_tmpfs(mount: Path, options: str) -> Iterator[Path]:
    """A tmpfs mounted on ``mount`` (created if missing) with ``options`` such as
    "size=64k,mode=0700"; skips the test when not root or when mounting fails;
    always unmounted at the end."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root")
    mount.mkdir(mode=0o700, parents=True, exist_ok=True)
    proc = subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(mount)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a tmpfs here: {proc.stderr.strip()}")
    try:
        yield mount
    finally:
        if subprocess.run(["umount", str(mount)], capture_output=True).returncode:
            subprocess.run(["umount", "-l", str(mount)], check=False)


def states(env: Env, newsletter_id: int) -> dict[str, int]:
    rows = sql(env, "SELECT state, COUNT(*) AS n FROM messages WHERE newsletter_id = %s "
                    "GROUP BY state", (newsletter_id,))
    return {r["state"]: int(r["n"]) for r in rows}


def wait_for(predicate: Callable[[], Any], timeout: float, what: str,
             interval: float = 0.1) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        time.sleep(interval)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> int:
    try:
        return proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        raise AssertionError(f"process {proc.args} did not exit within {timeout}s") from None


def stop_all(*procs: subprocess.Popen[bytes]) -> None:
    for p in procs:
        if p.poll() is None:
            p.terminate()
    for p in procs:
        try:
            p.wait(timeout=10)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()


def worker_row(env: Env, name: str, role: str) -> dict[str, Any] | None:
    rows = sql(env, "SELECT *, TIMESTAMPDIFF(MICROSECOND, heartbeat_at, NOW(6)) / 1e6 AS age "
                    "FROM workers WHERE name = %s AND role = %s", (name, role))
    return rows[0] if rows else None
