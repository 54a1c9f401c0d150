"""config.ini parsed once into frozen dataclasses.

The parsed :class:`Config` is passed explicitly to whatever needs it; there
are no module-level settings. Database settings may be overridden by the
``SENDSYSTEM_DB_*`` environment variables and the signing secret by
``SENDSYSTEM_SECRET`` so that secrets need not live in the file.
"""

from __future__ import annotations

import configparser
import dataclasses
import difflib
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from .errors import ConfigError

DEFAULT_CONFIG = "config.ini"
# Unsubscribe tokens and VERP addresses are HMACs under the secret: a short
# or guessable one lets anyone unsubscribe anyone or forge bounces. 32
# characters of token_urlsafe carry 192 bits.
SECRET_MIN = 32
SECRET_RECIPE = "python3 -c 'import secrets; print(secrets.token_urlsafe(32))'"


@dataclass(frozen=True)
class DbHost:
    """One database node of ``[database] host``."""

    host: str
    port: int

    def __str__(self) -> str:
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"


@dataclass(frozen=True)
class DatabaseConfig:
    # One host, or a comma-separated list of nodes (a Galera cluster):
    # ``host[:port], host[:port]``; a node without a port uses ``port``.
    host: str = "127.0.0.1"
    port: int = 3306
    user: str = "root"
    password: str = ""
    name: str = "sendsystem"
    # Seconds to wait for one node to answer before trying the next.
    connect_timeout: float = 3.0
    # The server drops a connection idle this long inside a transaction
    # (a hung client would otherwise hold its row locks, the lease's too).
    idle_transaction_timeout: float = 10.0
    # Seconds a role process waits for one reply (or to send one request)
    # before it treats its connection as dead. A dead host or a partition
    # sends nothing, not even a reset, so without this a query would wait for
    # ever. Admin commands do not use it (db init may run long ALTERs).
    read_timeout: float = 10.0

    @property
    def hosts(self) -> tuple[DbHost, ...]:
        return parse_db_hosts(self.host, self.port)


@dataclass(frozen=True)
class PathsConfig:
    # Never under /tmp: another local user could pre-create or symlink a
    # world-writable path and so hold our locks or read and feed our journal.
    # /var/lib/sendsystem is the sendsystem user's own state directory (like
    # /var/lib/postfix or /var/lib/mailman3; systemd's StateDirectory=), and it
    # survives a reboot, which the journal must: replaying it is what stops a
    # message the relay accepted from being sent again.
    lock_dir: Path = Path("/var/lib/sendsystem/locks")
    journal_dir: Path = Path("/var/lib/sendsystem/journal")


@dataclass(frozen=True)
class BalancerConfig:
    horizon_seconds: float = 30.0
    # 1 s (was 2): a worker's measured rate reaches the balancer with its
    # heartbeat, so after its probe batch a worker waits up to this long for
    # its next batch (bench/pipeline.py's value; one small UPDATE a second).
    heartbeat_interval: float = 1.0
    heartbeat_timeout: float = 15.0
    batch_min: int = 50
    batch_max: int = 2000
    # How often a balancer runs one assignment tick. 0.5 s (was 1): a worker
    # gets at most batch_max a tick, so batch_max / tick_seconds (4,000/s) must
    # stay above the fastest worker's rate (a send worker does ~2,500/s).
    tick_seconds: float = 0.5
    # The first batch a worker with no measured rate yet receives. 200 (was 50):
    # 50 messages last ~25 ms at send speed, too short to measure a rate.
    probe_batch: int = 200
    # Merged messages of a newsletter waiting to be sent beyond which the sort
    # balancer hands out no more of its merging (0: no limit). Without it the
    # sort stage, the faster one, runs far ahead: on 2 cores a 1,000,000 send
    # had 800,000 bodies merged while the send workers, short of CPU, did 550/s.
    # 100,000 keeps every send worker of a big cluster supplied for a horizon.
    merged_backlog_max: int = 100_000


TLS_MODES = ("none", "starttls", "tls")
AUTH_MODES = ("auto", "plain", "login")


