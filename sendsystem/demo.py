"""`sendsystem demo`: the whole pipeline on this machine, as a new user first sees it.

What it does, in order: creates its own database (the configured name unless
that is the default ``sendsystem``, then ``sendsystem_demo``), a list of N fake
Danish subscribers with five merge fields, a ~20 KB newsletter (a ten-article
loop, HTML + text) with a small PDF attachment; starts an SMTP sink in a
thread that counts deliveries per recipient (or uses ``--relay``); writes its
own config.ini in a work directory; runs both balancers, two sort and two
send workers as real subprocesses; shows progress; and ends with a summary
checked against the sink plus the HTML report of ``stats --html``.

Decisions worth knowing:

* The demo only ever drops or reuses a database it created itself: it marks
  it with a schema COMMENT, and refuses a name that exists without that mark
  (so pointing it at a production database by mistake does nothing).
* The sink is a minimal asyncio SMTP server, not aiosmtpd: aiosmtpd reads DATA
  one line per await (~300 awaits for 22 KB) and, sharing two cores with
  MariaDB and six role processes, it became the bottleneck. Ours finds the
  end of DATA with one ``bytes.find`` per chunk, keeps no bodies, and counts
  by recipient, which is all the check needs.
* Children run in their own process group: a Ctrl-C at the terminal reaches
  only the demo, which then sends each child exactly one SIGTERM (a second
  signal would make a role stop at once instead of handing back its work).
* The work directory (config.ini, logs/, report.html) is kept so the report
  can be opened; the database is dropped at the end unless ``--keep``.

The pieces (fake subscribers, sample newsletter, sink, cluster) are reused by
bench/pipeline.py and bench/scaleout.py.
"""

from __future__ import annotations

import asyncio
import contextlib
import csv
import logging
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TextIO

import pymysql

from . import admin, stats
from .config import Config, DatabaseConfig, Relay, load_config
from .db import Database
from .errors import DatabaseUnavailable, SendSystemError, UserError

log = logging.getLogger(__name__)

DEMO_DB_NAME = "sendsystem_demo"
DB_MARK = "sendsystem demo database (dropped by sendsystem demo)"
LIST_NAME = "demo"
TEMPLATE_NAME = "demo-newsletter"
ROLE_COMMANDS = ("sort-balancer", "send-balancer", "sort-worker", "send-worker")

# ------------------------------------------------------------------ fake subscribers

FIRST_NAMES = (
    "Anne", "Mette", "Kirsten", "Hanne", "Helle", "Susanne", "Lene", "Maria", "Marianne",
    "Inge", "Camilla", "Sofie", "Ida", "Freja", "Emma", "Karen", "Birgitte", "Louise",
    "Peter", "Jens", "Lars", "Michael", "Henrik", "Søren", "Thomas", "Niels", "Jan",
    "Rasmus", "Mads", "Frederik", "Mikkel", "Anders", "Christian", "Jørgen", "Kasper",
    "Emil", "Magnus", "Oliver", "Ærling", "Åse", "Bjørn", "Asger", "Troels", "Signe",
)
LAST_NAMES = (
    "Nielsen", "Jensen", "Hansen", "Pedersen", "Andersen", "Christensen", "Larsen",
    "Sørensen", "Rasmussen", "Jørgensen", "Petersen", "Madsen", "Kristensen", "Olsen",
    "Thomsen", "Christiansen", "Poulsen", "Johansen", "Møller", "Mortensen", "Østergaard",
    "Kjær", "Lund", "Holm", "Bech", "Dahl", "Skov", "Vestergaard", "Bak", "Krogh",
)
CITIES = (
    "København", "Aarhus", "Odense", "Aalborg", "Esbjerg", "Randers", "Kolding",
    "Horsens", "Vejle", "Roskilde", "Herning", "Helsingør", "Silkeborg", "Næstved",
    "Fredericia", "Viborg", "Køge", "Holstebro", "Taastrup", "Slagelse", "Hillerød",
    "Sønderborg", "Svendborg", "Hjørring", "Frederikshavn", "Nørresundby", "Ringsted",
    "Ølstykke", "Haderslev", "Skive", "Æbeltoft", "Rønne", "Tórshavn", "Nuuk",
)
PLANS = ("Basis", "Plus", "Premium", "Familie", "Student")
DOMAINS = ("example.com", "example.net", "example.org", "post.example", "mail.example")
_ASCII = str.maketrans({"æ": "ae", "ø": "oe", "å": "aa", "Æ": "Ae", "Ø": "Oe", "Å": "Aa"})
MERGE_FIELDS = ("first_name", "last_name", "city", "plan", "member_since")


def fake_subscribers(n: int, seed: int = 2007) -> Iterator[dict[str, str]]:
    """``n`` deterministic fake subscribers: unique email + the five MERGE_FIELDS."""
    rng = random.Random(seed)
    for i in range(n):
        first, last = rng.choice(FIRST_NAMES), rng.choice(LAST_NAMES)
        local = f"{first}.{last}".lower().translate(_ASCII)
        yield {
            "email": f"{local}.{i}@{DOMAINS[i % len(DOMAINS)]}",
            "first_name": first, "last_name": last, "city": rng.choice(CITIES),
            "plan": rng.choice(PLANS),
            "member_since": f"{rng.randint(2005, 2024)}-{rng.randint(1, 12):02d}-"
                            f"{rng.randint(1, 28):02d}",
        }


