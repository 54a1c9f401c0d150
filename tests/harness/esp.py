"""ESP webhook requests for tests: payloads in the shape each provider documents
(written here, not copied), signed with keys made in the test.

* SES via SNS: a self-signed RSA certificate served by an injected fetcher at
  an ``sns.<region>.amazonaws.com`` URL (nothing leaves the machine), and the
  SNS signature (version 1 SHA1withRSA, 2 SHA256withRSA) over AWS's string.
* SendGrid: a P-256 key pair; the public key as SendGrid shows it (base64 DER).
* Mailgun: an HMAC signing key; Postmark: basic-auth credentials.
"""

from __future__ import annotations

import base64
import datetime
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec, padding, rsa
from cryptography.x509.oid import NameOID

from sendsystem.bounce.webhooks import sns_string_to_sign

CERT_URL = "https://sns.eu-west-1.amazonaws.com/SimpleNotificationService-test.pem"
TOPIC = "arn:aws:sns:eu-west-1:123456789012:sendsystem-bounces"
MAILGUN_KEY = "key-mailgun-test-signing-key-0123456789"
POSTMARK_USER = "postmark"
POSTMARK_PASSWORD = "pm-test-password-0123456789"


def self_signed(key: rsa.RSAPrivateKey) -> bytes:
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "sns.amazonaws.com")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (x509.CertificateBuilder().subject_name(name).issuer_name(name)
            .public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(days=1))
            .not_valid_after(now + datetime.timedelta(days=30))
            .sign(key, hashes.SHA256()))
    return cert.public_bytes(serialization.Encoding.PEM)


@dataclass
class SnsSigner:
    """An SNS topic's signing key and the fetcher that serves its certificate."""

    key: rsa.RSAPrivateKey = field(
        default_factory=lambda: rsa.generate_private_key(public_exponent=65537, key_size=2048))
    fetched: list[str] = field(default_factory=list)
    certs: dict[str, bytes] = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.certs[CERT_URL] = self_signed(self.key)

    def fetch(self, url: str) -> bytes:
        """The injected fetcher: serves our certificate, records every fetch."""
        self.fetched.append(url)
        return self.certs[url]

    def sign(self, message: dict[str, Any], version: str = "2",
             cert_url: str = CERT_URL) -> dict[str, Any]:
        message = {**message, "SignatureVersion": version, "SigningCertURL": cert_url}
        algorithm = hashes.SHA1() if version == "1" else hashes.SHA256()
        signature = self.key.sign(sns_string_to_sign(message), padding.PKCS1v15(), algorithm)
        message["Signature"] = base64.b64encode(signature).decode()
        return message


def ses_notification(notification: dict[str, Any], *, subject: str | None = None
                     ) -> dict[str, Any]:
    """The SNS envelope around an SES notification (unsigned)."""
    message: dict[str, Any] = {
        "Type": "Notification", "MessageId": "22b80b92-fdea-4c2c-8f9d-bdfb0c7bf324",
        "TopicArn": TOPIC, "Message": json.dumps(notification),
        "Timestamp": "2026-11-29T21:00:00.000Z",
        "UnsubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=Unsubscribe&x=1",
    }
    if subject is not None:
        message["Subject"] = subject
    return message


def ses_mail(message_id_header: str) -> dict[str, Any]:
    return {
        "timestamp": "2026-11-29T20:59:58.000Z", "source": "news@lists.test.example",
        "messageId": "0102018c1f2e3d4c-aaaa-bbbb-cccc-000000000000-000000",
        "destination": ["x@example.org"],
        "headersTruncated": False,
        "headers": [{"name": "From", "value": "News <news@lists.test.example>"},
                    {"name": "Message-ID", "value": message_id_header}],
        "commonHeaders": {"from": ["News <news@lists.test.example>"],
                          "messageId": message_id_header, "subject": "Hello"},
    }


def ses_bounce(message_id_header: str, email: str, bounce_type: str = "Permanent"
               ) -> dict[str, Any]:
    return {
        "notificationType": "Bounce",
        "bounce": {"bounceType": bounce_type,
                   "bounceSubType": "General" if bounce_type == "Permanent" else "MailboxFull",
                   "bouncedRecipients": [{"emailAddress": email, "action": "failed",
                                          "status": "5.1.1" if bounce_type == "Permanent"
                                          else "4.2.2",
                                          "diagnosticCode": "smtp; 550 5.1.1 user unknown"}],
                   "timestamp": "2026-11-29T20:59:59.000Z",
                   "feedbackId": "0102018c-feedback"},
        "mail": ses_mail(message_id_header),
    }


def ses_complaint(message_id_header: str, email: str) -> dict[str, Any]:
    return {
        "notificationType": "Complaint",
        "complaint": {"complainedRecipients": [{"emailAddress": email}],
                      "complaintFeedbackType": "abuse", "userAgent": "Yahoo!-Mail-Feedback/1.0",
                      "timestamp": "2026-11-29T20:59:59.000Z", "feedbackId": "0102018c-fb"},
        "mail": ses_mail(message_id_header),
    }