@dataclass(frozen=True)
class Relay:
    """One relay: ``[relay NAME]`` sections, or an unnamed ``[sending] relays`` entry.

    An unnamed relay is plain SMTP with the ``[sending]`` defaults, as before.
    ``None`` for connections / messages_per_connection / helo means "the
    ``[sending]`` value"; ``rate`` and ``daily_quota`` hold for the whole
    cluster (sendsystem/relaylimits.py).
    """

    host: str
    port: int
    name: str = ""  # "" for an unnamed relay: then it is called host:port
    group: str = ""  # "" = the default group
    tls: str = "none"  # none | starttls | tls (implicit TLS, port 465)
    verify: bool = True  # certificate chain and host name
    ca_file: Path | None = None
    username: str = ""
    password: str = field(default="", repr=False)
    auth: str = "auto"  # auto | plain | login
    helo: str | None = None
    connections: int | None = None
    messages_per_connection: int | None = None
    idle_timeout: float = 30.0  # a connection idle longer is closed and opened anew
    weight: float = 1.0
    rate: float | None = None  # messages/s, cluster-wide
    daily_quota: int | None = None  # messages per day (database clock), cluster-wide

    def __str__(self) -> str:
        if self.name:
            return self.name
        return f"[{self.host}]:{self.port}" if ":" in self.host else f"{self.host}:{self.port}"

    @property
    def limited(self) -> bool:
        return self.rate is not None or self.daily_quota is not None


# The keys of a [relay NAME] section, with their types.
RELAY_KEYS: Mapping[str, type] = {
    "host": str, "port": int, "group": str, "tls": str, "verify": bool, "ca_file": Path,
    "username": str, "password": str, "auth": str, "helo": str, "connections": int,
    "messages_per_connection": int, "idle_timeout": float, "weight": float, "rate": float,
    "daily_quota": int,
}
RELAY_SECTION = re.compile(r"relay\s+([A-Za-z0-9][A-Za-z0-9_.-]{0,63})")


@dataclass(frozen=True)
class SendingConfig:
    relays: tuple[Relay, ...] = (Relay("127.0.0.1", 25),)
    # 8 (was 4): the unconfirmed window defaults to the connections, and each
    # of its slots waits for the commit of its 250, so the window, not the
    # CPU, bounds one send worker (bench/pipeline.py --send-only; README).
    connections: int = 8
    messages_per_connection: int = 1000
    timeout: float = 30.0
    retry_min: float = 60.0
    retry_max: float = 3600.0
    max_age: float = 4 * 24 * 3600.0
    envelope_domain: str = "bounces.example.com"
    domain_rates: Mapping[str, float] = field(default_factory=dict)
    # A newsletter pauses itself when this share of its finished messages
    # failed (after at least failure_pause_min finished), so a broken list
    # or a blacklisted relay does not burn the sender's reputation.
    failure_pause_ratio: float = 0.5
    failure_pause_min: int = 200
    helo: str = ""
    # A relay that refuses connections or answers 421 is set aside for
    # relay_backoff_min seconds, doubling up to relay_backoff_max.
    relay_backoff_min: float = 5.0
    relay_backoff_max: float = 300.0
    # Most messages one send worker may have whose outcome the database does
    # not know yet: on the wire, or accepted (250) and not yet committed. Cut
    # off from the database, a worker stops once this many are out; they are
    # the only ones a peer can send again. 0 = connections x relays.
    unconfirmed_window: int = 0


@dataclass(frozen=True)
class UnsubscribeConfig:
    url: str = "https://lists.example.com/unsubscribe/{token}"
    mailto: str = "unsubscribe@bounces.example.com"
    secret: str = ""


@dataclass(frozen=True)
class DkimConfig:
    domain: str = ""
    selector: str = ""
    key_file: Path | None = None

    @property
    def enabled(self) -> bool:
        return self.key_file is not None


BOUNCE_SCOPES = ("list", "address")


