"""Classify what arrives at the bounce address: pure functions, no database.

``classify(raw, ...)`` turns one raw message into a :class:`BounceReport`; the
bounce intake (``bounce receive`` / ``bounce scan``) stores it. Decisions:

* **Order.** Standard reports win over heuristics: an RFC 3464 DSN
  (``multipart/report; report-type=delivery-status``) or an RFC 5965 ARF
  report is read first, because Postfix and Exim bounces also carry
  ``Auto-Submitted: auto-replied`` and would otherwise look like
  vacation mail. Then auto-replies, then mail to the unsubscribe address,
  then flufl.bounce's heuristics for non-DSN bounces, else NOT_BOUNCE.
* **Hard, soft or blocked.** The reply is read by
  :func:`sendsystem.smtpstatus.read_reply`, the same reading the send worker
  gives a reply at SMTP time. Policy and spam blocks (5.7.x, our sender
  refused with 5.1.7/5.1.8, or wording such as "blocked", "spam",
  "unsolicited", "blacklisted" next to a generic code) are BLOCKED: about our
  reputation, kept for stats, never counted against the address, whatever
  generic status code sits next to them. ``failed`` + 5.x.x is HARD, except
  where the failure is not the address's fault: a full mailbox (5.2.2,
  quota wording), a message too big (5.2.3, 5.3.4, size wording) and a
  delivery that expired (4.4.7, "gave up after N attempts") are SOFT. A
  ``delayed`` action and any 4.x.x are SOFT. Measured against flufl.bounce's
  own corpus in ``bench/bounce_corpus.py``.
* **Which address.** Per DSN recipient block, ``Original-Recipient`` (what
  our relay was given) before ``Final-Recipient`` (where an alias or forward
  led) before ``X-Actual-Recipient``: only the first present one is the
  recipient. A base64 or quoted-printable delivery-status part is decoded
  first. Without a DSN, flufl.bounce's detectors find the addresses (a
  bounce without a From header gets a placeholder for them), and the reason
  is read from the first SMTP reply line or else from the lines naming the
  failed address, never from the returned newsletter below.
* **Evidence.** ``verp_message_id`` comes only from a VERP address whose
  HMAC verifies, ``signed_message`` only from a Message-ID whose HMAC
  verifies (see :mod:`sendsystem.tokens`): quoted in the returned headers
  of a DSN, the original of an ARF report, the In-Reply-To/References of a
  reply, or inline in an old-style bounce's text. An ARF report's
  ``unsubscribe_token`` comes from the original's List-Unsubscribe (feedback
  loops that redact the recipient keep it). Anything else a report names
  (recipient addresses, unsigned or old sequential Message-IDs) is a claim,
  not evidence: the intake keeps such reports as unverified.
  ``claimed_newsletter_id`` is the newsletter an unsigned Message-ID of our
  shape claims, only for counting unverified reports.
* **Robustness.** ``classify`` never raises: garbage or broken MIME gives
  NOT_BOUNCE with a diagnostic saying why. Only the first
  :data:`MAX_PARSE_BYTES` are parsed; reports put the status before the
  returned message, so nothing needed is lost.
"""

from __future__ import annotations

import base64
import binascii
import logging
import quopri
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from email import message_from_bytes, message_from_string
from email.header import decode_header, make_header
from email.message import Message
from email.utils import getaddresses, parseaddr
from enum import StrEnum

from flufl.bounce import all_failures

from sendsystem.smtpstatus import (
    Cause,
    Reading,
    enhanced_status,
    enhanced_status_class,
    has_reply,
    read_reply,
    status_from_reply,
)
from sendsystem.tokens import (
    SignedMessage,
    claimed_newsletter,
    decode_message_id,
    decode_verp,
    verify_unsubscribe_token,
)

log = logging.getLogger(__name__)

MAX_PARSE_BYTES = 10 * 1024 * 1024
MAX_DIAGNOSTIC = 1000


