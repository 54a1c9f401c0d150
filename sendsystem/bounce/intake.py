"""The bounce intake: what arrives at the bounce and unsubscribe addresses, into the database.

:func:`process` classifies one raw message (:mod:`sendsystem.bounce.classify`)
and records it; ``bounce receive`` (an MTA pipe) and ``bounce scan`` (a
Maildir, :mod:`sendsystem.bounce.maildir`) both call it.

Decisions:

* **Only signed evidence acts.** Anyone on the internet can mail the bounce
  address, so a report changes a subscriber only when it is tied to one of
  our messages by something an outsider cannot produce: the VERP envelope
  address (its HMAC verified), else a signed Message-ID the report quotes
  (returned headers, an ARF report's original, In-Reply-To/References); a
  complaint may also be tied to a subscription by the signed unsubscribe
  token in the original's List-Unsubscribe, and a mailto unsubscribe needs
  its token. The report acts on the subscriber of *that* message, never on
  an address the report names. A message addressed to a VERP-shaped address
  at our envelope domain whose HMAC does *not* verify is forged (or made
  with a retired secret): nothing else in it is trusted either.
* **Unverified** reports (an address-only DSN, an unsigned, old-format or
  wrongly signed Message-ID, a forged VERP, a token-less unsubscribe mail)
  are stored with ``verified = 0`` and their own kind, and change nothing:
  no status, no blocklist, no message state, no threshold. Their newsletter
  is recorded when the report claims one (an unsigned Message-ID of our
  shape, the forged VERP's id, or the newest message to the address named)
  so ``stats`` counts them apart. ``scan`` moves them, and anything that is
  not a bounce (a reader's personal reply), to the ``unknown`` folder for a
  human. Unattributed auto-replies are dropped: there is nothing to learn
  from them.
* **Idempotent**: one bounce of each kind per message (see
  :func:`sendsystem.bounce.recipients.record_bounce_once`), so re-processing
  the same mail after exit 75 or an interrupted scan never double-counts.
"""

from __future__ import annotations

import logging
import re
from dataclasses import dataclass, replace
from email.parser import BytesHeaderParser
from email.utils import getaddresses
from enum import StrEnum
from typing import Any

from ..config import Config
from ..db import Database
from ..states import SubscriberStatus
from ..tokens import verify_unsubscribe_token
from . import recipients
from .classify import BounceKind, BounceReport, classify

log = logging.getLogger(__name__)

# Bigger input is refused (exit 1). Postfix returns at most bounce_size_limit
# (50 kB) of the original; other MTAs return it whole, and newsletters with
# attachments may be a few MB.
MAX_INPUT = 64 * 1024 * 1024
# An unverified report that only names an address is counted against the
# newsletter last sent to it this recently (MTAs give up after 5 days).
RECIPIENT_MATCH_DAYS = 14

_VERP_SHAPE = re.compile(r"^b([0-9a-z]+)-[a-z2-7]{16}$")


class Action(StrEnum):
    RECORDED = "recorded"  # signed evidence: stored against a message; thresholds applied
    DUPLICATE = "duplicate"  # this message already had a bounce of this kind
    UNSUBSCRIBED = "unsubscribed"  # a mailto request with a valid token
    UNVERIFIED = "unverified"  # no signed evidence: kept, changed nothing; needs a human
    IGNORED = "ignored"  # not a bounce, or an auto-reply we cannot attribute


@dataclass(frozen=True)
class IntakeOutcome:
    """What :func:`process` did with one message (for logs, the CLI and tests)."""

    action: Action
    kind: BounceKind
    diagnostic: str
    status: str | None = None
    message_id: int | None = None
    subscriber_id: int | None = None
    email: str | None = None
    via: str | None = None  # the evidence: "verp", "message-id", "token"
    status_changed: bool = False  # the subscriber became bounced/complained/unsubscribed
    forged: bool = False
    newsletter_id: int | None = None  # UNVERIFIED: the newsletter it claims, if any

    @property
    def needs_human(self) -> bool:
        """Goes to the ``unknown`` folder: not understood, or not for us to decide."""
        return self.action is Action.UNVERIFIED or (
            self.action is Action.IGNORED and self.kind is BounceKind.NOT_BOUNCE)

    def describe(self) -> str:
        who = f" for message {self.message_id}" if self.message_id else ""
        addr = f" <{self.email}>" if self.email else ""
        via = f" (via {self.via})" if self.via else ""
        changed = "; subscriber status changed" if self.status_changed else ""
        return f"{self.action} {self.kind}{who}{addr}{via}{changed}: {self.diagnostic}"


