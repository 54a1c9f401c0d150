"""`sendsystem bounce receive` and `bounce scan` as real subprocesses (MTA pipe, cron)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

from sendsystem.bounce.maildir import deliver_to_maildir
from tests.harness.env import Env
from tests.integration.test_intake import DATA, bounce_rows, dsn, send_newsletter, state


def closed_port() -> int:
    """A loopback port nobody listens on (bound, then released)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def run_cli(env: Env, *args: str, stdin: bytes = b"", db_port: int | None = None
            ) -> tuple[int, str, str]:
    child_env = dict(os.environ)
    if db_port is not None:
        child_env["SENDSYSTEM_DB_PORT"] = str(db_port)
    proc = subprocess.run([sys.executable, "-m", "sendsystem", "--config", str(env.path), *args],
                          input=stdin, capture_output=True, env=child_env, timeout=120)
    return proc.returncode, proc.stdout.decode(), proc.stderr.decode()


def test_receive_records_hard_bounce(env: Env) -> None:
    [a] = send_newsletter(env, ["gone@example.org"])
    code, out, err = run_cli(env, "bounce", "receive", "--recipient", a.verp,
                             stdin=dsn(a.verp, a.email))
    assert code == 0, err
    assert "recorded hard" in out and f"message {a.id}" in out
    assert state(env, a) == ("bounced", "bounced")