class BounceKind(StrEnum):
    HARD = "hard"  # permanent: the address does not work
    SOFT = "soft"  # temporary, mailbox full, too big, expired: counts towards soft_limit
    BLOCKED = "blocked"  # policy / spam block: about us, never counted against the address
    AUTOREPLY = "autoreply"  # out-of-office, vacation: ignored, not a bounce
    COMPLAINT = "complaint"  # ARF Feedback-Type: abuse (or fraud)
    UNSUBSCRIBE = "unsubscribe"  # mail to the List-Unsubscribe mailto address
    NOT_BOUNCE = "not_bounce"


@dataclass(frozen=True)
class BounceReport:
    kind: BounceKind
    status: str | None  # RFC 3463 enhanced status, e.g. "5.1.1"
    diagnostic: str  # human-readable reason, <= 1000 chars, no CR/LF
    recipients: tuple[str, ...]  # failed recipient addresses
    verp_message_id: int | None  # from a VERP address whose HMAC verified
    original_message_ids: tuple[str, ...]  # Message-ID(s) of the returned original
    unsubscribe_token: str | None  # a token that verified (UNSUBSCRIBE: subject/body;
    #                                COMPLAINT: the original's List-Unsubscribe)
    sender: str | None  # From address of this message
    signed_message: SignedMessage | None = None  # a quoted Message-ID whose HMAC verified
    claimed_newsletter_id: int | None = None  # from an unsigned Message-ID: a claim only


# --- status codes -----------------------------------------------------------------


def failure_kind(status: str | None, text: str = "", *, delayed: bool = False) -> BounceKind:
    """HARD, SOFT or BLOCKED for a failed (or ``delayed``) delivery.

    ``status`` is the DSN's Status field (or None), ``text`` the diagnostic;
    :func:`sendsystem.smtpstatus.read_reply` reads both. Policy and spam
    blocks are BLOCKED whatever the class; a delay, a 4.x.x, a full mailbox, a
    message too big or an expired delivery is SOFT; other 5.x.x failures are
    HARD; no status at all is SOFT (an unknown format never removes a reader).
    """
    return _kind(read_reply(text, status=status), delayed=delayed)


def _kind(reading: Reading, *, delayed: bool = False) -> BounceKind:
    if reading.cause is Cause.POLICY:
        return BounceKind.BLOCKED
    if delayed or enhanced_status_class(reading.status) != 5:
        return BounceKind.SOFT
    if reading.cause in (Cause.FULL, Cause.SIZE, Cause.EXPIRED):
        return BounceKind.SOFT
    return BounceKind.HARD


# --- small helpers --------------------------------------------------------------------


def _clean(text: object, limit: int = MAX_DIAGNOSTIC) -> str:
    """One line of printable text: no CR/LF (it may end up in logs and headers)."""
    s = re.sub(r"[\x00-\x1f\x7f]+", " ", str(text))
    s = re.sub(r"\s+", " ", s).strip()
    return s[:limit]


def _header(msg: Message, name: str) -> str:
    value = msg.get(name)
    return "" if value is None else str(value)


def _decoded_header(msg: Message, name: str) -> str:
    raw = _header(msg, name)
    try:
        return str(make_header(decode_header(raw)))
    except Exception:  # a broken encoded-word: show it raw rather than fail
        return raw


def _addresses(values: Iterable[object]) -> list[str]:
    out = []
    for _name, addr in getaddresses([str(v) for v in values]):
        addr = addr.strip().strip("<>")
        if "@" in addr:
            out.append(addr)
    return out


def _dsn_address(value: str) -> str | None:
    """The address of "rfc822; user@example.org" (address-type is optional in practice)."""
    _type, sep, addr = value.partition(";")
    addr = (addr if sep else value).strip().strip("<>").strip()
    return addr if "@" in addr else None


def _unique(items: Iterable[str], *, fold: bool = True) -> tuple[str, ...]:
    seen: set[str] = set()
    out = []
    for item in items:
        key = item.lower() if fold else item
        if item and key not in seen:
            seen.add(key)
            out.append(item)
    return tuple(out)


