"""The database layer: the only place that opens connections and cursors.

Statements are looked up by name from sendsystem/sql/queries.sql. At start-up a role
calls :meth:`Database.prepare` with the statements it will run: the server
PREPAREs each one, so a schema that does not match fails at start with a
message naming the statement, not in the middle of a batch. The statements
then run through PyMySQL's client-side interpolation, which measured fastest
(one round trip; see bench/db_exec_bench.py and the README).

When MariaDB goes away, a single statement outside a transaction is retried
after reconnecting with capped back-off (logged once per outage); inside a
transaction the caller gets :class:`DatabaseUnavailable` and retries its
whole unit of work.

High availability: ``[database] host`` may list several nodes of a MariaDB
Galera cluster. A connection goes to the first node that answers within
``connect_timeout`` and is usable; when it is lost, the next attempt starts at
the following node (round robin), at once, and the capped back-off applies
only when every node has failed. A Galera node that is not Primary and
Synced (a minority partition, a joiner, a donor blocked by an rsync SST)
answers TCP but cannot serve us, so it counts as down, and so does error 1047
("WSREP has not yet prepared node") on a live connection. Certification
failures come back as 1213 and are retried like InnoDB deadlocks.

On Galera every session sets ``wsrep_sync_wait = 1`` (causal reads): a
SELECT first waits until the node has applied everything committed anywhere
in the cluster before it began. Galera's replication is synchronous only up
to certification; applying on the other nodes lags slightly, and a send
worker's main connection must see the outcomes its writer thread committed
(maybe through another node) or it would send those messages again. The
cost is one cluster round trip per read. Writes need no such wait: a write
based on a stale row conflicts at certification and is retried.
Auto-increment ids have gaps on Galera (each node hands out its own
residue); nothing in SendSystem assumes dense ids.

Dead hosts and partitions: a blackholed connection sends nothing, not even a
reset, so the long-running roles open theirs with ``read_timeout`` (and the
same write timeout): a request with no answer within it counts as a lost
connection. ``reconnects`` counts lost connections; it is the connection
*generation* the send worker's fence compares, since whatever it verified
before a loss may have changed while it was away.
"""

from __future__ import annotations

import contextlib
import logging
import math
import time
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any

import pymysql
import pymysql.cursors
from pymysql.constants import CLIENT, SERVER_STATUS

from ..config import DatabaseConfig, DbHost
from ..errors import DatabaseConflict, DatabaseUnavailable, SchemaError, UserError
from .queries import load_queries, load_value_columns, migrations, to_server_syntax

log = logging.getLogger(__name__)

SCHEMA_VERSION = 16
# Every table's, and every connection's (see _connect_node).
COLLATION = "utf8mb4_unicode_ci"
Params = Mapping[str, Any] | Sequence[Any] | None

# Client error codes that mean "the connection is gone", not "your SQL is wrong".
# 1047 is Galera's "WSREP has not yet prepared node for application use": the
# node left the Primary component, so this connection is as good as gone.
_CONNECTION_ERRNOS = {0, 1047, 1053, 1927, 2002, 2003, 2006, 2013, 2014, 2055, 4031}
# Refusals that every node would give alike: no point trying the next one.
_FINAL_CONNECT_ERRNOS = {1044, 1045, 1049}
# InnoDB gave up on a lock (deadlock, lock wait timeout): retry, do not die.
_CONFLICT_ERRNOS = {1205, 1213}
CONFLICT_RETRIES = 5
# Refusals of a migration's CREATE TRIGGER: no TRIGGER privilege (1142), or a
# binary log without SUPER / log_bin_trust_function_creators (1419, 1227).
_PRIVILEGE_ERRNOS = {1142, 1227, 1419}


def _is_connection_error(exc: BaseException) -> bool:
    if isinstance(exc, pymysql.err.InterfaceError):
        return True
    if isinstance(exc, pymysql.err.OperationalError | pymysql.err.InternalError):
        return bool(exc.args) and exc.args[0] in _CONNECTION_ERRNOS
    return isinstance(exc, ConnectionError | TimeoutError | BrokenPipeError)