def write_subscribers_csv(path: Path, n: int, seed: int = 2007) -> list[str]:
    """Write the CSV ``list import`` reads; the addresses, in order."""
    emails = []
    with path.open("w", encoding="utf-8", newline="") as fh:
        writer = csv.DictWriter(fh, fieldnames=("email", *MERGE_FIELDS))
        writer.writeheader()
        for row in fake_subscribers(n, seed):
            writer.writerow(row)
            emails.append(row["email"])
    return emails


# ------------------------------------------------------------------ the sample newsletter

_SENTENCES = (
    "Vi har samlet ugens vigtigste historier, så du hurtigt kan komme ajour.",
    "Foråret er kommet til hele landet, og med det en stribe nye arrangementer.",
    "Vores redaktion har talt med lokale ildsjæle om, hvad der rører sig lige nu.",
    "Mange læsere har skrevet til os med gode idéer, og her er et udvalg af dem.",
    "Prøv den nye opskrift på rugbrød med solsikkekerner og lidt ekstra tid i ovnen.",
    "Cykelstierne langs kysten er blevet forbedret, og turen er nu skiltet hele vejen.",
    "Bibliotekerne åbner for lange aftener med oplæsning, kaffe og brætspil.",
    "Et nyt fællesskab for havefolk deler frø, stiklinger og gode råd om kompost.",
    "Elbilerne bliver flere, og ladestanderne følger med i både by og på land.",
    "Sommerens koncerter er offentliggjort, og billetterne sælges allerede nu.",
    "Vi ser nærmere på, hvordan man sparer på varmen uden at gå på kompromis.",
    "Læs også interviewet med den unge keramiker, der har skabt en hel bevægelse.",
)
_CATEGORIES = ("Lokalt", "Mad", "Natur", "Kultur", "Bolig", "Fritid", "Teknik", "Sundhed",
               "Rejser", "Økonomi")
_TITLES = (
    "Fem ture du skal nå før sommerferien", "Rugbrød som din mormor bagte det",
    "Havens bedste venner: bier og humlebier", "Ny sæson på de små spillesteder",
    "Sådan får du et lunere hjem for færre kroner", "Weekendhygge med hele familien",
    "Apps der gør hverdagen lettere", "Motion der passer ind i en travl uge",
    "Skjulte perler på de danske øer", "Budgettet efter sommerferien",
)


def _articles_literal() -> str:
    """The ten articles as a Jinja list literal (templates may define their own data)."""
    items = []
    for i, title in enumerate(_TITLES):
        teaser = " ".join(_SENTENCES[(i + k) % len(_SENTENCES)] for k in range(6))
        items.append(
            f'{{"title": "{title}", "category": "{_CATEGORIES[i]}", '
            f'"minutes": {3 + i % 5}, "slug": "artikel-{i + 1}", "teaser": "{teaser}"}}'
        )
    return "[\n    " + ",\n    ".join(items) + "\n]"


DEMO_SUBJECT = "{{ first_name }}, ugens nyheder fra {{ list.name }} ({{ city }})"

