"""``/c/<token>`` and ``/o/<token>``: the click redirect and the open pixel.

Mounted in the unsubscribe web app (:func:`mount`; same WSGI app, same
gunicorn), under the path of ``[tracking] base_url``. Per request: verify the
token (a keyed hash, no I/O), find the link in the newsletter's link table
(cached per web worker; read from the database once per newsletter), buffer
the hit (:mod:`.recorder`: written in batches by a background thread, never
an INSERT on the request path) and answer:

* ``GET /c/<token>``: 302 to the link's URL from the newsletter's own table.
  A token that does not verify, or names a link the table does not have,
  gets 404 and nothing is recorded: no token makes us redirect anywhere else.
* ``GET /o/<token>``: a 1x1 transparent GIF that no cache may keep (each open
  must reach us).
* HEAD: the same answers without a body, recorded as a machine hit.
* When the link table of a newsletter this worker has not read yet cannot be
  read (database down): 503 with Retry-After, and the hit is still recorded
  (its token is genuine). Links already cached keep redirecting through an
  outage.

With ``[tracking] enabled`` off the links of mail already sent still redirect
and the pixel still answers, but nothing is recorded.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Iterable
from urllib.parse import urlsplit
from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

from ..config import Config
from ..db import Database
from ..errors import SendSystemError
from .machine import agent_verdict
from .recorder import Recorder
from .tokens import CLICK, OPEN, Hit, Signer

log = logging.getLogger(__name__)

# The smallest transparent GIF (43 bytes).
PIXEL = (b"GIF89a\x01\x00\x01\x00\x80\x00\x00\x00\x00\x00\xff\xff\xff!\xf9\x04\x01\x00\x00"
         b"\x00\x00,\x00\x00\x00\x00\x01\x00\x01\x00\x00\x02\x02D\x01\x00;")
_NO_CACHE = [("Cache-Control", "no-store, no-cache, must-revalidate, max-age=0, private"),
             ("Pragma", "no-cache"), ("Expires", "0")]
RETRY_AFTER = "30"
# A link missing from the cached table is looked up again at most this often.
RELOAD_AFTER = 5.0
MAX_NEWSLETTERS = 2000


class LinkTable:
    """Each newsletter's links (idx -> URL), read once per web worker and kept.

    Rows are only ever added (by the sort workers, before any message using them
    is stored), so a cached table is never wrong, only possibly short: a miss
    reads the table again, at most every RELOAD_AFTER seconds per newsletter.
    """

    def __init__(self, database: Callable[[], Database]) -> None:
        self._make_db = database
        self._db: Database | None = None
        self._lock = threading.Lock()
        self._tables: dict[int, dict[int, str]] = {}
        self._loaded_at: dict[int, float] = {}

    def url(self, newsletter_id: int, idx: int) -> str | None:
        """The URL, or None when the newsletter has no such link; raises
        SendSystemError (a TemporaryError) when it must be read and cannot be."""
        table = self._tables.get(newsletter_id)
        if table is not None:
            url = table.get(idx)
            if url is not None or time.monotonic() - self._loaded_at[newsletter_id] \
                    < RELOAD_AFTER:
                return url
        return self._load(newsletter_id).get(idx)

    def _load(self, newsletter_id: int) -> dict[int, str]:
        with self._lock:
            if self._db is None:
                self._db = self._make_db()
            rows = self._db.fetchall("tracking_links_all", {"id": newsletter_id})
            table = {int(r["idx"]): str(r["url"]) for r in rows}
            if len(self._tables) >= MAX_NEWSLETTERS and newsletter_id not in self._tables:
                oldest = min(self._loaded_at, key=self._loaded_at.__getitem__)
                self._tables.pop(oldest, None)
                self._loaded_at.pop(oldest, None)
            self._tables[newsletter_id] = table
            self._loaded_at[newsletter_id] = time.monotonic()
            return table

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()


class TrackingApp:
    """The two routes; ``recorder`` None records nothing (``[tracking] enabled`` off)."""

    def __init__(self, signer: Signer, links: LinkTable, recorder: Recorder | None,
                 click_path: str, open_path: str) -> None:
        self.signer = signer
        self.links = links
        self.recorder = recorder
        self.click_path = click_path
        self.open_path = open_path

    def handles(self, path: str) -> bool:
        return path.startswith(self.click_path) or path.startswith(self.open_path)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse
                 ) -> Iterable[bytes]:
        method = str(environ.get("REQUEST_METHOD", "GET")).upper()
        path = str(environ.get("PATH_INFO", "") or "/")
        try:
            status, headers, body = self.route(method, path, environ)
        except Exception:
            log.exception("tracking request failed")
            status, headers, body = _text("500 Internal Server Error", "try again later\n")
        start_response(status, headers)
        return [] if method == "HEAD" else [body]

    def route(self, method: str, path: str, environ: WSGIEnvironment
              ) -> tuple[str, list[tuple[str, str]], bytes]:
        if path.startswith(self.click_path):
            kind, token = CLICK, path[len(self.click_path):]
        else:
            kind, token = OPEN, path[len(self.open_path):]
        if method not in ("GET", "HEAD"):
            return _text("405 Method Not Allowed", "method not allowed\n",
                         [("Allow", "GET, HEAD")])
        hit = self.signer.verify(kind, token)
        if hit is None:
            return _text("404 Not Found", "not found\n")
        if kind == OPEN:
            self._record(hit, method, environ)
            return ("200 OK", [("Content-Type", "image/gif"),
                               ("Content-Length", str(len(PIXEL))), *_NO_CACHE], PIXEL)
        try:
            url = self.links.url(hit.newsletter_id, hit.link_idx)
        except SendSystemError as exc:
            log.warning("link table of newsletter %d unavailable: %s", hit.newsletter_id, exc)
            self._record(hit, method, environ)
            return _text("503 Service Unavailable", "temporarily unavailable, try again\n",
                         [("Retry-After", RETRY_AFTER)])
        if url is None:
            return _text("404 Not Found", "not found\n")
        self._record(hit, method, environ)
        return ("302 Found", [("Location", url), ("Content-Length", "0"),
                              ("Cache-Control", "no-store, private"),
                              ("Referrer-Policy", "no-referrer")], b"")

    def _record(self, hit: Hit, method: str, environ: WSGIEnvironment) -> None:
        if self.recorder is not None:
            self.recorder.record(hit, agent_verdict(method, environ.get("HTTP_USER_AGENT")))

    def close(self) -> None:
        if self.recorder is not None:
            self.recorder.close()
        self.links.close()


def _text(status: str, text: str, extra: Iterable[tuple[str, str]] = ()
          ) -> tuple[str, list[tuple[str, str]], bytes]:
    body = text.encode()
    return status, [("Content-Type", "text/plain; charset=utf-8"),
                    ("Content-Length", str(len(body))), ("Cache-Control", "no-store"),
                    *extra], body


def paths(base_url: str) -> tuple[str, str]:
    """The URL paths of the click and open routes for ``[tracking] base_url``."""
    root = urlsplit(base_url).path.rstrip("/")
    return f"{root}/c/", f"{root}/o/"


def tracking_app(config: Config) -> TrackingApp | None:
    """The routes for this config, or None when ``[tracking] base_url`` is not set."""
    t = config.tracking
    if not t.base_url:
        return None
    signer = Signer.from_secret(config.secret())
    links = LinkTable(lambda: Database(config.database, retry_for=1.0, read_timeout=5.0))
    recorder = Recorder(t, lambda: Database(config.database, retry_for=0.0,
                                            read_timeout=5.0)) if t.enabled else None
    click_path, open_path = paths(t.base_url)
    return TrackingApp(signer, links, recorder, click_path, open_path)


def mount(app: WSGIApplication, tracking: TrackingApp) -> WSGIApplication:
    """``app`` with the tracking routes in front (everything else goes to ``app``)."""

    def dispatch(environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        if tracking.handles(str(environ.get("PATH_INFO", "") or "")):
            return tracking(environ, start_response)
        return app(environ, start_response)

    dispatch.tracking = tracking  # type: ignore[attr-defined]
    return dispatch