@dataclass(frozen=True)
class _Target:
    message_id: int | None  # None: a complaint tied to a subscription by its token
    subscriber_id: int
    email: str
    via: str


def _verp_shape(address: str, domain: str) -> re.Match[str] | None:
    local, _, addr_domain = address.strip().strip("<>").lower().rpartition("@")
    return _VERP_SHAPE.match(local.split("+", 1)[0]) if addr_domain == domain.lower() else None


def _looks_like_verp(address: str, domain: str) -> bool:
    return _verp_shape(address, domain) is not None


def _forged_verp(raw: bytes, envelope_recipient: str | None, domain: str) -> str | None:
    """A VERP-shaped address of ours this message was delivered to (it did not verify)."""
    headers = BytesHeaderParser().parsebytes(raw[:256 * 1024])
    values = [str(v) for name in ("Delivered-To", "X-Original-To", "Envelope-To", "To")
              for v in headers.get_all(name, [])]
    candidates = [envelope_recipient] if envelope_recipient else []
    candidates += [addr for _name, addr in getaddresses(values)]
    return next((c for c in candidates if _looks_like_verp(c, domain)), None)


def _target(row: dict[str, Any] | None, via: str) -> _Target | None:
    if row is None:
        return None
    return _Target(int(row["id"]), int(row["subscriber_id"]), str(row["email"]), via)


def _attribute(db: Database, secret: bytes, report: BounceReport) -> _Target | None:
    """The message (or, for a complaint, subscription) signed evidence ties this report to."""
    if report.verp_message_id is not None:
        found = _target(db.fetchone("message_for_bounce", {"id": report.verp_message_id}),
                        "verp")
        if found:
            return found
    signed = report.signed_message
    if signed is not None:
        row = db.fetchone("message_for_bounce", {"id": signed.message_id})
        # Both ids are signed; a row of another newsletter means the ids were
        # reused (a rebuilt database), so it is not the message we signed.
        if row is not None and int(row["newsletter_id"]) == signed.newsletter_id:
            return _target(row, "message-id")
    if report.kind is BounceKind.COMPLAINT and report.unsubscribe_token:
        # A feedback loop that redacts the recipient still returns the
        # List-Unsubscribe header: its token names one subscription.
        token = verify_unsubscribe_token(secret, report.unsubscribe_token)
        if token is not None:
            row = db.fetchone("subscriber_with_list", {"id": token.subscriber_id,
                                                       "list_id": token.list_id})
            if row is not None:
                return _Target(None, int(row["id"]), str(row["email"]), "token")
    return None


def process(db: Database, config: Config, raw: bytes,
            envelope_recipient: str | None = None) -> IntakeOutcome:
    """Classify one message and record what it means. Raises only on database
    trouble (:class:`~sendsystem.errors.DatabaseUnavailable`: try again later)."""
    report = classify(raw, secret=config.secret(), envelope_domain=config.sending.envelope_domain,
                      unsubscribe_address=config.unsubscribe.mailto or None,
                      envelope_recipient=envelope_recipient)
    kind = report.kind
    if kind is BounceKind.NOT_BOUNCE:
        return IntakeOutcome(Action.IGNORED, kind, report.diagnostic)
    if kind is BounceKind.UNSUBSCRIBE:
        return _mailto_unsubscribe(db, config, report)

    forged = None
    if report.verp_message_id is None:
        forged = _forged_verp(raw, envelope_recipient, config.sending.envelope_domain)
    target = None if forged else _attribute(db, config.secret(), report)
    if target is None:
        if kind is BounceKind.AUTOREPLY:
            return IntakeOutcome(Action.IGNORED, kind, report.diagnostic)
        return _unverified(db, config, report, forged)

    if kind is BounceKind.COMPLAINT:
        done = recipients.record_complaint(db, config.bounce, diagnostic=report.diagnostic,
                                           email=target.email, evidence=target.via,
                                           message_id=target.message_id,
                                           subscriber_id=target.subscriber_id)
    elif kind is BounceKind.AUTOREPLY:
        assert target.message_id is not None
        with db.transaction():
            # Reusing the dedupe keeps one auto-reply row per message.
            done = recipients.Recorded(stored=False, status_changed=False)
            if not db.fetchval("bounce_seen_for_message",
                               {"message_id": target.message_id, "kind": "autoreply"}):
                recipients.store_event(db, kind="autoreply", diagnostic=report.diagnostic,
                                       email=target.email, evidence=target.via,
                                       message_id=target.message_id,
                                       subscriber_id=target.subscriber_id)
                done = recipients.Recorded(stored=True, status_changed=False)
    else:
        assert target.message_id is not None
        done = recipients.record_bounce_once(db, config.bounce, kind=str(kind),
                                             status=report.status,
                                             diagnostic=report.diagnostic,
                                             email=target.email, message_id=target.message_id,
                                             subscriber_id=target.subscriber_id,
                                             evidence=target.via)
    outcome = IntakeOutcome(Action.RECORDED if done.stored else Action.DUPLICATE, kind,
                            report.diagnostic, report.status, target.message_id,
                            target.subscriber_id, target.email, target.via, done.status_changed)
    log.info("%s", outcome.describe())
    return outcome