_HTML = """{% set articles = ARTICLES %}<!DOCTYPE html>
<html lang="da"><head><meta charset="utf-8">
<meta name="viewport" content="width=device-width, initial-scale=1">
<title>{{ newsletter.subject }}</title>
<style>
  body {
    margin: 0;
    padding: 0;
    background: #eef2f5;
    font-family: Georgia, 'Times New Roman', serif;
    color: #1f2d3a;
  }
  .wrap { max-width: 640px; margin: 0 auto; background: #ffffff; }
  .masthead { background: #12395b; color: #ffffff; padding: 28px 32px; }
  .masthead h1 { margin: 0; font-size: 28px; letter-spacing: 0.5px; }
  .masthead p {
    margin: 6px 0 0;
    color: #b9d3ea;
    font-family: Helvetica, Arial, sans-serif;
    font-size: 13px;
  }
  .intro { padding: 24px 32px 8px; font-size: 17px; line-height: 1.55; }
  .card { margin: 16px 32px; padding: 18px 20px; border: 1px solid #dde5ec; border-radius: 8px; }
  .card .cat {
    font-family: Helvetica, Arial, sans-serif;
    font-size: 11px;
    text-transform: uppercase;
    letter-spacing: 1px;
    color: #c0542c;
  }
  .card h2 { margin: 6px 0 8px; font-size: 21px; line-height: 1.25; color: #12395b; }
  .card p { margin: 0 0 12px; font-size: 15px; line-height: 1.6; }
  .button {
    display: inline-block;
    padding: 9px 16px;
    background: #c0542c;
    color: #ffffff !important;
    text-decoration: none;
    border-radius: 4px;
    font-family: Helvetica, Arial, sans-serif;
    font-size: 13px;
  }
  .meta { font-family: Helvetica, Arial, sans-serif; font-size: 12px; color: #6b7c8c; }
  .offer {
    margin: 24px 32px;
    padding: 20px;
    background: #fdf3e7;
    border-left: 4px solid #c0542c;
    font-size: 15px;
    line-height: 1.55;
  }
  .footer {
    padding: 24px 32px 32px;
    background: #f4f7f9;
    font-family: Helvetica, Arial, sans-serif;
    font-size: 12px;
    line-height: 1.6;
    color: #6b7c8c;
  }
  .footer a { color: #12395b; }
</style></head>
<body>
<table role="presentation" width="100%" cellpadding="0" cellspacing="0"><tr><td>
<div class="wrap">
  <div class="masthead">
    <h1>{{ list.name | title }} Nyt</h1>
    <p>Nyhedsbrev nr. {{ newsletter.id }} &middot;
    til {{ first_name }} {{ last_name }} i {{ city }}</p>
  </div>
  <div class="intro">
    <p>Kære {{ first_name }},</p>
    <p>Tak fordi du har været medlem siden {{ member_since }}. Her er ugens udvalgte historier
    fra {{ city }} og resten af landet &ndash; god fornøjelse med læsningen.</p>
  </div>
{% for a in articles %}
  <div class="card">
    <div class="cat">{{ a.category }} &middot; {{ a.minutes }} min. læsning</div>
    <h2>{{ loop.index }}. {{ a.title }}</h2>
    <p>{{ a.teaser }}</p>
    <p class="meta">Udvalgt til dig, {{ first_name }}, fordi du bor i {{ city }}.</p>
    <a class="button" href="https://news.example.com/{{ a.slug
      }}?utm_source=nyhedsbrev&amp;utm_medium=email&amp;id={{ newsletter.id }}">Læs
      hele artiklen</a>
  </div>
{% endfor %}
  <div class="offer">
    <strong>Særligt for {{ plan }}-medlemmer:</strong> Som {{ plan }}-medlem får du 20 % rabat
    på alle arrangementer i {{ city }} resten af måneden. Se kataloget i den vedhæftede PDF.
  </div>
  <div class="footer">
    <p>Du modtager denne e-mail som medlem af {{ list.name }} på {{ email }}.</p>
    <p><a href="{{ unsubscribe_url }}">Afmeld nyhedsbrevet</a> med ét klik &middot;
    <a href="https://news.example.com/profil">Ret dine oplysninger</a></p>
    <p>{{ list.name | title }} Nyt &middot; Nørregade 7 &middot; 1165 København K</p>
  </div>
</div>
</td></tr></table>
</body></html>
"""

_TEXT = """{% set articles = ARTICLES %}{{ list.name | title }} Nyt - nyhedsbrev nr. {{
newsletter.id }}

Kære {{ first_name }},

Tak fordi du har været medlem siden {{ member_since }}. Her er ugens udvalgte
historier fra {{ city }} og resten af landet.
{% for a in articles %}
{{ loop.index }}. {{ a.title }} ({{ a.category }}, {{ a.minutes }} min.)
{{ a.teaser }}
Læs mere: https://news.example.com/{{ a.slug }}
{% endfor %}
Særligt for {{ plan }}-medlemmer: 20 % rabat på arrangementer i {{ city }}.

Afmeld: {{ unsubscribe_url }}
"""


@dataclass(frozen=True)
class SampleNewsletter:
    subject: str
    html: str
    text: str
    attachment_name: str
    attachment: bytes


def sample_newsletter() -> SampleNewsletter:
    """The demo newsletter: ~18 KB of HTML and text per recipient plus a ~2 KB PDF."""
    articles = _articles_literal()
    return SampleNewsletter(
        subject=DEMO_SUBJECT, html=_HTML.replace("ARTICLES", articles, 1),
        text=_TEXT.replace("ARTICLES", articles, 1), attachment_name="katalog.pdf",
        attachment=sample_pdf(),
    )


def sample_pdf(title: str = "Sommerkatalog - medlemstilbud") -> bytes:
    """A small but valid one-page PDF (built by hand: no PDF library needed)."""
    lines = [title, ""] + [f"{i + 1}. {t}".translate(_ASCII) for i, t in enumerate(_TITLES)]
    text = "BT /F1 20 Tf 56 780 Td 24 TL " + " ".join(
        f"({line.replace('(', '[').replace(')', ']')}) '" for line in lines) + " ET"
    objects = [
        b"<< /Type /Catalog /Pages 2 0 R >>",
        b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
        b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 595 842] /Contents 4 0 R "
        b"/Resources << /Font << /F1 5 0 R >> >> >>",
        b"<< /Length %d >>\nstream\n%s\nendstream" % (len(text), text.encode("latin-1")),
        b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>",
    ]
    out = bytearray(b"%PDF-1.4\n%\xe6\xf8\xe5\n")
    offsets = []
    for number, body in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n%s\nendobj\n" % (number, body)
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % off for off in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (
        len(objects) + 1, xref)
    return bytes(out)


# ------------------------------------------------------------------ the counting SMTP sink

@dataclass
class SinkTally:
    """What the sink accepted; updated in the sink's thread, read under ``lock``."""

    by_recipient: Counter[str] = field(default_factory=Counter)
    messages: int = 0
    bytes: int = 0
    connections: int = 0
    lock: threading.Lock = field(default_factory=threading.Lock)


