"""The unsubscribe WSGI app called directly (no server, no database): body limits,
a crashing callback, the generic page, path prefixes, log escaping. Over a real
loopback HTTP server: tests/integration/test_unsubscribe_app.py."""

from __future__ import annotations

import io
from dataclasses import dataclass, field
from wsgiref.util import setup_testing_defaults

import pytest

from sendsystem.errors import TemporaryError
from sendsystem.tokens import UnsubscribeTarget, unsubscribe_token
from sendsystem.unsubscribe.app import (
    UnsubscribeResult,
    make_app,
    path_prefix_from_url,
    printable,
)

SECRET = b"unsubscribe-app-test-secret"


TOKEN = unsubscribe_token(SECRET, 42, 3)


ONE_CLICK = b"List-Unsubscribe=One-Click"


@dataclass
class FakeStore:
    """Stands in for the database the integrator wires in."""

    subscribed: set[tuple[int, int]] = field(default_factory=lambda: {(42, 3)})
    calls: list[UnsubscribeTarget] = field(default_factory=list)
    list_name: str = "Garden <News> & \"Friends\""
    email: str = "<script>alert(1)</script>@example.org"
    down: bool = False

    def unsubscribe(self, target: UnsubscribeTarget) -> UnsubscribeResult | None:
        if self.down:
            raise TemporaryError("database unreachable")
        self.calls.append(target)
        self.subscribed.discard((target.subscriber_id, target.list_id))
        return UnsubscribeResult(True, self.list_name, self.email)

    def lookup(self, target: UnsubscribeTarget) -> UnsubscribeResult | None:
        if self.down:
            raise TemporaryError("database unreachable")
        active = (target.subscriber_id, target.list_id) in self.subscribed
        return UnsubscribeResult(active, self.list_name, self.email)


def call(app: object, method: str, path: str, body: bytes = b"",
         length: str | None = None) -> tuple[str, bytes]:
    environ: dict[str, object] = {"REQUEST_METHOD": method, "PATH_INFO": path,
                                  "CONTENT_TYPE": "application/x-www-form-urlencoded",
                                  "CONTENT_LENGTH": str(len(body)) if length is None else length,
                                  "wsgi.input": io.BytesIO(body)}
    setup_testing_defaults(environ)
    seen: list[str] = []
    out = b"".join(app(environ, lambda status, headers: seen.append(status)))  # type: ignore[operator]
    return seen[0], out


def test_body_size_is_limited() -> None:
    store = FakeStore()
    app = make_app(SECRET, store.unsubscribe, max_body=1024)
    status, _ = call(app, "POST", f"/unsubscribe/{TOKEN}", ONE_CLICK + b"&x=" + b"a" * 2000)
    assert status.startswith("413")
    assert call(app, "POST", f"/unsubscribe/{TOKEN}", ONE_CLICK, length="-5")[0].startswith("400")
    assert call(app, "POST", f"/unsubscribe/{TOKEN}", ONE_CLICK, length="x")[0].startswith("400")
    assert store.calls == []


def test_callback_crash_is_500_and_app_survives() -> None:
    def broken(target: UnsubscribeTarget) -> UnsubscribeResult | None:
        raise RuntimeError("boom")

    app = make_app(SECRET, broken)
    assert call(app, "POST", f"/unsubscribe/{TOKEN}", ONE_CLICK)[0].startswith("500")
    assert call(app, "GET", "/healthz")[0].startswith("200")


def test_without_lookup_the_page_is_generic() -> None:
    app = make_app(SECRET, FakeStore().unsubscribe)
    status, body = call(app, "GET", f"/unsubscribe/{TOKEN}")
    assert status.startswith("200") and b"this mailing list" in body


def test_custom_prefix() -> None:
    prefix = path_prefix_from_url("https://lists.example.com/u/x/{token}")
    assert prefix == "/u/x/"
    assert path_prefix_from_url("https://lists.example.com/unsubscribe/{token}") == "/unsubscribe/"
    store = FakeStore()
    app = make_app(SECRET, store.unsubscribe, path_prefix=prefix)
    assert call(app, "POST", f"/u/x/{TOKEN}", ONE_CLICK)[0].startswith("200")
    assert call(app, "POST", f"/unsubscribe/{TOKEN}", ONE_CLICK)[0].startswith("404")
    with pytest.raises(ValueError):
        make_app(SECRET, store.unsubscribe, path_prefix="nope")


def test_printable_escapes_only_non_printables() -> None:
    assert printable("caf\u00e9 /a b") == "caf\u00e9 /a b"
    assert printable("\x1b[0m\t\x00\u2028") == "\\x1b[0m\\t\\x00\\u2028"
