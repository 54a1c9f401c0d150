"""Bounces and complaints reported by ESPs over HTTP webhooks.

An ESP that sends for us (Amazon SES, SendGrid, Mailgun, Postmark) reports a
bounce or complaint by POSTing JSON to ``/webhooks/<provider>`` of the
unsubscribe web app (:mod:`sendsystem.unsubscribe.app`), which hands the raw
request to :class:`WebhookReceiver`.

Two separate checks, as for bounce mail (:mod:`sendsystem.bounce.intake`):

* **The request is the ESP's.** SES via SNS: the SNS signature (version 1 =
  SHA1withRSA, 2 = SHA256withRSA) over AWS's canonical string, checked with
  the public key of the signing certificate at ``SigningCertURL``, which is
  fetched only over HTTPS from a host on ``sns_cert_hosts`` and cached.
  SendGrid: ECDSA P-256/SHA-256 over timestamp + raw body with the
  configured public key. Mailgun: HMAC-SHA256 of timestamp + token with the
  signing key; an old timestamp or a token already seen (in this process)
  is a replay. Postmark signs nothing: HTTP basic auth with configured
  credentials, compared in constant time. All crypto is the
  ``cryptography`` package's. A request that fails this check is 403 and
  changes nothing.
* **The event is about one of our messages.** An authenticated ESP still
  only repeats what a receiving MTA or a mailbox provider told it, and a
  customer of the same ESP account could produce events too. So an event
  acts only when it carries our *signed* Message-ID
  (:func:`sendsystem.tokens.decode_message_id`): SES's original headers,
  SendGrid's ``smtp-id``, Mailgun's ``message.headers.message-id``, a
  Postmark bounce's returned content; a ``sendsystem_id`` custom argument /
  user variable / metadata value holding it is accepted too. Then it acts on
  *that* message's subscriber (evidence ``webhook``) through the same
  functions as bounce mail, once per message and kind. Without it the event
  is stored unverified, changes nothing, and the request is answered 200 so
  the ESP does not retry it for ever.

SubscriptionConfirmation (SNS) is verified like a notification but never
followed automatically: fetching a URL that arrived in a request is the
kind of thing an attacker wants us to do, and confirming is a one-off. The
SubscribeURL is logged at WARNING for the operator to open.

Events that are neither bounces nor complaints (deliveries, opens, delays)
are ignored: a delay is not a bounce, and SendGrid's ``dropped`` is its own
suppression list speaking, not a receiving server.
"""

from __future__ import annotations

import base64
import binascii
import hmac
import json
import logging
import re
import ssl
import threading
import time
import urllib.request
from collections import OrderedDict
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import urlsplit

from cryptography import x509
from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa

from ..config import Config, WebhooksConfig
from ..db import Database
from ..tokens import decode_message_id
from . import recipients
from .classify import BounceKind

log = logging.getLogger(__name__)

PROVIDERS = ("ses", "sendgrid", "mailgun", "postmark")
# The custom argument / variable / metadata key that may carry our signed Message-ID.
CUSTOM_KEY = "sendsystem_id"
MAX_CERT = 64 * 1024
CERT_CACHE_SIZE = 16
MAILGUN_TOKENS_KEPT = 10_000

CertFetcher = Callable[[str], bytes]


class WebhookRejected(Exception):
    """The request is not authentically from the ESP (403)."""


class WebhookMalformed(Exception):
    """Authentic or not, the request cannot be understood (400)."""


@dataclass(frozen=True)
class WebhookEvent:
    """One bounce or complaint an ESP reported, before attribution."""

    kind: BounceKind
    email: str | None
    status: str | None
    diagnostic: str
    candidates: tuple[str, ...]  # values that may be our signed Message-ID


@dataclass(frozen=True)
class EventOutcome:
    kind: BounceKind
    verified: bool  # acted upon (or a duplicate of one that did)
    message_id: int | None
    status_changed: bool


# ------------------------------------------------------------------ helpers

def _json(body: bytes) -> Any:
    try:
        return json.loads(body.decode("utf-8"))
    except (UnicodeDecodeError, ValueError):
        raise WebhookMalformed("body is not JSON") from None


def _str(value: object) -> str | None:
    return value if isinstance(value, str) and value else None


def _dict(value: object) -> dict[str, Any]:
    return value if isinstance(value, dict) else {}


def _b64(value: str, what: str) -> bytes:
    try:
        return base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        raise WebhookRejected(f"{what} is not base64") from None