_EHLO = (b"250-sendsystem-demo-sink\r\n250-SIZE 104857600\r\n250-8BITMIME\r\n"
         b"250 SMTPUTF8\r\n")
_MAX_LINE = 4096


class _SinkProtocol(asyncio.Protocol):
    """Just enough ESMTP for a sending client: accept everything, count, keep nothing."""

    def __init__(self, tally: SinkTally) -> None:
        self.tally = tally
        self.transport: asyncio.Transport | None = None
        self.buf = bytearray()
        self.in_data = False
        self.scan = 0
        self.rcpts: list[str] = []

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        with self.tally.lock:
            self.tally.connections += 1
        transport.write(b"220 sendsystem-demo-sink ESMTP\r\n")

    def data_received(self, data: bytes) -> None:
        self.buf += data
        while self.transport is not None and self.buf:
            if self.in_data:
                if not self._end_of_data():
                    return
            else:
                end = self.buf.find(b"\r\n")
                if end < 0:
                    if len(self.buf) > _MAX_LINE:
                        self._reply(b"500 5.5.2 Line too long\r\n", close=True)
                    return
                line = bytes(self.buf[:end])
                del self.buf[:end + 2]
                self._command(line)

    def _end_of_data(self) -> bool:
        buf = self.buf
        if buf.startswith(b".\r\n"):  # an empty message
            end, size = 3, 0
        else:
            found = buf.find(b"\r\n.\r\n", self.scan)
            if found < 0:
                self.scan = max(0, len(buf) - 4)
                return False
            end, size = found + 5, found + 2
        del buf[:end]
        self.in_data, self.scan = False, 0
        with self.tally.lock:
            self.tally.messages += 1
            self.tally.bytes += size
            self.tally.by_recipient.update(self.rcpts)
        self.rcpts = []
        self._reply(b"250 2.0.0 Ok: queued\r\n")
        return True

    def _command(self, line: bytes) -> None:
        verb = line[:4].upper()
        if verb == b"EHLO":
            self._reply(_EHLO)
        elif verb in (b"HELO", b"NOOP"):
            self._reply(b"250 Ok\r\n")
        elif verb == b"MAIL":
            self.rcpts = []
            self._reply(b"250 2.1.0 Ok\r\n")
        elif verb == b"RCPT":
            start, stop = line.find(b"<"), line.find(b">")
            address = line[start + 1:stop] if 0 <= start < stop else line[8:].strip()
            self.rcpts.append(address.decode("utf-8", "replace").lower())
            self._reply(b"250 2.1.5 Ok\r\n")
        elif verb == b"DATA":
            if not self.rcpts:
                self._reply(b"503 5.5.1 Need RCPT first\r\n")
            else:
                self.in_data = True
                self._reply(b"354 End data with <CR><LF>.<CR><LF>\r\n")
        elif verb == b"RSET":
            self.rcpts = []
            self._reply(b"250 2.0.0 Ok\r\n")
        elif verb == b"QUIT":
            self._reply(b"221 2.0.0 Bye\r\n", close=True)
        else:
            self._reply(b"502 5.5.2 Command not implemented\r\n")

    def _reply(self, text: bytes, close: bool = False) -> None:
        if self.transport is not None:
            self.transport.write(text)
            if close:
                self.transport.close()
                self.transport = None

    def connection_lost(self, exc: Exception | None) -> None:
        self.transport = None


class CountingSink:
    """An SMTP sink on 127.0.0.1 in its own thread and event loop, counting per recipient."""

    def __init__(self, port: int = 0) -> None:
        self.tally = SinkTally()
        self._port = port
        self._loop: asyncio.AbstractEventLoop | None = None
        self._server: asyncio.Server | None = None
        self._thread: threading.Thread | None = None

    def start(self) -> CountingSink:
        loop = asyncio.new_event_loop()
        self._loop = loop
        self._server = loop.run_until_complete(loop.create_server(
            lambda: _SinkProtocol(self.tally), "127.0.0.1", self._port, backlog=1000))
        self._port = int(self._server.sockets[0].getsockname()[1])
        self._thread = threading.Thread(target=loop.run_forever, name="demo-smtp-sink",
                                        daemon=True)
        self._thread.start()
        return self

    def stop(self) -> None:
        loop, server, thread = self._loop, self._server, self._thread
        if loop is None or server is None or thread is None:
            return
        self._loop = None

        async def close() -> None:
            server.close()
            await server.wait_closed()

        with contextlib.suppress(Exception):
            asyncio.run_coroutine_threadsafe(close(), loop).result(timeout=5)
        loop.call_soon_threadsafe(loop.stop)
        thread.join(timeout=5)
        loop.close()

    def __enter__(self) -> CountingSink:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    @property
    def relay(self) -> Relay:
        return Relay("127.0.0.1", self._port)

    @property
    def messages(self) -> int:
        return self.tally.messages

    def counts(self) -> Counter[str]:
        with self.tally.lock:
            return Counter(self.tally.by_recipient)


# ------------------------------------------------------------------ config and database