class Database:
    """One connection to MariaDB, with named statements and reconnects.

    ``retry_for``: how long (seconds) to keep retrying an unreachable
    database before raising :class:`DatabaseUnavailable`; None retries until
    ``should_abort()`` says stop (the long-running roles).
    """

    def __init__(self, config: DatabaseConfig, *, retry_for: float | None = 10.0,
                 should_abort: Callable[[], bool] = lambda: False,
                 read_timeout: float | None = None) -> None:
        self.config = config
        self.retry_for = retry_for
        self.should_abort = should_abort
        self.read_timeout = read_timeout
        self._conn: pymysql.connections.Connection | None = None
        self._queries = load_queries()
        self._value_columns = load_value_columns()
        self._in_transaction = False
        self._outage_since: float | None = None
        # Lost connections so far: the connection generation (see module docstring).
        self.reconnects = 0
        self._hosts = config.hosts
        self._next = 0  # the node the next connection attempt starts at
        self.node: DbHost | None = None  # the node the open connection is on
        self.galera = False
        # The kept counts' slot of this connection's writes (see set_slot).
        self.slot: int | None = None

    @property
    def node_name(self) -> str | None:
        """``host:port`` of the node this process talks to (the last one it reached)."""
        return None if self.node is None else str(self.node)

    # -- connection ---------------------------------------------------------

    def _connect_node(self, node: DbHost, database: str | None
                      ) -> pymysql.connections.Connection:
        cfg = self.config
        # The connection's collation is the schema's (every table is
        # utf8mb4_unicode_ci). With the server's default for utf8mb4
        # (utf8mb4_general_ci), `status = 'active'` is not seen as fixing the
        # column, so an ORDER BY over (list_id, status, id) no longer follows
        # the index: `list export` read each chunk's index range to its end and
        # sorted it (0.74 s a chunk at ten million subscribers, 0.06 s with this).
        return pymysql.connect(
            host=node.host, port=node.port, user=cfg.user, password=cfg.password,
            database=database, charset="utf8mb4", collation=COLLATION, autocommit=True,
            binary_prefix=True,
            cursorclass=pymysql.cursors.DictCursor, connect_timeout=cfg.connect_timeout,
            client_flag=CLIENT.MULTI_STATEMENTS if database is None else 0,
            init_command="SET SESSION time_zone = '+00:00'",
            read_timeout=self.read_timeout if database is not None else None,
            write_timeout=self.read_timeout if database is not None else None,
        )

    def _unusable(self, conn: pymysql.connections.Connection) -> str | None:
        """Why this node cannot serve us (a Galera node not Primary and Synced), else None.

        Also sets the session up: the idle-transaction limit, and causal
        reads on Galera (see the module docstring).
        """
        with conn.cursor(pymysql.cursors.DictCursor) as cur:
            try:
                # A client that hangs or vanishes inside a transaction (a frozen
                # host keeps its TCP connection open) would hold its row locks,
                # the balancer lease's among them, for hours; the server drops
                # it after this many idle seconds instead.
                cur.execute(self.sql("db_idle_transaction_timeout"),
                            {"seconds": max(1, math.ceil(self.config.idle_transaction_timeout))})
            except pymysql.err.MySQLError as exc:
                if not exc.args or exc.args[0] != 1193:  # a server without the variable
                    raise
            if self.slot is not None:
                cur.execute(self.sql("db_session_slot"), {"slot": self.slot})
            try:
                cur.execute(self.sql("db_node_state"))
            except pymysql.err.MySQLError as exc:
                if exc.args and exc.args[0] == 1193:  # no @@wsrep_on: not MariaDB/Galera
                    self.galera = False
                    return None
                raise
            state: dict[str, Any] = cur.fetchone() or {}
            self.galera = bool(state.get("wsrep_on"))
            if not self.galera:
                return None
            if state.get("cluster_status") != "Primary" or state.get("ready") != "ON":
                return f"Galera node not in the Primary component ({state.get('cluster_status')})"
            if state.get("local_state") != "Synced":
                return f"Galera node is {state.get('local_state')}, not Synced"
            cur.execute(self.sql("db_causal_reads"))
        return None

    def _connect(self, database: str | None) -> pymysql.connections.Connection:
        """A connection to the first usable node, starting at ``_next`` (round robin)."""
        problems = []
        count = len(self._hosts)
        for step in range(count):
            index = (self._next + step) % count
            node = self._hosts[index]
            try:
                conn = self._connect_node(node, database)
            except pymysql.err.OperationalError as exc:
                if exc.args and exc.args[0] in _FINAL_CONNECT_ERRNOS:
                    raise
                problems.append(f"{node}: {exc.args[-1] if exc.args else exc}")
                continue
            try:
                why = self._unusable(conn)
            except pymysql.err.MySQLError as exc:
                why = str(exc.args[-1] if exc.args else exc)
            if why is not None:
                with contextlib.suppress(Exception):
                    conn.close()
                problems.append(f"{node}: {why}")
                continue
            if step or self.node not in (None, node):
                log.warning("database: now on node %s%s", node,
                            f" (skipped {'; '.join(problems)})" if problems else "")
            self._next = index
            self.node = node
            return conn
        raise pymysql.err.OperationalError(
            2003, "no database node answers: " + "; ".join(problems))

    def _ensure(self) -> pymysql.connections.Connection:
        if self._conn is None:
            try:
                self._conn = self._connect(self.config.name)
            except pymysql.err.OperationalError as exc:
                if exc.args and exc.args[0] == 1049:  # unknown database
                    raise SchemaError(
                        f"Database {self.config.name!r} does not exist on "
                        f"{self.config.host}. Run `sendsystem db init`."
                    ) from None
                if exc.args and exc.args[0] in (1044, 1045):
                    raise DatabaseUnavailable(
                        f"MariaDB refused user {self.config.user!r}: {exc.args[1]}. "
                        "Check [database] user/password or SENDSYSTEM_DB_USER/_PASSWORD."
                    ) from None
                raise
        return self._conn

    def close(self) -> None:
        if self._conn is not None:
            # Closing a dead socket may fail; there is nothing to do about it.
            with contextlib.suppress(Exception):
                self._conn.close()
            self._conn = None

    def set_slot(self, slot: int) -> None:
        """Write kept counts into ``slot`` (a role's worker id), on this connection
        and every one it reconnects with.

        The kept-count triggers (migration 014) spread each hot counter over
        slots so that two workers committing changes to one newsletter never
        wait for, or on Galera conflict on, one row; a worker's own id keeps
        its slot apart from every other worker's. Without it the connection id
        decides, which two workers may share.
        """
        self.slot = slot
        if self._conn is not None:
            self.execute("db_session_slot", {"slot": slot})

    def connection_id(self) -> int:
        return int(self.fetchval("connection_id") or 0)

    def _run(self, op: Callable[[pymysql.cursors.DictCursor], Any]) -> Any:
        delay = 0.2
        conflicts = 0
        while True:
            connected = self._conn is not None
            try:
                conn = self._ensure()
                with conn.cursor(pymysql.cursors.DictCursor) as cur:
                    result = op(cur)
                if self._outage_since is not None:
                    log.warning("database reachable again after %.1fs",
                                time.monotonic() - self._outage_since)
                    self._outage_since = None
                return result
            except pymysql.err.OperationalError as exc:
                if not exc.args or exc.args[0] not in _CONFLICT_ERRNOS:
                    if _is_connection_error(exc):
                        delay = self._lost(exc, connected, delay)
                        continue
                    raise
                conflicts += 1
                if self._in_transaction or conflicts > CONFLICT_RETRIES:
                    raise DatabaseConflict(f"{exc.args[1]} (the unit of work is retried)") \
                        from exc
                log.info("lock conflict (%s); retrying the statement", exc.args[1])
                time.sleep(0.05 * conflicts)
            except Exception as exc:
                if not _is_connection_error(exc):
                    raise
                delay = self._lost(exc, connected, delay)

    def _lost(self, exc: BaseException, connected: bool, delay: float) -> float:
        """Forget a dead connection (log once per outage), then wait or move on.

        A connection that was open and broke moves on to the next node at
        once; a failed attempt to connect to any node backs off first.
        Returns the next back-off delay.
        """
        node = self.node
        self.close()
        self.reconnects += 1
        if connected:
            self._next = (self._next + 1) % len(self._hosts)
        if self._outage_since is None:
            self._outage_since = time.monotonic()
            log.warning("database %s unreachable (%s); retrying%s",
                        node or self.config.host, exc,
                        " on the next node" if len(self._hosts) > 1 else "")
        if connected and len(self._hosts) > 1 and not self._in_transaction:
            return delay
        return self._wait(exc, delay)

    def _wait(self, exc: BaseException, delay: float) -> float:
        """Back off before reconnecting, or give up; returns the next delay."""
        if self._in_transaction:
            raise DatabaseUnavailable(f"database connection lost mid-transaction: {exc}") \
                from exc
        assert self._outage_since is not None
        waited = time.monotonic() - self._outage_since
        if (self.retry_for is not None and waited >= self.retry_for) or self.should_abort():
            raise DatabaseUnavailable(
                f"MariaDB at {self.config.host} is unreachable ({exc}); try again later."
            ) from exc
        time.sleep(delay)
        return min(delay * 2, 5.0)

    # -- named statements ---------------------------------------------------

    def sql(self, name: str) -> str:
        try:
            return self._queries[name]
        except KeyError:
            raise SchemaError(f"no statement named {name!r} in sendsystem/sql/queries.sql"
                              ) from None

    def execute(self, name: str, params: Params = None) -> int:
        """Run a statement; the number of rows it changed."""
        statement = self.sql(name)
        return int(self._run(lambda cur: cur.execute(statement, params)))

    def insert(self, name: str, params: Params = None) -> int:
        """Run an INSERT; the new row's AUTO_INCREMENT id."""
        statement = self.sql(name)

        def op(cur: pymysql.cursors.DictCursor) -> int:
            cur.execute(statement, params)
            return int(cur.lastrowid)
        return int(self._run(op))

    def executemany(self, name: str, rows: Sequence[Params]) -> int:
        """One statement over many parameter sets (multi-row INSERTs in one round trip)."""
        if not rows:
            return 0
        statement = self.sql(name)
        return int(self._run(lambda cur: cur.executemany(statement, rows) or 0))

    def execute_values(self, name: str, rows: Sequence[Sequence[Any]],
                       params: Mapping[str, Any] | None = None) -> int:
        """One statement for a whole chunk of rows: ``%(values)s`` becomes a row set.

        A chunk of per-row UPDATEs costs a round trip each, even through
        executemany (PyMySQL only folds INSERT ... VALUES); joining a
        ``SELECT .. UNION ALL SELECT ..`` row set keeps each statement's WHERE
        guard and measured 2.7x (5 KB bodies) to 6x (small rows) faster
        (bench/db_exec_bench.py, variant f). The columns are the statement's
        ``-- values:`` line in queries.sql.
        """
        if not rows:
            return 0
        statement = self.sql(name)
        columns = self._value_columns[name]

        def op(cur: pymysql.cursors.DictCursor) -> int:
            escape = cur.connection.escape
            literals = [[str(escape(v)) for v in row] for row in rows]
            first = ", ".join(f"{lit} AS `{col}`"
                              for lit, col in zip(literals[0], columns, strict=True))
            selects = [f"SELECT {first}", *(f"SELECT {', '.join(r)}" for r in literals[1:])]
            # The row set is already escaped; '%' must survive PyMySQL's own formatting.
            table = " UNION ALL ".join(selects).replace("%", "%%")
            return int(cur.execute(statement.replace("%(values)s", table), params))
        return int(self._run(op))

    def execute_rows(self, name: str, rows: Sequence[Sequence[Any]]) -> int:
        """One multi-row statement: ``%(rows)s`` becomes ``(v, ..), (v, ..)``; rows changed.

        For bulk writes too big for PyMySQL's ``executemany``, whose per-value
        escaping measured 11 µs a row (7 values), most of a 10,000,000-row
        import's client time. Strings are quoted here with two C-level
        ``str.replace`` calls (0.4 µs a row): inside a quoted literal the
        server needs only the backslash and the quote escaped ("MySQL
        requires only that backslash and the quote character used to quote
        the string in the query be escaped", the C API's documentation of
        mysql_real_escape_string; it escapes NUL, CR, LF and ^Z only for
        logs), and with ``NO_BACKSLASH_ESCAPES`` only the quote, doubled. The
        connection is utf8mb4, so no multi-byte character can swallow a
        backslash. Other types go through PyMySQL's own escaping. The
        columns, for the row width and for PREPARE, are the statement's
        ``-- values:`` line.
        """
        if not rows:
            return 0

        def op(cur: pymysql.cursors.DictCursor) -> int:
            # No parameters: PyMySQL leaves the text alone (no %-formatting).
            return int(cur.execute(self._with_rows(name, rows, cur.connection)))
        return int(self._run(op))

    def fetch_rows(self, name: str, rows: Sequence[Sequence[Any]]) -> list[dict[str, Any]]:
        """A query over a row set given as ``%(rows)s`` (quoted as in :meth:`execute_rows`)."""
        if not rows:
            return []

        def op(cur: pymysql.cursors.DictCursor) -> list[dict[str, Any]]:
            cur.execute(self._with_rows(name, rows, cur.connection))
            return list(cur.fetchall())
        return list(self._run(op))

    def _with_rows(self, name: str, rows: Sequence[Sequence[Any]],
                   conn: pymysql.connections.Connection) -> str:
        width = len(self._value_columns[name])
        status = int(getattr(conn, "server_status", 0) or 0)
        backslash = not status & SERVER_STATUS.SERVER_STATUS_NO_BACKSLASH_ESCAPES
        literals = []
        for row in rows:
            if len(row) != width:
                raise ValueError(f"{name}: a row of {len(row)} values, the statement "
                                 f"takes {width}")
            literals.append("(" + ",".join([_literal(v, backslash, conn) for v in row]) + ")")
        return self.sql(name).replace("%(rows)s", ",".join(literals))

    def fetchall(self, name: str, params: Params = None) -> list[dict[str, Any]]:
        statement = self.sql(name)

        def op(cur: pymysql.cursors.DictCursor) -> list[dict[str, Any]]:
            cur.execute(statement, params)
            return list(cur.fetchall())
        return list(self._run(op))

    def fetchone(self, name: str, params: Params = None) -> dict[str, Any] | None:
        rows = self.fetchall(name, params)
        return rows[0] if rows else None

    def fetchval(self, name: str, params: Params = None) -> Any:
        row = self.fetchone(name, params)
        return None if row is None else next(iter(row.values()))

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """A unit of work: committed at the end, rolled back on any error."""
        if self._in_transaction:
            raise RuntimeError("nested transactions are not supported")
        self._run(lambda cur: cur.execute("BEGIN"))
        self._in_transaction = True
        try:
            yield
            self._run(lambda cur: cur.execute("COMMIT"))
        except BaseException:
            self._in_transaction = False
            try:
                if self._conn is not None:
                    self._conn.rollback()
            except Exception:  # the connection may be gone; the server rolls back
                self.close()
            raise
        finally:
            self._in_transaction = False

    def prepare(self, names: Iterable[str]) -> None:
        """Have the server PREPARE each statement: a schema mismatch fails here, by name."""
        self.check_schema_version()
        for name in names:
            text = to_server_syntax(self.sql(name), self._value_columns.get(name, ()))

            def op(cur: pymysql.cursors.DictCursor, text: str = text) -> None:
                cur.execute("PREPARE sendsystem_check FROM %s", (text,))
                cur.execute("DEALLOCATE PREPARE sendsystem_check")
            try:
                self._run(op)
            except pymysql.err.MySQLError as exc:
                if _is_connection_error(exc):
                    raise
                raise SchemaError(
                    f"The database schema does not match statement {name!r}: "
                    f"{exc.args[-1] if exc.args else exc}. "
                    "Run `sendsystem db init` to create or upgrade the schema "
                    "(all servers must run the same SendSystem version)."
                ) from None

    def check_schema_version(self) -> int:
        try:
            version = self.fetchval("schema_version")
        except pymysql.err.ProgrammingError:
            version = None
        if version is None:
            raise SchemaError(
                f"Database {self.config.name!r} has no SendSystem schema. Run `sendsystem db init`."
            )
        if int(version) < SCHEMA_VERSION:
            raise SchemaError(
                f"Database schema is version {version}, this SendSystem needs {SCHEMA_VERSION}. "
                "Run `sendsystem db init` to upgrade it."
            )
        if int(version) > SCHEMA_VERSION:
            raise SchemaError(
                f"Database schema is version {version}, newer than this SendSystem "
                f"({SCHEMA_VERSION}). Upgrade SendSystem on this server."
            )
        return int(version)

    # -- lifecycle of the schema itself --------------------------------------

    def init_schema(self, *, up_to: int | None = None) -> tuple[int, int]:
        """Create the database if needed and apply missing migrations; (from, to) versions."""
        cfg = self.config
        with self._admin() as cur:
            cur.execute(
                f"CREATE DATABASE IF NOT EXISTS `{_ident(cfg.name)}` "
                f"CHARACTER SET utf8mb4 COLLATE {COLLATION}"
            )
            cur.execute(f"USE `{_ident(cfg.name)}`")
            cur.execute("SHOW TABLES LIKE 'schema_version'")
            current = 0
            if cur.fetchone():
                cur.execute("SELECT COALESCE(MAX(version), 0) AS v FROM schema_version")
                row = cur.fetchone()
                current = int(row["v"]) if row else 0
            start = current
            for version, path in migrations():
                if version <= current or (up_to is not None and version > up_to):
                    continue
                log.info("applying schema migration %s", path.name)
                try:
                    cur.execute(path.read_text(encoding="utf-8"))
                    while cur.nextset():
                        pass
                except pymysql.err.MySQLError as exc:
                    if exc.args and exc.args[0] in _PRIVILEGE_ERRNOS:
                        raise SchemaError(
                            f"Migration {path.name} was refused: {exc.args[-1]}. The user "
                            f"{cfg.user!r} needs the TRIGGER privilege on {cfg.name!r} (the "
                            "kept counts are maintained by triggers), and, when the server "
                            "writes a binary log, SUPER or BINLOG ADMIN, or the server "
                            "setting log_bin_trust_function_creators = 1. Grant it and run "
                            "`sendsystem db init` again.") from None
                    raise
                current = version
        return start, current

    @contextmanager
    def _admin(self) -> Iterator[pymysql.cursors.DictCursor]:
        """A cursor on a connection to the server itself (no database selected)."""
        cfg = self.config
        try:
            admin = self._connect(None)
        except pymysql.err.OperationalError as exc:
            raise DatabaseUnavailable(
                f"MariaDB is not reachable at {cfg.host} as {cfg.user!r}: "
                f"{exc.args[-1]}. Start it (`make test` and `make demo` do), or set "
                "[database] / SENDSYSTEM_DB_* to point at it."
            ) from None
        try:
            with admin.cursor(pymysql.cursors.DictCursor) as cur:
                yield cur
        finally:
            admin.close()

    @staticmethod
    def _schema_comment(cur: pymysql.cursors.DictCursor, name: str) -> str | None:
        """The database's COMMENT ('' when it has none), or None when it does not exist."""
        cur.execute("SELECT schema_comment FROM information_schema.schemata "
                    "WHERE schema_name = %s", (name,))
        row = cur.fetchone()
        return None if row is None else str(row["schema_comment"] or "")

    def create_database(self, comment: str) -> None:
        """Create the database afresh, marked with ``comment``; refuse to touch any other.

        The mark is the schema COMMENT: a database that exists with the same
        comment is one we created (dropped and created again); one with any
        other comment is somebody's data and raises :class:`UserError`.
        """
        name = _ident(self.config.name)
        with self._admin() as cur:
            existing = self._schema_comment(cur, name)
            if existing is not None:
                if existing != comment:
                    raise UserError(
                        f"Database {name!r} already exists and was not created by "
                        "`sendsystem demo`; it is left alone. Choose another name with "
                        "SENDSYSTEM_DB_NAME (or [database] name in the config).")
                cur.execute(f"DROP DATABASE `{name}`")
            cur.execute(f"CREATE DATABASE `{name}` CHARACTER SET utf8mb4 "
                        f"COLLATE {COLLATION} COMMENT %s", (comment,))

    def drop_database(self, comment: str) -> None:
        """Drop the database, but only if its schema COMMENT is ``comment``."""
        name = _ident(self.config.name)
        with self._admin() as cur:
            if self._schema_comment(cur, name) == comment:
                cur.execute(f"DROP DATABASE `{name}`")


def _literal(value: Any, backslash: bool, conn: pymysql.connections.Connection) -> str:
    """An SQL literal for :meth:`Database.execute_rows` (see there for why it is safe)."""
    if type(value) is str:
        if backslash:
            return "'" + value.replace("\\", "\\\\").replace("'", "\\'") + "'"
        return "'" + value.replace("'", "''") + "'"
    if value is None:
        return "NULL"
    if type(value) is int:
        return str(value)
    return str(conn.escape(value))


def _ident(name: str) -> str:
    if not name.replace("_", "").isalnum():
        raise SchemaError(f"database name {name!r} may only contain letters, digits and _")
    return name