def _text_payload(part: Message) -> str:
    try:
        data = part.get_payload(decode=True)
    except Exception:
        return ""
    if not isinstance(data, bytes):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, errors="replace")
    except LookupError:  # an unknown charset name
        return data.decode("utf-8", errors="replace")


def _header_blocks(part: Message) -> list[Message]:
    """The header blocks of a message/delivery-status or feedback-report part.

    The email package parses those into a list of Message objects without
    looking at Content-Transfer-Encoding, so a base64 or quoted-printable
    part (Exchange and some appliances send them) comes out as garbage or
    with "=3D" and soft line breaks in the fields: such a part is decoded
    first and its blocks parsed from the text. A part sent as text/plain
    arrives as a string and is parsed the same way.
    """
    payload = part.get_payload()
    encoded = str(part.get("Content-Transfer-Encoding", "")).strip().lower() in (
        "base64", "quoted-printable")
    if not encoded and isinstance(payload, list) and any(
            isinstance(b, Message) and len(b.keys()) for b in payload):
        return [b for b in payload if isinstance(b, Message)]
    text = _decoded_text(part) if encoded else _text_payload(part)
    return [message_from_string(chunk) for chunk in re.split(r"\r?\n\s*\r?\n", text) if chunk]


def _decoded_text(part: Message) -> str:
    """The text of an encoded message/* part, whose payload the parser made into blocks."""
    payload = part.get_payload()
    if isinstance(payload, list):
        # The parser split the encoded text on blank lines into blocks and read
        # each as headers; a line that is not one (all of base64, the rest of a
        # quoted-printable soft break) ends the headers and sits in the block's
        # payload. Rejoin them (the parser drops the blank after a colon: put one back).
        blocks = []
        for b in payload:
            if not isinstance(b, Message):
                continue
            lines = [f"{name}: {value}" for name, value in b.raw_items()]
            rest = b.get_payload()
            if isinstance(rest, str) and rest:
                lines.append(rest)
            blocks.append("\n".join(lines))
        raw = "\n\n".join(blocks)
    else:
        raw = str(payload)
    cte = str(part.get("Content-Transfer-Encoding", "")).strip().lower()
    try:
        if cte == "base64":
            data = base64.b64decode("".join(raw.split()), validate=False)
        else:
            data = quopri.decodestring(raw.encode("ascii", "replace"))
    except (binascii.Error, ValueError):
        return ""
    charset = part.get_content_charset() or "utf-8"
    try:
        return data.decode(charset, errors="replace")
    except LookupError:
        return data.decode("utf-8", errors="replace")


def _embedded_originals(msg: Message) -> list[Message]:
    """Header sets of returned originals (message/rfc822 or text/rfc822-headers parts)."""
    found = []
    for part in msg.walk():
        ctype = part.get_content_type()
        if ctype == "message/rfc822":
            payload = part.get_payload()
            if isinstance(payload, list) and payload and isinstance(payload[0], Message):
                found.append(payload[0])
        elif ctype in ("text/rfc822-headers", "text/rfc822-header"):
            found.append(message_from_string(_text_payload(part)))
    return found


_BODY_MSGID_RE = re.compile(r"^\s*Message-ID:\s*(<[^<>\s]+>)", re.IGNORECASE | re.MULTILINE)
_ANGLE_ID_RE = re.compile(r"<[^<>\s]+>")


def _original_message_ids(msg: Message, originals: list[Message]) -> tuple[str, ...]:
    ids = [_header(o, "Message-ID").strip() for o in originals]
    ids = [i for i in ids if i]
    if not ids:
        # Non-MIME bounces (old Exim, qmail) quote the original inline in the body.
        for part in _text_parts(msg):
            ids.extend(_BODY_MSGID_RE.findall(_text_payload(part)))
    return _unique(_clean(i, 998) for i in ids)


def _referenced_message_ids(msg: Message) -> tuple[str, ...]:
    """In-Reply-To and References of the report itself (NDRs and replies set them)."""
    ids = [i for name in ("In-Reply-To", "References") for value in msg.get_all(name, [])
           for i in _ANGLE_ID_RE.findall(str(value))]
    return _unique((_clean(i, 998) for i in ids), fold=False)


