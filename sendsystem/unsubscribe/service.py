"""The unsubscribe web app's database side, and the WSGI factory for real servers.

The app (:mod:`sendsystem.unsubscribe.app`) touches no database:
:class:`UnsubscribeService` gives it the ``unsubscribe`` and ``lookup``
callbacks over MariaDB, through :func:`sendsystem.bounce.recipients.unsubscribe`,
the same function a mailto unsubscribe with a valid token reaches.
:class:`WebhookService` is the same for the ESP webhooks
(:mod:`sendsystem.bounce.webhooks`), mounted under ``/webhooks/`` when any
provider is enabled in ``[webhooks]``. :func:`create_app` builds the whole
app from a config file, for gunicorn and the like.
"""

from __future__ import annotations

import threading
from collections.abc import Mapping
from wsgiref.types import WSGIApplication

from .. import history
from ..bounce import recipients
from ..bounce.webhooks import (
    PROVIDERS,
    CertFetcher,
    EventOutcome,
    WebhookEvent,
    WebhookReceiver,
    WebhookReply,
    fetch_certificate,
    record_event,
)
from ..config import Config, DatabaseConfig, load_config
from ..db import Database
from ..errors import ConfigError
from ..forget import forgotten
from ..states import SubscriberStatus
from ..tokens import UnsubscribeTarget
from ..tracking.web import mount, tracking_app
from .app import UnsubscribeResult, make_app, path_prefix_from_url


class UnsubscribeService:
    """``unsubscribe`` and ``lookup`` callbacks for :func:`sendsystem.unsubscribe.app.make_app`.

    One connection, used under a lock: the development server is threaded
    and a PyMySQL connection is not. A database outage raises
    :class:`~sendsystem.errors.DatabaseUnavailable` (a TemporaryError) after
    ``retry_for`` seconds, which the app turns into 503 + Retry-After.
    """

    def __init__(self, database: DatabaseConfig, *, retry_for: float = 3.0) -> None:
        self._db = Database(database, retry_for=retry_for)
        self._lock = threading.Lock()

    def unsubscribe(self, target: UnsubscribeTarget) -> UnsubscribeResult:
        with self._lock:
            row = recipients.unsubscribe(self._db, target.subscriber_id, target.list_id,
                                         via=target.via or history.UNSUBSCRIBE_LINK,
                                         newsletter_id=target.newsletter_id)
        if row is None:
            return UnsubscribeResult(ok=False, list_name=None, email=None)
        return UnsubscribeResult(ok=True, list_name=row["list_name"], email=_shown(row))

    def lookup(self, target: UnsubscribeTarget) -> UnsubscribeResult:
        with self._lock:
            row = self._db.fetchone("subscriber_with_list", {"id": target.subscriber_id,
                                                             "list_id": target.list_id})
        if row is None:
            return UnsubscribeResult(ok=False, list_name=None, email=None)
        return UnsubscribeResult(ok=row["status"] == SubscriberStatus.ACTIVE,
                                 list_name=row["list_name"], email=_shown(row))

    def close(self) -> None:
        with self._lock:
            self._db.close()


def _shown(row: Mapping[str, object]) -> str | None:
    """The address to show on the page; none for a forgotten subscriber (an old link
    of theirs still opens, and says only that they are not subscribed)."""
    email = str(row["email"])
    return None if forgotten(email) else email


class WebhookService:
    """ESP webhooks over MariaDB: authenticate (:class:`WebhookReceiver`), then
    record each event under one lock-guarded connection, as above."""

    def __init__(self, config: Config, *, retry_for: float = 3.0,
                 cert_fetcher: CertFetcher = fetch_certificate) -> None:
        self._config = config
        config.secret()  # attribution needs it: fail at start-up, not per request
        self._db = Database(config.database, retry_for=retry_for)
        self._lock = threading.Lock()
        self.receiver = WebhookReceiver(config.webhooks, self._record, cert_fetcher=cert_fetcher)
        self.last: WebhookReply | None = None  # for tests and debugging

    def _record(self, provider: str, event: WebhookEvent) -> EventOutcome:
        with self._lock:
            return record_event(self._db, self._config, provider, event)

    def __call__(self, provider: str, headers: Mapping[str, str], body: bytes
                 ) -> tuple[int, str]:
        reply = self.receiver.handle(provider, headers, body)
        self.last = reply
        return reply.status, reply.text

    def close(self) -> None:
        with self._lock:
            self._db.close()


def webhooks_enabled(config: Config) -> bool:
    return any(getattr(config.webhooks, f"{p}_enabled") for p in PROVIDERS)


def unsubscribe_wsgi_app(config: Config, service: UnsubscribeService | None = None,
                         webhooks: WebhookService | None = None) -> WSGIApplication:
    """The one-click unsubscribe WSGI app over this config's database, with the
    ESP webhooks when ``[webhooks]`` enables any, and the open/click tracking
    routes (/c/, /o/) when ``[tracking] base_url`` is set."""
    service = service or UnsubscribeService(config.database)
    if webhooks is None and webhooks_enabled(config):
        webhooks = WebhookService(config)
    prefix = path_prefix_from_url(config.unsubscribe.url)
    app = make_app(config.secret(), service.unsubscribe, lookup=service.lookup,
                   path_prefix=prefix, webhooks=webhooks)
    tracking = tracking_app(config)
    if tracking is None:
        return app
    if tracking.handles(prefix) or prefix.startswith((tracking.click_path, tracking.open_path)):
        raise ConfigError(f"[unsubscribe] url's path {prefix!r} collides with the tracking "
                          f"routes {tracking.click_path} and {tracking.open_path}; give "
                          "[tracking] base_url a path of its own (e.g. https://host/t)")
    return mount(app, tracking)


def create_app(config_path: str | None = None) -> WSGIApplication:
    """WSGI factory for a real server, e.g.
    ``gunicorn -w 4 'sendsystem.unsubscribe.service:create_app("/etc/sendsystem/config.ini")'``.
    Command lines that name ``sendsystem.intake:create_app`` reach this same function."""
    return unsubscribe_wsgi_app(load_config(config_path))
