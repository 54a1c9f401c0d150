"""ESP webhooks through the real WSGI app on a loopback HTTP server, over MariaDB.

Each provider's recorded-shape payload, signed with keys made here: a good
signature naming our signed Message-ID acts on that message's subscriber;
a bad signature is 403 and changes nothing; an authentic event without our
signed Message-ID is stored unverified (200) and changes nothing. The SNS
signing certificate comes from an injected fetcher: nothing leaves the host.
"""

from __future__ import annotations

import http.server
import json
import ssl
import threading
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

import pytest

from sendsystem.bounce.webhooks import https_fetcher
from sendsystem.unsubscribe.app import make_wsgi_server
from sendsystem.unsubscribe.service import (
    UnsubscribeService,
    WebhookService,
    create_app,
    unsubscribe_wsgi_app,
)
from tests.harness import esp
from tests.harness.env import Env
from tests.harness.tls_certs import TestCA
from tests.integration.test_intake import Sent, blocked, bounce_rows, send_newsletter, state


@dataclass
class Site:
    url: str
    sns: esp.SnsSigner
    sendgrid: esp.SendGridSigner
    service: WebhookService

    def post(self, provider: str, payload: Any, headers: dict[str, str] | None = None,
             body: bytes | None = None) -> int:
        data = json.dumps(payload).encode() if body is None else body
        if provider == "sendgrid" and headers is None:
            headers = self.sendgrid.headers(data)
        if provider == "postmark" and headers is None:
            headers = {"Authorization": esp.postmark_auth()}
        req = urllib.request.Request(f"{self.url}/webhooks/{provider}", data=data, method="POST",
                                     headers={"Content-Type": "application/json",
                                              **(headers or {})})
        try:
            with urllib.request.urlopen(req, timeout=10) as resp:
                return int(resp.status)
        except urllib.error.HTTPError as exc:
            return exc.code


