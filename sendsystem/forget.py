"""`sendsystem subscriber forget EMAIL`: erase a person's personal data, for erasure requests.

What is personal here is the address, the merge fields, and any free text
that quotes the address (a relay's ``550 5.1.1 <addr>`` reply, a DSN's
diagnostic). What is not is the fact that *someone* joined a list, received
newsletter 12 and bounced: the counts ``stats`` and ``list stats`` show.
So `forget` removes the first and keeps the second, and afterwards no row in
any table holds the address (tests/integration/test_forget.py scans every
text column of every table for it).

Decisions:

* **The subscriber rows are anonymised, not deleted.** Every subscription of
  the address keeps its id, list, status and ``created_at``; its address
  becomes ``forgotten-<id>@forgotten.invalid`` (``.invalid`` is reserved and
  never resolves), its domain ``forgotten.invalid`` and its fields ``{}``.
  Message, bounce and history rows refer to subscriber ids; deleting the
  rows would leave those pointing nowhere, change the list's counts and
  lose its joins (a join is the row's ``created_at``). An active
  subscription is ended first (``unsubscribed``, reason ``erasure
  request``): the one change to the counts, and a true one.
* **Their message rows stay, without what identifies them**: the body (only
  ever held until a message is final) is dropped, and every address in the
  relay's reply and the detail is replaced by ``[forgotten]`` (every
  address, not only theirs: their rows may name a forwarding address of
  theirs). The rows keep state, times and reply codes, so every
  newsletter's counts stay. Bounce rows likewise lose the address and the
  addresses in their diagnostic, found by subscription and by address (an
  unverified report has no subscriber). History rows lose their subscriber
  id. Shared rows that may quote the address (a relay's last error, a
  purged newsletter's summary of top replies, a tracked link whose URL
  carried a merge field, plain or URL-encoded) have that address replaced.
  Their opens and clicks are deleted (the tracking tables' own statements):
  the one place where a newsletter's figures (its unique opens and clicks)
  go down by this person's.
* **They are never mailed again.** A plain blocklist entry for the address
  (a complaint with ``[bounce] scope = address`` adds one) would keep the
  address; instead `forget` leaves ``sha256:`` + SHA-256(salt + lower-case
  address) in the blocklist, with a random salt kept in the database
  (``privacy_salt``), and the sort and send workers match it like any
  entry. A customer who imports the old CSV again therefore cannot mail a
  person who asked to be forgotten (their messages are skipped as blocked).
  This keeps a pseudonymous trace, as a suppression list must; erasing it
  too would defeat the request. ``sendsystem block remove ADDRESS`` lifts
  it, should the person subscribe again.
* **Safe during a send.** Each subscription ends in its own short
  transaction, so no new message goes out; messages of theirs that no
  worker holds are cancelled (as a newsletter cancel does); messages a
  worker holds right now are waited for (``--wait``, default 60 s) until
  they are final and can be scrubbed too. If they are still held then,
  `forget` erases nothing more and exits 75: run it again (the address
  still finds the subscriptions). The scrubs are chunked (``--chunk-size``
  rows per autocommitted statement) and idempotent, so an interrupted run
  is finished by running it again.
* **Reports that arrive later** (a DSN for a message sent before `forget`,
  an in-flight message's 5.1.1) are stored without the address: the bounce
  recipient service (:func:`sendsystem.bounce.recipients._insert`) drops the
  address and redacts every address in the diagnostic when the report is
  about a forgotten subscription or names a forgotten address (one indexed
  lookup of the hashed entry per report).
* **Outside the database**: the relay's and our own logs, and a send
  worker's journal (emptied once its outcomes are committed), are the
  operator's to rotate.

Extension: :data:`STEPS` lists every table's scrub as named statements in
sendsystem/sql/queries.sql. A new table that can hold an address, or rows
about a person, adds its count and scrub statements there (as the tracking
tables do); the subscriber rows are always anonymised last, so a run cut
short is finished by running it again (the address still finds them).
"""

from __future__ import annotations

import logging
import re
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal
from urllib.parse import quote

from . import history
from .addresses import validate_email
from .db import Database
from .errors import TemporaryError, UserError
from .states import SubscriberStatus

log = logging.getLogger(__name__)

PLACEHOLDER_DOMAIN = "forgotten.invalid"
REDACTED = "[forgotten]"
# Any address in free text (PCRE, for the database's REGEXP): used on the
# person's own rows only, where every address is about them.
ANY_ADDRESS = r"[^\s<>()\[\]\",;:]+@[^\s<>()\[\]\",;:']+"
_ANY_ADDRESS_RE = re.compile(ANY_ADDRESS)
_LOCAL_CHARS = r"A-Za-z0-9.!#$%&'*+/=?^_`{|}~-"


@dataclass(frozen=True)
class Step:
    """One table's part of forgetting: a count (``--dry-run``) and a chunked scrub.

    ``per``: ``subscription`` runs once per subscription of the address (params
    ``id``, ``list_id``), ``address`` once (param ``email``). Every statement
    also gets ``pattern`` (PCRE matching the address), ``any_address`` and
    ``chunk``; a scrub changes at most ``chunk`` rows and is repeated until it
    changes fewer, so it must stop matching a row once it has scrubbed it.
    """

    table: str
    count: str
    scrub: str
    per: Literal["subscription", "address"]


