"""The one-click unsubscribe web app (WSGI, standard library only).

Routes (the token is the last path segment of ``[unsubscribe] url``):

* ``POST <prefix><token>`` with ``List-Unsubscribe=One-Click`` (RFC 8058, as
  mailbox providers send it) or ``confirm=yes`` (our own form): unsubscribes
  and answers 200. Repeating it is harmless; a forged or mangled token gets a
  bare 400 that reveals nothing.
* ``GET <prefix><token>``: a confirmation page whose button POSTs. A GET
  never unsubscribes, because link scanners and mail-security gateways
  prefetch every URL in a message.
* ``GET /healthz``: 200 ``ok`` for load balancers.
* ``POST /webhooks/<provider>`` (ses, sendgrid, mailgun, postmark): an ESP's
  bounce/complaint webhook, when the integrator passes ``webhooks`` (see
  :mod:`sendsystem.bounce.webhooks`); 403 when it is not authentic, 404 for a
  provider not enabled. Anything else is 404.

The app touches no database: the integrator passes ``unsubscribe`` (do it,
idempotently) and optionally ``lookup`` (describe it, for the page) callbacks.
A callback raising :class:`~sendsystem.errors.TemporaryError` gives 503 with
Retry-After, so a mailbox provider's one-click POST is retried later; the
confirmation page (GET) answers the same way rather than a 500, so a person
is told to come back and a monitor sees "unavailable", not "broken".
"""

from __future__ import annotations

import html
import logging
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, replace
from email.parser import BytesParser
from socketserver import ThreadingMixIn
from urllib.parse import parse_qsl, urlsplit
from wsgiref.simple_server import WSGIRequestHandler, WSGIServer, make_server
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from sendsystem.errors import TemporaryError
from sendsystem.tokens import UnsubscribeTarget, verify_unsubscribe_token

log = logging.getLogger(__name__)

DEFAULT_PREFIX = "/unsubscribe/"
# A one-click body is 26 bytes; our form's is smaller. Anything big is abuse.
MAX_BODY = 16 * 1024
# SendGrid batches events; a batch of a thousand is a few hundred kB.
MAX_WEBHOOK_BODY = 4 * 1024 * 1024
WEBHOOK_PREFIX = "/webhooks/"
# Seconds a client should wait after a 503 (the database is down).
RETRY_AFTER = "300"
# How an unsubscribe came (UnsubscribeTarget.via): the reasons the subscriber's
# history records (the same strings as sendsystem.history's, which this
# standard-library-only module does not import).
VIA_ONE_CLICK = "List-Unsubscribe one-click"
VIA_FORM = "unsubscribe link"

_HEADERS = [
    # The token in the URL is a credential: keep it out of Referer headers and caches.
    ("Referrer-Policy", "no-referrer"),
    ("Cache-Control", "no-store"),
    ("X-Content-Type-Options", "nosniff"),
    ("X-Frame-Options", "DENY"),
    ("Content-Security-Policy",
     "default-src 'none'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"),
]


@dataclass(frozen=True)
class UnsubscribeResult:
    """What a callback reports about one subscription.

    From ``unsubscribe``: ``ok`` is True when the address is now off the list
    (also when it already was). From ``lookup``: ``ok`` is True while the
    address is still subscribed. ``list_name`` and ``email`` are only shown
    on the HTML pages (escaped); either may be None.
    """

    ok: bool
    list_name: str | None
    email: str | None


Callback = Callable[[UnsubscribeTarget], UnsubscribeResult | None]
# (provider, request headers in lower case, raw body) -> (HTTP status, text).
WebhookCallback = Callable[[str, Mapping[str, str], bytes], tuple[int, str]]
_REASONS = {200: "OK", 400: "Bad Request", 403: "Forbidden", 404: "Not Found"}


def path_prefix_from_url(url_template: str) -> str:
    """The path before ``{token}`` in ``[unsubscribe] url``, e.g. ``/unsubscribe/``."""
    path = urlsplit(url_template.replace("{token}", "TOKEN")).path
    prefix, sep, _rest = path.rpartition("TOKEN")
    return prefix if sep and prefix.endswith("/") else DEFAULT_PREFIX