def start(env: Env, *, fetcher: Any = None, **sections: dict[str, object]) -> Iterator[Site]:
    sns, sendgrid = esp.SnsSigner(), esp.SendGridSigner()
    webhooks = {
        "ses_enabled": "yes", "sendgrid_enabled": "yes",
        "sendgrid_public_key": sendgrid.public_key, "mailgun_enabled": "yes",
        "mailgun_signing_key": esp.MAILGUN_KEY, "postmark_enabled": "yes",
        "postmark_user": esp.POSTMARK_USER, "postmark_password": esp.POSTMARK_PASSWORD,
        **sections.pop("webhooks", {})}
    env.configure(**sections, webhooks=webhooks)
    unsub = UnsubscribeService(env.config.database)
    hooks = WebhookService(env.config, cert_fetcher=fetcher or sns.fetch)
    httpd = make_wsgi_server(unsubscribe_wsgi_app(env.config, unsub, hooks), port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield Site(f"http://127.0.0.1:{httpd.server_port}", sns, sendgrid, hooks)
    httpd.shutdown()
    httpd.server_close()
    hooks.close()
    unsub.close()


@pytest.fixture
def site(env: Env) -> Iterator[Site]:
    yield from start(env)


def ses(site: Site, notification: dict[str, Any], **sign: Any) -> dict[str, Any]:
    return site.sns.sign(esp.ses_notification(notification), **sign)


def assert_untouched(env: Env, *sent: Sent) -> None:
    for s in sent:
        assert state(env, s) == ("sent", "active")
    assert blocked(env) == []


def acted(env: Env, kind: str) -> dict[str, Any]:
    [row] = bounce_rows(env)
    assert (row["kind"], row["verified"], row["evidence"]) == (kind, 1, "webhook")
    return row


# ----------------------------------------------------------------- SES / SNS

def test_ses_hard_bounce_acts(env: Env, site: Site) -> None:
    a, b = send_newsletter(env, ["gone@example.org", "fine@example.org"])
    assert site.post("ses", ses(site, esp.ses_bounce(a.message_id, a.email))) == 200
    assert state(env, a) == ("bounced", "bounced")
    assert state(env, b) == ("sent", "active")
    row = acted(env, "hard")
    assert (row["message_id"], row["subscriber_id"], row["status"]) == (
        a.id, a.subscriber_id, "5.1.1")
    # SNS delivers at least once: the same notification again counts once.
    assert site.post("ses", ses(site, esp.ses_bounce(a.message_id, a.email))) == 200
    assert len(bounce_rows(env)) == 1


def test_ses_complaint_acts_signature_version_1(env: Env, site: Site) -> None:
    [a] = send_newsletter(env, ["angry@example.org"])
    assert site.post("ses", ses(site, esp.ses_complaint(a.message_id, a.email),
                                version="1")) == 200
    assert state(env, a) == ("sent", "complained")
    acted(env, "complaint")
    assert blocked(env) == []  # scope = list


def test_ses_bad_signature_is_403_and_changes_nothing(env: Env, site: Site) -> None:
    a, b = send_newsletter(env, ["gone@example.org", "fine@example.org"])
    message = ses(site, esp.ses_bounce(a.message_id, a.email))
    # Re-aimed at another subscriber's message after signing.
    message["Message"] = message["Message"].replace(a.message_id, b.message_id)
    assert site.post("ses", message) == 403
    forged = esp.SnsSigner().sign(esp.ses_notification(esp.ses_bounce(a.message_id, a.email)))
    assert site.post("ses", forged) == 403
    assert_untouched(env, a, b)
    assert bounce_rows(env) == []


def test_ses_certificate_host_outside_allowlist_is_refused(env: Env, site: Site) -> None:
    [a] = send_newsletter(env, ["gone@example.org"])
    evil = "https://sns.eu-west-1.amazonaws.com.evil.example/SimpleNotificationService-x.pem"
    site.sns.certs[evil] = site.sns.certs[esp.CERT_URL]  # a fetch would even succeed
    assert site.post("ses", ses(site, esp.ses_bounce(a.message_id, a.email),
                                cert_url=evil)) == 403
    assert site.sns.fetched == []
    assert_untouched(env, a)
    assert bounce_rows(env) == []


def test_ses_unsigned_message_id_is_stored_unverified(env: Env, site: Site) -> None:
    [a] = send_newsletter(env, ["gone@example.org"])
    # Our shape, but not our signature (an outsider's guess, or another sender's mail).
    guessed = f"<{a.id}.{a.newsletter_id}.aaaaaaaaaaaaaaaa@bounces.test.example>"
    assert site.post("ses", ses(site, esp.ses_bounce(guessed, a.email))) == 200
    assert_untouched(env, a)
    [row] = bounce_rows(env)
    assert (row["kind"], row["verified"], row["evidence"], row["message_id"]) == (
        "hard", 0, None, None)
    assert "ses webhook, no signed Message-ID" in row["diagnostic"]


# ------------------------------------------------------------------ SendGrid

def test_sendgrid_bounce_and_spamreport_act(env: Env, site: Site) -> None:
    a, b, c = send_newsletter(env, ["gone@example.org", "angry@example.org", "ok@example.org"])
    events = [esp.sendgrid_event("bounce", a.email, a.message_id, type="bounce",
                                 status="5.1.1", reason="550 5.1.1 unknown user"),
              esp.sendgrid_event("spamreport", b.email, b.message_id),
              esp.sendgrid_event("delivered", c.email, c.message_id)]
    assert site.post("sendgrid", events) == 200
    assert state(env, a) == ("bounced", "bounced")
    assert state(env, b) == ("sent", "complained")
    assert state(env, c) == ("sent", "active")
    assert {(r["kind"], r["evidence"]) for r in bounce_rows(env)} == {
        ("hard", "webhook"), ("complaint", "webhook")}


def test_sendgrid_bad_signature_is_403(env: Env, site: Site) -> None:
    [a] = send_newsletter(env, ["gone@example.org"])
    body = json.dumps([esp.sendgrid_event("bounce", a.email, a.message_id,
                                          type="bounce")]).encode()
    assert site.post("sendgrid", None, esp.SendGridSigner().headers(body), body) == 403
    assert site.post("sendgrid", None, {}, body) == 403  # unsigned
    good = site.sendgrid.headers(body)
    assert site.post("sendgrid", None, good, body.replace(b"bounce", b"bounce ")) == 403
    assert_untouched(env, a)
    assert bounce_rows(env) == []


def test_sendgrid_unknown_message_id_is_stored_unverified(env: Env, site: Site) -> None:
    [a] = send_newsletter(env, ["gone@example.org"])
    events = [esp.sendgrid_event("bounce", a.email, "<14c5d75ce93.dfd.64b469@sendgrid.net>",
                                 type="bounce")]
    assert site.post("sendgrid", events) == 200
    assert_untouched(env, a)
    assert [(r["verified"], r["email"]) for r in bounce_rows(env)] == [(0, a.email)]


# ------------------------------------------------------------------- Mailgun

def test_mailgun_failed_and_complained_act(env: Env, site: Site) -> None:
    a, b = send_newsletter(env, ["gone@example.org", "angry@example.org"])
    assert site.post("mailgun", esp.mailgun_event("failed", a.email, a.message_id)) == 200
    assert site.post("mailgun", esp.mailgun_event("complained", b.email, b.message_id)) == 200
    assert state(env, a) == ("bounced", "bounced")
    assert state(env, b) == ("sent", "complained")


def test_mailgun_soft_bounce_counts_towards_soft_limit(env: Env, site: Site) -> None:
    [a] = send_newsletter(env, ["full@example.org"])
    assert site.post("mailgun", esp.mailgun_event("failed", a.email, a.message_id,
                                                  "temporary")) == 200
    assert state(env, a) == ("sent", "active")  # soft_limit = 3
    [row] = bounce_rows(env)
    assert (row["kind"], row["verified"], row["evidence"]) == ("soft", 1, "webhook")


def test_mailgun_bad_signature_and_replay_are_403(env: Env, site: Site) -> None:
    [a] = send_newsletter(env, ["gone@example.org"])
    forged = esp.mailgun_event("failed", a.email, a.message_id,
                               signature=esp.mailgun_signature("not-the-key"))
    assert site.post("mailgun", forged) == 403
    old = esp.mailgun_event("failed", a.email, a.message_id,
                            signature=esp.mailgun_signature(timestamp=1_700_000_000))
    assert site.post("mailgun", old) == 403
    assert_untouched(env, a)
    assert bounce_rows(env) == []
    first = esp.mailgun_event("complained", a.email, a.message_id)
    assert site.post("mailgun", first) == 200
    replay = esp.mailgun_event("failed", a.email, a.message_id, signature=first["signature"])
    assert site.post("mailgun", replay) == 403
    assert state(env, a) == ("sent", "complained")  # the complaint, not the replayed bounce


def test_mailgun_unknown_message_id_is_stored_unverified(env: Env, site: Site) -> None:
    [a] = send_newsletter(env, ["gone@example.org"])
    event = esp.mailgun_event("failed", a.email, "<20261129.1.x@mailgun.example>")
    assert site.post("mailgun", event) == 200
    assert_untouched(env, a)
    assert [r["verified"] for r in bounce_rows(env)] == [0]


# ------------------------------------------------------------------ Postmark

def test_postmark_bounce_and_complaint_act(env: Env, site: Site) -> None:
    a, b = send_newsletter(env, ["gone@example.org", "angry@example.org"])
    assert site.post("postmark", esp.postmark_bounce(a.email, a.message_id)) == 200
    assert site.post("postmark", esp.postmark_complaint(b.email, b.message_id)) == 200
    assert state(env, a) == ("bounced", "bounced")
    assert state(env, b) == ("sent", "complained")


def test_postmark_wrong_credentials_are_403(env: Env, site: Site) -> None:
    [a] = send_newsletter(env, ["gone@example.org"])
    payload = esp.postmark_bounce(a.email, a.message_id)
    assert site.post("postmark", payload, {"Authorization": esp.postmark_auth(
        password="pm-test-password-0123456780")}) == 403
    assert site.post("postmark", payload, {}) == 403
    assert_untouched(env, a)
    assert bounce_rows(env) == []


def test_postmark_event_naming_an_address_only_is_stored_unverified(env: Env,
                                                                    site: Site) -> None:
    [a] = send_newsletter(env, ["gone@example.org"])
    payload = {**esp.postmark_bounce(a.email, a.message_id), "Content": ""}
    assert site.post("postmark", payload) == 200
    assert_untouched(env, a)
    assert [(r["verified"], r["kind"]) for r in bounce_rows(env)] == [(0, "hard")]


# --------------------------------------------------------------------- scope

def test_complaint_with_scope_address_blocks_everywhere(env: Env) -> None:
    for site in start(env, bounce={"scope": "address"}):
        a, _ = send_newsletter(env, ["angry@example.org", "x@example.org"])
        [other] = send_newsletter(env, ["angry@example.org"], list_name="offers")
        assert site.post("ses", ses(site, esp.ses_complaint(a.message_id, a.email))) == 200
        assert state(env, a) == ("sent", "complained")
        assert blocked(env) == ["angry@example.org"]
        assert other.email == a.email and state(env, other) == ("sent", "active")


# ------------------------------------------- the real fetcher, loopback HTTPS

@pytest.fixture
def cert_server(tmp_path: Any) -> Iterator[tuple[str, TestCA, dict[str, bytes]]]:
    """An HTTPS server on 127.0.0.1 (a test CA's certificate) serving ``files``."""
    files: dict[str, bytes] = {}

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            data = files.get(self.path)
            self.send_response(200 if data else 404)
            self.end_headers()
            self.wfile.write(data or b"")

        def log_message(self, format: str, *args: object) -> None:
            pass

    ca = TestCA(tmp_path / "ca")
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    httpd.socket = ca.leaf("certsrv").server_context().wrap_socket(httpd.socket,
                                                                   server_side=True)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"https://127.0.0.1:{httpd.server_port}", ca, files
    httpd.shutdown()
    httpd.server_close()


def test_ses_certificate_fetched_over_https_from_an_allowed_host(
        env: Env, cert_server: tuple[str, TestCA, dict[str, bytes]]) -> None:
    base, ca, files = cert_server
    trusting = https_fetcher(ssl.create_default_context(cafile=str(ca.path)))
    for site in start(env, fetcher=trusting, webhooks={"sns_cert_hosts": "127.0.0.1"}):
        a, b = send_newsletter(env, ["gone@example.org", "fine@example.org"])
        url = f"{base}/SimpleNotificationService-test.pem"
        files["/SimpleNotificationService-test.pem"] = site.sns.certs[esp.CERT_URL]
        assert site.post("ses", ses(site, esp.ses_bounce(a.message_id, a.email),
                                    cert_url=url)) == 200
        assert state(env, a) == ("bounced", "bounced")
        # A certificate URL that is not there is refused (and nothing changes).
        assert site.post("ses", ses(site, esp.ses_bounce(b.message_id, b.email),
                                    cert_url=f"{base}/missing.pem")) == 403
        assert state(env, b) == ("sent", "active")


def test_ses_certificate_server_must_have_a_trusted_tls_certificate(
        env: Env, cert_server: tuple[str, TestCA, dict[str, bytes]]) -> None:
    base, _ca, files = cert_server
    # The system trust store does not know the test CA: as if a MITM answered.
    for site in start(env, fetcher=https_fetcher(), webhooks={"sns_cert_hosts": "127.0.0.1"}):
        [a] = send_newsletter(env, ["gone@example.org"])
        files["/SimpleNotificationService-test.pem"] = site.sns.certs[esp.CERT_URL]
        url = f"{base}/SimpleNotificationService-test.pem"
        assert site.post("ses", ses(site, esp.ses_bounce(a.message_id, a.email),
                                    cert_url=url)) == 403
        assert state(env, a) == ("sent", "active")
        assert bounce_rows(env) == []


def test_create_app_mounts_the_providers_the_config_enables(env: Env) -> None:
    """The WSGI factory for gunicorn (and `unsubscribe-server`) wires [webhooks] in."""
    env.configure(webhooks={"postmark_enabled": "yes", "postmark_user": esp.POSTMARK_USER,
                            "postmark_password": esp.POSTMARK_PASSWORD})
    httpd = make_wsgi_server(create_app(str(env.path)), port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    try:
        site = Site(f"http://127.0.0.1:{httpd.server_port}", esp.SnsSigner(),
                    esp.SendGridSigner(), None)  # type: ignore[arg-type]
        [a] = send_newsletter(env, ["gone@example.org"])
        assert site.post("ses", ses(site, esp.ses_bounce(a.message_id, a.email))) == 404
        assert site.post("postmark", esp.postmark_bounce(a.email, a.message_id)) == 200
        assert state(env, a) == ("bounced", "bounced")
    finally:
        httpd.shutdown()
        httpd.server_close()