def test_receive_takes_recipient_from_postfix_environment(env: Env) -> None:
    [a] = send_newsletter(env, ["gone@example.org"])
    raw = dsn("somewhere@else.example", a.email)  # headers name no VERP address
    child = dict(os.environ, ORIGINAL_RECIPIENT=a.verp)
    proc = subprocess.run([sys.executable, "-m", "sendsystem", "--config", str(env.path),
                           "bounce", "receive"], input=raw, capture_output=True, env=child,
                          timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert b"via verp" in proc.stdout


def test_receive_not_a_bounce_exits_0(env: Env) -> None:
    code, out, _err = run_cli(env, "bounce", "receive",
                              stdin=(DATA / "personal_reply.eml").read_bytes())
    assert code == 0 and out.startswith("ignored not_bounce")
    assert bounce_rows(env) == []


def test_receive_keeps_unknown_mail_in_a_maildir(env: Env) -> None:
    keep = env.tmp / "unknown-mail"
    raw = (DATA / "personal_reply.eml").read_bytes()
    code, _out, err = run_cli(env, "bounce", "receive", "--keep-unknown", str(keep), stdin=raw)
    assert code == 0, err
    [kept] = list((keep / "new").iterdir())
    assert kept.read_bytes() == raw


def test_receive_empty_input_exits_1(env: Env) -> None:
    code, _out, err = run_cli(env, "bounce", "receive", stdin=b"\r\n")
    assert code == 1 and "empty" in err


def test_receive_database_down_exits_75_and_nothing_is_lost(env: Env) -> None:
    [a] = send_newsletter(env, ["gone@example.org"])
    raw = dsn(a.verp, a.email)
    code, _out, err = run_cli(env, "bounce", "receive", "--db-wait", "0.5", stdin=raw,
                              db_port=closed_port())
    assert code == 75, err
    assert "unreachable" in err
    assert state(env, a) == ("sent", "active") and bounce_rows(env) == []
    # The MTA kept the message and delivers it again once MariaDB is back.
    code, _out, err = run_cli(env, "bounce", "receive", stdin=raw)
    assert code == 0, err
    assert state(env, a) == ("bounced", "bounced")
    assert len(bounce_rows(env)) == 1


def test_receive_broken_config_exits_75(env: Env) -> None:
    """An admin mistake is fixable: the MTA must keep the bounce meanwhile."""
    env.configure(database={"name": "no_such_sendsystem_db"})
    code, _out, err = run_cli(env, "bounce", "receive", stdin=dsn("x@bounces.test.example",
                                                                  "y@example.org"))
    assert code == 75, err
    assert "db init" in err


def _maildir_with(env: Env, messages: dict[str, bytes]) -> Path:
    root = env.tmp / "Maildir"
    for sub in ("cur", "new", "tmp"):
        (root / sub).mkdir(parents=True, exist_ok=True)
    for name, raw in messages.items():
        (root / "new" / name).write_bytes(raw)
    return root


def test_scan_moves_processed_and_unknown(env: Env) -> None:
    a, b = send_newsletter(env, ["gone@example.org", "slow@example.org"])
    hard = dsn(a.verp, a.email)  # kept: its Date: header is the time of the call
    root = _maildir_with(env, {
        "1.hard": hard,
        "2.soft": dsn(b.verp, b.email, action="delayed", status="4.4.1"),
        "3.stranger": dsn("postmaster@lists.test.example", "stranger@example.org"),
        "4.personal": (DATA / "personal_reply.eml").read_bytes(),
        "5.empty": b"",
    })
    # A message a mail client already looked at (in cur/, with flags).
    (root / "cur" / "6.ooo:2,S").write_bytes((DATA / "ooo_english.eml").read_bytes())
    code, out, err = run_cli(env, "bounce", "scan", str(root))
    assert code == 0, err
    assert "3 processed, 3 moved to unknown" in out
    assert sorted(os.listdir(root / "new")) == [] and os.listdir(root / "cur") == []
    processed = sorted(os.listdir(root / ".processed" / "cur"))
    assert processed == ["1.hard:2,S", "2.soft:2,S", "6.ooo:2,S"]
    assert sorted(os.listdir(root / ".unknown" / "new")) == ["3.stranger", "4.personal",
                                                               "5.empty"]
    for folder in (".processed", ".unknown"):
        assert {p.name for p in (root / folder).iterdir()} >= {"cur", "new", "tmp"}
    assert state(env, a) == ("bounced", "bounced")
    # The stranger's DSN names an address only: kept unverified, it changed nothing.
    assert sorted((r["kind"], r["verified"]) for r in bounce_rows(env)) == \
        [("hard", 0), ("hard", 1), ("soft", 1)]
    # Nothing is deleted: every byte is still there.
    assert (root / ".processed" / "cur" / "1.hard:2,S").read_bytes() == hard
    # A second scan finds nothing to do.
    code, out, _err = run_cli(env, "bounce", "scan", str(root))
    assert code == 0 and out.startswith("0 processed, 0 moved")


def test_scan_stops_when_database_is_down(env: Env) -> None:
    [a] = send_newsletter(env, ["gone@example.org"])
    root = _maildir_with(env, {"1.hard": dsn(a.verp, a.email)})
    deliver_to_maildir(root, dsn("postmaster@lists.test.example", "x@example.org"))
    code, _out, err = run_cli(env, "bounce", "scan", "--db-wait", "0.5", str(root),
                              db_port=closed_port())
    assert code == 75, err
    assert len(os.listdir(root / "new")) == 2  # left for the next run
    code, out, err = run_cli(env, "bounce", "scan", str(root))
    assert code == 0, err
    assert "1 processed, 1 moved to unknown" in out
    assert state(env, a) == ("bounced", "bounced")


def test_scan_rejects_a_directory_that_is_no_maildir(env: Env) -> None:
    code, _out, err = run_cli(env, "bounce", "scan", str(env.tmp))
    assert code == 1 and "not a Maildir" in err


RECIPE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


def test_short_secret_stops_bounce_intake_before_any_mail_is_touched(env: Env) -> None:
    [a] = send_newsletter(env, ["gone@example.org"])
    raw = dsn(a.verp, a.email)
    env.configure(unsubscribe={"secret": "only-twenty-chars..."})
    # The MTA pipe: 75, so Postfix keeps the bounce until the admin fixes the config.
    code, _out, err = run_cli(env, "bounce", "receive", "--recipient", a.verp, stdin=raw)
    assert code == 75, err
    assert "at least 32 characters" in err and RECIPE in err
    root = _maildir_with(env, {"1.hard": raw})
    code, _out, err = run_cli(env, "bounce", "scan", str(root))
    assert code == 1, err
    assert "at least 32 characters" in err and RECIPE in err and "Traceback" not in err
    assert os.listdir(root / "new") == ["1.hard"]
    assert not (root / ".processed").exists() and not (root / ".unknown").exists()
    assert bounce_rows(env) == [] and state(env, a) == ("sent", "active")