@dataclass(frozen=True)
class BounceConfig:
    hard_limit: int = 1
    soft_limit: int = 3
    soft_window_days: int = 7
    # What a bounce or complaint with signed evidence ends: "list" = only the
    # subscription of the list the message was sent for; "address" = every
    # subscription of the address (and a complaint blocks it everywhere).
    scope: str = "list"


@dataclass(frozen=True)
class SortingConfig:
    # Customer templates render in a child process of the sort worker under
    # these limits (render_child.py): CPU seconds per render, the child's
    # address space in MB, and how many render failures in a row pause a
    # newsletter (0: never). hoist_constants: what a template prints the same
    # for every recipient is rendered once per newsletter (hoisting.py).
    render_timeout: float = 2.0
    render_memory_mb: int = 1024
    render_failures_pause: int = 5
    hoist_constants: bool = True


@dataclass(frozen=True)
class CheckConfig:
    """`sendsystem check` thresholds (sendsystem/monitoring.py says where they come from).

    Rates are percentages of the messages delivered (sent + bounced) of the
    last finished newsletter; they are judged only from ``min_delivered`` on.
    """

    stall_minutes: float = 15.0
    deferred_minutes: float = 60.0
    bounce_warn: float = 2.0
    bounce_crit: float = 5.0
    complaint_warn: float = 0.1
    complaint_crit: float = 0.3
    min_delivered: int = 100


@dataclass(frozen=True)
class WebhooksConfig:
    # Bounce and complaint webhooks of ESPs (sendsystem/bounce/webhooks.py),
    # served by the unsubscribe web app under /webhooks/<provider>. Each is off
    # until enabled; an enabled provider without its secret is a config error.
    ses_enabled: bool = False
    # SNS signing certificates are fetched only over HTTPS from these hosts;
    # '*' stands for one DNS label (the region).
    sns_cert_hosts: str = "sns.*.amazonaws.com, sns.*.amazonaws.com.cn"
    # SNS topic ARNs accepted (comma-separated); empty: any topic.
    sns_topic_arns: str = ""
    sendgrid_enabled: bool = False
    # The "Verification Key" SendGrid shows for the signed Event Webhook
    # (base64 of the DER public key, P-256).
    sendgrid_public_key: str = ""
    mailgun_enabled: bool = False
    # Mailgun's "HTTP webhook signing key".
    mailgun_signing_key: str = ""
    # Seconds a Mailgun signature stays acceptable (replayed requests are refused).
    mailgun_max_age: int = 900
    postmark_enabled: bool = False
    # The basic-auth user and password put in the webhook URL at Postmark
    # (https://user:password@host/webhooks/postmark).
    postmark_user: str = ""
    postmark_password: str = ""

    def cert_host_patterns(self) -> tuple[str, ...]:
        return tuple(h.strip().lower() for h in self.sns_cert_hosts.split(",") if h.strip())

    def topic_arns(self) -> tuple[str, ...]:
        return tuple(a.strip() for a in self.sns_topic_arns.split(",") if a.strip())


TRACK_KINDS = ("opens", "clicks")


@dataclass(frozen=True)
class TrackingConfig:
    """Opt-in open and click tracking (sendsystem/tracking/).

    ``enabled`` is the global switch and wins over every list and newsletter
    setting: off, no sort worker rewrites a link or adds a pixel (the web app
    still redirects the links of mail already sent, and records nothing).
    """

    enabled: bool = False
    # Where /c/<token> (clicks) and /o/<token> (opens) are served: the same web
    # app as the unsubscribe links, e.g. https://lists.example.com.
    base_url: str = ""
    # Rewrite the http(s) links of the text part too (off: only the HTML part).
    track_text_links: bool = False
    # Hits the database could not take are appended here (one file per web
    # worker process, fsync'd) and replayed when it is back. Local disk.
    spool_dir: Path = Path("/var/lib/sendsystem/tracking-spool")
    # Each web worker writes its hits in one multi-row INSERT this often, or
    # sooner when flush_rows are waiting.
    flush_interval: float = 0.5
    flush_rows: int = 2000
    # Machine hits (counted apart): within machine_seconds of delivery, and a
    # recipient's clicks on burst_links or more distinct links within
    # burst_seconds (a link scanner opening every link at once).
    machine_seconds: float = 10.0
    burst_links: int = 3
    burst_seconds: float = 2.0
    # Distinct URLs tracked per newsletter (per sort worker); links beyond it
    # (e.g. a URL that carries per-recipient data) are left as written.
    max_links: int = 1000

    @property
    def click_prefix(self) -> str:
        return self.base_url.rstrip("/") + "/c/"

    @property
    def open_prefix(self) -> str:
        return self.base_url.rstrip("/") + "/o/"


