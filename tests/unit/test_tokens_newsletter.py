"""Unsubscribe tokens that name the newsletter (schema 13), beside the old form."""

from __future__ import annotations

import io
import re
from wsgiref.util import setup_testing_defaults

from hypothesis import given
from hypothesis import strategies as st

from sendsystem import history
from sendsystem.bounce.classify import _find_token
from sendsystem.tokens import UnsubscribeTarget, unsubscribe_token, verify_unsubscribe_token
from sendsystem.unsubscribe import app as app_mod
from sendsystem.unsubscribe.app import UnsubscribeResult, make_app

SECRET = b"unit-test-secret-for-tokens-0123456789"
ids = st.integers(min_value=0, max_value=10**12)


@given(ids, ids, ids)
def test_round_trip_with_and_without_newsletter(sub: int, lst: int, nl: int) -> None:
    assert verify_unsubscribe_token(SECRET, unsubscribe_token(SECRET, sub, lst, nl)) == \
        UnsubscribeTarget(sub, lst, nl)
    assert verify_unsubscribe_token(SECRET, unsubscribe_token(SECRET, sub, lst)) == \
        UnsubscribeTarget(sub, lst, None)


def test_old_tokens_cannot_gain_nor_new_ones_lose_a_newsletter() -> None:
    old = unsubscribe_token(SECRET, 42, 3)
    new = unsubscribe_token(SECRET, 42, 3, 7)
    sub, lst, sig = old.split(".")
    assert verify_unsubscribe_token(SECRET, f"{sub}.{lst}.7.{sig}") is None
    parts = new.split(".")
    assert verify_unsubscribe_token(SECRET, f"{parts[0]}.{parts[1]}.{parts[3]}") is None
    assert verify_unsubscribe_token(SECRET, f"{parts[0]}.{parts[1]}.8.{parts[3]}") is None
    assert verify_unsubscribe_token(b"another secret", new) is None


def test_bounce_classifier_finds_both_forms() -> None:
    for token in (unsubscribe_token(SECRET, 42, 3), unsubscribe_token(SECRET, 42, 3, 99)):
        assert _find_token(SECRET, [f"Subject: unsubscribe {token}"]) == token
        assert _find_token(SECRET, [f"<https://x.example/unsubscribe/{token}>"]) == token


def test_access_log_redacts_both_forms() -> None:
    for token in (unsubscribe_token(SECRET, 42, 3), unsubscribe_token(SECRET, 42, 3, 99)):
        line = app_mod._TOKEN_IN_PATH.sub("/<token>", f"POST /unsubscribe/{token} HTTP/1.1")
        assert line == "POST /unsubscribe/<token> HTTP/1.1"
        assert not re.search(token.rsplit(".", 1)[1], line)


def _post(app: object, path: str, body: bytes) -> str:
    environ: dict[str, object] = {"REQUEST_METHOD": "POST", "PATH_INFO": path,
                                  "CONTENT_TYPE": "application/x-www-form-urlencoded",
                                  "CONTENT_LENGTH": str(len(body)), "wsgi.input": io.BytesIO(body)}
    setup_testing_defaults(environ)
    seen: list[str] = []
    b"".join(app(environ, lambda status, headers: seen.append(status)))  # type: ignore[operator]
    return seen[0]


def test_app_says_how_the_request_came() -> None:
    calls: list[UnsubscribeTarget] = []

    def unsubscribe(target: UnsubscribeTarget) -> UnsubscribeResult:
        calls.append(target)
        return UnsubscribeResult(True, "news", "a@example.org")

    app = make_app(SECRET, unsubscribe)
    token = unsubscribe_token(SECRET, 42, 3, 7)
    assert _post(app, f"/unsubscribe/{token}", b"List-Unsubscribe=One-Click").startswith("200")
    assert _post(app, f"/unsubscribe/{token}", b"confirm=yes").startswith("200")
    assert calls == [UnsubscribeTarget(42, 3, 7)] * 2
    assert [c.via for c in calls] == [history.ONE_CLICK, history.UNSUBSCRIBE_LINK]
    # The app (standard library only) spells the history's reasons itself: keep them equal.
    assert (app_mod.VIA_ONE_CLICK, app_mod.VIA_FORM) == (history.ONE_CLICK,
                                                         history.UNSUBSCRIBE_LINK)


def test_history_reasons() -> None:
    assert history.bounce_reason("hard", "5.1.1") == "hard bounce 5.1.1"
    assert history.bounce_reason("soft", None) == "soft bounce"
    assert history.complaint_reason("webhook") == "complaint (webhook)"
    assert history.complaint_reason("verp") == "complaint (ARF)"