class _Response:
    def __init__(self, status: str, body: str, content_type: str = "text/html",
                 extra: Iterable[tuple[str, str]] = ()) -> None:
        self.status = status
        self.body = body.encode("utf-8")
        self.headers = [("Content-Type", f"{content_type}; charset=utf-8"),
                        ("Content-Length", str(len(self.body))), *_HEADERS, *extra]


def _text(status: str, body: str, extra: Iterable[tuple[str, str]] = ()) -> _Response:
    return _Response(status, body, "text/plain", extra)


_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<meta name="robots" content="noindex, nofollow">
<title>{title}</title>
<style>
body {{ margin: 0; background: #f4f5f7; color: #1f2933;
       font: 16px/1.5 -apple-system, "Segoe UI", Roboto, Helvetica, Arial, sans-serif; }}
main {{ max-width: 30rem; margin: 12vh auto; padding: 2rem 2.25rem; background: #fff;
       border-radius: 10px; box-shadow: 0 2px 12px rgba(0, 0, 0, .08); }}
h1 {{ font-size: 1.4rem; margin: 0 0 1rem; }}
p {{ margin: 0 0 1rem; }}
.who {{ font-weight: 600; overflow-wrap: anywhere; }}
button {{ font: inherit; font-weight: 600; color: #fff; background: #c81e1e; border: 0;
         border-radius: 6px; padding: .6rem 1.4rem; cursor: pointer; }}
