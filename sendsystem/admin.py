"""What the admin commands do, without the command line around it.

Each function takes the :class:`Database` it works on and raises a
:class:`UserError` that says what to fix; nothing is half-done: every
change that spans several rows runs in one transaction, except the two that
may touch millions, which work in short chunks: creating a newsletter's
messages (release.py) and importing a list (importer.py says why and what a
crash leaves).
"""

from __future__ import annotations

import logging
import mimetypes
import os
import socket
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from . import exporter, history, importer, keptcounts
from .addresses import parse_from, validate_email
from .config import format_track, parse_track
from .db import Database
from .errors import UserError
from .importer import ImportResult
from .merge import TemplateSource, check_template
from .release import release
from .states import SubscriberStatus

log = logging.getLogger(__name__)

__all__ = ["ImportResult"]


# ------------------------------------------------------------------ lists

def create_list(db: Database, name: str, from_header: str) -> int:
    name = name.strip()
    if not name or len(name) > 100:
        raise UserError("A list name must be 1 to 100 characters.")
    try:
        sender = parse_from(from_header)
    except ValueError as exc:
        raise UserError(f"--from: {exc}") from None
    if db.fetchone("list_by_name", {"name": name}):
        raise UserError(f"A list named {name!r} already exists.")
    return db.insert("list_insert", {"name": name, "from_name": sender.name,
                                     "from_address": sender.address})


def get_list(db: Database, name: str) -> dict[str, Any]:
    row = db.fetchone("list_by_name", {"name": name})
    if row is None:
        raise UserError(f"There is no list named {name!r}. Create it with "
                        f"`sendsystem list create {name} --from 'Name <address>'`.")
    return row


def import_csv(db: Database, list_name: str, path: Path, *, skip_invalid: bool = False,
               progress: importer.Progress | None = None,
               on_problem: importer.Problems | None = None) -> ImportResult:
    """Import (or update) subscribers from a CSV file of any size; strict: any bad row
    and nothing is imported. See :mod:`sendsystem.importer`."""
    lst = get_list(db, list_name)
    return importer.import_csv(db, int(lst["id"]), str(lst["name"]), path,
                               skip_invalid=skip_invalid, progress=progress,
                               on_problem=on_problem)


def export_csv(db: Database, list_name: str, out: TextIO, *, status: str | None = None,
               for_spreadsheet: bool = False,
               progress: exporter.Progress | None = None) -> int:
    """Write the list as CSV in the layout `list import` reads; the number of rows.
    See :mod:`sendsystem.exporter`."""
    lst = get_list(db, list_name)
    return exporter.export_csv(db, int(lst["id"]), out, status=status,
                               for_spreadsheet=for_spreadsheet, progress=progress)


# -------------------------------------------------------------- templates

def add_template(db: Database, name: str, subject: str, html_file: Path,
                 text_file: Path | None) -> int:
    """Add or replace a template; it must compile in the sandbox first."""
    html = _read_text(html_file, "--html")
    text = _read_text(text_file, "--text") if text_file else None
    check_template(TemplateSource(subject=subject, html=html, text=text))
    db.execute("template_upsert", {"name": name, "subject": subject, "html": html, "text": text})
    row = db.fetchone("template_by_name", {"name": name})
    assert row is not None
    return int(row["id"])


