"""The recipient service: bounces, complaints and unsubscribes change who is mailed.

Shared by the send worker (a 5.1.x reply at send time is a hard bounce) and
the bounce intake. Only evidence an outsider cannot forge reaches the
functions that change a subscriber here: the intake calls them only for a
report tied to one of our messages by its VERP address or signed
Message-ID (or to a subscription by a signed unsubscribe token), and the
send worker for its own relay's reply on its own connection. Everything
else is stored with :func:`store_unverified` and changes nothing. The
``evidence`` argument records which it was.

Thresholds come from ``[bounce]``: ``hard_limit`` hard bounces, or
``soft_limit`` soft bounces within ``soft_window_days``. With ``scope =
list`` (the default) they are counted per subscription and end only the
subscription of the list the bounced message was sent for: lists belong to
different customers, and one customer's mail being refused (a policy block
is a soft bounce) must not take a reader off another customer's list; an
address that really does not exist bounces on the other lists' next
newsletter too, which costs one message each. ``scope = address`` is the
old behaviour: the address's bounces on every list count together and end
every subscription of it.

A complaint ends the subscription of the message complained about
(`complained`); with ``scope = address`` it also puts the address on the
blocklist, so no list mails it again. Every later newsletter skips bounced,
complained and blocked recipients, including messages already queued or
merged (the sort and send workers check status and blocklist per message).

The intake records at most one bounce of each kind per message
(:func:`record_bounce_once`): an MTA re-delivering a bounce after a
temporary failure, a scan interrupted between recording and moving the
file, or a delay warning followed by the final report never count twice
towards the thresholds.

Every status change also records when and why (``subscribers.left_at`` and
``left_reason``, shown by `list export`): a short reason built here
(:func:`bounce_reason`, :func:`complaint_reason`, :func:`unsubscribe_reason`)
from what is already stored (counts, the DSN status code, the kind of
evidence), never a diagnostic text, which may quote the address.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from .. import history
from ..config import BounceConfig
from ..db import Database
from ..forget import is_forgotten, redact_addresses

log = logging.getLogger(__name__)

RECIPIENT_STATEMENTS = ("bounce_insert", "bounce_tally", "bounce_tally_subscriber",
                        "subscribers_mark_bounced", "subscriber_mark_bounced",
                        "message_mark_bounced", "forget_suppressed", *history.STATEMENTS)
INTAKE_STATEMENTS = (*RECIPIENT_STATEMENTS, "bounce_message_lock", "bounce_seen_for_message",
                     "subscriber_complained", "block_add", "subscriber_with_list",
                     "subscriber_unsubscribe", "message_for_bounce", "recent_message_by_email")

# What tied a report to us (the `bounces.evidence` column).
EVIDENCE = ("verp", "message-id", "token", "smtp", "webhook")


@dataclass(frozen=True)
class Recorded:
    """What :func:`record_bounce_once` / :func:`record_complaint` did."""

    stored: bool  # False: this message already had a bounce of this kind
    status_changed: bool  # the subscriber is now bounced / complained


def _insert(db: Database, *, kind: str, email: str | None, verified: bool,
            evidence: str | None, message_id: int | None = None,
            subscriber_id: int | None = None, newsletter_id: int | None = None,
            status: str | None = None, diagnostic: str | None = None) -> None:
    if verified and evidence not in EVIDENCE:
        raise ValueError(f"verified report needs evidence, one of {EVIDENCE}")
    if is_forgotten(db, email):
        # About someone who asked to be forgotten (a late DSN, an in-flight
        # message's reply): counted, but without their address (sendsystem/forget.py).
        email, diagnostic = None, redact_addresses(diagnostic)
    db.execute("bounce_insert", {
        "newsletter_id": newsletter_id, "message_id": message_id,
        "subscriber_id": subscriber_id, "email": (email or "")[:254] or None, "kind": kind,
        "verified": 1 if verified else 0, "evidence": evidence if verified else None,
        "status": (status or "")[:20] or None, "diagnostic": (diagnostic or "")[:1000] or None,
    })


def _store(db: Database, limits: BounceConfig, *, email: str, kind: str, evidence: str,
           message_id: int | None, subscriber_id: int | None, status: str | None,
           diagnostic: str | None) -> bool:
    """Insert the bounce and apply the thresholds; the caller holds a transaction."""
    _insert(db, kind=kind, email=email, verified=True, evidence=evidence, message_id=message_id,
            subscriber_id=subscriber_id, status=status, diagnostic=diagnostic)
    if kind == "hard" and message_id is not None:
        db.execute("message_mark_bounced", {"id": message_id})
    if kind not in ("hard", "soft"):
        return False
    per_list = limits.scope == "list" and subscriber_id is not None
    if per_list:
        tally = db.fetchone("bounce_tally_subscriber", {"subscriber_id": subscriber_id,
                                                        "days": limits.soft_window_days})
    else:
        tally = db.fetchone("bounce_tally", {"email": email, "days": limits.soft_window_days})
    hard = int(tally["hard"]) if tally else 0
    soft = int(tally["soft"]) if tally else 0
    if hard >= limits.hard_limit or soft >= limits.soft_limit:
        # The status change and its history row (sendsystem/history.py) commit together.
        reason = history.bounce_reason(kind, status)
        if per_list:
            assert subscriber_id is not None
            changed = history.change(db, subscriber_id, "subscriber_mark_bounced",
                                     {"id": subscriber_id}, to_status="bounced",
                                     reason=reason, message_id=message_id)
        else:
            changed = bool(history.change_active_by_email(
                db, email, "subscribers_mark_bounced", {"email": email}, to_status="bounced",
                reason=reason, message_id=message_id))
        if changed:
            log.info("%s set to bounced on %s (%d hard, %d soft bounces)", email,
                     "its list" if per_list else "every list", hard, soft)
        return bool(changed)
    return False


def record_bounce(db: Database, limits: BounceConfig, *, email: str, kind: str, evidence: str,
                  message_id: int | None = None, subscriber_id: int | None = None,
                  status: str | None = None, diagnostic: str | None = None) -> bool:
    """Store one verified bounce (hard/soft/autoreply) and apply the thresholds.

    Returns True when the subscription (or, with ``scope = address``, the
    address) crossed a threshold and is now `bounced`.
    """
    with db.transaction():
        return _store(db, limits, email=email, kind=kind, evidence=evidence,
                      message_id=message_id, subscriber_id=subscriber_id, status=status,
                      diagnostic=diagnostic)


def _seen(db: Database, message_id: int, kind: str) -> bool:
    # Lock the message row first, so two intakes of the same bounce queue up
    # here instead of both finding no earlier bounce.
    db.fetchone("bounce_message_lock", {"id": message_id})
    return bool(db.fetchval("bounce_seen_for_message", {"message_id": message_id, "kind": kind}))


def record_bounce_once(db: Database, limits: BounceConfig, *, email: str, kind: str,
                       evidence: str, message_id: int, subscriber_id: int | None,
                       status: str | None = None, diagnostic: str | None = None) -> Recorded:
    """:func:`record_bounce` unless this message already has a bounce of this kind."""
    with db.transaction():
        if _seen(db, message_id, kind):
            return Recorded(stored=False, status_changed=False)
        changed = _store(db, limits, email=email, kind=kind, evidence=evidence,
                         message_id=message_id, subscriber_id=subscriber_id, status=status,
                         diagnostic=diagnostic)
    return Recorded(stored=True, status_changed=changed)


def record_complaint(db: Database, limits: BounceConfig, *, email: str, evidence: str,
                     message_id: int | None, subscriber_id: int | None,
                     diagnostic: str | None = None,
                     newsletter_id: int | None = None) -> Recorded:
    """A reader marked our mail as spam: store it and set the subscription `complained`.

    With ``scope = address`` the address also goes on the blocklist (every
    list); with ``scope = list`` only this subscription ends (see the
    module docstring). ``newsletter_id``: the newsletter a complaint tied by
    an unsubscribe token is about, when the token names it (a message names
    its own).
    """
    with db.transaction():
        if message_id is not None and _seen(db, message_id, "complaint"):
            return Recorded(stored=False, status_changed=False)
        _insert(db, kind="complaint", email=email, verified=True, evidence=evidence,
                message_id=message_id, subscriber_id=subscriber_id, diagnostic=diagnostic,
                newsletter_id=newsletter_id)
        changed = False
        if subscriber_id is not None:
            changed = history.change(db, subscriber_id, "subscriber_complained",
                                     {"id": subscriber_id}, to_status="complained",
                                     reason=history.complaint_reason(evidence),
                                     newsletter_id=newsletter_id, message_id=message_id)
        if limits.scope == "address":
            db.execute("block_add", {"pattern": email, "reason": "complaint"})
    log.info("complaint from %s: %s", email, "unsubscribed and blocked on every list"
             if limits.scope == "address" else "unsubscribed from the list")
    return Recorded(stored=True, status_changed=bool(changed))


def store_unverified(db: Database, *, kind: str, email: str | None,
                     newsletter_id: int | None = None, status: str | None = None,
                     diagnostic: str | None = None) -> None:
    """Keep a report that carries no signed evidence: it changes nothing.

    No message or subscriber is linked (the report only *claims* them); the
    newsletter may be, loosely, so `stats` can count it apart.
    """
    _insert(db, kind=kind, email=email, verified=False, evidence=None,
            newsletter_id=newsletter_id, status=status, diagnostic=diagnostic)


def store_event(db: Database, *, kind: str, email: str | None, evidence: str,
                message_id: int | None = None, subscriber_id: int | None = None,
                status: str | None = None, diagnostic: str | None = None) -> None:
    """Keep a verified row that changes no status (an attributed auto-reply, an unsubscribe)."""
    _insert(db, kind=kind, email=email, verified=True, evidence=evidence, message_id=message_id,
            subscriber_id=subscriber_id, status=status, diagnostic=diagnostic)


def unsubscribe(db: Database, subscriber_id: int, list_id: int, *,
                via: str = history.UNSUBSCRIBE_LINK,
                newsletter_id: int | None = None) -> dict[str, Any] | None:
    """Take one subscriber off one list (idempotent); their row, or None if unknown.

    Only an `active` subscription changes: a bounced or complained one is
    already off the list and keeps the stronger reason. ``via`` is how they
    asked (the history's reason, see :mod:`sendsystem.history`);
    ``newsletter_id`` the newsletter their token names, if any.
    """
    with db.transaction():
        row = db.fetchone("subscriber_with_list", {"id": subscriber_id, "list_id": list_id})
        if row is None:
            return None
        changed = history.change(db, subscriber_id, "subscriber_unsubscribe",
                                 {"id": subscriber_id, "list_id": list_id},
                                 to_status="unsubscribed", reason=via,
                                 newsletter_id=newsletter_id)
    if changed:
        log.info("subscriber %d unsubscribed from list %d (%s)", subscriber_id, list_id, via)
    return row