def _one_line(text: str) -> str:
    return " ".join(text.split())[:900]


_ENHANCED = re.compile(r"\b([245]\.\d{1,3}\.\d{1,3})\b")


def _enhanced(*texts: object) -> str | None:
    for text in texts:
        if isinstance(text, str):
            m = _ENHANCED.search(text)
            if m:
                return m.group(1)
    return None


# -------------------------------------------------------------- SES via SNS

_SNS_FIELDS = {
    "Notification": ("Message", "MessageId", "Subject", "Timestamp", "TopicArn", "Type"),
    "SubscriptionConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token",
                                 "TopicArn", "Type"),
    "UnsubscribeConfirmation": ("Message", "MessageId", "SubscribeURL", "Timestamp", "Token",
                                "TopicArn", "Type"),
}


def sns_string_to_sign(message: Mapping[str, Any]) -> bytes:
    """AWS's canonical form: ``Name\\nValue\\n`` for each signed field present, in
    the documented (alphabetical) order; Subject only when the message has one."""
    fields = _SNS_FIELDS.get(str(message.get("Type")))
    if fields is None:
        raise WebhookMalformed(f"unknown SNS message type {message.get('Type')!r}")
    out = []
    for name in fields:
        value = message.get(name)
        if value is None:
            if name == "Subject":
                continue
            raise WebhookMalformed(f"SNS message lacks {name}")
        if not isinstance(value, str):
            raise WebhookMalformed(f"SNS {name} is not a string")
        out.append(f"{name}\n{value}\n")
    return "".join(out).encode("utf-8")


def host_allowed(host: str, patterns: Iterable[str]) -> bool:
    """``host`` matches one pattern; ``*`` stands for exactly one DNS label."""
    host = host.lower().rstrip(".")
    for pattern in patterns:
        rx = r"\.".join("[a-z0-9-]+" if label == "*" else re.escape(label)
                        for label in pattern.lower().split("."))
        if re.fullmatch(rx, host):
            return True
    return False


class _NoRedirect(urllib.request.HTTPRedirectHandler):
    def redirect_request(self, *args: Any, **kwargs: Any) -> None:
        raise WebhookRejected("SigningCertURL redirects elsewhere")


def https_fetcher(context: ssl.SSLContext | None = None) -> CertFetcher:
    """A fetcher over HTTPS only, the server's certificate checked (``context``, else
    the system's trust store), 5 s, 64 kB at most. Tests pass a context trusting
    their own CA; production uses :func:`fetch_certificate`."""
    # No redirects: the allowlisted host must serve the certificate itself.
    opener = urllib.request.build_opener(
        urllib.request.HTTPSHandler(context=context or ssl.create_default_context()),
        _NoRedirect())

    def fetch(url: str) -> bytes:
        if urlsplit(url).scheme != "https":
            raise WebhookRejected("SigningCertURL is not https")
        with opener.open(url, timeout=5) as resp:
            data: bytes = resp.read(MAX_CERT + 1)
        if len(data) > MAX_CERT:
            raise WebhookRejected("SigningCertURL answered more than a certificate")
        return data

    return fetch


def fetch_certificate(url: str) -> bytes:
    """The default fetcher (see :func:`https_fetcher`)."""
    return https_fetcher()(url)


class CertificateCache:
    """RSA public keys of SNS signing certificates, by URL (a few, newest kept).

    Only a URL whose host is allowed reaches the fetcher; a certificate that
    does not parse, is not RSA or is outside its validity is not cached.
    """

    def __init__(self, patterns: tuple[str, ...], fetcher: CertFetcher = fetch_certificate,
                 *, size: int = CERT_CACHE_SIZE) -> None:
        self.patterns = patterns
        self.fetcher = fetcher
        self.size = size
        self.fetches = 0
        self._keys: OrderedDict[str, rsa.RSAPublicKey] = OrderedDict()
        self._lock = threading.Lock()

    def check_url(self, url: str) -> None:
        parts = urlsplit(url)
        if parts.scheme != "https" or parts.username or parts.password:
            raise WebhookRejected("SigningCertURL must be a plain https URL")
        if not parts.hostname or not host_allowed(parts.hostname, self.patterns):
            raise WebhookRejected(f"SigningCertURL host {parts.hostname!r} is not on "
                                  "sns_cert_hosts")
        if not parts.path.endswith(".pem"):
            raise WebhookRejected("SigningCertURL is not a .pem file")

    def key(self, url: str) -> rsa.RSAPublicKey:
        self.check_url(url)
        with self._lock:
            if url in self._keys:
                self._keys.move_to_end(url)
                return self._keys[url]
        self.fetches += 1
        try:
            cert = x509.load_pem_x509_certificate(self.fetcher(url))
        except WebhookRejected:
            raise
        except Exception as exc:  # network trouble or not a certificate: not authentic
            raise WebhookRejected(f"cannot load the SNS signing certificate: {exc}") from None
        now = time.time()
        valid = cert.not_valid_before_utc.timestamp(), cert.not_valid_after_utc.timestamp()
        if not valid[0] <= now <= valid[1]:
            raise WebhookRejected("SNS signing certificate is not valid now")
        public = cert.public_key()
        if not isinstance(public, rsa.RSAPublicKey):
            raise WebhookRejected("SNS signing certificate is not RSA")
        with self._lock:
            self._keys[url] = public
            while len(self._keys) > self.size:
                self._keys.popitem(last=False)
        return public