def parse_track(text: str, where: str = "--track") -> frozenset[str]:
    """``opens,clicks`` (either, both, or ``none``/empty) as a set of kinds."""
    kinds: set[str] = set()
    for item in text.replace(";", ",").split(","):
        item = item.strip().lower()
        if not item or item in ("none", "off", "no"):
            continue
        if item in ("open", "click", "all", "yes", "on"):
            item = {"open": "opens", "click": "clicks"}.get(item, item)
        if item in ("all", "yes", "on"):
            kinds.update(TRACK_KINDS)
        elif item in TRACK_KINDS:
            kinds.add(item)
        else:
            raise ConfigError(f"{where}: {item!r} is not a tracking kind; use opens, clicks, "
                              "opens,clicks or none")
    return frozenset(kinds)


def format_track(kinds: frozenset[str] | set[str]) -> str:
    """The stored form of a set of tracking kinds: ``opens,clicks``, ``opens``, or ``""``."""
    return ",".join(k for k in TRACK_KINDS if k in kinds)


@dataclass(frozen=True)
class Config:
    database: DatabaseConfig = DatabaseConfig()
    paths: PathsConfig = PathsConfig()
    balancer: BalancerConfig = BalancerConfig()
    sending: SendingConfig = SendingConfig()
    unsubscribe: UnsubscribeConfig = UnsubscribeConfig()
    dkim: DkimConfig = DkimConfig()
    bounce: BounceConfig = BounceConfig()
    sorting: SortingConfig = SortingConfig()
    check: CheckConfig = CheckConfig()
    webhooks: WebhooksConfig = WebhooksConfig()
    tracking: TrackingConfig = TrackingConfig()
    source: str = "(defaults)"

    def secret(self) -> bytes:
        """The HMAC secret for unsubscribe tokens and VERP addresses.

        Every command that signs or verifies calls this before it does
        anything else, so a missing or short secret stops it at start-up.
        """
        secret = self.unsubscribe.secret
        if len(secret) < SECRET_MIN:
            what = (f"is {len(secret)} characters, fewer than {SECRET_MIN}" if secret
                    else "is not set")
            raise ConfigError(
                f"The signing secret ([unsubscribe] secret in {self.source}, or "
                f"$SENDSYSTEM_SECRET) {what}. Set it to a random string of at least "
                f"{SECRET_MIN} characters, the same on every server; make one with: "
                f"{SECRET_RECIPE}"
            )
        return secret.encode()


def _get(cp: configparser.ConfigParser, section: str, key: str, default: object, kind: type,
         source: str) -> object:
    if not cp.has_option(section, key):
        return default
    raw = cp.get(section, key).strip()
    try:
        if kind is bool:
            return cp.getboolean(section, key)
        if kind is Path:
            return Path(raw) if raw else default
        return kind(raw)
    except ValueError:
        raise ConfigError(
            f"{source}: [{section}] {key} = {raw!r} is not a valid {kind.__name__}"
        ) from None


def _section(cp: configparser.ConfigParser, section: str, cls: type, source: str,
             skip: tuple[str, ...] = ()) -> dict[str, object]:
    defaults = cls()
    values: dict[str, object] = {}
    for f in dataclasses.fields(cls):
        name = f.name
        if name in skip:
            continue
        default = getattr(defaults, name)
        kind = type(default) if default is not None else Path
        if isinstance(default, Path):
            kind = Path
        values[name] = _get(cp, section, name, default, kind, source)
    return values