def _signed(secret: bytes, ids: Iterable[str]) -> SignedMessage | None:
    for value in ids:
        found = decode_message_id(secret, value)
        if found is not None:
            return found
    return None


def _claimed(ids: Iterable[str], domain: str) -> int | None:
    for value in ids:
        newsletter = claimed_newsletter(value, domain)
        if newsletter is not None:
            return newsletter
    return None


def _text_parts(msg: Message) -> Iterator[Message]:
    for part in msg.walk():
        if part.get_content_maintype() == "text" and not part.is_multipart():
            if part.get_content_type() in ("text/rfc822-headers", "text/rfc822-header"):
                continue
            yield part


# --- attribution ----------------------------------------------------------------------


def _verp_id(secret: bytes, domain: str, candidates: Iterable[str]) -> int | None:
    for cand in candidates:
        ident = decode_verp(secret, cand, domain)
        if ident is not None:
            return ident
    return None


def _addressed_candidates(msg: Message, envelope_recipient: str | None) -> list[str]:
    """Where this message was delivered to, most trustworthy first."""
    cands = [envelope_recipient] if envelope_recipient else []
    for name in ("Delivered-To", "X-Original-To", "Envelope-To", "To"):
        cands.extend(_addresses(msg.get_all(name, [])))
    return cands


def _embedded_candidates(blocks: list[Message], originals: list[Message]) -> list[str]:
    """Our envelope sender as quoted by the report (Postfix, ARF, returned headers)."""
    cands = []
    for block in blocks:
        for name in ("X-Postfix-Sender", "Original-Mail-From"):
            for value in block.get_all(name, []):
                addr = _dsn_address(str(value))
                if addr:
                    cands.append(addr)
    for original in originals:
        cands.extend(_addresses(original.get_all("Return-Path", [])))
    return cands


# --- the detectors --------------------------------------------------------------------


@dataclass(frozen=True)
class _Verdict:
    kind: BounceKind
    status: str | None
    diagnostic: str
    recipients: tuple[str, ...]


_SEVERITY = {BounceKind.HARD: 2, BounceKind.SOFT: 1, BounceKind.BLOCKED: 0}
# The address we sent to first: Original-Recipient is what our relay was given
# (RFC 3464 2.3.1); Final-Recipient may be where a forward or alias led
# ("userx@sims-ms-daemon"), which is not an address we know.
_RECIPIENT_FIELDS = ("Original-Recipient", "Final-Recipient", "X-Actual-Recipient")


def _dsn_recipient(block: Message) -> str | None:
    for name in _RECIPIENT_FIELDS:
        addr = _dsn_address(_header(block, name))
        if addr:
            return addr
    return None


def _read_dsn(blocks: list[Message]) -> _Verdict | None:
    """RFC 3464 per-recipient blocks → the most severe failure, or None if none failed."""
    best: _Verdict | None = None
    for block in blocks:
        action = _header(block, "Action").strip().lower()
        if not action.startswith(("failed", "failure", "error", "delayed")):
            continue  # delivered / relayed / expanded, or the per-message block
        diag = _clean(_header(block, "Diagnostic-Code"))
        diag_text = diag.split(";", 1)[1].strip() if ";" in diag[:20] else diag
        reading = read_reply(diag_text, status=_clean(_header(block, "Status")) or None)
        kind = _kind(reading, delayed=action.startswith("delayed"))
        recipient = _dsn_recipient(block)
        summary = diag_text or _clean(_header(block, "Status")) or action
        verdict = _Verdict(kind, reading.status, summary, (recipient,) if recipient else ())
        if best is None or _SEVERITY[verdict.kind] > _SEVERITY[best.kind]:
            best = verdict
        elif _SEVERITY[verdict.kind] == _SEVERITY[best.kind]:
            best = _Verdict(best.kind, best.status, best.diagnostic,
                            _unique(best.recipients + verdict.recipients))
    return best