def _read_text(path: Path, option: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise UserError(f"{option} {path}: no such file.") from None
    except UnicodeDecodeError:
        raise UserError(f"{option} {path}: not UTF-8 text.") from None


# ------------------------------------------------------------- newsletters

def parse_at(text: str, now: datetime | None = None) -> datetime:
    """``YYYY-MM-DD HH:MM`` in this machine's local time, as naive UTC for the database."""
    try:
        local = datetime.strptime(text.strip(), "%Y-%m-%d %H:%M")
    except ValueError:
        raise UserError(f"--at {text!r}: use the form 'YYYY-MM-DD HH:MM' (local time).") from None
    return local.astimezone().astimezone(UTC).replace(tzinfo=None)


def enqueue(db: Database, list_name: str, template_name: str, *, at: str | None = None,
            attachments: tuple[Path, ...] = (),
            progress: Callable[[int], None] | None = None,
            track: bool | None = None) -> tuple[int, int]:
    """Create a newsletter; (newsletter id, message rows created now).

    Unscheduled newsletters are released at once (message rows created in
    chunks, see release.py); scheduled ones are released by the sort
    balancer when due, so the audience is the list as it is at send time.
    """
    lst = get_list(db, list_name)
    template = db.fetchone("template_by_name", {"name": template_name})
    if template is None:
        raise UserError(f"There is no template named {template_name!r}. Add it with "
                        "`sendsystem template add`.")
    send_at = parse_at(at) if at else None
    files = []
    for path in attachments:
        try:
            data = path.read_bytes()
        except OSError as exc:
            raise UserError(f"--attach {path}: {exc.strerror or exc}.") from None
        ctype = mimetypes.guess_type(path.name)[0] or "application/octet-stream"
        files.append({"filename": path.name, "content_type": ctype, "size": len(data),
                      "data": data})
    with db.transaction():
        nid = db.insert("newsletter_insert", {
            "list_id": lst["id"], "template_id": template["id"], "subject": template["subject"],
            "html": template["html"], "text": template["text"], "send_at": send_at,
            "attachment_bytes": sum(f["size"] for f in files),
        })
        for f in files:
            db.execute("attachment_insert", {"newsletter_id": nid, **f})
        # What it tracks is fixed now, like its template: the list's setting, or
        # --track (opens and clicks) / --no-track.
        db.execute("newsletter_set_track", {
            "id": nid, "track": None if track is None else "opens,clicks" if track else ""})
    created = 0
    if send_at is None or send_at <= datetime.now(UTC).replace(tzinfo=None):
        # If this command dies half-way, the sort balancer carries on once the
        # lease runs out (the newsletter is due: send_at is NULL).
        holder = f"enqueue:{socket.gethostname()}:{os.getpid()}"
        created = release(db, nid, int(lst["id"]), holder=holder, progress=progress).total
    return nid, created


def get_newsletter(db: Database, newsletter_id: int) -> dict[str, Any]:
    row = db.fetchone("newsletter_get", {"id": newsletter_id})
    if row is None:
        raise UserError(f"There is no newsletter {newsletter_id}.")
    return row


def pause(db: Database, newsletter_id: int, reason: str = "paused by an admin") -> None:
    nl = get_newsletter(db, newsletter_id)
    if not db.execute("newsletter_pause", {"id": newsletter_id, "reason": reason}):
        raise UserError(f"Newsletter {newsletter_id} is {nl['state']}; only a scheduled or "
                        "running newsletter can be paused.")


def resume(db: Database, newsletter_id: int) -> None:
    nl = get_newsletter(db, newsletter_id)
    if not db.execute("newsletter_resume", {"id": newsletter_id}):
        raise UserError(f"Newsletter {newsletter_id} is {nl['state']}, not paused.")


def cancel(db: Database, newsletter_id: int) -> int:
    """Cancel; every message not yet final becomes cancelled. Returns how many."""
    nl = get_newsletter(db, newsletter_id)
    with db.transaction():
        if not db.execute("newsletter_cancel", {"id": newsletter_id}):
            raise UserError(f"Newsletter {newsletter_id} is already {nl['state']}.")
        n = db.execute("newsletter_cancel_messages", {"id": newsletter_id})
    # Finished: fold its kept counters' slots, as the send balancer does for a done one.
    keptcounts.compact(db, newsletter_id)
    return n


def reply_like(pattern: str | None) -> str:
    """A LIKE pattern from ``--reply``: shell wildcards (``*``, ``?``) over the whole
    reply, or, without wildcards, text the reply contains."""
    if not pattern:
        return "%"
    text = pattern.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")
    if "*" not in pattern and "?" not in pattern:
        return f"%{text}%"
    return text.replace("*", "%").replace("?", "_")


def retry_failed(db: Database, newsletter_id: int, reply: str | None = None) -> int:
    """Queue the failed messages of a newsletter again (e.g. after a relay was
    misconfigured); never those of a bounced, unsubscribed, complained or blocked
    recipient, nor a failure that was recorded as a bounce. Returns how many."""
    nl = get_newsletter(db, newsletter_id)
    if nl["state"] not in ("running", "done", "paused"):
        raise UserError(f"Newsletter {newsletter_id} is {nl['state']}; only a running, paused "
                        "or done newsletter can have its failed messages sent again.")
    with db.transaction():
        n = db.execute("newsletter_retry_failed", {"id": newsletter_id,
                                                   "pattern": reply_like(reply)})
        if n:
            db.execute("newsletter_reopen", {"id": newsletter_id})
    log.info("newsletter %s: %d failed messages queued again", newsletter_id, n)
    return n


# ------------------------------------------------------------------ lists: relay group

def set_list_relays(db: Database, name: str, group: str, known: set[str] | None = None) -> None:
    """Send the list's mail only through relay group ``group`` ("" or "default": the
    relays without a group). ``known``: the groups this server's config has."""
    get_list(db, name)
    group = "" if group.strip().lower() in ("", "default") else group.strip()
    if known is not None and group not in known:
        have = ", ".join(sorted(g or "default" for g in known))
        raise UserError(f"No relay in this server's config is in group {group!r} (groups: "
                        f"{have}). Add group = {group} to a [relay NAME] section first, on "
                        "every send server.")
    db.execute("list_set_relay_group", {"name": name, "group": group or None})


def set_list_track(db: Database, name: str, track: str) -> str:
    """What the list's newsletters track from now on: ``opens,clicks``, ``opens``,
    ``clicks`` or ``none``; the stored form. ``[tracking] enabled`` still wins."""
    get_list(db, name)
    value = format_track(parse_track(track))
    db.execute("list_set_track", {"name": name, "track": value})
    return value


# ----------------------------------------------------------------- workers

def find_worker(db: Database, ident: str) -> dict[str, Any]:
    rows = db.fetchall("worker_find", {"id": int(ident) if ident.isdigit() else -1,
                                       "name": ident})
    if not rows:
        raise UserError(f"There is no worker {ident!r}; `sendsystem workers` lists them.")
    if len(rows) > 1:
        listing = ", ".join(f"{r['id']} ({r['role']} on {r['host']})" for r in rows)
        raise UserError(f"{ident!r} names several workers: {listing}. Use the id.")
    return rows[0]


def set_worker_enabled(db: Database, ident: str, enabled: bool) -> dict[str, Any]:
    worker = find_worker(db, ident)
    db.execute("worker_set_enabled", {"id": worker["id"], "enabled": int(enabled)})
    return worker


# --------------------------------------------------------------- blocklist

def block_pattern(raw: str) -> str:
    raw = raw.strip()
    if raw.startswith("@"):
        domain = raw[1:].lower()
        try:
            validate_email(f"x@{domain}")
        except ValueError:
            raise UserError(f"{raw!r} is not a valid @domain.") from None
        return "@" + domain.encode("idna").decode("ascii")
    try:
        return validate_email(raw)
    except ValueError as exc:
        raise UserError(f"{exc}. Give an address or @domain.") from None


def block_add(db: Database, raw: str, reason: str | None = None) -> bool:
    return bool(db.execute("block_add", {"pattern": block_pattern(raw), "reason": reason}))


def block_remove(db: Database, raw: str) -> bool:
    """Lift a block; for an address also the hashed entry `subscriber forget` left."""
    pattern = block_pattern(raw)
    removed = db.execute("block_remove", {"pattern": pattern})
    if not pattern.startswith("@"):
        removed += db.execute("block_remove_forgotten", {"pattern": pattern})
    return bool(removed)


# -------------------------------------------------------------- subscribers

def unsubscribe(db: Database, list_name: str, raw: str) -> bool:
    """An admin takes an address off a list (e.g. asked by phone); True when it was active.

    The change is recorded in the list's history with the reason ``admin``.
    """
    lst = get_list(db, list_name)
    try:
        email = validate_email(raw)
    except ValueError as exc:
        raise UserError(f"{exc}.") from None
    with db.transaction():
        row = db.fetchone("subscriber_by_list_email", {"list_id": lst["id"], "email": email})
        if row is None:
            raise UserError(f"{email} is not on list {list_name!r}.")
        changed = history.change(db, int(row["id"]), "subscriber_set_status",
                                 {"id": row["id"], "status": SubscriberStatus.UNSUBSCRIBED},
                                 to_status=SubscriberStatus.UNSUBSCRIBED, reason=history.ADMIN)
    return changed