def _why_unverified(report: BounceReport, forged: str | None) -> str:
    if forged:
        return f"forged VERP address {forged}"
    if report.kind is BounceKind.UNSUBSCRIBE:
        return "no valid unsubscribe token"
    if report.verp_message_id is not None or report.signed_message is not None:
        return "signed, but no such message"
    if report.original_message_ids:
        return "Message-ID not signed by us"
    if report.recipients:
        return "names an address only"
    return "no signed evidence"


def _claimed_newsletter(db: Database, config: Config, report: BounceReport,
                        forged: str | None, email: str | None) -> int | None:
    """The newsletter an unverified report claims to be about (for `stats` only)."""
    if report.signed_message is not None:
        return report.signed_message.newsletter_id
    if report.claimed_newsletter_id is not None:
        return report.claimed_newsletter_id
    shape = _verp_shape(forged, config.sending.envelope_domain) if forged else None
    row = None
    if shape is not None and len(shape.group(1)) <= 12:
        row = db.fetchone("message_for_bounce", {"id": int(shape.group(1), 36)})
    elif report.verp_message_id is None and email:
        row = db.fetchone("recent_message_by_email", {"email": email,
                                                      "days": RECIPIENT_MATCH_DAYS})
    return int(row["newsletter_id"]) if row else None


def _unverified(db: Database, config: Config, report: BounceReport,
                forged: str | None) -> IntakeOutcome:
    """Keep a report without signed evidence; it changes nothing (see the module docstring)."""
    kind = report.kind
    why = _why_unverified(report, forged)
    diagnostic = f"[unverified {kind}: {why}] {report.diagnostic}"
    email = report.recipients[0] if report.recipients else report.sender
    newsletter = _claimed_newsletter(db, config, report, forged, email)
    recipients.store_unverified(db, kind=str(kind), email=email, newsletter_id=newsletter,
                                status=report.status, diagnostic=diagnostic)
    log.warning("unverified %s kept, nothing changed: %s", kind, diagnostic)
    return IntakeOutcome(Action.UNVERIFIED, kind, diagnostic, report.status, email=email,
                         forged=forged is not None, newsletter_id=newsletter)


def _mailto_unsubscribe(db: Database, config: Config, report: BounceReport) -> IntakeOutcome:
    target = (verify_unsubscribe_token(config.secret(), report.unsubscribe_token)
              if report.unsubscribe_token else None)
    row = (recipients.unsubscribe(db, target.subscriber_id, target.list_id, via="mail")
           if target else None)
    if target is None or row is None:
        # A request without a valid token is still a person asking to leave,
        # but From: is forgeable: keep it unverified where a human will see it.
        why = None if target is None else "valid token, but no such subscription"
        return _unverified(db, config, replace(report, diagnostic=(
            report.diagnostic + (f" ({why})" if why else ""))), None)
    recipients.store_event(db, kind="unsubscribe", email=row["email"], evidence="token",
                           subscriber_id=target.subscriber_id, diagnostic=report.diagnostic)
    outcome = IntakeOutcome(Action.UNSUBSCRIBED, report.kind, report.diagnostic,
                            subscriber_id=target.subscriber_id, email=row["email"], via="token",
                            status_changed=row["status"] == SubscriberStatus.ACTIVE)
    log.info("%s", outcome.describe())
    return outcome