button:hover, button:focus {{ background: #a61b1b; }}
.muted {{ color: #616e7c; font-size: .9rem; margin-top: 1.5rem; }}
</style></head>
<body><main>
<h1>{title}</h1>
{content}
</main></body></html>
"""


def _page(status: str, title: str, content: str) -> _Response:
    return _Response(status, _PAGE.format(title=html.escape(title), content=content))


def _describe(info: UnsubscribeResult | None) -> tuple[str, str]:
    """Escaped HTML fragments naming the address and the list."""
    email = (f'<span class="who">{html.escape(info.email)}</span>'
             if info and info.email else "your address")
    lst = (f'<span class="who">{html.escape(info.list_name)}</span>'
           if info and info.list_name else "this mailing list")
    return email, lst


def _read_body(environ: WSGIEnvironment, limit: int) -> bytes | _Response:
    try:
        length = int(environ.get("CONTENT_LENGTH") or 0)
    except ValueError:
        return _text("400 Bad Request", "bad Content-Length\n")
    if length < 0:
        return _text("400 Bad Request", "bad Content-Length\n")
    if length > limit:
        return _text("413 Content Too Large", "request body too large\n")
    return environ["wsgi.input"].read(length) if length else b""


def _form_fields(content_type: str, body: bytes) -> dict[str, str]:
    """Fields of an urlencoded or multipart/form-data body (both are allowed by RFC 8058)."""
    fields: dict[str, str] = {}
    if content_type.lower().startswith("multipart/form-data"):
        msg = BytesParser().parsebytes(
            b"Content-Type: " + content_type.encode("latin-1", "replace") + b"\r\n\r\n" + body)
        for part in msg.walk():
            name = part.get_param("name", header="content-disposition")
            if isinstance(name, str) and not part.is_multipart():
                data = part.get_payload(decode=True)
                if isinstance(data, bytes):
                    fields[name] = data.decode("utf-8", "replace").strip()
        return fields
    # urlencoded, or no Content-Type at all (lenient: some senders omit it).
    try:
        pairs = parse_qsl(body.decode("utf-8", "replace"), keep_blank_values=True,
                          max_num_fields=20)
    except ValueError:
        return fields
    for key, value in pairs:
        fields.setdefault(key, value.strip())
    return fields


class _UnsubscribeApp:
    def __init__(self, secret: bytes, unsubscribe: Callback, lookup: Callback | None,
                 prefix: str, max_body: int, webhooks: WebhookCallback | None = None) -> None:
        self.webhooks = webhooks
        self.secret = secret
        self.unsubscribe = unsubscribe
        self.lookup = lookup
        self.prefix = prefix
        self.max_body = max_body

    def __call__(self, environ: WSGIEnvironment,
                 start_response: StartResponse) -> Iterable[bytes]:
        method = environ.get("REQUEST_METHOD", "GET").upper()
        try:
            response = self.route(method, environ.get("PATH_INFO", "") or "/", environ)
        except Exception:
            log.exception("unsubscribe app failed on %s request", printable(method))
            response = _text("500 Internal Server Error", "internal error, try again later\n")
        start_response(response.status, response.headers)
        return [] if method == "HEAD" else [response.body]

    def route(self, method: str, path: str, environ: WSGIEnvironment) -> _Response:
        if path == "/healthz":
            if method in ("GET", "HEAD"):
                return _text("200 OK", "ok\n")
            return _text("405 Method Not Allowed", "method not allowed\n",
                         [("Allow", "GET, HEAD")])
        if self.webhooks is not None and path.startswith(WEBHOOK_PREFIX):
            return self.webhook(method, path[len(WEBHOOK_PREFIX):].rstrip("/"), environ)
        if not path.startswith(self.prefix):
            return _text("404 Not Found", "not found\n")
        token = path[len(self.prefix):].rstrip("/")
        if not token or "/" in token:
            return _text("404 Not Found", "not found\n")
        if method not in ("GET", "HEAD", "POST"):
            return _text("405 Method Not Allowed", "method not allowed\n",
                         [("Allow", "GET, HEAD, POST")])
        target = verify_unsubscribe_token(self.secret, token)
        if target is None:
            if method == "POST":
                return _text("400 Bad Request", "invalid unsubscribe link\n")
            return _page("400 Bad Request", "Invalid link",
                         "<p>This unsubscribe link is not valid. Please use the link from the "
                         "most recent message you received, or reply to it and ask to be "
                         "removed.</p>")
        if method == "POST":
            return self.post(target, environ)
        return self.confirmation_page(target)

    def confirmation_page(self, target: UnsubscribeTarget) -> _Response:
        try:
            info = self._call(self.lookup, target) if self.lookup else None
        except TemporaryError as exc:
            log.warning("unsubscribe page for subscriber %d of list %d unavailable: %s",
                        target.subscriber_id, target.list_id, exc)
            response = _page("503 Service Unavailable", "Please try again later",
                             "<p>We cannot show this page right now. Nothing has changed; "
                             "please open the link again in a few minutes.</p>")
            response.headers.append(("Retry-After", RETRY_AFTER))
            return response
        email, lst = _describe(info)
        if info is not None and not info.ok:
            return _page("200 OK", "Already unsubscribed",
                         f"<p>{email} is not subscribed to {lst}. "
                         "You will receive no more messages from it.</p>")
        return _page("200 OK", "Unsubscribe",
                     f"<p>Unsubscribe {email} from {lst}?</p>"
                     '<form method="post">'
                     '<input type="hidden" name="confirm" value="yes">'
                     '<button type="submit">Unsubscribe</button></form>'
                     '<p class="muted">Nothing changes until you press the button.</p>')

    def post(self, target: UnsubscribeTarget, environ: WSGIEnvironment) -> _Response:
        body = _read_body(environ, self.max_body)
        if isinstance(body, _Response):
            return body
        fields = _form_fields(environ.get("CONTENT_TYPE", ""), body)
        from_form = fields.get("confirm") == "yes"
        if fields.get("List-Unsubscribe") != "One-Click" and not from_form:
            return _text("400 Bad Request", "expected List-Unsubscribe=One-Click\n")
        try:
            result = self._call(self.unsubscribe,
                                replace(target, via=VIA_FORM if from_form else VIA_ONE_CLICK))
        except TemporaryError as exc:
            log.warning("unsubscribe of subscriber %d from list %d deferred: %s",
                        target.subscriber_id, target.list_id, exc)
            return _text("503 Service Unavailable", "temporarily unavailable, try again later\n",
                         [("Retry-After", RETRY_AFTER)])
        log.info("unsubscribed subscriber %d from list %d (%s)", target.subscriber_id,
                 target.list_id, "form" if from_form else "one-click")
        if not from_form:
            return _text("200 OK", "unsubscribed\n")
        email, lst = _describe(result)
        if result is not None and not result.ok:
            return _page("200 OK", "Not subscribed",
                         f"<p>We could not find a subscription of {email} to {lst}; it may "
                         "have been removed already. You will receive no more messages "
                         "from it.</p>")
        return _page("200 OK", "You are unsubscribed",
                     f"<p>{email} has been removed from {lst}. "
                     "You will receive no more messages from it.</p>"
                     '<p class="muted">Unsubscribed by mistake? Sign up again where you '
                     "subscribed the first time.</p>")

    def webhook(self, method: str, provider: str, environ: WSGIEnvironment) -> _Response:
        assert self.webhooks is not None
        if not provider or "/" in provider:
            return _text("404 Not Found", "not found\n")
        if method != "POST":
            return _text("405 Method Not Allowed", "method not allowed\n", [("Allow", "POST")])
        body = _read_body(environ, MAX_WEBHOOK_BODY)
        if isinstance(body, _Response):
            return body
        headers = {key[5:].replace("_", "-").lower(): str(value)
                   for key, value in environ.items() if key.startswith("HTTP_")}
        if environ.get("CONTENT_TYPE"):
            headers["content-type"] = str(environ["CONTENT_TYPE"])
        try:
            code, text = self.webhooks(provider, headers, body)
        except TemporaryError as exc:
            log.warning("%s webhook deferred: %s", printable(provider), exc)
            # 503 makes every ESP retry later, and nothing was recorded.
            return _text("503 Service Unavailable", "temporarily unavailable, try again later\n",
                         [("Retry-After", RETRY_AFTER)])
        return _text(f"{code} {_REASONS.get(code, 'Error')}", text)

    @staticmethod
    def _call(callback: Callback | None, target: UnsubscribeTarget) -> UnsubscribeResult | None:
        if callback is None:
            return None
        return callback(target)


def make_app(secret: bytes, unsubscribe: Callback, *, lookup: Callback | None = None,
             path_prefix: str = DEFAULT_PREFIX, max_body: int = MAX_BODY,
             webhooks: WebhookCallback | None = None) -> WSGIApplication:
    """The WSGI app. ``path_prefix`` is the URL path before the token (see
    :func:`path_prefix_from_url`); ``unsubscribe`` must be idempotent;
    ``webhooks`` handles ``POST /webhooks/<provider>``."""
    if not path_prefix.startswith("/") or not path_prefix.endswith("/"):
        raise ValueError(f"path_prefix must start and end with '/', got {path_prefix!r}")
    if webhooks is not None and path_prefix.startswith(WEBHOOK_PREFIX):
        raise ValueError(f"path_prefix {path_prefix!r} collides with {WEBHOOK_PREFIX}")
    return _UnsubscribeApp(secret, unsubscribe, lookup, path_prefix, max_body, webhooks)


class _ThreadingWSGIServer(ThreadingMixIn, WSGIServer):
    daemon_threads = True


# Both token forms: <sub>.<list>.<sig> and <sub>.<list>.<newsletter>.<sig>.
_TOKEN_IN_PATH = re.compile(r"/[0-9a-z]+\.[0-9a-z]+(?:\.[0-9a-z]+)?\.[A-Za-z0-9_-]+")


def printable(text: str) -> str:
    """``text`` with every non-printable character escaped (ESC -> ``\\x1b``)."""
    return "".join(c if c.isprintable() else c.encode("unicode_escape").decode("ascii")
                   for c in text)


class _LoggingHandler(WSGIRequestHandler):
    """Access log through logging, with tokens redacted (they are credentials).

    The request line is the client's, raw: without escaping, ESC sequences
    would reach the terminal that follows the log (recolour, clear, move the
    cursor) and a CR would let a client forge what looks like a log line.
    """

    def log_message(self, format: str, *args: object) -> None:
        line = _TOKEN_IN_PATH.sub("/<token>", format % args)
        log.info("%s %s", self.address_string(), printable(line))


def make_wsgi_server(app: WSGIApplication, host: str = "127.0.0.1",
                     port: int = 8025) -> WSGIServer:
    """A threaded wsgiref server (port 0 picks a free port: ``server.server_port``)."""
    return make_server(host, port, app, server_class=_ThreadingWSGIServer,
                       handler_class=_LoggingHandler)


def serve(app: WSGIApplication, host: str = "127.0.0.1", port: int = 8025) -> None:
    """Serve ``app`` until interrupted. For development; production runs the app
    under a real WSGI server (gunicorn, uwsgi) behind TLS."""
    with make_wsgi_server(app, host, port) as server:
        log.info("unsubscribe app listening on http://%s:%d/", host, server.server_port)
        try:
            server.serve_forever()
        except KeyboardInterrupt:
            log.info("unsubscribe app stopped")
