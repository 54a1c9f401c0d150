"""ESP webhook authentication and event mapping, without a database: the SNS
string-to-sign and signatures, the certificate host allowlist and cache,
SendGrid ECDSA, Mailgun HMAC with its replay checks, Postmark basic auth, and
the WSGI route. Over MariaDB: tests/integration/test_webhooks_db.py."""

from __future__ import annotations

import io
import json
import time
from typing import Any

import pytest

from sendsystem.bounce.classify import BounceKind
from sendsystem.bounce.webhooks import (
    CertificateCache,
    EventOutcome,
    MailgunVerifier,
    WebhookEvent,
    WebhookReceiver,
    WebhookRejected,
    host_allowed,
    mailgun_events,
    postmark_events,
    sendgrid_events,
    ses_events,
    sns_string_to_sign,
    verify_basic_auth,
    verify_sendgrid,
    verify_sns,
)
from sendsystem.config import WebhooksConfig
from sendsystem.errors import TemporaryError
from sendsystem.unsubscribe.app import make_app
from tests.harness import esp

MSGID = "<12.3.abcdefghijklmnop@bounces.test.example>"
HOSTS = WebhooksConfig().cert_host_patterns()


def test_sns_string_to_sign_follows_the_documented_order() -> None:
    note = {"Type": "Notification", "MessageId": "m", "TopicArn": "t", "Message": "x",
            "Timestamp": "ts", "Subject": "s", "UnsubscribeURL": "u", "Signature": "z"}
    assert sns_string_to_sign(note) == (
        b"Message\nx\nMessageId\nm\nSubject\ns\nTimestamp\nts\nTopicArn\nt\nType\nNotification\n")
    del note["Subject"]  # Subject only when present
    assert b"Subject" not in sns_string_to_sign(note)
    confirm = esp.sns_subscription_confirmation()
    assert sns_string_to_sign(confirm).decode().split("\n")[::2] == [
        "Message", "MessageId", "SubscribeURL", "Timestamp", "Token", "TopicArn", "Type", ""]


@pytest.mark.parametrize("version", ["1", "2"])
def test_sns_signature_versions_verify_and_tampering_fails(version: str) -> None:
    signer = esp.SnsSigner()
    certs = CertificateCache(HOSTS, signer.fetch)
    message = signer.sign(esp.ses_notification(esp.ses_bounce(MSGID, "a@example.org"),
                                               subject="Amazon SES Email Event"), version)
    verify_sns(message, certs)
    tampered = {**message, "Message": message["Message"].replace("Permanent", "Transient")}
    with pytest.raises(WebhookRejected, match="does not verify"):
        verify_sns(tampered, certs)
    # A version-1 signature claimed as version 2 (or the reverse) fails too.
    other = {**message, "SignatureVersion": "2" if version == "1" else "1"}
    with pytest.raises(WebhookRejected):
        verify_sns(other, certs)
    with pytest.raises(WebhookRejected, match="SignatureVersion"):
        verify_sns({**message, "SignatureVersion": "3"}, certs)


def test_sns_signed_by_another_key_fails() -> None:
    signer, forger = esp.SnsSigner(), esp.SnsSigner()
    forged = forger.sign(esp.ses_notification(esp.ses_bounce(MSGID, "a@example.org")))
    with pytest.raises(WebhookRejected, match="does not verify"):
        verify_sns(forged, CertificateCache(HOSTS, signer.fetch))


def test_certificate_host_allowlist() -> None:
    assert host_allowed("sns.eu-west-1.amazonaws.com", HOSTS)
    assert host_allowed("SNS.us-east-1.amazonaws.com.", HOSTS)
    assert host_allowed("sns.cn-north-1.amazonaws.com.cn", HOSTS)
    for bad in ("sns.amazonaws.com.evil.example", "evil.example", "sns.a.b.amazonaws.com",
                "xsns.eu-west-1.amazonaws.com", "sns.eu-west-1.amazonaws.com.evil"):
        assert not host_allowed(bad, HOSTS), bad
    assert host_allowed("127.0.0.1", ["127.0.0.1"])


@pytest.mark.parametrize("url", [
    "https://evil.example/SimpleNotificationService-x.pem",
    "http://sns.eu-west-1.amazonaws.com/SimpleNotificationService-x.pem",
    "https://sns.eu-west-1.amazonaws.com@evil.example/x.pem",
    "https://sns.eu-west-1.amazonaws.com/not-a-cert",
])
def test_certificate_url_outside_the_allowlist_is_never_fetched(url: str) -> None:
    signer = esp.SnsSigner()
    signer.certs[url] = signer.certs[esp.CERT_URL]
    message = signer.sign(esp.ses_notification(esp.ses_bounce(MSGID, "a@example.org")),
                          cert_url=url)
    with pytest.raises(WebhookRejected):
        verify_sns(message, CertificateCache(HOSTS, signer.fetch))
    assert signer.fetched == []