def parse_relays(text: str, source: str = "config") -> tuple[Relay, ...]:
    relays = []
    for item in text.replace(";", ",").split(","):
        item = item.strip()
        if not item:
            continue
        host, sep, port = item.rpartition(":")
        if not sep or not port.isdigit():
            raise ConfigError(f"{source}: relay {item!r} must be host:port")
        relays.append(Relay(host.strip("[]"), int(port)))
    if not relays:
        raise ConfigError(f"{source}: [sending] relays lists no relay (host:port, host:port)")
    return tuple(relays)


def parse_relay_sections(cp: configparser.ConfigParser, source: str,
                         env: Mapping[str, str]) -> tuple[Relay, ...]:
    """The ``[relay NAME]`` sections, in file order.

    The password may come from ``$SENDSYSTEM_RELAY_<NAME>_PASSWORD`` (NAME
    upper-cased, '-' and '.' as '_') so that it need not be in the file.
    """
    relays = []
    for section in cp.sections():
        m = RELAY_SECTION.fullmatch(section)
        if m is None or section in SECTIONS:
            continue
        name = m.group(1)
        values: dict[str, object] = {"name": name}
        for key, kind in RELAY_KEYS.items():
            default = getattr(Relay, key, None) if key not in ("host", "port") else None
            values[key] = _get(cp, section, key, default, kind, source)
        if not values["host"]:
            raise ConfigError(f"{source}: [{section}] needs host = (the relay's host name)")
        tls = str(values["tls"]).lower()
        if tls not in TLS_MODES:
            raise ConfigError(f"{source}: [{section}] tls = {tls!r}; use none, starttls "
                              "(port 587 or 25) or tls (implicit TLS, port 465)")
        values["tls"] = tls
        if values["port"] is None:
            values["port"] = 465 if tls == "tls" else 587 if values["username"] else 25
        auth = str(values["auth"]).lower()
        if auth not in AUTH_MODES:
            raise ConfigError(f"{source}: [{section}] auth = {auth!r}; use auto, plain or login")
        values["auth"] = auth
        var = "SENDSYSTEM_RELAY_" + re.sub(r"[^A-Za-z0-9]", "_", name).upper() + "_PASSWORD"
        if env.get(var):
            values["password"] = env[var]
        if values["password"] and not values["username"]:
            raise ConfigError(f"{source}: [{section}] has a password but no username")
        if values["username"] and tls == "none":
            raise ConfigError(f"{source}: [{section}] sends a password (username = ...) over "
                              "plain SMTP; set tls = starttls or tls")
        for key in ("connections", "messages_per_connection", "daily_quota"):
            if values[key] is not None and int(values[key]) < 1:  # type: ignore[call-overload]
                raise ConfigError(f"{source}: [{section}] {key} must be at least 1")
        for key in ("rate", "weight", "idle_timeout"):
            if values[key] is not None and not float(values[key]) > 0:  # type: ignore[arg-type]
                raise ConfigError(f"{source}: [{section}] {key} must be above 0")
        values["helo"] = values["helo"] or None
        relays.append(Relay(**values))  # type: ignore[arg-type]
    return tuple(relays)


def parse_db_hosts(text: str, default_port: int, source: str = "config") -> tuple[DbHost, ...]:
    """``host[:port], host[:port], ...``; IPv6 addresses in brackets (``[::1]:3306``)."""
    hosts = []
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        if item.startswith("["):
            host, bracket, rest = item[1:].partition("]")
            if not bracket or (rest and not rest.startswith(":")):
                raise ConfigError(f"{source}: database host {item!r} must be [ipv6]:port")
            port_text = rest[1:]
        elif item.count(":") == 1:
            host, _, port_text = item.partition(":")
        elif ":" in item:
            raise ConfigError(f"{source}: database host {item!r}: put an IPv6 address in "
                              "brackets, e.g. [::1]:3306")
        else:
            host, port_text = item, ""
        if not host or (port_text and not port_text.isdigit()):
            raise ConfigError(f"{source}: database host {item!r} must be host or host:port")
        port = int(port_text) if port_text else default_port
        if not 0 < port < 65536:
            raise ConfigError(f"{source}: database host {item!r}: port out of range")
        hosts.append(DbHost(host, port))
    if not hosts:
        raise ConfigError(f"{source}: [database] host names no host "
                          "(host[:port], host[:port], ...)")
    return tuple(hosts)