def sns_subscription_confirmation() -> dict[str, Any]:
    return {
        "Type": "SubscriptionConfirmation", "MessageId": "165545c9-2a5c-472c-8df2-7ff2be2b3b1b",
        "Token": "2336412f37fb687f5d51e6e2425f004aed7bd1a",
        "TopicArn": TOPIC,
        "Message": f"You have chosen to subscribe to the topic {TOPIC}.",
        "SubscribeURL": "https://sns.eu-west-1.amazonaws.com/?Action=ConfirmSubscription&T=1",
        "Timestamp": "2026-11-29T21:00:00.000Z",
    }


@dataclass
class SendGridSigner:
    key: ec.EllipticCurvePrivateKey = field(
        default_factory=lambda: ec.generate_private_key(ec.SECP256R1()))

    @property
    def public_key(self) -> str:
        """As SendGrid's settings page shows it: base64 of the DER public key."""
        der = self.key.public_key().public_bytes(
            serialization.Encoding.DER, serialization.PublicFormat.SubjectPublicKeyInfo)
        return base64.b64encode(der).decode()

    def headers(self, body: bytes, timestamp: str | None = None) -> dict[str, str]:
        timestamp = timestamp or str(int(time.time()))
        signature = self.key.sign(timestamp.encode() + body, ec.ECDSA(hashes.SHA256()))
        return {"X-Twilio-Email-Event-Webhook-Signature": base64.b64encode(signature).decode(),
                "X-Twilio-Email-Event-Webhook-Timestamp": timestamp}


def sendgrid_event(event: str, email: str, smtp_id: str, **extra: Any) -> dict[str, Any]:
    return {"email": email, "timestamp": 1_764_450_000, "smtp-id": smtp_id, "event": event,
            "sg_event_id": secrets.token_hex(8), "sg_message_id": "14c5d75ce93.dfd.64b469.filter",
            **extra}


def mailgun_signature(key: str = MAILGUN_KEY, *, timestamp: int | None = None,
                      token: str | None = None) -> dict[str, str]:
    ts = str(int(time.time()) if timestamp is None else timestamp)
    token = token or secrets.token_hex(25)
    sig = hmac.new(key.encode(), (ts + token).encode(), hashlib.sha256).hexdigest()
    return {"timestamp": ts, "token": token, "signature": sig}


def mailgun_event(event: str, email: str, message_id: str, severity: str = "permanent",
                  signature: dict[str, str] | None = None) -> dict[str, Any]:
    data: dict[str, Any] = {
        "event": event, "id": "G9Bn5sl1TC6nu79C8C0bwg", "timestamp": 1_764_450_000.5,
        "recipient": email, "log-level": "error" if event == "failed" else "warn",
        "message": {"headers": {"to": email, "message-id": message_id.strip("<>"),
                                "from": "news@lists.test.example", "subject": "Hello"}},
        "user-variables": {},
    }
    if event == "failed":
        data["severity"] = severity
        data["reason"] = "bounce" if severity == "permanent" else "generic"
        data["delivery-status"] = {"code": 550 if severity == "permanent" else 452,
                                   "message": "5.1.1 The email account does not exist",
                                   "description": "", "attempt-no": 1}
    return {"signature": signature or mailgun_signature(), "event-data": data}


def postmark_auth(user: str = POSTMARK_USER, password: str = POSTMARK_PASSWORD) -> str:
    return "Basic " + base64.b64encode(f"{user}:{password}".encode()).decode()


def postmark_bounce(email: str, message_id_header: str, kind: str = "HardBounce"
                    ) -> dict[str, Any]:
    """A bounce webhook with the returned message's headers in Content."""
    return {
        "RecordType": "Bounce", "ID": 4323372036854775807, "Type": kind,
        "TypeCode": 1 if kind == "HardBounce" else 4096, "Name": "Hard bounce",
        "Tag": "", "MessageID": "883953f4-6105-42a2-a16a-77a8eac79483", "Metadata": {},
        "ServerID": 23, "MessageStream": "broadcast",
        "Description": "The server was unable to deliver your message (ex: unknown user).",
        "Details": "smtp;550 5.1.1 The email account that you tried to reach does not exist.",
        "Email": email, "From": "news@lists.test.example",
        "BouncedAt": "2026-11-29T21:00:00Z", "DumpAvailable": True, "Inactive": True,
        "CanActivate": True, "Subject": "Hello",
        "Content": ("Return-Path: <>\r\nFrom: MAILER-DAEMON\r\n\r\n--- original ---\r\n"
                    f"Message-ID: {message_id_header}\r\nSubject: Hello\r\n"),
    }


def postmark_complaint(email: str, message_id_header: str) -> dict[str, Any]:
    """A spam complaint whose Content is the ARF report quoting our message."""
    return {
        "RecordType": "SpamComplaint", "ID": 42, "Type": "SpamComplaint", "TypeCode": 512,
        "MessageID": "00000000-0000-0000-0000-000000000000",
        "Metadata": {}, "Email": email,
        "From": "news@lists.test.example", "BouncedAt": "2026-11-29T21:00:00Z",
        "Details": "", "Description": "The subscriber explicitly marked this message as spam.",
        "Subject": "Hello",
        "Content": ("Content-Type: multipart/report; report-type=feedback-report\r\n\r\n"
                    "Feedback-Type: abuse\r\n\r\n"
                    f"From: news@lists.test.example\r\nMessage-ID: {message_id_header}\r\n"),
    }