def test_certificate_is_cached() -> None:
    signer = esp.SnsSigner()
    certs = CertificateCache(HOSTS, signer.fetch)
    for n in range(3):
        note = esp.ses_notification(esp.ses_bounce(MSGID, f"{n}@example.org"))
        verify_sns(signer.sign(note), certs)
    assert signer.fetched == [esp.CERT_URL]


def test_ses_events_map_bounce_types_and_complaints() -> None:
    [hard] = ses_events(esp.ses_bounce(MSGID, "a@example.org"))
    assert (hard.kind, hard.email, hard.status) == (BounceKind.HARD, "a@example.org", "5.1.1")
    assert MSGID in hard.candidates
    [soft] = ses_events(esp.ses_bounce(MSGID, "a@example.org", "Transient"))
    assert soft.kind is BounceKind.SOFT
    assert ses_events(esp.ses_bounce(MSGID, "a@example.org", "Undetermined")) == []
    [complaint] = ses_events(esp.ses_complaint(MSGID, "a@example.org"))
    assert complaint.kind is BounceKind.COMPLAINT and complaint.candidates[0] == MSGID
    assert ses_events({"notificationType": "Delivery", "mail": {}}) == []


def test_sendgrid_signature() -> None:
    signer = esp.SendGridSigner()
    body = json.dumps([esp.sendgrid_event("bounce", "a@example.org", MSGID)]).encode()
    headers = signer.headers(body)
    sig = headers["X-Twilio-Email-Event-Webhook-Signature"]
    ts = headers["X-Twilio-Email-Event-Webhook-Timestamp"]
    verify_sendgrid(signer.public_key, sig, ts, body)
    with pytest.raises(WebhookRejected):
        verify_sendgrid(signer.public_key, sig, ts, body.replace(b"a@ex", b"b@ex"))
    with pytest.raises(WebhookRejected):
        verify_sendgrid(signer.public_key, sig, str(int(ts) + 1), body)
    with pytest.raises(WebhookRejected):
        verify_sendgrid(esp.SendGridSigner().public_key, sig, ts, body)
    with pytest.raises(WebhookRejected):
        verify_sendgrid(signer.public_key, None, ts, body)


def test_sendgrid_events() -> None:
    events = sendgrid_events([
        esp.sendgrid_event("bounce", "a@example.org", MSGID, type="bounce", status="5.1.1",
                           reason="550 5.1.1 unknown"),
        esp.sendgrid_event("bounce", "b@example.org", MSGID, type="blocked",
                           reason="550 5.7.1 spam"),
        esp.sendgrid_event("spamreport", "c@example.org", MSGID),
        esp.sendgrid_event("delivered", "d@example.org", MSGID),
        esp.sendgrid_event("dropped", "e@example.org", MSGID, reason="Bounced Address"),
        esp.sendgrid_event("deferred", "f@example.org", MSGID),
    ])
    assert [(e.kind, e.email) for e in events] == [
        (BounceKind.HARD, "a@example.org"), (BounceKind.BLOCKED, "b@example.org"),
        (BounceKind.COMPLAINT, "c@example.org")]
    assert events[0].status == "5.1.1" and events[1].status == "5.7.1"


def test_mailgun_signature_replay_window_and_token_reuse() -> None:
    verifier = MailgunVerifier(esp.MAILGUN_KEY, max_age=900)
    good = esp.mailgun_signature()
    assert verifier.verify(good) == good["token"]
    assert verifier.verify(good) == good["token"]  # not taken until remembered
    verifier.remember(good["token"])
    with pytest.raises(WebhookRejected, match="already used"):
        verifier.verify(good)
    with pytest.raises(WebhookRejected, match="does not verify"):
        verifier.verify(esp.mailgun_signature("another-key"))
    with pytest.raises(WebhookRejected, match="old"):
        verifier.verify(esp.mailgun_signature(timestamp=int(time.time()) - 3600))
    with pytest.raises(WebhookRejected):
        verifier.verify({**esp.mailgun_signature(), "token": "changed"})