def write_config(path: Path, settings: Mapping[str, Mapping[str, object]]) -> Path:
    """Write a config.ini from {section: {key: value}}."""
    lines = []
    for section, values in settings.items():
        lines.append(f"[{section}]")
        lines.extend(f"{key} = {value}" for key, value in values.items())
        lines.append("")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def cluster_settings(db: DatabaseConfig, work_dir: Path, relays: Sequence[Relay],
                     **overrides: Mapping[str, object]) -> dict[str, dict[str, object]]:
    """config.ini sections for a one-machine cluster (tuned with bench/pipeline.py)."""
    settings: dict[str, dict[str, object]] = {
        "database": {"host": db.host, "port": db.port, "user": db.user,
                     "password": db.password, "name": db.name},
        "paths": {"lock_dir": work_dir / "locks", "journal_dir": work_dir / "journal"},
        # Short horizon and tick: the run lasts under a minute, so the
        # balancer must react within a second rather than plan for 30 s.
        "balancer": {"horizon_seconds": 4, "heartbeat_interval": 1, "heartbeat_timeout": 10,
                     "batch_min": 50, "batch_max": 2000, "tick_seconds": 0.5,
                     "probe_batch": 200},
        "sending": {"relays": ", ".join(str(r) for r in relays), "connections": 8,
                    "messages_per_connection": 1000, "timeout": 30, "retry_min": 5,
                    "retry_max": 60, "max_age": 3600, "envelope_domain": "bounces.example.com",
                    "helo": "demo.example.com"},
        "unsubscribe": {"url": "https://news.example.com/unsubscribe/{token}",
                        "mailto": "unsubscribe@bounces.example.com",
                        "secret": os.urandom(24).hex()},
    }
    for section, values in overrides.items():
        settings.setdefault(section, {}).update(values)
    return settings


def _server(db: DatabaseConfig) -> pymysql.connections.Connection:
    try:
        return pymysql.connect(host=db.host, port=db.port, user=db.user, password=db.password,
                               charset="utf8mb4", autocommit=True, connect_timeout=5)
    except pymysql.err.OperationalError as exc:
        raise DatabaseUnavailable(
            f"MariaDB is not reachable at {db.host}:{db.port} as {db.user!r}: {exc.args[-1]}. "
            "Start it (`make demo` does) or set [database] / SENDSYSTEM_DB_* to point at it."
        ) from None


def create_demo_database(db: DatabaseConfig) -> None:
    """Create ``db.name`` afresh, marked as a demo database; refuse to touch any other."""
    conn = _server(db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT schema_comment FROM information_schema.schemata "
                        "WHERE schema_name = %s", (db.name,))
            row = cur.fetchone()
            if row is not None:
                if row[0] != DB_MARK:
                    raise UserError(
                        f"Database {db.name!r} already exists and was not created by "
                        "`sendsystem demo`; it is left alone. Choose another name with "
                        "SENDSYSTEM_DB_NAME (or [database] name in the config).")
                cur.execute(f"DROP DATABASE `{db.name}`")
            cur.execute(f"CREATE DATABASE `{db.name}` CHARACTER SET utf8mb4 "
                        f"COLLATE utf8mb4_unicode_ci COMMENT %s", (DB_MARK,))
    finally:
        conn.close()


def drop_demo_database(db: DatabaseConfig) -> None:
    conn = _server(db)
    try:
        with conn.cursor() as cur:
            cur.execute("SELECT schema_comment FROM information_schema.schemata "
                        "WHERE schema_name = %s", (db.name,))
            row = cur.fetchone()
            if row is not None and row[0] == DB_MARK:
                cur.execute(f"DROP DATABASE `{db.name}`")
    finally:
        conn.close()


def demo_database_name(config: Config, env: Mapping[str, str] | None = None) -> str:
    """The configured name, unless it is only the default ``sendsystem``."""
    env = os.environ if env is None else env
    name = config.database.name
    if "SENDSYSTEM_DB_NAME" in env or name != DatabaseConfig().name:
        return name
    return DEMO_DB_NAME


# ------------------------------------------------------------------ the cluster

@dataclass(frozen=True)
class RoleSpec:
    command: str            # one of ROLE_COMMANDS
    name: str               # --name
    max_rate: float | None = None

    @property
    def label(self) -> str:
        return self.name


def default_roles(sort_workers: int = 2, send_workers: int = 2) -> list[RoleSpec]:
    return ([RoleSpec("sort-balancer", "balancer-1"), RoleSpec("send-balancer", "balancer-1")]
            + [RoleSpec("sort-worker", f"sort-{i + 1}") for i in range(sort_workers)]
            + [RoleSpec("send-worker", f"send-{i + 1}") for i in range(send_workers)])


@dataclass(frozen=True)
class Restart:
    role: RoleSpec
    code: int
    reason: str  # the last line of its log