def _read_arf(blocks: list[Message], originals: list[Message]) -> _Verdict:
    fields = blocks[0] if blocks else Message()
    ftype = _clean(_header(fields, "Feedback-Type")).lower()
    recipients = [a for v in fields.get_all("Original-Rcpt-To", [])
                  if (a := _dsn_address(str(v)))]
    if not recipients:
        for original in originals:
            recipients.extend(_addresses(original.get_all("To", [])))
    # "fraud" is a reader's complaint as much as "abuse"; "not-spam",
    # "auth-failure" (DMARC) and "virus" are reports about us, not about the reader.
    kind = BounceKind.COMPLAINT if ftype in ("abuse", "fraud") else BounceKind.NOT_BOUNCE
    return _Verdict(kind, None, f"feedback report: {ftype or 'no Feedback-Type'}",
                    _unique(recipients))


_AUTOREPLY_SUBJECT_RE = re.compile(
    r"^\s*(?:"
    r"out of (?:the )?office|automatic reply|auto(?:matic)?[ -]?(?:reply|response)"
    r"|autosvar|automatisk svar|frav(?:æ|ae)rsmeddelelse|frav(?:æ|ae)r\b|ferie\b"
    r"|abwesenheitsnotiz|automatische antwort|r(?:é|e)ponse automatique|absence\b"
    r"|respuesta autom(?:á|a)tica|afwezig|automatisch antwoord|vacation\b|on vacation"
    r"|away from (?:the|my) office|i am (?:currently )?(?:away|out)"
    r")",
    re.IGNORECASE,
)


def _autoreply_reason(msg: Message, subject: str) -> str | None:
    """Why this looks like an RFC 3834 auto-reply (vacation, out-of-office), or None."""
    auto = _header(msg, "Auto-Submitted").strip().lower()
    if auto.startswith("auto-replied"):
        return "Auto-Submitted: auto-replied"
    for name in ("X-Autoreply", "X-Autorespond", "X-Autoresponder"):
        if msg.get(name) is not None:
            return f"{name} header"
    if _header(msg, "Precedence").strip().lower() == "auto_reply":
        return "Precedence: auto_reply"
    if _header(msg, "X-Auto-Response-Suppress") and _header(msg, "X-MS-Exchange-Inbox-Rules-Loop"):
        return "Exchange inbox rule reply"
    if _AUTOREPLY_SUBJECT_RE.search(subject):
        return "auto-reply subject"
    return None


def _flufl(msg: Message) -> tuple[set[str], set[str]]:
    """flufl.bounce's (temporary, permanent) failed addresses; empty on any detector error."""
    # flufl.bounce's Yale detector indexes the From address unguarded and
    # raises (logging a traceback) when there is none; bounces without a
    # From do exist (simple_13 and simple_31 of its own corpus), so they get
    # a placeholder for the duration of the scan instead of being skipped.
    originals = msg.get_all("From", [])
    blank = not any(addr for _name, addr in getaddresses([str(v) for v in originals]))
    if blank:
        del msg["From"]
        msg["From"] = "MAILER-DAEMON"
    try:
        temporary, permanent = all_failures(msg)
    except Exception:  # a heuristic detector choking on odd input is not our failure
        log.debug("flufl.bounce failed on message", exc_info=True)
        return set(), set()
    finally:
        if blank:
            del msg["From"]
            for value in originals:
                msg["From"] = value

    def text(addrs: Iterable[bytes]) -> set[str]:
        return {a.decode("ascii", "replace").strip("<>") for a in addrs if b"@" in a}

    return text(temporary), text(permanent)


_FAILURE_SUBJECT_RE = re.compile(
    r"undeliver|delivery (?:status )?notification|returned mail|mail delivery fail"
    r"|failure notice|delivery fail|could not be delivered|non[- ]?delivery|not delivered",
    re.IGNORECASE,
)
_DAEMON_RE = re.compile(r"^(?:mailer-daemon|postmaster|mail delivery)", re.IGNORECASE)