def verify_sns(message: Mapping[str, Any], certs: CertificateCache) -> None:
    """Raise :class:`WebhookRejected` unless the SNS signature verifies."""
    version = message.get("SignatureVersion")
    algorithm: hashes.HashAlgorithm
    if version == "1":
        algorithm = hashes.SHA1()  # SNS SignatureVersion 1 is SHA1withRSA
    elif version == "2":
        algorithm = hashes.SHA256()
    else:
        raise WebhookRejected(f"unsupported SNS SignatureVersion {version!r}")
    url, signature = _str(message.get("SigningCertURL")), _str(message.get("Signature"))
    if url is None or signature is None:
        raise WebhookRejected("SNS message is not signed")
    data = sns_string_to_sign(message)
    key = certs.key(url)
    try:
        key.verify(_b64(signature, "SNS Signature"), data, padding.PKCS1v15(), algorithm)
    except InvalidSignature:
        raise WebhookRejected("SNS signature does not verify") from None


def _ses_candidates(mail: Mapping[str, Any]) -> list[str]:
    found = []
    common = _dict(mail.get("commonHeaders"))
    if _str(common.get("messageId")):
        found.append(str(common["messageId"]))
    for header in mail.get("headers") or []:
        header = _dict(header)
        name = str(header.get("name", "")).lower()
        if name in ("message-id", "x-sendsystem-id") and _str(header.get("value")):
            found.append(str(header["value"]))
    return found


def ses_events(notification: Mapping[str, Any]) -> list[WebhookEvent]:
    """Events of one SES notification (``notificationType``, or ``eventType`` of
    event publishing): Permanent bounce = hard, Transient = soft, complaint."""
    kind = notification.get("notificationType") or notification.get("eventType")
    mail = _dict(notification.get("mail"))
    candidates = tuple(_ses_candidates(mail))
    events = []
    if kind == "Bounce":
        bounce = _dict(notification.get("bounce"))
        btype = bounce.get("bounceType")
        sub = bounce.get("bounceSubType")
        if btype == "Permanent":
            event_kind = BounceKind.HARD
        elif btype == "Transient":
            event_kind = BounceKind.SOFT
        else:  # Undetermined: SES could not tell; nothing to act on
            return []
        for rcpt in bounce.get("bouncedRecipients") or []:
            rcpt = _dict(rcpt)
            diag = str(rcpt.get("diagnosticCode") or f"SES {btype}/{sub}")
            events.append(WebhookEvent(event_kind, _str(rcpt.get("emailAddress")),
                                       _str(rcpt.get("status")) or _enhanced(diag),
                                       _one_line(f"ses {btype}/{sub}: {diag}"), candidates))
    elif kind == "Complaint":
        complaint = _dict(notification.get("complaint"))
        feedback = complaint.get("complaintFeedbackType") or "unspecified"
        for rcpt in complaint.get("complainedRecipients") or []:
            rcpt = _dict(rcpt)
            events.append(WebhookEvent(BounceKind.COMPLAINT, _str(rcpt.get("emailAddress")),
                                       None, f"ses complaint ({feedback})", candidates))
    return events


# ------------------------------------------------------------------ SendGrid