def parse_domain_rates(text: str, source: str = "config") -> dict[str, float]:
    rates: dict[str, float] = {}
    for item in text.split(","):
        item = item.strip()
        if not item:
            continue
        domain, sep, rate = item.partition(":")
        try:
            rates[domain.strip().lower()] = float(rate)
        except ValueError:
            raise ConfigError(
                f"{source}: domain_rates entry {item!r} must be domain:messages_per_second"
            ) from None
        if not sep:
            raise ConfigError(f"{source}: domain_rates entry {item!r} must be domain:rate")
    return rates


# Every section config.ini may have, and the dataclass whose fields are its keys.
SECTIONS: Mapping[str, type] = {
    "database": DatabaseConfig,
    "paths": PathsConfig,
    "balancer": BalancerConfig,
    "sending": SendingConfig,
    "unsubscribe": UnsubscribeConfig,
    "dkim": DkimConfig,
    "bounce": BounceConfig,
    "sorting": SortingConfig,
    "check": CheckConfig,
    "webhooks": WebhooksConfig,
    "tracking": TrackingConfig,
}


def _nearest(word: str, choices: list[str]) -> str:
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    return f"; did you mean {close[0]!r}?" if close else f"; valid: {', '.join(sorted(choices))}"


def check_known_keys(cp: configparser.ConfigParser, source: str) -> None:
    """An unknown section or key is an error naming it and the nearest valid one.

    A typo (``conections = 8``) would otherwise be ignored silently and the
    default used, which an operator only finds out from the throughput.
    """
    for section in cp.sections():
        cls = SECTIONS.get(section)
        if section.startswith("relay") and cls is None:
            if not RELAY_SECTION.fullmatch(section):
                raise ConfigError(f"{source}: [{section}]: a relay section is [relay NAME], "
                                  "NAME being letters, digits, '.', '_' or '-' (at most 64)")
            keys = list(RELAY_KEYS)
        elif cls is None:
            raise ConfigError(f"{source}: unknown section [{section}]"
                              f"{_nearest(section, [*SECTIONS, 'relay NAME'])}")
        else:
            keys = [f.name for f in dataclasses.fields(cls)]
        for key in cp.options(section):
            if key not in keys:
                raise ConfigError(f"{source}: [{section}] unknown key {key!r}"
                                  f"{_nearest(key, keys)}")


