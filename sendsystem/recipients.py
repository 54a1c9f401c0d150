"""The recipient service: bounces, complaints and unsubscribes change who is mailed.

Shared by the send worker (a 5.1.x reply at send time is a hard bounce) and
the bounce intake. Thresholds come from ``[bounce]``: ``hard_limit`` hard
bounces, or ``soft_limit`` soft bounces within ``soft_window_days``, set
every subscription of the address to `bounced`. A complaint unsubscribes at
once and blocks the address. Every later newsletter skips them, including
messages already queued or merged (the sort and send workers check status
and blocklist per message).

The intake records at most one bounce of each kind per message
(:func:`record_bounce_once`): an MTA re-delivering a bounce after a
temporary failure, a scan interrupted between recording and moving the
file, or a delay warning followed by the final report never count twice
towards the thresholds.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .config import BounceConfig
from .db import Database

log = logging.getLogger(__name__)

RECIPIENT_STATEMENTS = ("bounce_insert", "bounce_tally", "subscribers_mark_bounced",
                        "message_mark_bounced")
INTAKE_STATEMENTS = (*RECIPIENT_STATEMENTS, "bounce_message_lock", "bounce_seen_for_message",
                     "subscriber_complained", "block_add", "subscriber_with_list",
                     "subscriber_unsubscribe", "message_for_bounce", "message_by_message_id",
                     "recent_message_by_email")


@dataclass(frozen=True)
class Recorded:
    """What :func:`record_bounce_once` / :func:`record_complaint` did."""

    stored: bool  # False: this message already had a bounce of this kind
    status_changed: bool  # the subscriber is now bounced / complained


def _store(db: Database, limits: BounceConfig, *, email: str, kind: str,
           message_id: int | None, subscriber_id: int | None, status: str | None,
           diagnostic: str | None) -> bool:
    """Insert the bounce and apply the thresholds; the caller holds a transaction."""
    db.execute("bounce_insert", {
        "message_id": message_id, "subscriber_id": subscriber_id, "email": email,
        "kind": kind, "status": (status or "")[:20] or None,
        "diagnostic": (diagnostic or "")[:1000] or None,
    })
    if kind == "hard" and message_id is not None:
        db.execute("message_mark_bounced", {"id": message_id})
    if kind not in ("hard", "soft"):
        return False
    tally = db.fetchone("bounce_tally", {"email": email, "days": limits.soft_window_days})
    hard = int(tally["hard"]) if tally else 0
    soft = int(tally["soft"]) if tally else 0
    if hard >= limits.hard_limit or soft >= limits.soft_limit:
        changed = db.execute("subscribers_mark_bounced", {"email": email})
        if changed:
            log.info("%s set to bounced (%d hard, %d soft bounces)", email, hard, soft)
        return bool(changed)
    return False


def record_bounce(db: Database, limits: BounceConfig, *, email: str, kind: str,
                  message_id: int | None = None, subscriber_id: int | None = None,
                  status: str | None = None, diagnostic: str | None = None) -> bool:
    """Store one bounce (hard/soft/autoreply/...) and apply the thresholds.

    Returns True when the address crossed a threshold and is now `bounced`.
    """
    with db.transaction():
        return _store(db, limits, email=email, kind=kind, message_id=message_id,
                      subscriber_id=subscriber_id, status=status, diagnostic=diagnostic)


def _seen(db: Database, message_id: int, kind: str) -> bool:
    # Lock the message row first, so two intakes of the same bounce queue up
    # here instead of both finding no earlier bounce.
    db.fetchone("bounce_message_lock", {"id": message_id})
    return bool(db.fetchval("bounce_seen_for_message", {"message_id": message_id, "kind": kind}))


def record_bounce_once(db: Database, limits: BounceConfig, *, email: str, kind: str,
                       message_id: int, subscriber_id: int | None, status: str | None = None,
                       diagnostic: str | None = None) -> Recorded:
    """:func:`record_bounce` unless this message already has a bounce of this kind."""
    with db.transaction():
        if _seen(db, message_id, kind):
            return Recorded(stored=False, status_changed=False)
        changed = _store(db, limits, email=email, kind=kind, message_id=message_id,
                         subscriber_id=subscriber_id, status=status, diagnostic=diagnostic)
    return Recorded(stored=True, status_changed=changed)


def record_complaint(db: Database, *, email: str, message_id: int | None,
                     subscriber_id: int | None, diagnostic: str | None = None) -> Recorded:
    """A reader marked our mail as spam: store it, set `complained`, block the address.

    The block covers every list (the reader complained about *us*); the
    status records why this subscription ended.
    """
    with db.transaction():
        if message_id is not None and _seen(db, message_id, "complaint"):
            return Recorded(stored=False, status_changed=False)
        db.execute("bounce_insert", {
            "message_id": message_id, "subscriber_id": subscriber_id, "email": email,
            "kind": "complaint", "status": None, "diagnostic": (diagnostic or "")[:1000] or None,
        })
        changed = 0
        if subscriber_id is not None:
            changed = db.execute("subscriber_complained", {"id": subscriber_id})
        db.execute("block_add", {"pattern": email, "reason": "complaint"})
    log.info("complaint from %s: unsubscribed and blocked", email)
    return Recorded(stored=True, status_changed=bool(changed))


def store_event(db: Database, *, kind: str, email: str | None, message_id: int | None = None,
                subscriber_id: int | None = None, status: str | None = None,
                diagnostic: str | None = None) -> None:
    """Keep a row that changes no status (auto-reply, unattributed `unknown`, unsubscribe)."""
    db.execute("bounce_insert", {
        "message_id": message_id, "subscriber_id": subscriber_id,
        "email": (email or "")[:254] or None, "kind": kind, "status": (status or "")[:20] or None,
        "diagnostic": (diagnostic or "")[:1000] or None,
    })


def unsubscribe(db: Database, subscriber_id: int, list_id: int) -> dict[str, Any] | None:
    """Take one subscriber off one list (idempotent); their row, or None if unknown.

    Only an `active` subscription changes: a bounced or complained one is
    already off the list and keeps the stronger reason.
    """
    row = db.fetchone("subscriber_with_list", {"id": subscriber_id, "list_id": list_id})
    if row is None:
        return None
    if db.execute("subscriber_unsubscribe", {"id": subscriber_id, "list_id": list_id}):
        log.info("subscriber %d (%s) unsubscribed from list %d", subscriber_id, row["email"],
                 list_id)
    return row