def verify_sendgrid(public_key_b64: str, signature_b64: str | None, timestamp: str | None,
                    body: bytes) -> None:
    """ECDSA (P-256, SHA-256) over ``timestamp + body``; the key as SendGrid shows it."""
    if not signature_b64 or not timestamp:
        raise WebhookRejected("SendGrid signature headers missing")
    try:
        key = serialization.load_der_public_key(base64.b64decode(public_key_b64))
    except (ValueError, binascii.Error) as exc:
        raise WebhookRejected(f"[webhooks] sendgrid_public_key does not load: {exc}") from None
    if not isinstance(key, ec.EllipticCurvePublicKey):
        raise WebhookRejected("[webhooks] sendgrid_public_key is not an ECDSA key")
    try:
        key.verify(_b64(signature_b64, "SendGrid signature"), timestamp.encode() + body,
                   ec.ECDSA(hashes.SHA256()))
    except InvalidSignature:
        raise WebhookRejected("SendGrid signature does not verify") from None


def sendgrid_events(payload: Any) -> list[WebhookEvent]:
    """``bounce`` (type ``bounce`` = hard, ``blocked`` = blocked) and ``spamreport``."""
    if not isinstance(payload, list):
        raise WebhookMalformed("SendGrid posts a JSON array of events")
    events = []
    for item in payload:
        item = _dict(item)
        name = item.get("event")
        candidates = tuple(v for v in (_str(item.get(CUSTOM_KEY)), _str(item.get("smtp-id")))
                           if v)
        email = _str(item.get("email"))
        reason = str(item.get("reason") or "")
        status = _str(item.get("status"))
        if name == "bounce":
            kind = BounceKind.BLOCKED if item.get("type") == "blocked" else BounceKind.HARD
            events.append(WebhookEvent(kind, email, status or _enhanced(reason),
                                       _one_line(f"sendgrid {item.get('type') or 'bounce'}: "
                                                 f"{reason}"), candidates))
        elif name == "spamreport":
            events.append(WebhookEvent(BounceKind.COMPLAINT, email, None,
                                       "sendgrid spamreport", candidates))
    return events


# ------------------------------------------------------------------- Mailgun

class MailgunVerifier:
    """HMAC-SHA256(signing key, timestamp + token), a replay window, and tokens
    remembered (per process, bounded) so one signed request is taken once.

    A token is remembered only once its events are recorded (:meth:`remember`):
    a request answered 503 (database down) is retried by Mailgun with the same
    signature, and must then be taken.
    """

    def __init__(self, signing_key: str, max_age: int) -> None:
        self.key = signing_key.encode()
        self.max_age = max_age
        self._seen: OrderedDict[str, None] = OrderedDict()
        self._lock = threading.Lock()

    def verify(self, signature: Mapping[str, Any], now: float | None = None) -> str:
        """The token of a valid, fresh, unused signature; else :class:`WebhookRejected`."""
        timestamp, token = _str(signature.get("timestamp")), _str(signature.get("token"))
        given = _str(signature.get("signature"))
        if timestamp is None or token is None or given is None:
            raise WebhookRejected("Mailgun signature object incomplete")
        expected = hmac.new(self.key, (timestamp + token).encode(), "sha256").hexdigest()
        if not hmac.compare_digest(expected, given.lower()):
            raise WebhookRejected("Mailgun signature does not verify")
        try:
            age = (time.time() if now is None else now) - int(timestamp)
        except ValueError:
            raise WebhookRejected("Mailgun timestamp is not a number") from None
        if abs(age) > self.max_age:
            raise WebhookRejected(f"Mailgun timestamp is {int(age)} s old (replay?)")
        with self._lock:
            if token in self._seen:
                raise WebhookRejected("Mailgun token already used (replay)")
        return token

    def remember(self, token: str) -> None:
        with self._lock:
            self._seen[token] = None
            while len(self._seen) > MAILGUN_TOKENS_KEPT:
                self._seen.popitem(last=False)


def mailgun_events(payload: Mapping[str, Any]) -> list[WebhookEvent]:
    """``failed`` (severity permanent = hard, temporary = soft) and ``complained``."""
    data = _dict(payload.get("event-data"))
    name = data.get("event")
    headers = _dict(_dict(data.get("message")).get("headers"))
    variables = _dict(data.get("user-variables"))
    candidates = tuple(v for v in (_str(variables.get(CUSTOM_KEY)),
                                   _str(headers.get("message-id"))) if v)
    email = _str(data.get("recipient"))
    if name == "failed":
        delivery = _dict(data.get("delivery-status"))
        text = str(delivery.get("description") or delivery.get("message") or data.get("reason")
                   or "")
        kind = BounceKind.HARD if data.get("severity") == "permanent" else BounceKind.SOFT
        return [WebhookEvent(kind, email, _enhanced(delivery.get("enhanced-code"), text),
                             _one_line(f"mailgun {data.get('severity')} "
                                       f"{delivery.get('code') or ''}: {text}"), candidates)]
    if name == "complained":
        return [WebhookEvent(BounceKind.COMPLAINT, email, None, "mailgun complaint", candidates)]
    return []


