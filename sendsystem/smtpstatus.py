"""What an SMTP reply or a DSN status says went wrong: the one home of the reply rules.

Pure functions, no I/O. The send worker (:func:`sendsystem.delivery.classify_reply`,
a reply at SMTP time) and the bounce classifier (:mod:`sendsystem.bounce.classify`,
a DSN or a bounce's text days later) read the same reply through :func:`read_reply`,
so a reply means the same whether it arrives at once or in a bounce. Each
caller only maps the :class:`Cause` to its own outcome.

How a reply is read, and why:

* **Codes.** RFC 3463 enhanced codes (``5.1.1``) say most; a bare RFC 5321
  reply code (``550``) only says permanent or temporary (it reads as
  ``5.0.0``). A DSN's ``Status`` field is authoritative for permanent vs
  temporary, but MTAs that cannot map a remote reply write a generic
  ``5.0.0`` (Exim does) while the ``Diagnostic-Code`` holds the remote's
  specific ``550-5.7.1``: a generic code (subject 0) gives way to a specific
  one of the same class found in the text.
* **Causes by code.** x.1.x: the address (mailbox, domain) is bad, except
  x.1.7 / x.1.8, which are about *our* sender address. x.2.1: mailbox
  disabled. x.2.2: mailbox full. x.2.3 / x.3.4: message too big. x.4.7:
  delivery time expired. x.7.x: policy (spam, reputation, authentication,
  DMARC, relaying). Anything else says nothing about the address by itself.
* **Causes by wording**, only when the code is generic or absent (a specific
  code is the server's own machine-readable verdict and wins): policy and
  spam wording first ("blocked", "spam", "unsolicited", "blacklisted",
  "reputation", "relay access denied"...), then full mailbox, size, expiry,
  then "user unknown" wording. Policy comes first on purpose: "Message
  blocked: user unknown to spam policy" is a block, and mistaking a block
  for a dead address costs a real reader. Host names, addresses and IPs are
  removed before the wording is read, so ``mx.spamexperts.com said: 550
  5.1.1`` or ``blocklist.example.net`` never read as a block.
* "User unknown" wording counts only with 550, 551 or 553 (or no reply code
  at all, as in a bounce's prose): 552 and 554 replies that happen to say
  "no such user" are too often something else.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum


class Cause(StrEnum):
    """Why a delivery failed, as far as the reply tells."""

    ADDRESS = "address"  # mailbox or domain does not exist, or is disabled
    FULL = "full"  # mailbox full / over quota: it may empty
    SIZE = "size"  # message too big for this mailbox or server
    POLICY = "policy"  # spam / policy / reputation block, or our sender refused: about us
    EXPIRED = "expired"  # the sending MTA gave up retrying: says nothing about the mailbox
    OTHER = "other"  # nothing more specific


@dataclass(frozen=True)
class Reading:
    status: str | None  # the most specific RFC 3463 status found, e.g. "5.7.1"
    cause: Cause


# Subject 0-7 only (RFC 3463): "Exim 4.92.3" is a version, not a status.
_ENHANCED_RE = re.compile(r"(?<![\d.])([245])\.([0-7])\.(\d{1,3})(?![\d.])")
# "550 5.1.1", "550-5.1.1", or a bare "550 " / "550-" reply code. The code is
# not part of a longer number, and a bare code is not followed by a digit, so
# phone numbers ("480-624-2500") and times are not replies.
_REPLY_RE = re.compile(
    r"(?<![\d.-])([245]\d\d)(?:[ -]+([245]\.[0-7]\.\d{1,3})(?![\d.])|[ -](?![\d-])|$)",
    re.MULTILINE,
)
# Host names, e-mail addresses, IPs: stripped before reading the wording.
_HOSTLIKE_RE = re.compile(r"[\w.+=-]*@[\w.-]+|\b[\w-]+(?:\.[\w-]+)+\b")

_POLICY_RE = re.compile(
    r"\bspam|unsolicited|\bblock(?:ed|ing|list(?:ed)?)?\b|black ?list(?:ed)?|deny ?list(?:ed)?"
    r"|\b(?:dns)?rbl\b|spamhaus|\bpolicy\b|policies|reputation|rate limit"
    r"|too many (?:connections|recipients|messages|mails?|emails|requests|sessions)"
    r"|relay(?:ing)? (?:access )?(?:denied|not (?:allowed|permitted))|unable to relay"
    r"|not permitted to relay|bulk mail|dmarc|\bspf\b|\bdkim\b|not authori[sz]ed to send"
    r"|content (?:rejected|filter)|\bvirus",
    re.IGNORECASE,
)
_FULL_RE = re.compile(
    r"quota|(?:mail ?box|mail ?folder|inbox|mail ?drop) (?:is )?full|mailbox.{0,20}exceed"
    r"|insufficient (?:system )?storage|out of storage|storage (?:space|limit|allocation)"
    r"|disk (?:quota|space|full)|over ?quota|not enough space|space not enough",
    re.IGNORECASE,
)
_SIZE_RE = re.compile(
    r"message (?:size|too (?:big|large))|too (?:big|large)|(?:exceeds?|exceeded) (?:the )?"
    r"(?:maximum |max )?(?:allowed |inbound |incoming )*(?:message )?size|size limit",
    re.IGNORECASE,
)
# Not a bare "expired": "account expired" is a dead mailbox, not a give-up.
_EXPIRED_RE = re.compile(
    r"(?:time|delivery|message|retry|lifetime)[\w -]{0,20}expired|\bexpired (?:in|after|while)"
    r"|retry time(?:out)? (?:not reached|exceeded)|too long in (?:the )?queue|queue too long"
    r"|maximum (?:delivery )?(?:time|attempts)|failed \d+ attempts",
    re.IGNORECASE,
)
_UNKNOWN_USER_RE = re.compile(
    r"user unknown|unknown user|no such (?:user|mailbox|recipient|address|account)"
    r"|unknown (?:recipient|mailbox|address)|recipient unknown|mailbox unknown"
    r"|does not exist|doesn'?t exist|n'existe pas|invalid (?:recipient|mailbox|address)"
    r"|(?:user|mailbox|recipient|account) not found|not a valid (?:user|mailbox|recipient)"
    r"|address rejected|user not local|no mailbox|account (?:is |has been )?disabled"
    r"|mailbox (?:is )?disabled|not our customer",
    re.IGNORECASE,
)


def enhanced_status(text: str | None) -> str | None:
    """The first RFC 3463 enhanced status code ("5.1.1") in ``text``, or None."""
    if not text:
        return None
    m = _ENHANCED_RE.search(text)
    return f"{m.group(1)}.{int(m.group(2))}.{int(m.group(3))}" if m else None


def enhanced_status_class(status: str | None) -> int | None:
    """2, 4 or 5 for a status like "5.1.1" (success, transient, permanent), else None."""
    if not status or enhanced_status(status) != status:
        return None
    return int(status[0])


def status_from_reply(text: str | None) -> str | None:
    """The status an SMTP reply in ``text`` carries: its enhanced code, else "5.0.0"
    from a bare 550, else the first enhanced code anywhere; None without either."""
    if not text:
        return None
    m = _REPLY_RE.search(text)
    if m:
        return enhanced_status(m.group(2)) or f"{m.group(1)[0]}.0.0"
    return enhanced_status(text)


def reply_code(reply: str) -> int:
    """The reply code a stored reply line starts with ("250 2.0.0 Ok" -> 250), else 0
    (the send worker stores 0 when there was no reply)."""
    head = reply[:3]
    return int(head) if head.isdigit() else 0


def has_reply(text: str) -> bool:
    """True when ``text`` holds an SMTP reply code or an enhanced status code."""
    return bool(_REPLY_RE.search(text) or _ENHANCED_RE.search(text))


def _parts(status: str) -> tuple[int, int, int]:
    cls, subject, detail = (int(x) for x in status.split("."))
    return cls, subject, detail


def _code_cause(status: str | None) -> Cause:
    if status is None:
        return Cause.OTHER
    _cls, subject, detail = _parts(status)
    if subject == 7 or (subject, detail) in {(1, 7), (1, 8)}:
        return Cause.POLICY
    if subject == 1 or (subject, detail) == (2, 1):
        return Cause.ADDRESS
    if (subject, detail) == (2, 2):
        return Cause.FULL
    if (subject, detail) in {(2, 3), (3, 4)}:
        return Cause.SIZE
    if (subject, detail) == (4, 7):
        return Cause.EXPIRED
    return Cause.OTHER


def _best_status(status: str | None, text: str) -> str | None:
    """``status`` (a DSN's Status field), or the text's code when that is more specific."""
    found = status_from_reply(text)
    if status is None:
        return found
    if found is not None and found[0] == status[0] and _parts(status)[1] == 0 \
            and _parts(found)[1] != 0:
        return found
    return status


def read_reply(text: str, *, status: str | None = None, code: int | None = None) -> Reading:
    """What a failure reply says: its most specific status and its :class:`Cause`.

    ``text``: the reply or diagnostic text (with or without the reply code);
    ``status``: a DSN's ``Status`` field if there is one (a bare reply code
    such as "553 ..." in it is read as one); ``code``: the SMTP reply code
    when the caller has it separately (the send worker).
    """
    field = None
    if status:
        # "5.0.0 (recipient reached disk quota)", "553 Exceeded maximum inbound
        # message size": a Status field's words count like the diagnostic's.
        field = enhanced_status(status) or status_from_reply(status)
        text = f"{status} {text}"
    if code is not None and 400 <= code < 600:
        # The reply code is known: only an enhanced code can add to it.
        best: str | None = enhanced_status(text) or f"{code // 100}.0.0"
    else:
        best = _best_status(field, text)
    cause = _code_cause(best)
    if cause is not Cause.OTHER:
        return Reading(best, cause)
    words = _HOSTLIKE_RE.sub(" ", text)
    if _POLICY_RE.search(words):
        cause = Cause.POLICY
    elif _FULL_RE.search(words):
        cause = Cause.FULL
    elif _SIZE_RE.search(words):
        cause = Cause.SIZE
    elif _EXPIRED_RE.search(words):
        cause = Cause.EXPIRED
    elif _UNKNOWN_USER_RE.search(words) and _user_unknown_code(code, text):
        cause = Cause.ADDRESS
    return Reading(best, cause)


def _user_unknown_code(code: int | None, text: str) -> bool:
    if code is None:
        m = _REPLY_RE.search(text)
        code = int(m.group(1)) if m else None
    return code is None or code in (550, 551, 553)


# Replies that ask the *sender* to slow down: SES "454 Throttling failure:
# Maximum sending rate exceeded", Gmail "421 4.7.28 ... rate limited",
# Postfix/Exim "452 4.3.2 Too many messages", "451 ... rate limit exceeded".
_THROTTLE_RE = re.compile(
    r"throttl|rate[ -]?limit|sending rate|too many (?:messages|mails?|emails|requests"
    r"|connections|sessions|concurrent)|slow(?:ing)? down|try (?:again )?(?:later|slower)"
    r".{0,20}rate|maximum (?:sending )?rate|quota exceeded|exceeded .{0,20}rate",
    re.IGNORECASE,
)


def is_throttling(code: int, text: str) -> bool:
    """True when a reply refuses the message for our sending pace, not for itself.

    454 is throttling on a submission relay (SES answers it at MAIL FROM or
    after DATA when the account's rate is exceeded). Other transient replies
    count only with throttling wording or Gmail's 4.7.28; a 421 without such
    wording is a relay going away (it is set aside instead), and a 4xx that
    says "mailbox full" or "greylisted" is not about our pace.
    """
    if not 400 <= code < 500:
        return False
    if code == 454:
        return True
    return enhanced_status(text) == "4.7.28" or bool(_THROTTLE_RE.search(text))


def refuses_sender_auth(code: int, text: str) -> bool:
    """A reply to MAIL FROM that says the relay wants us authenticated (530, 5.7.0
    "Authentication required"): the relay's settings are wrong, not the message."""
    if code in (530, 534, 535, 538):
        return True
    return 500 <= code < 600 and bool(re.search(r"authentication required|must authenticate",
                                                text, re.IGNORECASE))
