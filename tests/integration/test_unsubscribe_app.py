"""The unsubscribe web app over a real loopback HTTP server (wsgiref, urllib). The app
called directly, without a server: tests/unit/test_unsubscribe_app.py."""

from __future__ import annotations

import logging
import socket
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass

import pytest

from sendsystem.tokens import UnsubscribeTarget, unsubscribe_token
from sendsystem.unsubscribe.app import (
    make_app,
    make_wsgi_server,
)
from tests.unit.test_unsubscribe_app import ONE_CLICK, SECRET, TOKEN, FakeStore


@dataclass
class Server:
    base: str
    store: FakeStore


@pytest.fixture
def server() -> Iterator[Server]:
    store = FakeStore()
    app = make_app(SECRET, store.unsubscribe, lookup=store.lookup)
    httpd = make_wsgi_server(app, "127.0.0.1", 0)
    thread = threading.Thread(target=httpd.serve_forever, kwargs={"poll_interval": 0.05},
                              daemon=True)
    thread.start()
    try:
        yield Server(f"http://127.0.0.1:{httpd.server_port}", store)
    finally:
        httpd.shutdown()
        httpd.server_close()
        thread.join(5)


def request(url: str, data: bytes | None = None, *, method: str | None = None,
            content_type: str = "application/x-www-form-urlencoded"
            ) -> tuple[int, dict[str, str], str]:
    req = urllib.request.Request(url, data=data, method=method)
    if data is not None:
        req.add_header("Content-Type", content_type)
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, dict(resp.headers), resp.read().decode()
    except urllib.error.HTTPError as err:
        with err:
            return err.code, dict(err.headers), err.read().decode()


def test_one_click_post_unsubscribes(server: Server) -> None:
    status, headers, body = request(f"{server.base}/unsubscribe/{TOKEN}", ONE_CLICK)
    assert status == 200
    assert headers["Content-Type"].startswith("text/plain")
    assert "unsubscribed" in body
    assert server.store.calls == [UnsubscribeTarget(42, 3)]
    assert (42, 3) not in server.store.subscribed


def test_one_click_is_idempotent(server: Server) -> None:
    for _ in range(3):
        status, _headers, _body = request(f"{server.base}/unsubscribe/{TOKEN}", ONE_CLICK)
        assert status == 200
    assert (42, 3) not in server.store.subscribed


def test_one_click_multipart_form_data(server: Server) -> None:
    body = (b"--XyZ\r\nContent-Disposition: form-data; name=\"List-Unsubscribe\"\r\n\r\n"
            b"One-Click\r\n--XyZ--\r\n")
    status, _h, _b = request(f"{server.base}/unsubscribe/{TOKEN}", body,
                             content_type="multipart/form-data; boundary=XyZ")
    assert status == 200
    assert server.store.calls == [UnsubscribeTarget(42, 3)]


def test_get_shows_form_and_does_not_unsubscribe(server: Server) -> None:
    for _ in range(2):  # a link scanner prefetching twice changes nothing
        status, headers, body = request(f"{server.base}/unsubscribe/{TOKEN}")
        assert status == 200
        assert headers["Content-Type"].startswith("text/html")
        assert '<form method="post">' in body
        assert 'name="confirm"' in body
    assert server.store.calls == []
    assert (42, 3) in server.store.subscribed
    assert headers["Referrer-Policy"] == "no-referrer"
    assert headers["Cache-Control"] == "no-store"


def test_head_does_not_unsubscribe(server: Server) -> None:
    status, _headers, body = request(f"{server.base}/unsubscribe/{TOKEN}", method="HEAD")
    assert status == 200 and body == ""
    assert server.store.calls == []


def test_form_post_shows_unsubscribed_page(server: Server) -> None:
    status, headers, body = request(f"{server.base}/unsubscribe/{TOKEN}", b"confirm=yes")
    assert status == 200
    assert headers["Content-Type"].startswith("text/html")
    assert "You are unsubscribed" in body
    assert server.store.calls == [UnsubscribeTarget(42, 3)]
    # Afterwards the page says so instead of offering the button again.
    _s, _h, again = request(f"{server.base}/unsubscribe/{TOKEN}")
    assert "Already unsubscribed" in again and "<form" not in again