# In order; extended with the tracking tables' steps when they exist.
STEPS: tuple[Step, ...] = (
    Step("messages", "forget_count_messages", "forget_scrub_messages", "subscription"),
    Step("bounces", "forget_count_bounces_subscriber", "forget_scrub_bounces_subscriber",
         "subscription"),
    Step("bounces", "forget_count_bounces_email", "forget_scrub_bounces_email", "address"),
    Step("subscriber_events", "forget_count_events", "forget_scrub_events", "subscription"),
    Step("blocklist", "forget_count_blocklist", "forget_scrub_blocklist", "address"),
    Step("relay_health", "forget_count_relay_health", "forget_scrub_relay_health", "address"),
    # After messages: the kept counts' sample replies and emptied failure reasons.
    Step("kept_counts", "forget_count_kept_samples", "forget_scrub_kept_samples", "address"),
    Step("kept_failures", "forget_count_kept_failures", "forget_scrub_kept_failures", "address"),
    Step("newsletter_summaries", "forget_count_summaries", "forget_scrub_summaries", "address"),
    # Their opens and clicks go (the tracking helper's statements, keyed by address).
    Step("tracking_events", "forget_count_tracking_events", "forget_tracking_events", "address"),
    Step("tracking_unique", "forget_count_tracking_unique", "forget_tracking_unique", "address"),
    Step("newsletter_links", "forget_count_links", "forget_scrub_links", "address"),
)
# Always last: the rows every other table refers to.
SUBSCRIBER_STEP = Step("subscribers", "forget_count_subscriber", "forget_scrub_subscriber",
                       "subscription")

DEFAULT_WAIT = 60.0
DEFAULT_CHUNK = 1000


def forgotten(email: str) -> bool:
    """True for the placeholder address of a forgotten subscriber."""
    return email.lower().endswith("@" + PLACEHOLDER_DOMAIN)


def redact_addresses(text: str | None) -> str | None:
    """``text`` with every address in it replaced by ``[forgotten]``."""
    return None if text is None else _ANY_ADDRESS_RE.sub(REDACTED, text)


def is_forgotten(db: Database, email: str | None) -> bool:
    """Whether a report's address belongs to a forgotten person: the placeholder of
    an anonymised subscription, or an address `forget` left its hashed entry for."""
    if not email:
        return False
    return forgotten(email) or bool(int(db.fetchval("forget_suppressed", {"email": email})
                                        or 0))


def _escaped(address: str) -> str:
    return "".join(c if c.isalnum() or not c.isascii() else "\\" + c for c in address)


_DOMAIN_ENDS = r"(?![A-Za-z0-9-]|\.[A-Za-z0-9])"


def address_pattern(address: str) -> str:
    """A PCRE matching ``address`` anywhere in text, in any case, but not as part of
    a longer address (``ann@x.com`` does not match inside ``joann@x.com``)."""
    return f"(?i)(?<![{_LOCAL_CHARS}]){_escaped(address)}{_DOMAIN_ENDS}"


@dataclass
class ForgetReport:
    """What `forget` did (or, with ``dry_run``, would do) for one address."""

    email: str
    dry_run: bool
    subscriptions: int = 0
    ended: int = 0  # active subscriptions ended (unsubscribed, reason "erasure request")
    cancelled: int = 0  # pending messages cancelled
    suppressed: bool = False  # the hashed blocklist entry was added (or exists)
    rows: dict[str, int] = field(default_factory=dict)  # table -> rows scrubbed

    def add(self, table: str, n: int) -> None:
        self.rows[table] = self.rows.get(table, 0) + n


class StillInFlight(TemporaryError):
    """A worker still holds a message to the address: run `forget` again shortly."""


def _forms(raw: str) -> tuple[str, list[str]]:
    """The address as stored (normalised like an import) and every spelling to scrub."""
    address = raw.strip()
    if not address or "@" not in address or any(c.isspace() for c in address):
        raise UserError(f"{raw!r} is not an address; give the address to forget, "
                        "like someone@example.com.")
    try:
        normal = validate_email(address)
    except ValueError:
        normal = address  # a report may have stored an address an import would refuse
    spellings = {normal.lower(): normal}
    spellings.setdefault(address.lower(), address)
    return normal, list(spellings.values())