def test_mailgun_events() -> None:
    [hard] = mailgun_events(esp.mailgun_event("failed", "a@example.org", MSGID))
    assert hard.kind is BounceKind.HARD and hard.status == "5.1.1"
    assert hard.candidates == (MSGID.strip("<>"),)
    [soft] = mailgun_events(esp.mailgun_event("failed", "a@example.org", MSGID, "temporary"))
    assert soft.kind is BounceKind.SOFT
    [complaint] = mailgun_events(esp.mailgun_event("complained", "a@example.org", MSGID))
    assert complaint.kind is BounceKind.COMPLAINT
    assert mailgun_events(esp.mailgun_event("delivered", "a@example.org", MSGID)) == []


def test_basic_auth_is_checked() -> None:
    verify_basic_auth(esp.postmark_auth(), esp.POSTMARK_USER, esp.POSTMARK_PASSWORD)
    for header in (None, "", esp.postmark_auth(password="wrong"),
                   esp.postmark_auth(user="other"), "Basic !!!", "Bearer abc"):
        with pytest.raises(WebhookRejected):
            verify_basic_auth(header, esp.POSTMARK_USER, esp.POSTMARK_PASSWORD)


def test_postmark_events() -> None:
    [hard] = postmark_events(esp.postmark_bounce("a@example.org", MSGID))
    assert hard.kind is BounceKind.HARD and hard.status == "5.1.1" and MSGID in hard.candidates
    [soft] = postmark_events(esp.postmark_bounce("a@example.org", MSGID, "SoftBounce"))
    assert soft.kind is BounceKind.SOFT
    [complaint] = postmark_events(esp.postmark_complaint("a@example.org", MSGID))
    assert complaint.kind is BounceKind.COMPLAINT and MSGID in complaint.candidates
    assert postmark_events(esp.postmark_bounce("a@example.org", MSGID, "AutoResponder")) == []
    meta = {**esp.postmark_bounce("a@example.org", "<x@y>"), "Metadata": {"sendsystem_id": MSGID}}
    assert postmark_events(meta)[0].candidates[0] == MSGID


# ------------------------------------------------------ receiver and route

def config(**overrides: Any) -> WebhooksConfig:
    sendgrid = esp.SendGridSigner()
    base: dict[str, Any] = dict(
        ses_enabled=True, sendgrid_enabled=True, sendgrid_public_key=sendgrid.public_key,
        mailgun_enabled=True, mailgun_signing_key=esp.MAILGUN_KEY, postmark_enabled=True,
        postmark_user=esp.POSTMARK_USER, postmark_password=esp.POSTMARK_PASSWORD)
    return WebhooksConfig(**{**base, **overrides})


class Recorder:
    def __init__(self) -> None:
        self.events: list[tuple[str, WebhookEvent]] = []

    def __call__(self, provider: str, event: WebhookEvent) -> EventOutcome:
        self.events.append((provider, event))
        return EventOutcome(event.kind, False, None, False)