def test_everything_shown_is_html_escaped(server: Server) -> None:
    for body in (request(f"{server.base}/unsubscribe/{TOKEN}")[2],
                 request(f"{server.base}/unsubscribe/{TOKEN}", b"confirm=yes")[2]):
        assert "<script>" not in body
        assert "&lt;script&gt;alert(1)&lt;/script&gt;@example.org" in body
        assert "Garden &lt;News&gt; &amp; &quot;Friends&quot;" in body


@pytest.mark.parametrize("token", [
    TOKEN[:-1] + ("A" if TOKEN[-1] != "A" else "B"),  # forged signature
    unsubscribe_token(b"someone else's secret", 42, 3),
    "not-a-token",
    "1.1." + "x" * 22,
])
def test_forged_token_is_400(server: Server, token: str) -> None:
    status, _headers, body = request(f"{server.base}/unsubscribe/{token}", ONE_CLICK)
    assert status == 400
    assert "42" not in body and "3" not in body
    status, _h, page = request(f"{server.base}/unsubscribe/{token}")
    assert status == 400 and "<form" not in page
    assert server.store.calls == []


def test_post_without_one_click_field_is_400(server: Server) -> None:
    status, _h, _b = request(f"{server.base}/unsubscribe/{TOKEN}", b"foo=bar")
    assert status == 400
    assert server.store.calls == []


def test_temporary_failure_is_503(server: Server) -> None:
    server.store.down = True
    status, headers, _b = request(f"{server.base}/unsubscribe/{TOKEN}", ONE_CLICK)
    assert status == 503
    assert headers["Retry-After"] == "300"
    status, headers, body = request(f"{server.base}/unsubscribe/{TOKEN}")
    assert status == 503 and headers["Retry-After"] == "300"
    assert "try again later" in body and "<form" not in body


def test_healthz_and_404(server: Server) -> None:
    assert request(f"{server.base}/healthz")[:3:2] == (200, "ok\n")
    assert request(f"{server.base}/")[0] == 404
    assert request(f"{server.base}/unsubscribe/")[0] == 404
    assert request(f"{server.base}/unsubscribe/{TOKEN}/extra")[0] == 404
    assert request(f"{server.base}/other/{TOKEN}")[0] == 404
    assert request(f"{server.base}/unsubscribe/{TOKEN}", method="DELETE")[0] == 405


def raw_request(base: str, request_line: bytes) -> bytes:
    host, port = base.removeprefix("http://").split(":")
    with socket.create_connection((host, int(port)), timeout=10) as sock:
        sock.sendall(request_line + b"\r\nHost: x\r\n\r\n")
        chunks = []
        while chunk := sock.recv(65536):
            chunks.append(chunk)
    return b"".join(chunks)


def test_access_log_escapes_control_characters(server: Server,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A client's ESC sequences and CRs must not reach the terminal following the log."""
    caplog.set_level(logging.INFO, logger="sendsystem.unsubscribe.app")
    # ESC (clear screen, red), a C1 CSI (0x9b) and a bare CR that would start a forged line.
    assert raw_request(server.base, b"GET /\x1b[2J\x1b[31mred\x9b1m HTTP/1.0").startswith(
        b"HTTP/1.0 404")
    assert raw_request(server.base,
                       b"GET /x\rINFO 10.0.0.1 forged HTTP/1.0").startswith(b"HTTP/1.0 400")
    deadline = time.monotonic() + 5
    while len([r for r in caplog.records if '"GET /' in r.getMessage()]) < 2:
        assert time.monotonic() < deadline, "access log lines not seen"
        time.sleep(0.02)
    text = "\n".join(r.getMessage() for r in caplog.records)
    assert "\x1b" not in text and "\x9b" not in text and "\r" not in text
    assert "GET /\\x1b[2J\\x1b[31mred\\x9b1m HTTP/1.0" in text
    assert "GET /x\\rINFO 10.0.0.1 forged" in text