def _body_status(msg: Message) -> tuple[str | None, str]:
    """The first SMTP error in a non-DSN bounce's text: (status, that line)."""
    for part in _text_parts(msg):
        lines = _text_payload(part).splitlines()
        for i, line in enumerate(lines):
            if has_reply(line):
                # Wrapped diagnostics: keep the continuation lines that follow.
                context = " ".join([line, *lines[i + 1:i + 3]])
                status = status_from_reply(line) or enhanced_status(context)
                if status and enhanced_status_class(status) in (4, 5):
                    return status, _clean(context)
    return None, ""


def _address_context(msg: Message, addresses: Iterable[str]) -> str:
    """The lines that name a failed address, and the two after each (the reason).

    Without a reply code in the text (qmail: "<user@example.net>:" then the
    reason on the next line), this is where the reason is. Only these lines
    are read, never the whole body: the returned newsletter below it says
    "privacy policy" or "blocked" often enough to fake a policy block.
    """
    wanted = [a.lower() for a in addresses]
    found: list[str] = []
    for part in _text_parts(msg):
        lines = _text_payload(part).splitlines()
        for i, line in enumerate(lines):
            low = line.lower()
            hit = next((a for a in wanted if a in low), None)
            if hit is not None:
                found.append(" ".join(lines[i:i + 3]))
                wanted.remove(hit)
        if not wanted:
            break
    return _clean(" ".join(found))


def _read_heuristic(msg: Message, subject: str) -> _Verdict | None:
    temporary, permanent = _flufl(msg)
    status, line = _body_status(msg)
    if permanent or temporary:
        failed = permanent or temporary
        text = line or _address_context(msg, failed)
        reading = read_reply(text, status=status or ("5.0.0" if permanent else "4.0.0"))
        kind = _kind(reading, delayed=not permanent)
        return _Verdict(kind, reading.status if status else None, text or _clean(subject),
                        _unique(sorted(failed)))
    sender = parseaddr(_header(msg, "From"))[1] or _header(msg, "From")
    null_sender = _header(msg, "Return-Path").strip() == "<>"
    if (null_sender or _DAEMON_RE.match(sender)) and _FAILURE_SUBJECT_RE.search(subject):
        # Clearly a bounce, but no recipient could be parsed out of it: count it
        # as SOFT so an unknown format never removes a reader on its own.
        return _Verdict(BounceKind.SOFT, status, line or f"unparsed bounce: {_clean(subject)}",
                        ())
    return None


# <sub>.<list>.<sig>, or <sub>.<list>.<newsletter>.<sig> (schema 13 on).
_TOKEN_SEARCH_RE = re.compile(r"(?<![0-9A-Za-z.])([0-9a-z]+\.[0-9a-z]+(?:\.[0-9a-z]+)?"
                              r"\.[A-Za-z0-9_-]{22})(?![A-Za-z0-9_-])")


def _find_token(secret: bytes, texts: Iterable[str]) -> str | None:
    """The first unsubscribe token in ``texts`` that verifies (forged ones are ignored)."""
    for text in texts:
        for cand in _TOKEN_SEARCH_RE.findall(text.replace("%20", " ")):
            if verify_unsubscribe_token(secret, cand) is not None:
                return str(cand)
    return None


def _is_report(msg: Message, report_type: str) -> bool:
    param = msg.get_param("report-type", "")
    return msg.get_content_type() == "multipart/report" and str(param).lower() == report_type


def _find_parts(msg: Message, ctype: str) -> list[Message]:
    return [p for p in msg.walk() if p.get_content_type() == ctype]


# --- the entry point ------------------------------------------------------------------