def post(app: Any, path: str, body: bytes, headers: dict[str, str]) -> tuple[str, bytes]:
    environ: dict[str, Any] = {"REQUEST_METHOD": "POST", "PATH_INFO": path,
                               "CONTENT_TYPE": "application/json",
                               "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    for name, value in headers.items():
        environ["HTTP_" + name.upper().replace("-", "_")] = value
    status: list[str] = []
    out = b"".join(app(environ, lambda s, h, *a: status.append(s)))
    return status[0], out


def receiver_app(webhooks: WebhooksConfig, recorder: Recorder,
                 signer: esp.SnsSigner) -> Any:
    receiver = WebhookReceiver(webhooks, recorder, cert_fetcher=signer.fetch)

    def callback(provider: str, headers: Any, body: bytes) -> tuple[int, str]:
        reply = receiver.handle(provider, headers, body)
        return reply.status, reply.text

    return make_app(b"secret", lambda t: None, webhooks=callback)


def test_route_authenticates_each_provider_before_recording() -> None:
    signer, sendgrid, recorder = esp.SnsSigner(), esp.SendGridSigner(), Recorder()
    app = receiver_app(config(sendgrid_public_key=sendgrid.public_key), recorder, signer)
    ses = json.dumps(signer.sign(esp.ses_notification(esp.ses_bounce(MSGID, "a@x.org")))).encode()
    sg = json.dumps([esp.sendgrid_event("spamreport", "b@x.org", MSGID)]).encode()
    mg = json.dumps(esp.mailgun_event("failed", "c@x.org", MSGID)).encode()
    pm = json.dumps(esp.postmark_bounce("d@x.org", MSGID)).encode()
    assert post(app, "/webhooks/ses", ses, {})[0] == "200 OK"
    assert post(app, "/webhooks/sendgrid", sg, sendgrid.headers(sg))[0] == "200 OK"
    assert post(app, "/webhooks/mailgun", mg, {})[0] == "200 OK"
    auth = {"Authorization": esp.postmark_auth()}
    assert post(app, "/webhooks/postmark", pm, auth)[0] == "200 OK"
    assert [(p, e.email) for p, e in recorder.events] == [
        ("ses", "a@x.org"), ("sendgrid", "b@x.org"), ("mailgun", "c@x.org"),
        ("postmark", "d@x.org")]
    recorder.events.clear()
    bad_ses = ses.replace(b"a@x.org", b"z@x.org")
    assert post(app, "/webhooks/ses", bad_ses, {})[0] == "403 Forbidden"
    forged = esp.SendGridSigner().headers(sg)
    assert post(app, "/webhooks/sendgrid", sg, forged)[0] == "403 Forbidden"
    assert post(app, "/webhooks/mailgun", mg, {})[0] == "403 Forbidden"  # replayed token
    assert post(app, "/webhooks/postmark", pm,
                {"Authorization": esp.postmark_auth(password="guess")})[0] == "403 Forbidden"
    assert post(app, "/webhooks/postmark", pm, {})[0] == "403 Forbidden"
    assert recorder.events == []


def test_subscription_confirmation_is_verified_and_only_logged(
        caplog: pytest.LogCaptureFixture) -> None:
    signer, recorder = esp.SnsSigner(), Recorder()
    app = receiver_app(config(), recorder, signer)
    confirm = esp.sns_subscription_confirmation()
    body = json.dumps(signer.sign(confirm)).encode()
    with caplog.at_level("WARNING"):
        assert post(app, "/webhooks/ses", body, {})[0] == "200 OK"
    assert confirm["SubscribeURL"] in caplog.text
    forged = json.dumps(esp.SnsSigner().sign(confirm)).encode()
    assert post(app, "/webhooks/ses", forged, {})[0] == "403 Forbidden"
    assert recorder.events == []


def test_disabled_provider_topic_filter_and_bad_requests() -> None:
    signer, recorder = esp.SnsSigner(), Recorder()
    app = receiver_app(config(postmark_enabled=False, sns_topic_arns="arn:aws:sns:x:1:other"),
                       recorder, signer)
    pm = json.dumps(esp.postmark_bounce("d@x.org", MSGID)).encode()
    assert post(app, "/webhooks/postmark", pm, {"Authorization": esp.postmark_auth()})[0] \
        == "404 Not Found"
    assert post(app, "/webhooks/nope", b"{}", {})[0] == "404 Not Found"
    ses = json.dumps(signer.sign(esp.ses_notification(esp.ses_bounce(MSGID, "a@x.org")))).encode()
    assert post(app, "/webhooks/ses", ses, {})[0] == "403 Forbidden"  # topic not allowed
    assert post(app, "/webhooks/ses", b"not json", {})[0] == "400 Bad Request"
    assert recorder.events == []
    # Without a webhooks callback the path is just not found.
    plain = make_app(b"secret", lambda t: None)
    assert post(plain, "/webhooks/ses", ses, {})[0] == "404 Not Found"


def test_mailgun_request_answered_503_is_taken_when_retried() -> None:
    """The token counts as used only after its events are recorded."""
    signer, recorder = esp.SnsSigner(), Recorder()
    down = [True]

    def flaky(provider: str, event: WebhookEvent) -> EventOutcome:
        if down[0]:
            raise TemporaryError("database unreachable")
        return recorder(provider, event)

    receiver = WebhookReceiver(config(), flaky, cert_fetcher=signer.fetch)

    def callback(provider: str, headers: Any, body: bytes) -> tuple[int, str]:
        reply = receiver.handle(provider, headers, body)
        return reply.status, reply.text

    app = make_app(b"secret", lambda t: None, webhooks=callback)
    mg = json.dumps(esp.mailgun_event("failed", "c@x.org", MSGID)).encode()
    assert post(app, "/webhooks/mailgun", mg, {})[0] == "503 Service Unavailable"
    down[0] = False
    assert post(app, "/webhooks/mailgun", mg, {})[0] == "200 OK"
    assert post(app, "/webhooks/mailgun", mg, {})[0] == "403 Forbidden"  # now a replay
    assert [e.email for _p, e in recorder.events] == ["c@x.org"]