class Cluster:
    """Role processes on this machine, each a real ``python -m sendsystem`` subprocess."""

    def __init__(self, config_path: Path, roles: Sequence[RoleSpec], log_dir: Path,
                 *, log_level: str = "INFO",
                 interpreter: Callable[[RoleSpec], Sequence[str]] | None = None,
                 extra_env: Mapping[str, str] | None = None) -> None:
        """``interpreter(role)``: the command that stands for ``python`` for that role
        (benchmarks: ``taskset -c 0 python``, ``python -m cProfile -o FILE``)."""
        self.config_path = config_path
        self.roles = list(roles)
        self.log_dir = log_dir
        self.log_level = log_level
        self.interpreter = interpreter or (lambda role: [sys.executable])
        self.env = {**os.environ, **(extra_env or {})}
        self.procs: dict[RoleSpec, subprocess.Popen[bytes]] = {}
        self.peak_rss_kb: dict[RoleSpec, int] = {}
        self.restarts: list[Restart] = []

    def log_path(self, role: RoleSpec) -> Path:
        return self.log_dir / f"{role.command}-{role.name}.log"

    def start(self) -> None:
        self.log_dir.mkdir(parents=True, exist_ok=True)
        for role in self.roles:
            self._spawn(role)

    def _spawn(self, role: RoleSpec) -> None:
        args = [*self.interpreter(role), "-m", "sendsystem", "--config",
                str(self.config_path), "--log-level", self.log_level, role.command,
                "--name", role.name]
        if role.max_rate is not None:
            args += ["--max-rate", str(role.max_rate)]
        with self.log_path(role).open("ab") as log_file:
            # Own process group: a terminal Ctrl-C reaches only us, and we
            # send each child exactly one SIGTERM (graceful hand-back).
            self.procs[role] = subprocess.Popen(
                args, stdout=log_file, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                env=self.env, process_group=0)

    def died(self) -> list[tuple[RoleSpec, int]]:
        """Roles whose process has exited (they should run until we stop them)."""
        return [(r, p.returncode) for r, p in self.procs.items() if p.poll() is not None]

    def revive(self, max_restarts: int = 5) -> list[tuple[RoleSpec, int]]:
        """Do what cron does in production: start again each role process that exited.

        Returns the roles that died and could NOT be restarted (more than
        ``max_restarts`` times already). Every restart is kept in ``restarts``
        with the last line of the log (the reason) so it can be reported.
        """
        given_up = []
        for role, code in self.died():
            if sum(1 for r in self.restarts if r.role == role) >= max_restarts:
                given_up.append((role, code))
                continue
            self.sample_memory()
            reason = self.tail(role, 1)
            log.info("%s %s exited with status %s (%s); starting it again, as cron would",
                        role.command, role.name, code, reason)
            self.restarts.append(Restart(role, code, reason))
            self._spawn(role)
        return given_up

    def sample_memory(self) -> None:
        """Record each live child's peak RSS (VmHWM) so far; call periodically."""
        for role, proc in self.procs.items():
            if proc.poll() is None:
                kb = peak_rss_kb(proc.pid)
                if kb:
                    self.peak_rss_kb[role] = max(self.peak_rss_kb.get(role, 0), kb)

    def stop(self, timeout: float = 20.0) -> dict[RoleSpec, int | None]:
        """SIGTERM every child once, wait; SIGKILL what does not exit in ``timeout``."""
        self.sample_memory()
        for proc in self.procs.values():
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[RoleSpec, int | None] = {}
        for role, proc in self.procs.items():
            try:
                codes[role] = proc.wait(timeout=max(0.1, deadline - time.monotonic()))
            except subprocess.TimeoutExpired:
                log.warning("%s %s did not stop within %.0fs; killing it", role.command,
                            role.name, timeout)
                proc.kill()
                proc.wait()
                codes[role] = None
        return codes

    def tail(self, role: RoleSpec, lines: int = 8) -> str:
        try:
            text = self.log_path(role).read_text(encoding="utf-8", errors="replace")
        except OSError:
            return ""
        return "\n".join(text.splitlines()[-lines:])


