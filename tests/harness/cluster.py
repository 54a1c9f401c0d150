"""A simulated SendSystem cluster on this machine, for fault-injection tests.

* :class:`MariaDB`: a private ``mariadbd`` on a free 127.0.0.1 port with its
  own data directory, socket and pid file, so a test may stop it (SIGTERM, as
  an admin restarting the server would) and start it again on the same port
  and data, without touching the machine's server on 3306.
* :class:`Cluster`: one throw-away database on that server, a config file
  pointing at it, and the role processes as real subprocesses with distinct
  ``--name``s (each name stands for a server: its own lock file and journal).
  The processes themselves are the demo's (``sendsystem.demo.Cluster``): the
  same start, log and stop code that ``sendsystem demo`` and bench/ use.
* :class:`SmtpSink`: the demo's counting sink (by recipient and by
  Message-ID) plus a switch that refuses every recipient with 421 for as long
  as a test wants (a relay in trouble).
* :func:`account`: the final accounting of a newsletter, counted at the
  relays: lost recipients (never received, whatever state the database
  claims) and duplicates (deliveries beyond one per recipient).
"""

from __future__ import annotations

import dataclasses
import logging
import os
import pwd
import re
import secrets
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from collections import Counter
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Protocol

import pymysql
import pymysql.cursors

from sendsystem import demo, keptcounts
from sendsystem.config import Config, load_config
from sendsystem.db import Database
from sendsystem.demo import CountingSink

from .env import Env, write_config
from .helpers import query, wait_for

log = logging.getLogger(__name__)

MARIADBD = "/usr/sbin/mariadbd"
INSTALL_DB = "mariadb-install-db"
FINAL_STATES = ("sent", "skipped", "failed", "bounced", "cancelled")


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


# ------------------------------------------------------------------ MariaDB


