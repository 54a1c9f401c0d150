"""The unsubscribe web app over the real database, through real HTTP on loopback."""

from __future__ import annotations

import ast
import dataclasses
import importlib
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterator

import pytest

from sendsystem.errors import ConfigError
from sendsystem.unsubscribe.app import make_wsgi_server
from sendsystem.unsubscribe.service import UnsubscribeService, create_app, unsubscribe_wsgi_app
from tests.harness.env import Env
from tests.integration.test_bounce_cli import closed_port, run_cli
from tests.integration.test_intake import send_newsletter, state


def request(url: str, data: bytes | None = None) -> tuple[int, str, dict[str, str]]:
    req = urllib.request.Request(url, data=data, method="POST" if data is not None else "GET")
    if data is not None:
        req.add_header("Content-Type", "application/x-www-form-urlencoded")
    try:
        with urllib.request.urlopen(req, timeout=10) as resp:
            return resp.status, resp.read().decode(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(), dict(exc.headers)


@pytest.fixture
def server(env: Env) -> Iterator[str]:
    service = UnsubscribeService(env.config.database)
    httpd = make_wsgi_server(unsubscribe_wsgi_app(env.config, service), port=0)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{httpd.server_port}/unsubscribe/"
    httpd.shutdown()
    httpd.server_close()
    service.close()


ONE_CLICK = b"List-Unsubscribe=One-Click"


def test_one_click_post_unsubscribes(env: Env, server: str) -> None:
    a, b = send_newsletter(env, ["leaver@example.org", "stayer@example.org"])
    code, body, _headers = request(server + a.token, ONE_CLICK)
    assert (code, body) == (200, "unsubscribed\n")
    assert state(env, a) == ("sent", "unsubscribed")
    assert state(env, b) == ("sent", "active")
    # Repeating it (mailbox providers retry) is harmless.
    assert request(server + a.token, ONE_CLICK)[0] == 200
    assert state(env, a) == ("sent", "unsubscribed")


def test_confirmation_page_and_form(env: Env, server: str) -> None:
    [a] = send_newsletter(env, ["leaver@example.org"])
    code, page, _headers = request(server + a.token)
    assert code == 200 and "leaver@example.org" in page and "news" in page
    assert state(env, a) == ("sent", "active")  # a GET never unsubscribes
    code, page, _headers = request(server + a.token, b"confirm=yes")
    assert code == 200 and "You are unsubscribed" in page
    code, page, _headers = request(server + a.token)
    assert code == 200 and "Already unsubscribed" in page


def test_forged_token_changes_nothing(env: Env, server: str) -> None:
    [a] = send_newsletter(env, ["leaver@example.org"])
    forged = a.token[:-3] + ("xyz" if not a.token.endswith("xyz") else "abc")
    assert request(server + forged, ONE_CLICK)[0] == 400
    assert state(env, a) == ("sent", "active")


def test_database_down_answers_503(env: Env) -> None:
    down = dataclasses.replace(env.config.database, port=closed_port())
    service = UnsubscribeService(down, retry_for=0.3)
    httpd = make_wsgi_server(unsubscribe_wsgi_app(env.config, service), port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        [a] = send_newsletter(env, ["leaver@example.org"])
        url = f"http://127.0.0.1:{httpd.server_port}/unsubscribe/{a.token}"
        code, _body, headers = request(url, ONE_CLICK)
        assert code == 503 and headers.get("Retry-After") == "300"
        # The confirmation page too: "come back later", not a 500.
        code, page, headers = request(url)
        assert code == 503 and headers.get("Retry-After") == "300"
        assert "try again later" in page and "Unsubscribe" not in page
        head = urllib.request.Request(url, method="HEAD")
        with pytest.raises(urllib.error.HTTPError) as info:
            urllib.request.urlopen(head, timeout=10)
        assert info.value.code == 503 and info.value.headers.get("Retry-After") == "300"
        assert state(env, a) == ("sent", "active")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_unsubscribe_server_command(env: Env) -> None:
    [a] = send_newsletter(env, ["leaver@example.org"])
    port = closed_port()
    proc = subprocess.Popen([sys.executable, "-m", "sendsystem", "--config", str(env.path),
                             "unsubscribe-server", "--port", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    try:
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 20
        while True:
            try:
                if request(base + "/healthz")[0] == 200:
                    break
            except OSError:
                pass
            assert proc.poll() is None, proc.stderr.read() if proc.stderr else ""
            assert time.monotonic() < deadline, "unsubscribe-server did not start"
            time.sleep(0.1)
        assert request(f"{base}/unsubscribe/{a.token}", ONE_CLICK)[0] == 200
        assert state(env, a) == ("sent", "unsubscribed")
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_deployed_gunicorn_app_spec_still_works(env: Env) -> None:
    """Deployed gunicorn lines name ``sendsystem.intake:create_app(...)``: resolve it as
    gunicorn does (import the module, call the named factory with literal arguments)."""
    module, _, expression = f'sendsystem.intake:create_app("{env.path}")'.partition(":")
    call = ast.parse(expression, mode="eval").body
    assert isinstance(call, ast.Call) and isinstance(call.func, ast.Name)
    factory = getattr(importlib.import_module(module), call.func.id)
    app = factory(*[ast.literal_eval(arg) for arg in call.args])
    httpd = make_wsgi_server(app, port=0)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    try:
        [a] = send_newsletter(env, ["leaver@example.org"])
        url = f"http://127.0.0.1:{httpd.server_port}/unsubscribe/{a.token}"
        assert request(url, ONE_CLICK)[0] == 200
        assert state(env, a) == ("sent", "unsubscribed")
    finally:
        httpd.shutdown()
        httpd.server_close()


def test_short_secret_stops_the_unsubscribe_app_at_start(env: Env) -> None:
    env.configure(unsubscribe={"secret": "short"})
    recipe = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"
    with pytest.raises(ConfigError, match="at least 32 characters") as info:
        create_app(str(env.path))
    assert recipe in str(info.value)
    proc = subprocess.run([sys.executable, "-m", "sendsystem", "--config", str(env.path),
                           "unsubscribe-server", "--port", str(closed_port())],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    assert recipe in proc.stderr and "Traceback" not in proc.stderr


def test_mailto_unsubscribe_through_bounce_receive(env: Env) -> None:
    """The List-Unsubscribe mailto as a mail client sends it, piped in by the MTA."""
    [a] = send_newsletter(env, ["leaver@example.org"])
    mailto = env.config.unsubscribe.mailto
    raw = (f"From: Leaver <leaver@example.org>\r\nTo: {mailto}\r\n"
           f"Subject: unsubscribe {a.token}\r\nMessage-ID: <x1@example.org>\r\n\r\n\r\n").encode()
    code, out, err = run_cli(env, "bounce", "receive", "--recipient", mailto, stdin=raw)
    assert code == 0, err
    assert out.startswith("unsubscribed")
    assert state(env, a) == ("sent", "unsubscribed")