def load_config(path: str | os.PathLike[str] | None = None,
                env: Mapping[str, str] | None = None) -> Config:
    """Read config.ini (``path``, else $SENDSYSTEM_CONFIG, else ./config.ini).

    A missing file is an error when it was named explicitly; the implicit
    ./config.ini may be absent, and then the defaults apply.
    """
    env = os.environ if env is None else env
    explicit = path is not None or "SENDSYSTEM_CONFIG" in env
    chosen = Path(path if path is not None else env.get("SENDSYSTEM_CONFIG", DEFAULT_CONFIG))
    cp = configparser.ConfigParser(inline_comment_prefixes=(";", "#"), interpolation=None)
    if chosen.exists():
        try:
            cp.read(chosen, encoding="utf-8")
        except configparser.Error as exc:
            raise ConfigError(f"{chosen}: cannot parse: {exc}") from None
        source = str(chosen)
        check_known_keys(cp, source)
    elif explicit:
        raise ConfigError(
            f"Config file {chosen} does not exist. Copy config.ini.example there and edit it."
        )
    else:
        source = "(defaults)"

    db = _section(cp, "database", DatabaseConfig, source)
    for key, kind in (("host", str), ("port", int), ("user", str), ("password", str),
                      ("name", str)):
        var = f"SENDSYSTEM_DB_{key.upper()}"
        if var in env:
            try:
                db[key] = kind(env[var])
            except ValueError:
                raise ConfigError(f"${var} = {env[var]!r} is not a valid {kind.__name__}") from None

    sending = _section(cp, "sending", SendingConfig, source, skip=("relays", "domain_rates"))
    named = parse_relay_sections(cp, source, env)
    if cp.has_option("sending", "relays"):
        sending["relays"] = parse_relays(cp.get("sending", "relays"), source) + named
    else:
        sending["relays"] = named or SendingConfig().relays
    sending["domain_rates"] = (parse_domain_rates(cp.get("sending", "domain_rates"), source)
                               if cp.has_option("sending", "domain_rates") else {})

    unsub = _section(cp, "unsubscribe", UnsubscribeConfig, source)
    if env.get("SENDSYSTEM_SECRET"):
        unsub["secret"] = env["SENDSYSTEM_SECRET"]

    dkim = _section(cp, "dkim", DkimConfig, source, skip=("key_file",))
    key_file = cp.get("dkim", "key_file", fallback="").strip()
    dkim["key_file"] = Path(key_file) if key_file else None

    config = Config(
        database=DatabaseConfig(**db),  # type: ignore[arg-type]
        paths=PathsConfig(**_section(cp, "paths", PathsConfig, source)),  # type: ignore[arg-type]
        balancer=BalancerConfig(**_section(cp, "balancer", BalancerConfig, source)),  # type: ignore[arg-type]
        sending=SendingConfig(**sending),  # type: ignore[arg-type]
        unsubscribe=UnsubscribeConfig(**unsub),  # type: ignore[arg-type]
        dkim=DkimConfig(**dkim),  # type: ignore[arg-type]
        bounce=BounceConfig(**_section(cp, "bounce", BounceConfig, source)),  # type: ignore[arg-type]
        sorting=SortingConfig(**_section(cp, "sorting", SortingConfig, source)),  # type: ignore[arg-type]
        check=CheckConfig(**_section(cp, "check", CheckConfig, source)),  # type: ignore[arg-type]
        webhooks=WebhooksConfig(**_section(cp, "webhooks", WebhooksConfig, source)),  # type: ignore[arg-type]
        tracking=TrackingConfig(**_section(cp, "tracking", TrackingConfig, source)),  # type: ignore[arg-type]
        source=source,
    )
    _validate(config)
    return config


def _validate(config: Config) -> None:
    parse_db_hosts(config.database.host, config.database.port, config.source)
    if config.database.connect_timeout <= 0 or config.database.idle_transaction_timeout <= 0:
        raise ConfigError(f"{config.source}: [database] connect_timeout and "
                          "idle_transaction_timeout must be positive")
    b = config.balancer
    if b.batch_min < 1 or b.batch_max < b.batch_min:
        raise ConfigError(f"{config.source}: need 1 <= batch_min <= batch_max in [balancer]")
    if b.merged_backlog_max < 0:
        raise ConfigError(f"{config.source}: [balancer] merged_backlog_max must be 0 (no limit) "
                          "or more")
    if b.heartbeat_timeout <= b.heartbeat_interval:
        raise ConfigError(
            f"{config.source}: [balancer] heartbeat_timeout must exceed heartbeat_interval"
        )
    if b.heartbeat_timeout <= 2 * b.tick_seconds:
        # The active balancer renews its lease (heartbeat_timeout long) every tick.
        raise ConfigError(
            f"{config.source}: [balancer] heartbeat_timeout must be more than twice tick_seconds"
        )
    s = config.sending
    names = [str(r) for r in s.relays]
    dupes = sorted({n for n in names if names.count(n) > 1})
    if dupes:
        raise ConfigError(f"{config.source}: relay {dupes[0]} is listed twice")
    if s.unconfirmed_window < 0:
        raise ConfigError(f"{config.source}: [sending] unconfirmed_window must be 0 "
                          "(connections x relays) or a positive number of messages")
    if s.connections < 1 or s.messages_per_connection < 1:
        raise ConfigError(f"{config.source}: [sending] connections and "
                          "messages_per_connection must be at least 1")
    if s.retry_min <= 0 or s.retry_max < s.retry_min:
        raise ConfigError(f"{config.source}: need 0 < retry_min <= retry_max in [sending]")
    if config.bounce.scope not in BOUNCE_SCOPES:
        raise ConfigError(f"{config.source}: [bounce] scope = {config.bounce.scope!r}; use "
                          "'list' (only the list the message was for) or 'address' "
                          "(every list of the address)")
    validate_check(config.check, f"{config.source}: [check]")
    r = config.sorting
    if r.render_timeout <= 0:
        raise ConfigError(f"{config.source}: [sorting] render_timeout must be above 0 seconds")
    if 0 < r.render_memory_mb < 256:
        raise ConfigError(f"{config.source}: [sorting] render_memory_mb must be at least 256 "
                          "(a healthy render process needs ~30 MB of address space), or 0 "
                          "for no limit")
    if r.render_failures_pause < 0:
        raise ConfigError(f"{config.source}: [sorting] render_failures_pause must be 0 (never "
                          "pause) or more")
    _validate_webhooks(config)
    _validate_tracking(config)