class MariaDB:
    """A private mariadbd: ``start()``, ``stop()`` (SIGTERM and wait), ``start()`` again.

    Small on purpose (64 MB buffer pool, no performance schema): the tests
    need a server that restarts in about a second, not a fast one.
    """

    def __init__(self, root: Path, port: int | None = None) -> None:
        self.root = root
        self.datadir = root / "data"
        self.socket = root / "mariadb.sock"
        self.pid_file = root / "mariadb.pid"
        self.error_log = root / "mariadb.err"
        self.port = port or free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def settings(self) -> dict[str, object]:
        """The [database] keys (minus name) for write_config(..., db=...)."""
        return {"host": "127.0.0.1", "port": self.port, "user": "root", "password": ""}

    def install(self) -> None:
        if (self.datadir / "mysql").is_dir():
            return
        self.root.mkdir(parents=True, exist_ok=True)
        installer = shutil.which(INSTALL_DB) or shutil.which("mysql_install_db")
        if installer is None or not Path(MARIADBD).exists():
            raise RuntimeError(f"{MARIADBD} / {INSTALL_DB} not found: install mariadb-server")
        out = subprocess.run(
            [installer, "--no-defaults", f"--datadir={self.datadir}", "--user=root",
             "--auth-root-authentication-method=normal", "--skip-test-db",
             "--skip-name-resolve"],
            capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{installer} failed: {out.stdout}\n{out.stderr}")

    def start(self, timeout: float = 60) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.install()
        args = [MARIADBD, "--no-defaults", "--user=root", f"--datadir={self.datadir}",
                f"--socket={self.socket}", f"--pid-file={self.pid_file}",
                f"--port={self.port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
                f"--log-error={self.error_log}", "--performance-schema=OFF",
                "--innodb-buffer-pool-size=64M", "--innodb-log-file-size=16M",
                "--key-buffer-size=8M", "--max-connections=200",
                # Durable commits like production: a restart must not lose
                # what the workers were told was committed.
                "--innodb-flush-log-at-trx-commit=1"]
        with open(self.root / "mariadbd.out", "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._answers, timeout, f"private mariadbd on port {self.port}", 0.1)

    def _answers(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            tail = self.error_log.read_text(errors="replace")[-2000:] \
                if self.error_log.exists() else ""
            raise RuntimeError(f"mariadbd exited with {self.proc.returncode}:\n{tail}")
        try:
            pymysql.connect(**self.settings, connect_timeout=1).close()  # type: ignore[arg-type]
        except pymysql.err.MySQLError:
            return False
        return True

    def stop(self, timeout: float = 60) -> None:
        """A clean shutdown (SIGTERM), waiting until the process is gone."""
        if self.proc is None or self.proc.poll() is not None:
            self.proc = None
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.proc = None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def connect(self, database: str | None = None) -> pymysql.connections.Connection:
        return pymysql.connect(**self.settings, database=database,  # type: ignore[arg-type]
                               autocommit=True, cursorclass=pymysql.cursors.DictCursor,
                               init_command="SET SESSION time_zone = '+00:00'")


# ------------------------------------------------------------------- Galera


GALERA_PROVIDER = Path("/usr/lib/galera/libgalera_smm.so")


def galera_missing() -> str | None:
    """Why a Galera cluster cannot run here, or None when it can."""
    for path, package in ((GALERA_PROVIDER, "galera-4"), (Path(MARIADBD), "mariadb-server")):
        if not path.exists():
            return f"{path} not found: install Debian's {package} (`make test` does)"
    for program, package in (("rsync", "rsync"), ("ss", "iproute2")):
        if shutil.which(program) is None:
            return f"{program} not found (state transfer needs it): install {package} " \
                   "(`make test` does)"
    try:
        pwd.getpwnam("mysql")
    except KeyError:
        return "no `mysql` user (mariadb-server creates it)"
    return None


class GaleraNode(MariaDB):
    """One node of a private Galera cluster on loopback.

    Runs as the ``mysql`` user, because the rsync SST daemon the joiner
    starts serves the data directory as that user; everything lives under a
    root directory that user owns. Four free ports: SQL, gcomm (group
    communication), IST and SST. Small buffers and gcache: the machine is
    shared and two cores.
    """

    def __init__(self, root: Path, index: int, peers: list[int] | None = None) -> None:
        super().__init__(root)
        self.index = index
        self.name = f"node{index}"
        self.gcomm_port = free_port()
        self.ist_port = free_port()
        self.sst_port = free_port()
        self.peers: list[int] = peers or []  # every node's gcomm port, set by Galera

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def install(self) -> None:
        if (self.datadir / "mysql").is_dir():
            return
        # Its own tmpdir: bootstraps running at once (other test runs on a
        # shared machine) collided on temporary table names in /tmp.
        (self.root / "tmp").mkdir(parents=True, exist_ok=True)
        _chown_mysql(self.root)
        installer = shutil.which(INSTALL_DB) or shutil.which("mysql_install_db")
        if installer is None:
            raise RuntimeError(f"{INSTALL_DB} not found: install mariadb-server")
        out = subprocess.run(
            [installer, "--no-defaults", f"--datadir={self.datadir}", "--user=mysql",
             f"--tmpdir={self.root / 'tmp'}",
             "--auth-root-authentication-method=normal", "--skip-test-db",
             "--skip-name-resolve"],
            capture_output=True, text=True, timeout=120)
        if out.returncode != 0:
            raise RuntimeError(f"{installer} failed: {out.stdout}\n{out.stderr}")
        _chown_mysql(self.root)

    def recover_position(self) -> str | None:
        """The last committed position (uuid:seqno) of a node that crashed.

        A SIGKILLed node's grastate.dat says seqno -1; without its real
        position it would need a full SST (rsync blocks the donor meanwhile)
        instead of an IST of what it missed. So, like the galera_recovery
        step of Debian's systemd unit, run ``mariadbd --wsrep-recover`` first.
        """
        grastate = self.datadir / "grastate.dat"
        if not grastate.exists() or "seqno:   -1" not in grastate.read_text():
            return None
        log_path = self.root / "wsrep-recover.err"
        log_path.unlink(missing_ok=True)
        out = subprocess.run([*self._server_args(), "--wsrep-recover", "--skip-networking",
                              f"--log-error={log_path}"],
                             capture_output=True, text=True, timeout=120, check=False)
        text = log_path.read_text(errors="replace") if log_path.exists() else ""
        found = re.search(r"WSREP: Recovered position: (\S+:-?\d+)", text)
        if found is None:
            log.warning("wsrep-recover of %s found no position (exit %s): %s %s", self.name,
                        out.returncode, (out.stdout + out.stderr)[-2000:], text[-2000:])
        return found.group(1) if found else None

    def _server_args(self) -> list[str]:
        cluster = ",".join(f"127.0.0.1:{p}" for p in self.peers)
        provider_options = "; ".join((
            f"gmcast.listen_addr=tcp://127.0.0.1:{self.gcomm_port}",
            f"ist.recv_addr=127.0.0.1:{self.ist_port}",
            "gcache.size=64M", "gcache.page_size=16M",
            # A SIGKILLed peer is declared gone (and commits, which wait for
            # it until then, go on) after suspect_timeout: 3 s instead of 5 s.
            # The other EVS timeouts stay at their defaults: with an
            # inactive_timeout of 4 s a slow-starting joiner on this shared
            # machine was declared inactive mid-join, and the survivors lost
            # the Primary component for 6 s.
            "evs.suspect_timeout=PT3S",
        ))
        return [MARIADBD, "--no-defaults", "--user=mysql", f"--datadir={self.datadir}",
                f"--socket={self.socket}", f"--pid-file={self.pid_file}",
                f"--tmpdir={self.root / 'tmp'}",
                f"--port={self.port}", "--bind-address=127.0.0.1", "--skip-name-resolve",
                f"--log-error={self.error_log}", "--performance-schema=OFF",
                "--innodb-buffer-pool-size=48M", "--innodb-log-file-size=16M",
                "--key-buffer-size=8M", "--max-connections=200",
                "--innodb-flush-log-at-trx-commit=1",
                "--wsrep-on=ON", f"--wsrep-provider={GALERA_PROVIDER}",
                f"--wsrep-cluster-address=gcomm://{cluster}",
                "--wsrep-cluster-name=sendsystem_test", f"--wsrep-node-name={self.name}",
                f"--wsrep-node-address=127.0.0.1:{self.gcomm_port}",
                f"--wsrep-provider-options={provider_options}",
                "--wsrep-sst-method=rsync",
                f"--wsrep-sst-receive-address=127.0.0.1:{self.sst_port}",
                "--binlog-format=ROW", "--innodb-autoinc-lock-mode=2",
                "--default-storage-engine=InnoDB"]

    def start(self, timeout: float = 90, *, bootstrap: bool = False) -> None:
        if self.proc is not None and self.proc.poll() is None:
            return
        self.install()
        position = None if bootstrap else self.recover_position()
        args = self._server_args()
        if bootstrap:
            args.append("--wsrep-new-cluster")
        if position is not None:
            args.append(f"--wsrep-start-position={position}")
        with open(self.root / "mariadbd.out", "ab") as out:
            self.proc = subprocess.Popen(args, stdout=out, stderr=subprocess.STDOUT)
        wait_for(self._answers, timeout, f"Galera {self.name} on port {self.port} synced", 0.2)

    def state_transfer(self) -> str:
        """How the node last rejoined: 'IST' (only the missed writes), 'SST' (a full
        copy of a donor's data directory) or '' (it never joined a running cluster)."""
        text = self.error_log.read_text(errors="replace") if self.error_log.exists() else ""
        tail = text[text.rfind("State transfer required"):] if "State transfer required" \
            in text else ""
        if "rsync SST completed on joiner" in tail:
            return "SST"
        return "IST" if "IST received" in tail else ""

    def _answers(self) -> bool:
        if not super()._answers():
            return False
        return self.wsrep_status().get("wsrep_local_state_comment") == "Synced"

    def wsrep_status(self) -> dict[str, str]:
        conn = self.connect()
        try:
            with conn.cursor() as cur:
                cur.execute("SHOW GLOBAL STATUS LIKE 'wsrep%%'")
                return {r["Variable_name"]: str(r["Value"]) for r in cur.fetchall()}
        finally:
            conn.close()

    def kill(self) -> None:
        """SIGKILL: the node's machine dies; its clients' connections break."""
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL)
            self.proc.wait()
        self.proc = None


def _chown_mysql(path: Path) -> None:
    user = pwd.getpwnam("mysql")
    for folder, _dirs, files in os.walk(path):
        os.chown(folder, user.pw_uid, user.pw_gid)
        for f in files:
            os.chown(os.path.join(folder, f), user.pw_uid, user.pw_gid)


class Galera:
    """A private 3-node Galera cluster on loopback: ``start()``, ``stop()``, ``nodes``.

    The root is a fresh directory under /tmp that the ``mysql`` user can
    reach (pytest's own tmp folders are root-only); ``stop()`` removes it.
    """

    def __init__(self, size: int = 3) -> None:
        self.root = Path(tempfile.mkdtemp(prefix="sendsystem-galera-"))
        os.chmod(self.root, 0o755)
        self.nodes = [GaleraNode(self.root / f"node{i}", i) for i in range(1, size + 1)]
        ports = [n.gcomm_port for n in self.nodes]
        for n in self.nodes:
            n.peers = ports

    def start(self) -> None:
        self.nodes[0].start(bootstrap=True)
        for node in self.nodes[1:]:
            node.start()

    def host_list(self, first: int = 0) -> str:
        """The [database] host value: every node, starting with node ``first``."""
        order = self.nodes[first:] + self.nodes[:first]
        return ", ".join(n.address for n in order)

    @property
    def settings(self) -> dict[str, object]:
        """[database] keys for a Cluster's config: the whole host list."""
        return {"host": self.host_list(0), "port": 3306, "user": "root", "password": ""}

    def connect(self, database: str | None = None) -> pymysql.connections.Connection:
        """A connection to the first running node (the tests' look at the database)."""
        problems = []
        for node in self.nodes:
            if not node.running:
                continue
            try:
                return node.connect(database)
            except pymysql.err.MySQLError as exc:
                problems.append(f"{node.name}: {exc}")
        raise RuntimeError(f"no Galera node answers: {problems}")

    def stop(self, keep_logs: Path | None = None) -> None:
        """Stop every node and remove the root; copy the error logs to ``keep_logs`` first."""
        for node in reversed(self.nodes):
            node.stop()
        if keep_logs is not None:
            keep_logs.mkdir(parents=True, exist_ok=True)
            for node in self.nodes:
                if node.error_log.exists():
                    shutil.copy(node.error_log, keep_logs / f"{node.name}.err")
        shutil.rmtree(self.root, ignore_errors=True)


# -------------------------------------------------------------------- SMTP


class SmtpSink(CountingSink):
    """The demo's counting sink (by recipient and Message-ID) plus a switch that
    refuses every recipient (e.g. 421) for as long as a test wants."""

    def __init__(self, port: int = 0) -> None:
        super().__init__(port)
        self._refusal: str | None = None
        self._refused = 0
        self._accepted_at: list[float] = []

    def accepted(self, recipients: list[str], message_id: str) -> None:
        with self.tally.lock:
            self._accepted_at.append(time.time())

    @property
    def accepted_at(self) -> list[float]:
        """time.time() of each accepted message, in order (comparable with logs)."""
        with self.tally.lock:
            return list(self._accepted_at)

    def rcpt_reply(self, address: str) -> str | None:
        with self.tally.lock:
            if self._refusal is not None:
                self._refused += 1
            return self._refusal

    def refuse_all(self, reply: str | None = "421 4.3.2 Service not available, try later"
                   ) -> None:
        """Refuse every recipient with ``reply`` from now on; None accepts again."""
        with self.tally.lock:
            self._refusal = reply

    @contextmanager
    def refusing(self, reply: str = "421 4.3.2 Service not available, try later"
                 ) -> Iterator[None]:
        self.refuse_all(reply)
        try:
            yield
        finally:
            self.refuse_all(None)

    @property
    def refused(self) -> int:
        with self.tally.lock:
            return self._refused

    def count_by_recipient(self) -> Counter[str]:
        return self.counts()

    def count_by_message_id(self) -> Counter[str]:
        return self.counts_by_message_id()


# ------------------------------------------------------------------ cluster


ROLE_OF = {"sort-worker": "sort", "send-worker": "send",
           "sort-balancer": "sort-balancer", "send-balancer": "send-balancer"}


class Server(Protocol):
    """What a Cluster needs of its database: a MariaDB, or a Galera cluster."""

    @property
    def settings(self) -> dict[str, object]: ...

    def connect(self, database: str | None = None) -> pymysql.connections.Connection: ...


class Cluster(demo.Cluster):
    """One test's cluster: a fresh database on the private server, its config file,
    and role processes started one by one (:meth:`spawn`, the demo's process
    management), each ``--name`` standing for a server."""

    def __init__(self, server: Server, tmp: Path, db_name: str | None = None,
                 overrides: dict[str, dict[str, object]] | None = None) -> None:
        self.server = server
        self.tmp = tmp
        self.db_name = db_name or f"cluster_{secrets.token_hex(4)}"
        self.overrides = overrides or {}
        self.path = tmp / "config.ini"
        self._write()
        super().__init__(self.path, [], tmp, log_level=None)
        Database(self.config.database).init_schema()
        self.db = Database(self.config.database)

    # -- configuration -----------------------------------------------------------

    def _write(self) -> None:
        write_config(self.path, self.db_name, overrides=self.overrides,
                     db=self.server.settings)
        self.config: Config = load_config(self.path)

    def configure(self, **overrides: dict[str, object]) -> None:
        """Merge these per-section overrides into the config file (for later processes)."""
        self.overrides = demo.with_overrides(self.overrides, overrides)
        self._write()

    def variant(self, label: str, **overrides: dict[str, object]) -> Path:
        """A config file like this cluster's with some keys changed (e.g. one server's
        database port behind a proxy, or its own relay), for spawn(..., config=)."""
        settings = demo.with_overrides(self.overrides, overrides)
        db = {**self.server.settings, **settings.pop("database", {})}
        return write_config(self.tmp / f"config-{label}.ini", self.db_name,
                            overrides=settings, db=db)

    def use_relays(self, *sinks: SmtpSink, **sending: object) -> None:
        relays = ", ".join(str(s.relay) for s in sinks)
        self.configure(sending={"relays": relays, "relay_backoff_min": 0.5,
                                "relay_backoff_max": 2, **sending})

    @property
    def env(self) -> Env:
        """A tests.harness.env.Env over this cluster, for tests.harness.helpers.make_newsletter."""
        return Env(path=self.path, config=self.config, db=self.db, tmp=self.tmp)

    def cli(self, *args: str, timeout: float = 60) -> tuple[int, str, str]:
        return self.env.cli(*args, timeout=timeout)

    def close(self) -> None:
        self.stop()
        self.db.close()

    # -- looking at the database ------------------------------------------------

    def sql(self, statement: str, params: Any = None) -> list[dict[str, Any]]:
        return query(self.server.connect(self.db_name), statement, params)

    def states(self, newsletter_id: int) -> dict[str, int]:
        rows = self.sql("SELECT state, COUNT(*) AS n FROM messages WHERE newsletter_id = %s "
                        "GROUP BY state", (newsletter_id,))
        return {r["state"]: int(r["n"]) for r in rows}

    def kept_count_differences(self, host: str | None = None) -> list[keptcounts.Difference]:
        """Where the kept counts differ from COUNT(*) over the rows (keptcounts.verify),
        through the cluster's database, or through one node (``host``: host:port)."""
        config = self.config.database if host is None else \
            dataclasses.replace(self.config.database, host=host)
        db = Database(config, retry_for=30)
        try:
            return keptcounts.verify(db)
        finally:
            db.close()

    def assert_kept_counts(self, host: str | None = None) -> None:
        """The invariant every scenario ends with: kept counts == the rows."""
        differences = self.kept_count_differences(host)
        assert not differences, "kept counts differ from the message rows: " + \
            "; ".join(map(str, differences))

    def finished(self, newsletter_id: int) -> bool:
        """Every message of the newsletter is in a final state."""
        s = self.states(newsletter_id)
        return bool(s) and all(k in FINAL_STATES for k in s)

    def worker(self, command_or_role: str, name: str) -> dict[str, Any] | None:
        role = ROLE_OF.get(command_or_role, command_or_role)
        rows = self.sql("SELECT *, TIMESTAMPDIFF(MICROSECOND, heartbeat_at, NOW(6)) / 1e6 "
                        "AS age FROM workers WHERE name = %s AND role = %s", (name, role))
        return rows[0] if rows else None

    def backlog(self, command_or_role: str, name: str) -> int:
        """Messages in the worker's assigned batches right now (not its last heartbeat)."""
        role = ROLE_OF.get(command_or_role, command_or_role)
        rows = self.sql("SELECT COUNT(m.id) AS n FROM workers w "
                        "JOIN batches b ON b.worker_id = w.id AND b.state = 'assigned' "
                        "JOIN messages m ON m.batch_id = b.id "
                        "WHERE w.name = %s AND w.role = %s", (name, role))
        return int(rows[0]["n"]) if rows else 0

    def shares(self, newsletter_id: int, column: str) -> dict[str, int]:
        """Messages per worker name (``column``: sort_worker_id or send_worker_id)."""
        assert column in ("sort_worker_id", "send_worker_id")
        rows = self.sql(f"SELECT w.name, COUNT(*) AS n FROM messages m JOIN workers w "
                        f"ON w.id = m.{column} WHERE m.newsletter_id = %s GROUP BY w.name",
                        (newsletter_id,))
        return {r["name"]: int(r["n"]) for r in rows}

    def block_outcome_writes(self, newsletter_id: int, what: str
                             ) -> tuple[pymysql.connections.Connection, int]:
        """Lock the rows send workers hold (FOR UPDATE in an open transaction) and wait
        until a send worker's outcome write waits on that lock.

        Returns the blocking connection (roll it back to release the rows) and the
        server thread id of the waiting writer (to KILL its connection)."""
        held = [r["id"] for r in self.sql(
            "SELECT id FROM messages WHERE newsletter_id = %s AND state = 'merged' "
            "AND batch_id IS NOT NULL", (newsletter_id,))]
        blocker = self.server.connect(self.db_name)
        with blocker.cursor() as cur:
            cur.execute("BEGIN")
            cur.execute("SELECT id FROM messages WHERE id IN %s FOR UPDATE", (held,))

        def flush_waiting() -> list[dict[str, Any]]:
            return self.sql(
                "SELECT t.trx_mysql_thread_id AS thread FROM information_schema.INNODB_TRX t "
                "JOIN information_schema.PROCESSLIST p ON p.ID = t.trx_mysql_thread_id "
                "WHERE t.trx_state = 'LOCK WAIT' AND p.INFO LIKE %s", ("%state = 'sent'%",))
        waiting = wait_for(flush_waiting, 10, what, 0.02)
        return blocker, int(waiting[0]["thread"])

    def merge_all(self, newsletter_id: int, timeout: float = 60) -> None:
        """Run the SortingSystem once (unlimited) so a send test starts from merged rows."""
        procs = [self.spawn("sort-balancer", "merge-b", "--once"),
                 self.spawn("sort-worker", "merge-w", "--once")]
        for p in procs:
            assert p.wait(timeout) == 0, p.log()
        assert set(self.states(newsletter_id)) == {"merged"}, self.states(newsletter_id)


# --------------------------------------------------------------- accounting


@dataclass(frozen=True)
class Accounting:
    """What became of one newsletter, counted at the relays.

    ``lost`` is a recipient no relay ever received, whatever the database
    says about it: a message wrongly marked failed, skipped or cancelled is
    as lost as one stuck in no final state. (Every cluster scenario expects
    every recipient delivered; the database states are kept for diagnosis.)
    """

    recipients: int
    states: dict[str, int]
    undelivered: int  # recipients no relay ever received: the lost ones
    not_final: int  # message rows in no final state (diagnosis)
    never_delivered: int  # marked sent, but no relay ever received it (diagnosis)
    wrongly_final: int  # failed/skipped/cancelled/bounced, never received (diagnosis)
    duplicates: int  # deliveries beyond one per recipient
    duplicate_message_ids: int  # the same, counted by Message-ID header
    strangers: int  # deliveries to addresses that are not recipients of the newsletter
    delivered: int

    @property
    def lost(self) -> int:
        return self.undelivered

    def summary(self) -> str:
        return (f"recipients={self.recipients} delivered={self.delivered} lost={self.lost} "
                f"(not final {self.not_final}, sent but never received "
                f"{self.never_delivered}, other final state but never received "
                f"{self.wrongly_final}) duplicates={self.duplicates} "
                f"(by Message-ID {self.duplicate_message_ids}) states={self.states}")


def account(cluster: Cluster, newsletter_id: int, *sinks: SmtpSink) -> Accounting:
    rows = cluster.sql("SELECT s.email, m.state FROM messages m JOIN subscribers s "
                       "ON s.id = m.subscriber_id WHERE m.newsletter_id = %s",
                       (newsletter_id,))
    by_rcpt: Counter[str] = Counter()
    by_id: Counter[str] = Counter()
    for sink in sinks:
        by_rcpt.update(sink.count_by_recipient())
        by_id.update(sink.count_by_message_id())
    emails = {r["email"] for r in rows}
    unseen = [r for r in rows if by_rcpt[r["email"]] == 0]
    result = Accounting(
        recipients=len(rows),
        states=dict(Counter(r["state"] for r in rows)),
        undelivered=len(unseen),
        not_final=sum(r["state"] not in FINAL_STATES for r in rows),
        never_delivered=sum(r["state"] == "sent" for r in unseen),
        wrongly_final=sum(r["state"] in FINAL_STATES and r["state"] != "sent" for r in unseen),
        duplicates=sum(n - 1 for e, n in by_rcpt.items() if e in emails and n > 1),
        duplicate_message_ids=sum(n - 1 for n in by_id.values() if n > 1),
        strangers=sum(n for e, n in by_rcpt.items() if e not in emails),
        delivered=sum(by_rcpt.values()),
    )
    print(f"accounting: {result.summary()}")
    return result