# ------------------------------------------------------------------ Postmark

def verify_basic_auth(header: str | None, user: str, password: str) -> None:
    """Both parts compared in constant time (no early exit on the user)."""
    if not header or not header.lower().startswith("basic "):
        raise WebhookRejected("basic auth required")
    try:
        given = base64.b64decode(header[6:].strip(), validate=True).decode("utf-8")
    except (binascii.Error, ValueError):
        raise WebhookRejected("malformed basic auth") from None
    given_user, _, given_password = given.partition(":")
    ok_user = hmac.compare_digest(given_user.encode(), user.encode())
    ok_password = hmac.compare_digest(given_password.encode(), password.encode())
    if not (ok_user and ok_password):
        raise WebhookRejected("wrong basic auth credentials")


_POSTMARK_HARD = {"HardBounce", "BadEmailAddress", "ManuallyDeactivated"}
_POSTMARK_SOFT = {"SoftBounce", "DnsError", "Transient"}
_ANGLE_ID = re.compile(r"<[^<>\s@]+@[^<>\s@]+>")


def postmark_events(payload: Mapping[str, Any]) -> list[WebhookEvent]:
    """RecordType ``Bounce`` (HardBounce/SoftBounce/SpamComplaint...) and ``SpamComplaint``."""
    record = payload.get("RecordType")
    kind_name = payload.get("Type")
    metadata = _dict(payload.get("Metadata"))
    candidates = [v for v in (_str(metadata.get(CUSTOM_KEY)),) if v]
    # The returned bounce (when Postmark includes it) quotes our Message-ID.
    candidates += _ANGLE_ID.findall(str(payload.get("Content") or ""))[:20]
    email = _str(payload.get("Email"))
    details = str(payload.get("Details") or payload.get("Description") or "")
    if record == "SpamComplaint" or kind_name == "SpamComplaint":
        return [WebhookEvent(BounceKind.COMPLAINT, email, None, "postmark spam complaint",
                             tuple(candidates))]
    if record != "Bounce":
        return []
    if kind_name in _POSTMARK_HARD:
        kind = BounceKind.HARD
    elif kind_name in _POSTMARK_SOFT:
        kind = BounceKind.SOFT
    else:  # auto-replies, challenge-response, subscribe requests...: not a bounce
        return []
    return [WebhookEvent(kind, email, _enhanced(details),
                         _one_line(f"postmark {kind_name}: {details}"), tuple(candidates))]


# ---------------------------------------------------------------- recording

def record_event(db: Database, config: Config, provider: str,
                 event: WebhookEvent) -> EventOutcome:
    """Act on an authenticated event if it names one of our messages, else keep it."""
    secret = config.secret()
    signed = next((s for s in (decode_message_id(secret, c) for c in event.candidates) if s),
                  None)
    row = db.fetchone("message_for_bounce", {"id": signed.message_id}) if signed else None
    if signed is None or row is None or int(row["newsletter_id"]) != signed.newsletter_id:
        why = "signed, but no such message" if signed else "no signed Message-ID"
        diagnostic = f"[unverified {event.kind}: {provider} webhook, {why}] {event.diagnostic}"
        recipients.store_unverified(db, kind=str(event.kind), email=event.email,
                                    newsletter_id=signed.newsletter_id if signed else None,
                                    status=event.status, diagnostic=diagnostic)
        log.warning("unverified %s from %s webhook kept, nothing changed: %s", event.kind,
                    provider, diagnostic)
        return EventOutcome(event.kind, False, None, False)
    message_id, subscriber_id = int(row["id"]), int(row["subscriber_id"])
    # The subscriber of *that* message, never the address the event names.
    email = str(row["email"])
    if event.kind is BounceKind.COMPLAINT:
        done = recipients.record_complaint(db, config.bounce, email=email, evidence="webhook",
                                           message_id=message_id, subscriber_id=subscriber_id,
                                           diagnostic=event.diagnostic)
    else:
        done = recipients.record_bounce_once(db, config.bounce, kind=str(event.kind),
                                             evidence="webhook", email=email,
                                             message_id=message_id,
                                             subscriber_id=subscriber_id, status=event.status,
                                             diagnostic=event.diagnostic)
    log.info("%s webhook: %s for message %d <%s>%s%s", provider, event.kind, message_id, email,
             "" if done.stored else " (duplicate)",
             "; subscriber status changed" if done.status_changed else "")
    return EventOutcome(event.kind, True, message_id, done.status_changed)