def forget(db: Database, raw: str, *, dry_run: bool = False, chunk: int = DEFAULT_CHUNK,
           wait: float = DEFAULT_WAIT, sleep: Callable[[float], None] = time.sleep,
           clock: Callable[[], float] = time.monotonic) -> ForgetReport:
    """Erase the personal data of ``raw`` from every table (see the module docstring)."""
    if chunk < 1:
        raise UserError("--chunk-size must be at least 1.")
    db.check_schema_version()
    email, spellings = _forms(raw)
    report = ForgetReport(email=email, dry_run=dry_run)
    subs = [row for form in spellings for row in db.fetchall("forget_find", {"email": form})]
    subs = list({int(r["id"]): r for r in subs}.values())
    report.subscriptions = len(subs)
    if dry_run:
        return _count(db, report, subs, spellings)

    for sub in subs:
        _end(db, report, sub)
    _settle(db, report, subs, wait, sleep, clock)
    db.execute("privacy_salt_init", {"salt": secrets.token_hex(32)})
    for form in spellings:
        db.execute("forget_suppress", {"email": form})
    report.suppressed = True
    for step in (*STEPS, SUBSCRIBER_STEP):
        for params in _targets(step, subs, spellings):
            report.add(step.table, _scrub(db, step.scrub, params, chunk))
    log.info("forgot an address: %d subscriptions (%d ended), %d messages cancelled; %s",
             report.subscriptions, report.ended, report.cancelled,
             ", ".join(f"{t} {n}" for t, n in report.rows.items()))
    return report


def url_pattern(address: str) -> str:
    """A PCRE matching ``address`` in a URL: as written, or percent-encoded (``@`` as
    ``%40``, and so on, in either case of hex digits). In a URL the address follows
    ``/``, ``=`` and the like, which may also be in an address, so only its end is
    bounded."""
    forms = [_escaped(address) + _DOMAIN_ENDS]
    for safe in ("", "@"):
        encoded = quote(address, safe=safe)
        if encoded != address:
            forms.append(re.escape(encoded) + _DOMAIN_ENDS)
    return "(?i)(?:" + "|".join(dict.fromkeys(forms)) + ")"


def _params(email: str, sub: dict[str, Any] | None) -> dict[str, Any]:
    return {"email": email, "pattern": address_pattern(email), "any_address": ANY_ADDRESS,
            "url_pattern": url_pattern(email),
            "id": int(sub["id"]) if sub else None,
            "list_id": int(sub["list_id"]) if sub else None}


def _targets(step: Step, subs: list[dict[str, Any]], spellings: list[str]
             ) -> list[dict[str, Any]]:
    if step.per == "subscription":
        return [_params(spellings[0], sub) for sub in subs]
    return [_params(form, None) for form in spellings]


def _count(db: Database, report: ForgetReport, subs: list[dict[str, Any]],
           spellings: list[str]) -> ForgetReport:
    report.ended = sum(1 for s in subs if s["status"] == SubscriberStatus.ACTIVE)
    for sub in subs:
        pending = db.fetchone("forget_pending_messages", {"id": sub["id"]}) or {}
        report.cancelled += int(pending.get("n") or 0)
    report.suppressed = not any(int(db.fetchval("forget_suppressed", {"email": form}) or 0)
                                for form in spellings)
    for step in (*STEPS, SUBSCRIBER_STEP):
        for params in _targets(step, subs, spellings):
            report.add(step.table, int(db.fetchval(step.count, params) or 0))
    return report


def _end(db: Database, report: ForgetReport, sub: dict[str, Any]) -> None:
    """End an active subscription and cancel the messages of it no worker holds."""
    sid = int(sub["id"])
    with db.transaction():
        if history.change(db, sid, "subscriber_set_status",
                          {"id": sid, "status": SubscriberStatus.UNSUBSCRIBED},
                          to_status=SubscriberStatus.UNSUBSCRIBED, reason=history.ERASURE):
            report.ended += 1
        report.cancelled += db.execute("forget_cancel_messages", {"id": sid})


def _settle(db: Database, report: ForgetReport, subs: list[dict[str, Any]], wait: float,
            sleep: Callable[[float], None], clock: Callable[[], float]) -> None:
    """Wait until no worker holds a message of theirs, cancelling what it hands back.

    A sort worker that took the message before the subscription ended merges
    it (then it is cancelled here) or skips it; a send worker sends it or
    defers it. Either way it becomes final or unheld within a batch's time.
    """
    deadline = clock() + wait
    while True:
        held = 0
        for sub in subs:
            row = db.fetchone("forget_pending_messages", {"id": sub["id"]}) or {}
            if int(row.get("unheld") or 0):
                report.cancelled += db.execute("forget_cancel_messages", {"id": sub["id"]})
                row = db.fetchone("forget_pending_messages", {"id": sub["id"]}) or {}
            held += int(row.get("n") or 0)
        if not held:
            return
        if clock() >= deadline:
            raise StillInFlight(
                f"{held} message(s) to this address are being handled by a worker right now. "
                f"The address is unsubscribed from every list and will get no new mail, but "
                f"nothing has been erased yet: run `sendsystem subscriber forget` again in a "
                f"minute (or with a longer --wait).")
        sleep(0.5)


def _scrub(db: Database, statement: str, params: dict[str, Any], chunk: int) -> int:
    """Run a scrub until it changes fewer than ``chunk`` rows; each run is one short
    autocommitted statement, so a send going on meanwhile waits on no long lock."""
    total = 0
    while True:
        n = db.execute(statement, {**params, "chunk": chunk})
        total += n
        if n < chunk:
            return total