def classify(raw: bytes, *, secret: bytes, envelope_domain: str,
             unsubscribe_address: str | None = None,
             envelope_recipient: str | None = None) -> BounceReport:
    """Classify one message that arrived at the bounce / unsubscribe addresses.

    ``envelope_recipient`` is what the MTA says the message was delivered to
    (Postfix pipe: ``${original_recipient}``); it is the most reliable place
    for the VERP address. Never raises.
    """
    try:
        return _classify(raw, secret, envelope_domain, unsubscribe_address, envelope_recipient)
    except Exception as exc:  # malformed beyond what the email package tolerates
        log.warning("could not classify message: %s", exc, exc_info=True)
        return BounceReport(BounceKind.NOT_BOUNCE, None,
                            _clean(f"unparseable message: {type(exc).__name__}: {exc}"),
                            (), None, (), None, None)


def _classify(raw: bytes, secret: bytes, envelope_domain: str,
              unsubscribe_address: str | None, envelope_recipient: str | None) -> BounceReport:
    if not isinstance(raw, bytes | bytearray):
        raise TypeError(f"classify() needs the raw message as bytes, not {type(raw).__name__}")
    msg = message_from_bytes(bytes(raw[:MAX_PARSE_BYTES]))
    subject = _decoded_header(msg, "Subject")
    sender = parseaddr(_header(msg, "From"))[1] or None
    originals = _embedded_originals(msg)
    message_ids = _original_message_ids(msg, originals)
    quoted_ids = (*message_ids, *_referenced_message_ids(msg))
    signed = _signed(secret, quoted_ids)
    claimed = None if signed else _claimed(quoted_ids, envelope_domain)
    addressed = _addressed_candidates(msg, envelope_recipient)

    def report(verdict: _Verdict, blocks: list[Message], token: str | None = None) -> BounceReport:
        verp = _verp_id(secret, envelope_domain,
                        [*addressed, *_embedded_candidates(blocks, originals)])
        return BounceReport(verdict.kind, verdict.status, _clean(verdict.diagnostic),
                            verdict.recipients, verp, message_ids, token, sender, signed,
                            claimed)

    if _is_report(msg, "feedback-report"):
        blocks = [b for p in _find_parts(msg, "message/feedback-report")
                  for b in _header_blocks(p)]
        token = _find_token(secret, [str(v) for o in originals
                                     for v in o.get_all("List-Unsubscribe", [])])
        return report(_read_arf(blocks, originals), blocks, token)

    blocks = [b for p in _find_parts(msg, "message/delivery-status") for b in _header_blocks(p)]
    if blocks:
        verdict = _read_dsn(blocks)
        if verdict is not None:
            return report(verdict, blocks)
        if any(_header(b, "Action").strip() for b in blocks):
            # A success / relay notification (we never ask for those, but MTAs send them).
            return report(_Verdict(BounceKind.NOT_BOUNCE, None,
                                   "delivery status notification without failures", ()), blocks)

    reason = _autoreply_reason(msg, subject)
    heuristic = None
    if reason is None or reason == "Auto-Submitted: auto-replied":
        # Exim and Postfix bounces say "auto-replied" too, so that header alone
        # does not beat a bounce the heuristics recognise.
        heuristic = _read_heuristic(msg, subject)
    if heuristic is not None:
        return report(heuristic, blocks)
    if reason is not None:
        return report(_Verdict(BounceKind.AUTOREPLY, None,
                               f"auto-reply ({reason}): {_clean(subject)}", ()), blocks)

    if unsubscribe_address and unsubscribe_address.lower() in {a.lower() for a in addressed}:
        texts = [subject, *(_text_payload(p) for p in _text_parts(msg))]
        token = _find_token(secret, texts)
        what = "with a valid token" if token else "without a valid token"
        return report(_Verdict(BounceKind.UNSUBSCRIBE, None,
                               f"unsubscribe request from {sender or 'unknown sender'} {what}",
                               ()), blocks, token)

    if not msg.keys():
        why = "not an email message (no headers)"
    elif msg.defects:
        why = "not a bounce (message has MIME defects: " + ", ".join(
            type(d).__name__ for d in msg.defects[:3]) + ")"
    else:
        why = f"not a bounce: {subject!r} from {sender or 'unknown sender'}"
    return report(_Verdict(BounceKind.NOT_BOUNCE, None, why, ()), blocks)