def peak_rss_kb(pid: int) -> int:
    """VmHWM of a live process in KiB (0 when it is gone or /proc is not there)."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii", errors="replace") as fh:
            for line in fh:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1])
    except (OSError, ValueError):
        pass
    return 0


def wait_registered(db: Database, cluster: Cluster, timeout: float = 60.0) -> None:
    """Until every role process has registered and heartbeated once."""
    want = {(r.command.removesuffix("-worker"), r.name) for r in cluster.roles}
    deadline = time.monotonic() + timeout
    while True:
        rows = db.fetchall("workers_all")
        seen = {(w["role"], w["name"]) for w in rows
                if w["state"] in ("running", "standby") and w["heartbeat_age"] is not None}
        if want <= seen:
            return
        dead = cluster.died()
        if dead:
            role, code = dead[0]
            raise UserError(f"{role.command} {role.name} exited with status {code} at start:\n"
                            f"{cluster.tail(role)}")
        if time.monotonic() > deadline:
            raise UserError(f"the role processes did not all register within {timeout:.0f}s "
                            f"(missing: {sorted(want - seen)}); see {cluster.log_dir}")
        time.sleep(0.2)


# ------------------------------------------------------------------ progress

class Progress:
    """One refreshed line on a terminal; a quiet line every few seconds otherwise."""

    def __init__(self, stream: TextIO, total: int, *, tty: bool | None = None,
                 every: float = 5.0) -> None:
        self.stream = stream
        self.total = max(total, 1)
        self.tty = stream.isatty() if tty is None else tty
        self.every = every
        self._last = 0.0
        self.started = time.monotonic()

    def update(self, c: Mapping[str, int], *, force: bool = False) -> None:
        now = time.monotonic()
        done = sum(c.get(s, 0) for s in stats.FINAL)
        sent = c.get("sent", 0)
        elapsed = max(now - self.started, 1e-6)
        rate = sent / elapsed
        eta = (self.total - done) / rate if rate > 0 else None
        merged = c.get("merged", 0) + done - c.get("skipped", 0) - c.get("cancelled", 0)
        tail = (f"{done:>{len(str(self.total))},}/{self.total:,}  sorted {merged:,}  "
                f"{rate:,.0f} msg/s  {elapsed:4.0f}s"
                + (f"  ETA {eta:3.0f}s" if eta is not None and done < self.total else ""))
        if self.tty:
            width = shutil.get_terminal_size((100, 20)).columns
            bar_width = max(10, min(40, width - len(tail) - 4))
            filled = int(bar_width * done / self.total)
            line = f"[{'#' * filled}{'.' * (bar_width - filled)}] {tail}"
            self.stream.write("\r" + line[:width - 1].ljust(width - 1))
            self.stream.flush()
        elif force or now - self._last >= self.every:
            self._last = now
            self.stream.write(f"progress: {tail}\n")
            self.stream.flush()

    def finish(self) -> None:
        if self.tty:
            self.stream.write("\n")
            self.stream.flush()


# ------------------------------------------------------------------ the demo itself

class DemoInterrupted(SendSystemError):
    """Ctrl-C: the cluster was stopped cleanly; exit like a shell does after SIGINT."""

    exit_code = 130


@dataclass(frozen=True)
class DemoOptions:
    recipients: int = 20_000
    relay: Relay | None = None
    keep: bool = False
    work_dir: Path | None = None
    timeout: float | None = None   # default: generous, from the recipient count


@dataclass(frozen=True)
class DemoResult:
    ok: bool
    delivered: int
    duplicates: int
    missing: int
    seconds: float
    report: Path


def run_demo(config: Config, options: DemoOptions, out: TextIO = sys.stdout) -> DemoResult:
    """Run the demo end to end; print progress and the summary to ``out``."""
    if options.recipients < 1:
        raise UserError("--recipients must be at least 1.")
    db_config = DatabaseConfig(host=config.database.host, port=config.database.port,
                               user=config.database.user, password=config.database.password,
                               name=demo_database_name(config))
    work = options.work_dir or Path(tempfile.mkdtemp(prefix="sendsystem-demo-"))
    work.mkdir(parents=True, exist_ok=True)
    say = _printer(out)
    # The demo prints its own story; routine INFO lines from this process
    # (migrations applied, newsletter released) would only interleave with it.
    for name in ("sendsystem.db", "sendsystem.admin", "sendsystem.demo"):
        logging.getLogger(name).setLevel(max(logging.WARNING, logging.getLogger().level))
    say(f"SendSystem demo: {options.recipients:,} recipients, database {db_config.name!r} on "
        f"{db_config.host}:{db_config.port}, work directory {work}")
    create_demo_database(db_config)
    sink: CountingSink | None = None
    cluster: Cluster | None = None
    database: Database | None = None
    try:
        if options.relay is None:
            sink = CountingSink().start()
            relay = sink.relay
            say(f"SMTP sink (counts per recipient) on {relay}")
        else:
            relay = options.relay
            say(f"Relaying to {relay} (an external relay: delivery is checked in the database)")
        config_path = write_config(work / "config.ini", cluster_settings(db_config, work,
                                                                         [relay]))
        demo_config = load_config(config_path, env={})
        database = Database(demo_config.database)
        database.init_schema()
        emails = _set_up_newsletter(database, work, options.recipients, say)
        cluster = Cluster(config_path, default_roles(), work / "logs")
        cluster.start()
        wait_registered(database, cluster)
        say("Cluster up: sort-balancer, send-balancer, sort-1, sort-2, send-1, send-2 "
            f"(logs in {work / 'logs'})")
        nid, created = admin.enqueue(database, LIST_NAME, TEMPLATE_NAME,
                                     attachments=(work / "katalog.pdf",))
        started = time.monotonic()
        timeout = options.timeout or max(120.0, options.recipients / 50)
        finished = _follow(database, cluster, nid, created, timeout, out)
        seconds = time.monotonic() - started
        if finished:
            _wait_done(database, nid, 5.0)
        codes = cluster.stop()
        restarts = cluster.restarts
        cluster = None
        facts = stats.newsletter_stats(database, nid)
        report = work / "report.html"
        from .report import render_html
        report.write_text(render_html(facts), encoding="utf-8")
        result = _summary(say, facts, emails, sink, seconds, finished, report, codes,
                          restarts)
        if options.keep:
            say(f"Kept database {db_config.name!r}; look around with "
                f"`sendsystem --config {config_path} status`.")
        return result
    except KeyboardInterrupt:
        out.write("\nInterrupted: stopping the cluster...\n")
        raise
    finally:
        if cluster is not None:
            cluster.stop()
        if sink is not None:
            sink.stop()
        if database is not None:
            database.close()
        if not options.keep:
            with contextlib.suppress(Exception):
                drop_demo_database(db_config)


def _printer(out: TextIO) -> Any:
    def say(text: str) -> None:
        out.write(text + "\n")
        out.flush()
    return say


def _set_up_newsletter(database: Database, work: Path, n: int, say: Any) -> list[str]:
    t0 = time.monotonic()
    csv_path = work / "subscribers.csv"
    emails = write_subscribers_csv(csv_path, n)
    admin.create_list(database, LIST_NAME, "Nordlys Nyt <nyhedsbrev@news.example.com>")
    admin.import_csv(database, LIST_NAME, csv_path)
    sample = sample_newsletter()
    (work / "newsletter.html").write_text(sample.html, encoding="utf-8")
    (work / "newsletter.txt").write_text(sample.text, encoding="utf-8")
    (work / sample.attachment_name).write_bytes(sample.attachment)
    admin.add_template(database, TEMPLATE_NAME, sample.subject, work / "newsletter.html",
                       work / "newsletter.txt")
    say(f"Created list {LIST_NAME!r} with {n:,} subscribers (5 merge fields), template "
        f"{TEMPLATE_NAME!r} and a {len(sample.attachment):,}-byte PDF in "
        f"{time.monotonic() - t0:.1f}s")
    return emails


def _wait_done(database: Database, nid: int, seconds: float) -> None:
    """Give the send balancer a few ticks to mark the newsletter done (for the report)."""
    deadline = time.monotonic() + seconds
    while admin.get_newsletter(database, nid)["state"] != "done" and \
            time.monotonic() < deadline:
        time.sleep(0.2)


def _follow(database: Database, cluster: Cluster, nid: int, total: int, timeout: float,
            out: TextIO) -> bool:
    """Show progress until every message is final; False on timeout or a dead role."""
    progress = Progress(sys.stderr if out is sys.stdout else out, total)
    deadline = time.monotonic() + timeout
    try:
        while True:
            c = stats.counts(database, nid)
            progress.update(c)
            cluster.sample_memory()
            if sum(c[s] for s in stats.FINAL) >= total:
                progress.update(c, force=True)
                return True
            dead = cluster.revive(max_restarts=50)
            if dead:
                role, code = dead[0]
                progress.finish()
                out.write(f"{role.command} {role.name} keeps exiting (status {code}); "
                          f"giving up:\n{cluster.tail(role)}\n")
                return False
            if time.monotonic() > deadline:
                progress.finish()
                out.write(f"Timed out after {timeout:.0f}s; see {cluster.log_dir}\n")
                return False
            time.sleep(0.25)
    finally:
        progress.finish()


def _summary(say: Any, facts: Mapping[str, Any], emails: list[str], sink: CountingSink | None,
             seconds: float, finished: bool, report: Path,
             codes: Mapping[RoleSpec, int | None], restarts: Sequence[Restart]) -> DemoResult:
    n = len(emails)
    c = facts["counts"]
    if sink is not None:
        got = sink.counts()
        expected = {e.lower() for e in emails}
        delivered = sum(1 for e in expected if got.get(e, 0) >= 1)
        duplicates = sum(v - 1 for e, v in got.items() if v > 1)
        unexpected = sum(v for e, v in got.items() if e not in expected)
        checked = "checked against the SMTP sink"
    else:
        delivered, duplicates, unexpected = int(c["sent"]), 0, 0
        checked = "from the database (external relay: duplicates cannot be seen)"
    missing = n - delivered
    ok = finished and missing == 0 and duplicates == 0 and unexpected == 0 and \
        int(c["sent"]) == n
    say("")
    say("Summary")
    say(f"  delivered      {delivered:,} of {n:,} recipients, {checked}")
    say(f"  duplicates     {duplicates:,}   missing {missing:,}   unexpected {unexpected:,}")
    say("  states         " + ", ".join(f"{k} {v:,}" for k, v in c.items() if v))
    rate = int(c["sent"]) / seconds if seconds > 0 else 0.0
    say(f"  time           {seconds:.1f}s from enqueue to the last message  "
        f"({rate:,.0f} messages/s, {rate * 3600 / 1e6:.2f} M/hour)")
    if sink is not None and sink.tally.messages:
        say(f"  message size   {sink.tally.bytes / sink.tally.messages / 1024:.1f} KB on "
            f"average over {sink.tally.connections} SMTP connections")
    for role in ("sort", "send"):
        workers = [w for w in facts["workers"] if w["role"] == role]
        total = sum(w["messages"] for w in workers) or 1
        shares = "   ".join(f"{w['name']} {w['messages']:,} ({w['messages'] / total:.0%}"
                             + (f", {w['rate']:,.0f}/s)" if w["rate"] else ")")
                             for w in workers)
        say(f"  {role} workers   {shares or '-'}")
    bad = {f"{r.command} {r.name}": code for r, code in codes.items() if code != 0}
    if bad:
        say(f"  exit status    not clean: {bad}")
    for r in restarts:
        say(f"  restarted      {r.role.command} {r.role.name} after exit status {r.code}: "
            f"{r.reason[:160]}")
    say(f"  HTML report    {report}")
    say("Result: " + ("OK - every recipient got exactly one message." if ok else
                      "FAILED - not every recipient got exactly one message."))
    return DemoResult(ok=ok, delivered=delivered, duplicates=duplicates, missing=missing,
                      seconds=seconds, report=report)