def _validate_tracking(config: Config) -> None:
    t = config.tracking
    where = f"{config.source}: [tracking]"
    if t.base_url:
        m = re.fullmatch(r"https?://[^/\s?#]+(/[^\s?#]*)?", t.base_url)
        if m is None:
            raise ConfigError(f"{where} base_url = {t.base_url!r} must be an http(s) URL "
                              "without query or fragment, e.g. https://lists.example.com")
    elif t.enabled:
        raise ConfigError(f"{where} enabled needs base_url: the address of the web app that "
                          "serves the unsubscribe links, e.g. https://lists.example.com")
    if t.flush_interval <= 0 or t.flush_rows < 1:
        raise ConfigError(f"{where} flush_interval must be above 0 and flush_rows at least 1")
    if t.machine_seconds < 0 or t.burst_seconds <= 0 or t.burst_links < 2:
        raise ConfigError(f"{where} need machine_seconds >= 0, burst_seconds > 0 and "
                          "burst_links >= 2")
    if t.max_links < 1:
        raise ConfigError(f"{where} max_links must be at least 1")


def validate_check(c: CheckConfig, where: str) -> None:
    """Thresholds that make sense: positive, and each warning at most its critical."""
    if c.stall_minutes <= 0 or c.deferred_minutes <= 0 or c.min_delivered < 0:
        raise ConfigError(f"{where} stall_minutes and deferred_minutes must be above 0, "
                          "min_delivered 0 or more")
    for what in ("bounce", "complaint"):
        warn, crit = getattr(c, f"{what}_warn"), getattr(c, f"{what}_crit")
        if not 0 <= warn <= crit:
            raise ConfigError(f"{where} need 0 <= {what}_warn <= {what}_crit (percent)")


def _validate_webhooks(config: Config) -> None:
    w = config.webhooks
    where = f"{config.source}: [webhooks]"
    if w.ses_enabled and not w.cert_host_patterns():
        raise ConfigError(f"{where} ses_enabled needs sns_cert_hosts (e.g. sns.*.amazonaws.com)")
    if w.sendgrid_enabled and not w.sendgrid_public_key:
        raise ConfigError(f"{where} sendgrid_enabled needs sendgrid_public_key: copy the "
                          "Verification Key from SendGrid's Signed Event Webhook settings")
    if w.mailgun_enabled and not w.mailgun_signing_key:
        raise ConfigError(f"{where} mailgun_enabled needs mailgun_signing_key: copy the HTTP "
                          "webhook signing key from Mailgun's Webhooks page")
    if w.mailgun_max_age < 1:
        raise ConfigError(f"{where} mailgun_max_age must be at least 1 second")
    if w.postmark_enabled and (len(w.postmark_user) < 1 or len(w.postmark_password) < 16):
        raise ConfigError(f"{where} postmark_enabled needs postmark_user and a postmark_password "
                          "of at least 16 characters (make one with: " + SECRET_RECIPE + ")")