# ----------------------------------------------------------------- receiver

@dataclass(frozen=True)
class WebhookReply:
    status: int  # 200, 400, 403 or 404
    text: str
    outcomes: tuple[EventOutcome, ...] = ()


class WebhookReceiver:
    """Authenticates one provider's request, then records its events.

    ``recorder`` stores one event (over the database: see
    :class:`sendsystem.unsubscribe.service.WebhookService`); the receiver itself
    touches no database, so the verification is testable on its own.
    """

    def __init__(self, config: WebhooksConfig,
                 recorder: Callable[[str, WebhookEvent], EventOutcome], *,
                 cert_fetcher: CertFetcher = fetch_certificate) -> None:
        self.config = config
        self.recorder = recorder
        self.certs = CertificateCache(config.cert_host_patterns(), cert_fetcher)
        self.mailgun = MailgunVerifier(config.mailgun_signing_key, config.mailgun_max_age)

    def enabled(self, provider: str) -> bool:
        return provider in PROVIDERS and bool(getattr(self.config, f"{provider}_enabled"))

    def handle(self, provider: str, headers: Mapping[str, str], body: bytes) -> WebhookReply:
        """``headers`` keyed in lower case."""
        if not self.enabled(provider):
            return WebhookReply(404, "not found\n")
        try:
            events, token = self._authentic_events(provider, headers, body)
        except WebhookRejected as exc:
            log.warning("%s webhook refused (403): %s", provider, exc)
            return WebhookReply(403, "forbidden\n")
        except WebhookMalformed as exc:
            log.warning("%s webhook malformed (400): %s", provider, exc)
            return WebhookReply(400, f"bad request: {exc}\n")
        outcomes = tuple(self.recorder(provider, event) for event in events)
        if token is not None:
            self.mailgun.remember(token)
        return WebhookReply(200, "ok\n", outcomes)

    def _authentic_events(self, provider: str, headers: Mapping[str, str],
                          body: bytes) -> tuple[list[WebhookEvent], str | None]:
        """The events, and a Mailgun token to remember once they are recorded."""
        c = self.config
        if provider == "postmark":
            # Authenticate before parsing: an outsider learns nothing from errors.
            verify_basic_auth(headers.get("authorization"), c.postmark_user, c.postmark_password)
            return postmark_events(_dict(_json(body))), None
        if provider == "sendgrid":
            verify_sendgrid(c.sendgrid_public_key,
                            headers.get("x-twilio-email-event-webhook-signature"),
                            headers.get("x-twilio-email-event-webhook-timestamp"), body)
            return sendgrid_events(_json(body)), None
        payload = _dict(_json(body))
        if provider == "mailgun":
            token = self.mailgun.verify(_dict(payload.get("signature")))
            return mailgun_events(payload), token
        return self._ses(payload), None

    def _ses(self, message: Mapping[str, Any]) -> list[WebhookEvent]:
        verify_sns(message, self.certs)
        topics = self.config.topic_arns()
        if topics and message.get("TopicArn") not in topics:
            raise WebhookRejected(f"SNS topic {message.get('TopicArn')!r} is not on "
                                  "sns_topic_arns")
        kind = message.get("Type")
        if kind == "SubscriptionConfirmation":
            log.warning("SNS subscription to %s awaits confirmation: open %s once to confirm "
                        "it (it is never followed automatically)", message.get("TopicArn"),
                        message.get("SubscribeURL"))
            return []
        if kind != "Notification":
            log.info("SNS %s for %s ignored", kind, message.get("TopicArn"))
            return []
        inner = message.get("Message")
        try:
            notification = json.loads(inner) if isinstance(inner, str) else None
        except ValueError:
            notification = None
        if not isinstance(notification, dict):
            raise WebhookMalformed("SNS Message is not an SES notification")
        return ses_events(notification)
